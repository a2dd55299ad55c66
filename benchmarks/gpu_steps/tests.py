"""Step `tests`: the tests that take a device (`pytest -m device --device cuda`)."""

from __future__ import annotations

import importlib.util
from typing import Any

from gpu_steps.plumbing import (
    Check,
    StepFailed,
)


def step_tests(check: Check) -> dict[str, Any]:
    """The tests that take a device (`-m device`), on this device."""
    argv = check.python("-m", "pytest", "-p", "no:cacheprovider", "-m", "device", "--device",
                        check.sizes.device, "--basetemp", str(check.work / "pytest"),
                        "--continue-on-collection-errors", *check.sizes.tests)
    if not check.dry_run and importlib.util.find_spec("xdist") is not None:
        argv += ["-n", "4"]
    job = check.run("pytest", argv, limit=check.sizes.limits["tests"])
    lines = [line for line in job.output.splitlines() if line.strip()]
    details = {"command": " ".join(argv[1:]), "summary": lines[-1] if lines else ""}
    if not job.ok:
        raise StepFailed(job.failure("pytest"), details)
    return details
