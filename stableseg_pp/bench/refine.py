"""Benchmark: the refinements of StableSeg's masks side by side on one split (docs/emerdiff.md).

(a) stage 0 (bilinear upsampling), (b) DenseCRF, (c) EmerDiff, (d) DenseCRF on
EmerDiff's scores: val mIoU, boundary F-score, denoiser rows per image and
images/s, each step run as ``fit`` runs it (content-addressed folders under
``--root``: a second call reuses them and only prints). Any ``key=value``
after the options overrides the composed ``fit`` config.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from stableseg_pp.config import compose_checked
from stableseg_pp.data.description import describe_dataset
from stableseg_pp.stages import crf, emerdiff, stage0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m stableseg_pp.bench refine", description=__doc__)
    p.add_argument("--root", default="bench-refine", help="paths.root_dir of the runs (data and outputs)")
    p.add_argument("--split", default="val")
    p.add_argument("overrides", nargs="*", help="fit config overrides, e.g. data.limit=20 emerdiff.sigma=1")
    args = p.parse_args(argv)
    cfg = compose_checked([f"paths.root_dir={Path(args.root).resolve()}", f"stage0.splits=[{args.split}]",
                           *args.overrides])  # fmt: skip
    dataset = describe_dataset(cfg.data, [args.split])
    rows: dict[str, dict] = {}

    def step(name: str, fn) -> Path:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
        metrics = json.loads((out / "metrics.json").read_text())[args.split]
        record = json.loads((out / "_COMPLETE.json").read_text())
        images = record.get("images_predicted") or record["splits"][args.split]["images"]
        rows[name] = {"miou": metrics["miou"], "boundary_f": metrics.get("boundary_f"), "folder": out.name,
                      "rows_per_image": record.get("denoiser_rows_per_image"),
                      "images_per_s": images / record["predict_seconds"] if record.get("predict_seconds") else None,
                      "step_seconds": seconds}  # fmt: skip
        return out

    s0 = step("(a) stage 0, bilinear", lambda: stage0.run(cfg, dataset))
    step("(b) DenseCRF", lambda: crf.run(cfg, dataset, s0))
    em = step("(c) EmerDiff", lambda: emerdiff.run(cfg, dataset, s0))
    step("(d) EmerDiff + DenseCRF", lambda: crf.run(cfg, dataset, em))
    rows["(a) stage 0, bilinear"]["rows_per_image"] = 1
    print(f"| masks ({args.split}) | mIoU | boundary F ({dataset.boundary_tolerance} px) | denoiser rows / image | "
          "images/s (predict loop) | folder |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        bf = "n/a" if r["boundary_f"] is None else f"{100 * r['boundary_f']:.1f}"
        speed = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.2f}"
        print(f"| {name} | {100 * r['miou']:.1f} | {bf} | {r['rows_per_image'] or 0} | {speed} | `{r['folder']}` |")
    return rows
