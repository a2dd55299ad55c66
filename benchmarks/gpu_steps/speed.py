"""Step `speed`: images per second, fp32 and bf16, and the projected wall clock of the paper's run."""

from __future__ import annotations

from typing import Any

from gpu_steps.plumbing import (
    Check,
    StepFailed,
    speed_of,
    speedups,
)


def step_speed(check: Check) -> dict[str, Any]:
    """Images per second (dense training, search, evaluation), fp32 and bf16, and the projected
    wall clock of the paper's 150 + 150 epoch run, from the mine step's runs (or new ones)."""
    details: dict[str, Any] = {"method": "per-epoch seconds from metrics.csv: training epochs 2.. that are not "
                                         "evaluated; evaluation = an evaluated epoch minus a training one",
                               "dense_training": "the ticket's fine-tuning: every weight trains, mask fixed"}
    problems = []
    for variant in ("fp32", "bf16"):
        run = check.mine_run(variant)
        if run.ok:
            details[variant] = speed_of(check, run)
        else:
            problems.append(run.job.failure(f"mine {variant}"))
    if "fp32" in details and "bf16" in details and not check.dry_run:
        details["bf16_speedup"] = speedups(details["fp32"], details["bf16"])
    if problems:
        raise StepFailed("\n".join(problems), details)
    return details
