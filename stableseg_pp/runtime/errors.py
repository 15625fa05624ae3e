"""Errors a user can fix, and how command-line entries report them: one line, never a traceback.

``UserError``: bad input or settings (exit code 2); the message names the file
or the config key and value and says what to do. Anything else is a failure
(exit code 1). The traceback is shown only when asked for (``HYDRA_FULL_ERROR=1``
for ``fit``, ``--debug`` for the other commands).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
USAGE_EXIT = 2
FAILURE_EXIT = 1


class UserError(Exception):
    """A problem with the user's input or settings, explained in its message."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and its value."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line: its first line, and its last when that says where to read more."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()] or [type(err).__name__]
    text = lines[0]
    if len(lines) > 1 and ("docs/" in lines[-1] or "how to" in lines[-1]):
        text += f" ({lines[-1]})"
    return text


def report_errors(run: Callable[[], T], debug: bool, debug_hint: str, program: str) -> T:
    """Run ``run``; a ``UserError`` (and the input errors of the libraries: missing files, bad values) ends
    the process with one line and exit code 2, any other exception with one line and exit code 1."""
    if debug:
        return run()
    try:
        return run()
    except KeyboardInterrupt:
        print(f"{program}: interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except (UserError, FileNotFoundError, PermissionError) as err:
        logging.getLogger(program).debug("user error", exc_info=True)
        print(f"{program}: error: {one_line(err)}", file=sys.stderr)
        sys.exit(USAGE_EXIT)
    except Exception as err:  # noqa: BLE001 - every failure gets one line; the traceback is one switch away
        logging.getLogger(program).debug("failure", exc_info=True)
        print(f"{program}: failed: {type(err).__name__}: {one_line(err)} ({debug_hint} shows the traceback)", file=sys.stderr)
        sys.exit(FAILURE_EXIT)
