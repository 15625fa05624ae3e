"""Every command line shown in README.md and docs/ works as written, at least as far as its arguments parse,
its configuration composes and its stage plan checks out (nothing is run): docs cannot drift from the code."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from stableseg_pp.config import compose_config
from stableseg_pp.data.description import describe_dataset
from stableseg_pp.data.layouts import DatasetLayoutError
from stableseg_pp.stages import check_segmenter, check_stage_splits, refinement, resolve_stages, stage_chain
from stableseg_pp.stages.emerdiff import check_emerdiff_settings
from stableseg_pp.stages.stage0 import check_backbone_settings, check_zero_shot_settings

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, fences paired in order."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every `python -m stableseg_pp...` line of a shell code block (continuations joined)."""
    found = []
    for doc in DOCS:
        for lang, block in fenced_blocks(doc.read_text()):
            if lang not in ("", "bash", "sh"):
                continue
            for line in block.replace("\\\n", " ").splitlines():
                if "python -m stableseg_pp." in line:
                    found.append((f"{doc.relative_to(REPO)}", line.strip()))
    return found


COMMANDS = documented_commands()


class Parsed(BaseException):  # not an Exception: passes the commands' one-line error reporting
    """Raised instead of running once a command's arguments have parsed."""


def _args(command: str) -> tuple[str, list[str]]:
    words = shlex.split(command.split("&&")[-1], comments=True)
    start = words.index("-m")
    return words[start + 1], words[start + 2 :]


def _user_config_dir(root: Path) -> Path:
    """The user config folder the docs write: docs/configs.md's my_shapes, and every ```yaml block of the docs whose
    first line names its file (``# my_configs/<group>/<name>.yaml``)."""
    folder = root / "my_configs" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "my_shapes.yaml").write_text("defaults:\n  - miniature\nname: my_shapes\nlimit: 3\n")
    for doc in DOCS:
        for lang, block in fenced_blocks(doc.read_text()):
            if lang == "yaml" and (m := re.match(r"# (my_configs/[\w/]+\.yaml)\n", block)):
                target = root / m.group(1)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(block)
    return root / "my_configs"


def _check_fit(args: list[str], root: Path) -> None:
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    if "--config-dir" in args:
        overrides.append(f"hydra.searchpath=[file://{_user_config_dir(root)}]")
    cfg = compose_config([*overrides, f"paths.root_dir={root}"])
    check_stage_splits(cfg.stage, list(cfg.stage0.splits))
    check_zero_shot_settings(cfg)
    check_segmenter(cfg.stage, cfg.stage0.segmenter)
    refinement.check_refine(cfg.refine)
    check_emerdiff_settings(cfg, refines=resolve_stages(cfg.stage) != ["0"])  # its site against the backbone
    assert stage_chain(cfg.stage)
    try:
        dataset = describe_dataset(cfg.data, list(cfg.stage0.splits))
    except DatasetLayoutError:
        return  # a real dataset (VOC, ...) is not on this machine: its layout is tested on fixtures
    if Path(cfg.diffusion.pretrained).is_absolute() and not Path(cfg.diffusion.pretrained).exists():
        return  # a placeholder for the user's own model folder
    if cfg.diffusion.get("lora") and not Path(str(cfg.diffusion.lora)).exists():
        return  # a placeholder for a step folder of the user's run
    check_backbone_settings(cfg, dataset)  # scales and prompt against the backbone (skipped for a hub id not cached)


def test_the_docs_show_commands():
    modules = {_args(c)[0] for _, c in COMMANDS}
    assert {"stableseg_pp.fit", "stableseg_pp.segment", "stableseg_pp.predict", "stableseg_pp.launch.slurm"} <= modules


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w}:{c[:70]}" for w, c in COMMANDS])
def test_documented_command(where, command, tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "docs-commands"  # one miniature world for all of them
    module, args = _args(command)
    if module == "stableseg_pp.fit":
        _check_fit(args, root)
        return
    if module == "stableseg_pp.launch.slurm":
        from stableseg_pp.launch import slurm

        monkeypatch.setenv("STABLESEG_HOME", str(root))
        options = [a for a in args if a.startswith("--")]
        assert set(options) <= {"--submit", "--dry-run", "--stages"}, options
        overrides = [a for a in args if "=" in a]
        scripts = slurm.write_scripts(overrides)
        assert [s.stem for s in scripts] == [f"stage{k}" for k in stage_chain(compose_config(overrides).stage)]
        return
    # argparse commands: the arguments must parse; stop before any work
    for method in ("parse_args", "parse_intermixed_args"):
        original = getattr(argparse.ArgumentParser, method)

        def parse_then_stop(self, argv=None, namespace=None, _original=original):
            raise Parsed(_original(self, argv, namespace))

        monkeypatch.setattr(argparse.ArgumentParser, method, parse_then_stop)
    entry = importlib.import_module(module if module != "stableseg_pp.bench" else "stableseg_pp.bench.__main__")
    with pytest.raises(Parsed) as parsed:
        entry.main(args)
    if module == "stableseg_pp.analyze":
        from stableseg_pp.analyze import analysis_config

        check_zero_shot_settings(analysis_config([*parsed.value.args[0].overrides, f"paths.root_dir={root}"]))
    if module == "stableseg_pp.segment":
        from stableseg_pp.segment import split_overrides

        _, overrides = split_overrides(parsed.value.args[0].inputs)
        cfg = compose_config(overrides)
        check_zero_shot_settings(cfg)
