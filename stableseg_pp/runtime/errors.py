"""Errors a user can fix, and how command-line entries report them: one line, never a traceback.

``UserError``: bad input or settings (exit code 2); the message names the file
or the config key and value and says what to do. Anything else is a failure
(exit code 1). The traceback is shown only when asked for (``HYDRA_FULL_ERROR=1``
for ``fit``, ``--debug`` for the other commands).
"""

from __future__ import annotations

import logging
import re
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


# torch re-raises an error of a DataLoader worker as the same type with this message, the worker's traceback after it
_WORKER_ERROR = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\s*\nOriginal Traceback")


def message_of(err: BaseException) -> str:
    """The message ``err`` was raised with; for an error a DataLoader worker raised, the worker's own message
    (torch wraps it in "Caught X in DataLoader worker process N" and the worker's traceback)."""
    text = str(err)
    if not _WORKER_ERROR.match(text):
        return text
    kind = type(err)
    names = (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: ")
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):  # the last exception line of the worker's traceback is the raised one
        for name in names:
            if lines[i].startswith(name):
                return "\n".join([lines[i][len(name) :], *lines[i + 1 :]])
    return text


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line: its first line, and its last when that says where to read more."""
    lines = [ln.strip() for ln in message_of(err).strip().splitlines() if ln.strip()] or [type(err).__name__]
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
