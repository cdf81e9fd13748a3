"""Run a training entry point and SIGKILL it at a chosen point: the reliability tests' fault injection.

    python -m tests.kill_at step:3 train.dalle ARGS...        # killed right after step 3
    python -m tests.kill_at checkpoint:4 train.dalle ARGS...  # killed in the middle of writing checkpoint 4
    python -m tests.kill_at step:3:SIGINT train.dalle ARGS... # sent SIGINT (Ctrl-C) there instead
    accelerate launch ... -m tests.kill_at step:2:SIGTERM@1 train.dalle ARGS...  # to process 1 alone

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
    target, _, rank = target.partition("@")
    event_step, _, name = target.partition(":SIG")
    signum = signal.Signals[f"SIG{name}"] if name else signal.SIGKILL
    mine = not rank or os.environ.get("RANK", "0") == rank

    def kill_at(event: str, step: int) -> None:
        if mine and f"{event}:{step}" == event_step:
            os.kill(os.getpid(), signum)

    loop.on_event = kill_at
    run_cli(importlib.import_module(module).main, args)


if __name__ == "__main__":
    main(sys.argv[1:])
