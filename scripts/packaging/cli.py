"""The one way the kit's command-line tools end: a result on stdout, or one ``error:`` line on stderr.

A user never sees a traceback, a key dump or terminal escape codes from ``make scaffold``,
``make convert`` or ``make aoti``: a :class:`ConfigError` is printed as it is, anything else as its
type and the first line of its message.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from servekit.errors import ConfigError, plain_line


def error_line(exc: Exception, subject: str) -> str:
    """The one line a user reads for ``exc``: a :class:`ConfigError` as it is, anything else as its type and
    the first line of its message."""
    if isinstance(exc, ConfigError):
        return f"error: {plain_line(str(exc))}"
    return f"error: cannot {subject}: {type(exc).__name__}: {plain_line(str(exc))[:300]}"


def report(action: Callable[[], str], subject: str) -> int:
    """Run ``action``; print what it returns (exit 0) or one error line (exit 2)."""
    try:
        text = action()
    except Exception as exc:  # the user gets one line, never a traceback
        sys.stderr.write(error_line(exc, subject) + "\n")
        return 2
    sys.stdout.write(text + "\n")
    return 0
