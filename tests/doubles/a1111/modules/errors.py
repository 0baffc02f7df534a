"""Mirror of modules/errors.py (A1111 v1.10.1): error reporting that never raises."""

from __future__ import annotations

import sys
import traceback

reported: list[str] = []
"""Test-only: every message passed to report()/display(), so tests can see swallowed errors."""


# modules/errors.py: report(message, *, exc_info=False)
def report(message: str, *, exc_info: bool = False) -> None:
    reported.append(message + ("\n" + traceback.format_exc() if exc_info else ""))
    print(message, file=sys.stderr)


# modules/errors.py: display(e, task, *, full_traceback=False)
def display(e: Exception, task, *, full_traceback=False):
    reported.append(f"{task}: {type(e).__name__}: {e}")
    print(f"{task or 'error'}: {type(e).__name__}", file=sys.stderr)
