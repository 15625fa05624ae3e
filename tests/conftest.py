"""Shared fixtures. Tests never touch the network: HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from stableseg_pp import artifacts  # noqa: E402
from stableseg_pp.backbones.sd_unet import MINIATURE_MODEL, SDUNetBackbone  # noqa: E402
from stableseg_pp.config import CONFIG_DIR  # noqa: E402
from stableseg_pp.miniature_sd.architecture import (  # noqa: E402
    build_noise_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def random_backbone(tmp_path_factory) -> SDUNetBackbone:
    """The miniature architecture with random weights: fast, for exactness tests."""
    torch.manual_seed(0)
    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    return SDUNetBackbone.from_components(
        build_vae().eval(), build_unet().eval(), build_text_encoder(tok).eval(), tok, build_noise_scheduler(), name="random"
    )


@pytest.fixture(scope="session")
def miniature_model() -> Path:
    if not (MINIATURE_MODEL / "model_index.json").exists():
        pytest.fail(f"the shipped miniature model is missing at {MINIATURE_MODEL}")
    return MINIATURE_MODEL


@pytest.fixture()
def compose_fit(tmp_path):
    """Compose the real `fit` config with overrides, writing into tmp_path."""

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(
                config_name="fit",
                overrides=[f"paths.root_dir={tmp_path}", "trainer.accelerator=cpu", *overrides],
            )

    return _compose


def file_stamps(folder: Path) -> dict[str, int]:
    """Relative path -> modification time of every file below ``folder``."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@contextmanager
def killed_after_records(monkeypatch, n: int) -> Iterator[list[str]]:
    """Within the block, stage-0-style writers die (``RuntimeError("killed")``) on the record after the first ``n``,
    as a killed run would; the block must end with that error. Yields the ids of the records written."""
    original = artifacts.MaskSetWriter.write_record
    written: list[str] = []

    def dying(self, record, layout):
        if len(written) == n:
            raise RuntimeError("killed")
        written.append(record.id)
        original(self, record, layout)

    monkeypatch.setattr(artifacts.MaskSetWriter, "write_record", dying)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            yield written
    finally:
        monkeypatch.setattr(artifacts.MaskSetWriter, "write_record", original)
