"""Benchmarks (not tests): ``python -m stableseg_pp.bench {capture,baselines} [options]``."""

from __future__ import annotations

import sys

from stableseg_pp.bench import baselines, capture, capture_mmdit, crf, hopping, magnet, ranks, refine, segmenter, stage0
from stableseg_pp.runtime.errors import USAGE_EXIT, report_errors

COMMANDS = {
    "capture": capture.main,
    "baselines": baselines.main,
    "crf": crf.main,
    "segmenter": segmenter.main,
    "ranks": ranks.main,
    "hopping": hopping.main,
    "capture_mmdit": capture_mmdit.main,
    "magnet": magnet.main,
    "stage0": stage0.main,
    "refine": refine.main,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m stableseg_pp.bench {{{','.join(COMMANDS)}}} [options] [--debug]", file=sys.stderr)
        sys.exit(USAGE_EXIT)
    report_errors(lambda: COMMANDS[argv[0]](argv[1:]), debug, "--debug", f"stableseg_pp.bench {argv[0]}")


if __name__ == "__main__":
    main()
