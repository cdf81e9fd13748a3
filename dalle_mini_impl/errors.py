"""User-facing errors and the one wrapper every command runs inside.

A mistake a user can make (a config typo, a missing file, an empty prompt, a corrupt weights file)
raises `UserError` with one sentence that names the thing and the fix. `run_cli` turns it into that
sentence on stderr and exit code 2, never a traceback; a warning is one line too (`warning: ...`), without the
source line Python's own format adds.
"""

from __future__ import annotations

import logging
import os
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
    for stream in (sys.stdout, sys.stderr):  # a console in a legacy code page (Windows) cannot print an emoji
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except SystemExit as e:  # a stage stopped by a signal (143), argparse's usage error (2)
        code = e.code
    exit_process(code)


def exit_process(code: object) -> None:
    """Exit with `code` (sys.exit's meaning). A process of a distributed run leaves its process group and then
    exits without the interpreter's finalisation: gloo's threads there aborted a finished process now and then
    ("terminate called without an active exception", SIGABRT, its work all written: 1 of 12 two-process runs on
    a busy 2-core machine, with the process group destroyed or not), and turned its exit code into -6."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        sys.exit(code)
    dist.destroy_process_group()
    if code is not None and not isinstance(code, int):  # sys.exit's message form: printed, exit 1
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code or 0)
