"""Benchmarks (not tests): ``python -m stableseg_pp.bench <benchmark> [options] [--debug]``.

Every module of this package with a ``main(argv)`` is a benchmark, named by its file; ``--help`` lists them with the
first line of each one's docstring, read from the files (nothing is imported, so the list comes at once).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import pkgutil
import sys
from pathlib import Path

from stableseg_pp.runtime.errors import USAGE_EXIT, report_errors

PACKAGE = Path(__file__).resolve().parent


def benchmarks() -> dict[str, str]:
    """Benchmark name -> its one-line description, from the source of each module that defines ``main``."""
    found = {}
    for info in pkgutil.iter_modules([str(PACKAGE)]):
        if info.name.startswith("_"):
            continue
        tree = ast.parse((PACKAGE / f"{info.name}.py").read_text())
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            doc = (ast.get_docstring(tree) or "").strip().splitlines()
            text = doc[0].removeprefix("Benchmark: ") if doc else ""
            found[info.name] = text[:1].upper() + text[1:]
    return dict(sorted(found.items()))


def usage() -> str:
    names = benchmarks()
    width = max(map(len, names))
    lines = [f"  {name:<{width}}  {text}" for name, text in names.items()]
    return (
        "usage: python -m stableseg_pp.bench <benchmark> [options] [--debug]\n\nbenchmarks:\n"
        + "\n".join(lines)
        + ("\n\n`python -m stableseg_pp.bench <benchmark> --help` gives a benchmark's options; docs/benchmarks.md the figures.")
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in ("-h", "--help"):
        parser = argparse.ArgumentParser(
            prog="python -m stableseg_pp.bench",
            usage="%(prog)s <benchmark> [options] [--debug]",
            description=usage().split("\n\n", 1)[1],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.parse_args(argv[:1])  # prints the help and exits
        return
    if not argv or argv[0] not in benchmarks():
        given = f"unknown benchmark {argv[0]!r}\n" if argv else ""
        print(given + usage(), file=sys.stderr)
        sys.exit(USAGE_EXIT)
    module = importlib.import_module(f"stableseg_pp.bench.{argv[0]}")
    report_errors(lambda: module.main(argv[1:]), debug, "--debug", f"stableseg_pp.bench {argv[0]}")


if __name__ == "__main__":
    main()
