"""The one way the kit's command-line tools end: a result on stdout, or one ``error:`` line on stderr.

A user never sees a traceback, a key dump or terminal escape codes from ``make scaffold``,
``make convert`` or ``make aoti``: a :class:`ConfigError` is printed as it is, anything else as its
type and the first line of its message.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from servekit.errors import ConfigError, plain_line


def report(action: Callable[[], str], subject: str) -> int:
    """Run ``action``; print what it returns (exit 0) or one error line (exit 2)."""
    try:
        text = action()
    except ConfigError as exc:
        sys.stderr.write(f"error: {plain_line(str(exc))}\n")
        return 2
    except Exception as exc:  # the user gets one line, never a traceback
        sys.stderr.write(f"error: cannot {subject}: {type(exc).__name__}: {plain_line(str(exc))[:300]}\n")
        return 2
    sys.stdout.write(text + "\n")
    return 0
