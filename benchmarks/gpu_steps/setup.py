"""Step `setup`: gemminer installed without network, the carried mnist1d importable, CIFAR-10 converted."""

from __future__ import annotations

from typing import Any

from gpu_steps.plumbing import (
    REPO,
    Check,
    StepFailed,
    ensure_cifar,
    tagged_json,
    tail,
)

SETUP_PROBE = r"""
import json, sys, time
start = time.perf_counter()
import gemminer, mnist1d
from gemminer.data import load_dataset
data = load_dataset("cifar10", sys.argv[1])
print("SETUP " + json.dumps({"gemminer": gemminer.__file__, "mnist1d": mnist1d.__file__, "train": len(data.train),
                             "test": len(data.test), "classes": data.num_classes,
                             "import_and_load_s": round(time.perf_counter() - start, 2)}))
"""


def step_setup(check: Check) -> dict[str, Any]:
    """gemminer installed without network (else from PYTHONPATH), the carried mnist1d importable, and
    CIFAR-10 converted from the carried JPEG archive and read once through gemminer (its cache)."""
    details: dict[str, Any] = {}
    if check.dry_run:
        details["pip"] = "not run in a dry run (it would reinstall into this machine's environment)"
    else:
        pip = check.run("pip-install", check.python("-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                                    "--no-index", "--quiet", "-e", str(REPO)), limit=90)
        details["pip"] = ("installed, editable" if pip.ok
                          else f"failed (exit {pip.process.returncode}); gemminer comes from PYTHONPATH")
        if not pip.ok:
            details["pip_error"] = tail(pip.output, 600)
    details["pythonpath"] = check.env["PYTHONPATH"]
    details["cifar10"] = dict(ensure_cifar(check))
    probe = check.run("imports-and-data", check.python("-c", SETUP_PROBE, check.data["folder"]),
                      limit=check.sizes.limits["setup"])
    if not probe.ok:
        raise StepFailed(probe.failure("importing gemminer and mnist1d and loading CIFAR-10"), details)
    details.update(tagged_json(probe.output, "SETUP"))
    return details
