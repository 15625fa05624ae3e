"""Benchmark: how long each command takes to answer ``--help`` (its start-up before any work), and ``import torch``."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {  # the package's commands, as a user types them
    "fit": ["-m", "stableseg_pp.fit", "--help"],
    "segment": ["-m", "stableseg_pp.segment", "--help"],
    "predict": ["-m", "stableseg_pp.predict", "--help"],
    "analyze": ["-m", "stableseg_pp.analyze", "--help"],
    "bench": ["-m", "stableseg_pp.bench", "--help"],
    "launch.slurm": ["-m", "stableseg_pp.launch.slurm", "--help"],
    "miniature_sd.train": ["-m", "stableseg_pp.miniature_sd.train", "--help"],
    "miniature_mmdit.train": ["-m", "stableseg_pp.miniature_mmdit.train", "--help"],
    "miniature_flux.train": ["-m", "stableseg_pp.miniature_flux.train", "--help"],
    "(reference) import torch": ["-c", "import torch"],
}


def seconds(args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"python {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m stableseg_pp.bench startup", description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="runs of each command; the median is printed")
    args = p.parse_args(argv)
    results = {}
    print(f"{'command':<28} {'median s':>9} {'max s':>7}")
    for name, command in COMMANDS.items():
        times = [seconds(command) for _ in range(args.rounds)]
        results[name] = {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}
        print(f"{name:<28} {results[name]['median_s']:>9.2f} {results[name]['max_s']:>7.2f}", flush=True)
    return results
