"""The pipeline in one picture: a few val images through the steps of a finished run, beside their ground truth.

    python -m stableseg_pp.figure --out docs/figures/pipeline.png
    python -m stableseg_pp.figure --out fig.png --images 6 diffusion=miniature_mmdit

The ``key=value`` overrides are ``fit``'s: they name the run (its folder and dataset), whose ``results.json``
(written by ``fit stage=all``) says which step folders to show: the stage-0 pseudo-masks, their refinement,
and the last DeepLabV3+ (StableSeg++).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from stableseg_pp.runtime.errors import UserError, report_errors

log = logging.getLogger("stableseg_pp.figure")


def steps_to_show(results: list[dict]) -> list[tuple[str, str]]:
    """(column title, step folder): the first row (stage-0 masks), the refined masks after it, and the last row."""
    chosen = [("pseudo-masks", results[0]["folder"])]
    if len(results) > 2 and results[1]["step"].startswith("init +"):
        chosen.append((results[1]["step"].removeprefix("init + ") + " masks", results[1]["folder"]))
    chosen.append(("DeepLabV3+ (" + ("++" if results[-1]["step"].startswith("++") else "+") + ")", results[-1]["folder"]))
    return chosen


def draw(overrides: list[str], out: Path, images: int, split: str) -> Path:
    import numpy as np
    from PIL import Image

    from stableseg_pp.config import compose_checked
    from stableseg_pp.data.description import describe_dataset
    from stableseg_pp.pictures import blend, present_classes, titled_panels
    from stableseg_pp.runtime.atomic import atomic_save

    cfg = compose_checked(overrides)
    run_dir = Path(cfg.paths.run_dir)
    table = run_dir / "results.json"
    if not table.exists():
        raise UserError(f"{table} does not exist: run `python -m stableseg_pp.fit {' '.join(overrides)}` (stage=all) first")
    columns = steps_to_show(json.loads(table.read_text()))
    dataset = describe_dataset(cfg.data, [split])
    ids = [sid for sid in dataset.split_ids(split) if all((run_dir / f / split / "masks" / f"{sid}.png").exists()
                                                          for _, f in columns)][:images]  # fmt: skip
    if not ids:
        raise UserError(f"{run_dir}: no {split} image has masks in every step folder of results.json; run stage=all")
    rows, masks = [], []
    for sid in ids:
        image = dataset.read_image(split, sid)
        row = [image]
        for _, folder in columns:
            mask = np.array(Image.open(run_dir / folder / split / "masks" / f"{sid}.png"))
            row.append(blend(image, mask, dataset.palette, dataset.background_index))
            masks.append(mask)
        if dataset.layout.has_mask(split, sid):
            gt = dataset.layout.read_mask(split, sid, len(dataset.class_names))
            row.append(blend(image, gt, dataset.palette, dataset.background_index))
            masks.append(gt)
        rows.append(row)
    titles = ["image", *(title for title, _ in columns)] + (["ground truth"] if len(rows[0]) > len(columns) + 1 else [])
    rows = [r[: len(titles)] for r in rows]
    classes = present_classes(masks, dataset.class_names)
    classes.pop(dataset.background_index, None)
    picture = titled_panels(rows, titles, classes, dataset.palette, min_panel=128)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(out, lambda t: picture.save(t, format="PNG"))
    log.info("wrote %s: %d %s images x %s", out, len(ids), split, ", ".join(titles))
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(
        prog="python -m stableseg_pp.figure", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides naming the run (as for fit)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--images", type=int, default=4, help="how many images (rows), the first of the split")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return report_errors(lambda: draw(args.overrides, args.out, args.images, args.split), args.debug, "--debug",
                         "stableseg_pp.figure")  # fmt: skip


if __name__ == "__main__":
    main()
