"""Benchmarks (not tests): ``python -m stableseg_pp.bench {capture,baselines} [options]``."""

from __future__ import annotations

import sys

from stableseg_pp.bench import baselines, capture, crf, ranks, segmenter

COMMANDS = {
    "capture": capture.main,
    "baselines": baselines.main,
    "crf": crf.main,
    "segmenter": segmenter.main,
    "ranks": ranks.main,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python -m stableseg_pp.bench {{{','.join(COMMANDS)}}} [options]")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
