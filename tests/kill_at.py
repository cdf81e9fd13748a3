"""Run a training entry point and SIGKILL it at a chosen point: the reliability tests' fault injection.

    python -m tests.kill_at step:3 train.dalle ARGS...        # killed right after step 3
    python -m tests.kill_at checkpoint:4 train.dalle ARGS...  # killed in the middle of writing checkpoint 4

It sets `train.loop.on_event`, the loop's test seam, then runs the module's `main` as its command line does.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from dalle_mini_impl.errors import run_cli
from train import loop


def main(argv: list[str]) -> None:
    target, module, *args = argv

    def kill_at(event: str, step: int) -> None:
        if f"{event}:{step}" == target:
            os.kill(os.getpid(), signal.SIGKILL)

    loop.on_event = kill_at
    run_cli(importlib.import_module(module).main, args)


if __name__ == "__main__":
    main(sys.argv[1:])
