"""One rank of tests/test_distributed.py's check that the processes agree on a non-finite step: under
`accelerate launch` on 2 CPU processes, rank 1 alone has one, and each rank prints what `loop.all_finite` decided."""

from __future__ import annotations

import json

from accelerate import Accelerator

from train.loop import all_finite

accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
decisions = [all_finite(accelerator, finite) for finite in (True, rank != 1, rank != 0, False)]
print(json.dumps({"rank": rank, "all_finite": decisions}), flush=True)
