"""Zero-shot segmentation of any picture with StableSeg.

    python -m stableseg_pp.segment photo.jpg --classes "red car,blue car" --out masks/

Writes ``<name>_mask.png`` (palette PNG: 0 = background, i = i-th class) and
``<name>_overlay.png`` per image. The miniature model is the default; any
SD 1.x/2.x diffusers folder or hub id works with ``--model``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from stableseg_pp.data.files import BadInputError, load_rgb
from stableseg_pp.data.palette import save_palette_png
from stableseg_pp.data.segmentation import to_model_pixels
from stableseg_pp.diffusion.backbone import load_unet_backbone
from stableseg_pp.models.stableseg import MODES, StableSeg, resize_scores
from stableseg_pp.models.zero_shot_module import DTYPES
from stableseg_pp.pipeline.atomic import atomic_save, atomic_write_text
from stableseg_pp.pipeline.writers import overlay_png

log = logging.getLogger("stableseg_pp.segment")

# Backbone defaults, as in configs/diffusion/*.yaml.
PRESETS = {"miniature": {"resolution": 64, "mode": "ca+sa"}}


def parse_classes(text: str) -> list[str]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise SystemExit("--classes: give at least one class name, comma-separated")
    if len(set(names)) != len(names):
        raise SystemExit(f"--classes: a class is named twice in {names}")
    return names


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--classes", required=True, help='comma-separated class names, e.g. "red car,blue car"')
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="miniature", help="miniature (default), a diffusers folder, or a hub id")
    p.add_argument("--resolution", type=int, default=None, help="model input side (default: 64 miniature, 512 otherwise)")
    p.add_argument("--mode", choices=MODES, default=None, help="ca | sa | ca+sa (default: ca miniature, ca+sa otherwise)")
    p.add_argument("--cross-scales", default="8,16")
    p.add_argument("--self-scales", default="all")
    p.add_argument("--background-threshold", type=float, default=0.55)
    p.add_argument("--prompt-template", default="a photo of a {}")
    p.add_argument("--timestep", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--convert-to-rgb", action="store_true", help="accept RGBA / greyscale images by converting them")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    classes = parse_classes(args.classes)
    preset = PRESETS.get(args.model, {"resolution": 512, "mode": "ca+sa"})
    scales = lambda s: s if s == "all" else [int(x) for x in s.split(",")]  # noqa: E731
    backbone = load_unet_backbone(args.model, dtype=DTYPES[args.dtype])
    seg = StableSeg(
        backbone,
        resolution=args.resolution or preset["resolution"],
        cross_scales=scales(args.cross_scales),
        self_scales=scales(args.self_scales),
        mode=args.mode or preset["mode"],
        timestep=args.timestep,
        background_threshold=args.background_threshold,
        prompt_template=args.prompt_template,
    ).to(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in args.images:
        try:
            image = load_rgb(path, convert=args.convert_to_rgb)
        except BadInputError as err:
            raise SystemExit(str(err)) from err
        pixels = to_model_pixels(image, seg.resolution)[None].to(args.device)
        out = seg(pixels, [classes])
        scores = resize_scores(out.scores.float(), image.shape[:2])[0]
        mask = scores.argmax(0).to(torch.uint8).cpu().numpy()
        stem = path.stem
        mask_path = atomic_save(args.out / f"{stem}_mask.png", lambda t, m=mask: save_palette_png(m, t))
        ov = overlay_png(image, mask, None)
        atomic_save(args.out / f"{stem}_overlay.png", lambda t, im=ov: im.save(t, format="PNG"))
        areas = {name: float((mask == i + 1).mean()) for i, name in enumerate(classes)}
        log.info("%s: %s", path, ", ".join(f"{k} {v:.1%}" for k, v in areas.items()))
        written.append(mask_path)
    legend = {"0": "background", **{str(i + 1): n for i, n in enumerate(classes)}}
    atomic_write_text(args.out / "classes.json", json.dumps(legend, indent=2))
    return written


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
