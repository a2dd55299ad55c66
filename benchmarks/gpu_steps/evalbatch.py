"""Step `evalbatch`: seconds per ResNet-20 test pass by evaluation batch size."""

from __future__ import annotations

import json
from typing import Any

from gpu_steps.plumbing import (
    Check,
    StepFailed,
    tail,
)

EVAL_BATCHES = {"cuda": "128,256,512,1000,2500,10000", "cpu": "16,64"}


def step_evalbatch(check: Check) -> dict[str, Any]:
    """Seconds per ResNet-20 pass over 10,000 test-sized inputs per evaluation batch size
    (`benchmarks/eval_batch.py`): the measurement behind `data.eval_batch_size: auto` on this device."""
    shrink = ["--samples", "64", "--width", "4", "--repeats", "1"] if check.dry_run else ["--repeats", "5"]
    argv = check.python("benchmarks/eval_batch.py", "--model", "resnet20", "--device", check.sizes.device,
                        "--batches", EVAL_BATCHES[check.sizes.device], *shrink)
    job = check.run("eval-batch", argv, limit=check.sizes.limits["evalbatch"])
    if not job.ok:
        raise StepFailed(job.failure("eval_batch.py"))
    lines = [line for line in job.output.splitlines() if line.startswith("{")]
    if not lines:
        raise StepFailed(f"eval_batch.py printed no result:\n{tail(job.output)}")
    result = json.loads(lines[-1])
    seconds = {int(batch): value for batch, value in result["seconds_per_pass"].items()}
    result["fastest_batch"] = min(seconds, key=seconds.__getitem__)
    return result
