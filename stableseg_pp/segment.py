"""Zero-shot segmentation of any picture with StableSeg.

    python -m stableseg_pp.segment photo.jpg --classes "red car,blue car" --out masks/
    python -m stableseg_pp.segment photo.jpg --classes "cat,dog" --out masks/ diffusion=sd15 \\
        diffusion.pretrained=/models/stable-diffusion-v1-5 zero_shot.mode=ca --device cuda

Composes the same Hydra config as ``fit`` (``diffusion=<preset>`` and any
``key=value`` override after the images), so the backbone and the stage-0
settings have one set of defaults. Writes ``<name>_mask.png`` (palette PNG:
0 = background, i = i-th class) and ``<name>_overlay.png`` per image, and
``classes.json`` (the legend; a folder holds the masks of one class list).
The inputs, ``--out`` and the settings are checked before the model loads.
``data.*`` settings do not apply (the pictures come from the command line;
``--strict`` is the strict RGB mode).

Every class named gets a mask, whether or not the model knows the word: a
name its text encoder or its training never saw (for the built-in miniature
model, anything but the shapes of its world) still gets confident-looking
masks, with nothing to say they are wrong. Check a few results by eye.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from stableseg_pp.runtime.errors import ConfigError, UserError, report_errors

if TYPE_CHECKING:  # torch, diffusers and the model code load after the arguments are parsed (a quick --help)
    from omegaconf import DictConfig

    from stableseg_pp.backbones.base import DiffusionBackbone
    from stableseg_pp.methods.stableseg import StableSeg

log = logging.getLogger("stableseg_pp.segment")


def parse_classes(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise UserError("--classes: give at least one class name, comma-separated")
    if len(set(names)) != len(names):
        raise UserError(f"--classes: a class is named twice in {names}")
    return names


def split_overrides(items: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Positional arguments: image paths, and ``key=value`` config overrides (anything with '=' that is no file)."""
    images, overrides = [], []
    for item in items:
        if "=" in item and not Path(item).exists():
            overrides.append(item)
        else:
            images.append(Path(item))
    return images, overrides


def refuse_data_settings(overrides: Sequence[str]) -> None:
    """``data.*`` describes a dataset; ``segment`` reads the pictures named on its command line."""
    for item in overrides:
        if item.lstrip("+~").split("=")[0].split(".")[0] == "data":
            raise ConfigError(
                f"{item}: segment reads the pictures named on its command line, so data settings do not apply; "
                "leave it out (--strict refuses images that are not RGB)"
            )


def check_prompts(cfg: DictConfig, backbone: DiffusionBackbone, classes: list[str]) -> None:
    """Every class name fits a prompt of this backbone's text encoder (checked from its tokenizer, before weights)."""
    from stableseg_pp.stages.stage0 import check_prompt_names

    try:
        check_prompt_names(backbone, classes, cfg.zero_shot, has_background=True)  # segment's legend has background 0
    except LookupError:
        return  # a hub id not in the local cache: checked when it is loaded


def build_segmenter(cfg: DictConfig, device: str, backbone: DiffusionBackbone) -> StableSeg:
    """StableSeg on the configured backbone (loaded here), with the configured stage-0 settings."""
    from hydra.utils import instantiate

    from stableseg_pp.artifacts import SiteWeights

    backbone = backbone.load()
    learned = None
    if site_weights := cfg.stage0.get("site_weights"):
        learned = SiteWeights.load(site_weights)
        learned.check_family(backbone.family)
    make = instantiate(cfg.zero_shot)  # StableSeg from its config node, as stage 0 builds it
    # one picture at a time: no head maps to store (the stored sites stay: they are captured as in stage 0)
    return make(backbone, site_weights=None if learned is None else dict(learned.weights), store_head_maps=False).to(device)


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(
        prog="python -m stableseg_pp.segment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("inputs", nargs="+", help="image files, then optional key=value config overrides (as for fit)")
    p.add_argument("--classes", required=True, help='comma-separated class names, e.g. "red car,blue car"')
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default=None, help="shorthand for diffusion.pretrained= (a diffusers folder or hub id)")
    p.add_argument("--dtype", default=None, help="shorthand for diffusion.dtype= (float32, float16, bfloat16)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda where PyTorch sees a GPU)")
    p.add_argument("--strict", action="store_true", help="refuse images that are not RGB instead of converting them")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_intermixed_args(argv)  # images, options and overrides in any order
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return report_errors(lambda: segment(args), args.debug, "--debug", "stableseg_pp.segment")


def segment(args: argparse.Namespace) -> list[Path]:
    """Segment every readable input; the unreadable ones are listed at the end (exit code 2). Everything that can be
    checked without the model is checked first: classes, overrides, ``--out``, the prompt, every input."""
    classes = parse_classes(args.classes)
    images, overrides = split_overrides(args.inputs)
    if not images:
        raise UserError("give at least one image file before the key=value overrides")
    refuse_data_settings(overrides)
    import numpy as np
    import torch

    from stableseg_pp.artifacts import check_legend, check_output_folder, check_pictures, write_picture_masks
    from stableseg_pp.config import build, compose_checked
    from stableseg_pp.data.prompted_images import to_model_pixels
    from stableseg_pp.methods.stableseg import resize_scores
    from stableseg_pp.stages.stage0 import check_zero_shot_settings

    np.seterr(all="ignore")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    legend = {0: "background", **{i + 1: n for i, n in enumerate(classes)}}
    check_output_folder(args.out)
    check_legend(args.out, legend)
    if args.model:
        overrides.append(f"diffusion.pretrained={args.model}")
    if args.dtype:
        overrides.append(f"diffusion.dtype={args.dtype}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: this machine has no GPU that PyTorch can use; use --device cpu")
    cfg = compose_checked(overrides)
    check_zero_shot_settings(cfg)
    backbone = build(cfg.diffusion, _convert_="all")
    check_prompts(cfg, backbone, classes)
    pictures = check_pictures(images, args.strict)
    seg = build_segmenter(cfg, args.device, backbone)
    generator = torch.Generator(args.device).manual_seed(int(cfg.seed))

    def predict(image: np.ndarray) -> np.ndarray:
        pixels = to_model_pixels(image, seg.resolution)[None].to(args.device)
        out = seg(pixels, [classes], generator=generator)
        scores = resize_scores(out.scores.float(), image.shape[:2])[0]
        scores = scores.masked_fill(~out.valid[0, :, None, None], float("-inf"))
        return scores.argmax(0).to(torch.uint8).cpu().numpy()

    return write_picture_masks(pictures, args.out, legend, predict)


if __name__ == "__main__":
    main()
