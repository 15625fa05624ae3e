"""Stage 0 with 1 and with 2 ranks on this machine (CPU, gloo): ``python -m stableseg_pp.bench ranks``.

Each variant runs ``python -m stableseg_pp.fit stage=0`` in a fresh output folder over the
same miniature world, with the machine's cores split evenly between the ranks. Prints the
wall time of the whole command and of the predict loop (model loading included) from the
completion record, and the 2-rank / 1-rank ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stableseg_pp.data.miniature import write_miniature_voc


def run_variant(home: Path, ranks: int, threads: int, overrides: list[str]) -> dict:
    env = dict(os.environ, STABLESEG_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "stableseg_pp.fit", "stage=0", "trainer.accelerator=cpu", f"trainer.devices={ranks}"]
    start = time.perf_counter()
    subprocess.run(cmd + overrides, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    record = json.loads(next((home / "outputs").glob("*/stage0-*/_COMPLETE.json")).read_text())
    return {"wall_s": wall, "predict_s": record["predict_seconds"], "images": record["images_predicted"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="fit overrides, e.g. data.limit=200")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        write_miniature_voc(world / "data" / "miniature")
        results: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.repeats):
            for ranks in (1, 2):  # alternate, so drifts of the machine hit both
                home = Path(tmp) / f"r{ranks}"
                shutil.rmtree(home, ignore_errors=True)
                shutil.copytree(world, home)
                results[ranks].append(run_variant(home, ranks, max(1, cores // ranks), args.overrides))
    best = {r: min(v, key=lambda x: x["wall_s"]) for r, v in results.items()}
    for r, b in best.items():
        print(f"{r} rank(s): {b['images']} images, command {b['wall_s']:.1f} s, predict loop {b['predict_s']:.1f} s "
              f"({b['images'] / b['predict_s']:.1f} img/s)")  # fmt: skip
    print(f"2 ranks / 1 rank: command {best[2]['wall_s'] / best[1]['wall_s']:.2f}x, "
          f"predict loop {best[2]['predict_s'] / best[1]['predict_s']:.2f}x ({cores} cores)")  # fmt: skip


if __name__ == "__main__":
    main()
