"""One rank of tests/test_distributed.py's check that the processes agree on a non-finite step: under
`accelerate launch` on 2 CPU processes, rank 1 alone has one; rank 0 prints what `loop.all_finite` decided on each."""

from __future__ import annotations

import json

from accelerate import Accelerator
from accelerate.utils import gather_object

from dalle_mini_impl.errors import exit_process
from train.loop import all_finite

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
decisions = [all_finite(accelerator, finite) for finite in (True, rank != 1, rank != 0, False)]
everyone = gather_object([decisions])  # in rank order; one line from one process (two would interleave on the pipe)
if accelerator.is_main_process:
    print(json.dumps({"all_finite": everyone}), flush=True)
exit_process(0)  # as the commands exit: gloo's threads abort a finalising interpreter now and then
