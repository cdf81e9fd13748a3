"""User-facing errors and the one wrapper every command runs inside.

A mistake a user can make (a config typo, a missing file, an empty prompt, a corrupt weights file)
raises `UserError` with one sentence that names the thing and the fix. `run_cli` turns it into that
sentence on stderr and exit code 2, never a traceback; a warning is one line too (`warning: ...`), without the
source line Python's own format adds.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A mistake the user can fix; its message is one sentence naming the thing and the fix."""


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` for the commands: `warning: MESSAGE` on stderr, one line, no file, line or code."""
    print(f"warning: {message}", file=sys.stderr)


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run `main(argv)` and exit: 0 on success, 2 with one sentence for a `UserError`, 130 on Ctrl-C."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(code or 0))
