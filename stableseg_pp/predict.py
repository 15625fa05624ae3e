"""Apply a trained DeepLabV3+ (the end product of stages 1-2) to new pictures, or export it.

    python -m stableseg_pp.predict outputs/miniature-miniature_sd/deeplab-<hash> photo.jpg --out masks/
    python -m stableseg_pp.predict outputs/.../deeplab-<hash> --export segmenter.pt2

The first argument is a DeepLabV3+ step folder (its ``checkpoints/last.ckpt``)
or a checkpoint file, read weights-only (no code in it runs; a file holding
other Python objects needs --trust-checkpoint). Writes ``<name>_mask.png``
(palette PNG of class ids), ``<name>_overlay.png`` and ``classes.json`` (the
legend). ``--export`` writes a ``torch.export`` program that needs only torch
(neither this package nor Lightning), with the class names, the training size
and the input convention stored in it; docs/guide.md has the five-line loader.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from stableseg_pp.runtime.errors import UserError, one_line, report_errors
from stableseg_pp.runtime.run_dir import final_checkpoint

if TYPE_CHECKING:  # torch and the model load after the arguments and inputs are checked
    import numpy as np

    from stableseg_pp.models.deeplab import DeepLabV3PlusModule

log = logging.getLogger("stableseg_pp.predict")


def find_checkpoint(path: Path) -> Path:
    """A checkpoint file, or a DeepLabV3+ step folder's ``checkpoints/last.ckpt``."""
    if path.is_file():
        return path
    ckpt = final_checkpoint(path)
    if path.is_dir() and ckpt.exists():
        return ckpt
    raise UserError(
        f"{path}: not a checkpoint file nor a DeepLabV3+ step folder with checkpoints/last.ckpt; give "
        "outputs/<run>/deeplab-<hash> (the folder of a finished stage 1 or 2) or a .ckpt file"
    )


def training_size(ckpt: Path) -> int | None:
    """The crop side a step folder's DeepLabV3+ was trained at (its ``key.json``); None for a bare checkpoint."""
    key = ckpt.parent.parent / "key.json"
    try:
        train = json.loads(key.read_text())["segmenter"]["train"]
        return int(train.get("crop_size") or train["base_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_segmenter(path: Path, device: str, trusted: bool = False) -> DeepLabV3PlusModule:
    """The trained module (its pretrained-encoder setting is ignored: the checkpoint holds every weight).

    The checkpoint is read with ``weights_only`` (tensors and plain values; no code in it runs) unless ``trusted``."""
    from stableseg_pp.models.deeplab import DeepLabV3PlusModule

    ckpt = find_checkpoint(path)
    try:
        module = DeepLabV3PlusModule.load_from_checkpoint(
            ckpt, map_location=device, encoder_weights=None, weights_only=not trusted
        )
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{ckpt}: holds Python objects besides weights and settings, which loading would run as code; if you "
            "trust the file (you made it, or its maker), add --trust-checkpoint"
        ) from err
    except (RuntimeError, KeyError, OSError, EOFError) as err:
        raise UserError(f"{ckpt}: not a DeepLabV3+ checkpoint of this package ({one_line(err)})") from err
    return module.eval().to(device)


def predict_mask(module: DeepLabV3PlusModule, image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 class ids, at the picture's own size (computed at a scale the training
    showed, :meth:`DeepLabV3PlusModule.predict_logits`)."""
    import torch

    from stableseg_pp.data.pairs import IMAGENET_MEAN, IMAGENET_STD

    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(module.device) / 255.0
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        logits = module.predict_logits((x - mean) / std)
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(
        prog="python -m stableseg_pp.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("segmenter", type=Path, help="a DeepLabV3+ step folder (deeplab-<hash>) or a .ckpt file")
    p.add_argument("images", nargs="*", type=Path)
    p.add_argument("--out", type=Path, help="folder for the masks (needed with images)")
    p.add_argument("--export", type=Path, help="write a torch.export program (.pt2) to this file")
    p.add_argument(
        "--export-size",
        type=int,
        default=None,
        help="the image side the export is traced and documented at (default: the training crop size)",
    )
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda where PyTorch sees a GPU)")
    p.add_argument("--strict", action="store_true", help="refuse images that are not RGB instead of converting them")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a checkpoint that holds Python objects besides weights (loading runs code from the file: only for "
        "files you trust); without it only tensors and plain values are read",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_intermixed_args(argv)  # images, options and overrides in any order
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return report_errors(lambda: run(args), args.debug, "--debug", "stableseg_pp.predict")


def run(args: argparse.Namespace) -> list[Path]:
    if not args.images and not args.export:
        raise UserError("give images to segment (with --out) and/or --export FILE")
    if args.images and not args.out:
        raise UserError("--out: give the folder for the masks")
    ckpt = find_checkpoint(args.segmenter)  # everything that needs no weights is checked before they load
    size = args.export_size or training_size(ckpt)
    if args.export and size is None:
        raise UserError(f"--export-size: {ckpt} is not in a DeepLabV3+ step folder, so its training size is unknown; give it")
    import torch

    from stableseg_pp.artifacts import check_legend, check_output_folder, check_pictures, write_picture_masks

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: this machine has no GPU that PyTorch can use; use --device cpu")
    pictures = None
    if args.images:
        check_output_folder(args.out)
        pictures = check_pictures(args.images, args.strict)
    if args.export:
        check_output_folder(args.export.parent, "--export")
        if args.export.is_dir():
            raise UserError(f"--export {args.export} is a folder: give the file to write, e.g. {args.export / 'segmenter.pt'}")
    module = load_segmenter(ckpt, args.device, args.trust_checkpoint)
    written: list[Path] = []
    if pictures is not None:
        legend = dict(enumerate(module.class_names))
        check_legend(args.out, legend)
    if args.export:
        from stableseg_pp.export import export_segmenter

        multiple = 2 ** int(module.hparams.encoder_depth)
        written.append(export_segmenter(module.model, module.class_names, args.export, size, multiple))
        log.info("exported %s: (B, 3, H, W) uint8 RGB -> class ids; H, W multiples of %d (trained at %d)", args.export,
                 multiple, size)  # fmt: skip
    if pictures is not None:
        predict = lambda im: predict_mask(module, im)  # noqa: E731
        written += write_picture_masks(pictures, args.out, legend, predict)
    return written


if __name__ == "__main__":
    main()
