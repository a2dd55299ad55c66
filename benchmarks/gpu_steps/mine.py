"""Step `mine`: ResNet-20 / CIFAR-10 with a short schedule, eager fp32 then `--bf16`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpu_steps.plumbing import (
    Check,
    StepFailed,
    describe,
)


def step_mine(check: Check) -> dict[str, Any]:
    """`gemminer mine` on ResNet-20 / CIFAR-10 with a short schedule, eager fp32, then --bf16."""
    details: dict[str, Any] = {"flags": " ".join(check.speed_flags(Path("OUT")))}
    problems = []
    for variant in ("fp32", "bf16"):
        run = check.mine_run(variant)
        if not run.ok:
            problems.append(run.job.failure(f"mine {variant}"))
            continue
        view = details[variant] = describe(run, check.dry_run)
        if not check.dry_run:
            if not str(view["device"]).startswith("cuda"):
                problems.append(f"mine {variant} ran on {view['device']}")
            if not (view["acc_after_finetune"] or 0) > 0.12:
                problems.append(f"mine {variant}: accuracy after fine-tuning {view['acc_after_finetune']} is at "
                                "chance (0.10) or barely above")
    if problems:
        raise StepFailed("\n".join(problems), details)
    return details
