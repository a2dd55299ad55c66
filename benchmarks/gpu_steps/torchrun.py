"""Step `torchrun`: `torchrun --nproc_per_node 1`, the process group, DDP and SyncBatchNorm."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from gpu_steps.plumbing import (
    DRIVER,
    Check,
    Run,
    StepFailed,
    describe,
    ensure_cifar,
)


def step_torchrun(check: Check) -> dict[str, Any]:
    """`torchrun --nproc_per_node 1`: the process group (NCCL on CUDA), DDP and SyncBatchNorm.

    gemminer joins a process group only with several processes (`distributed.init_from_env`), so
    the worker (this file's `_ddp`) joins it first, then runs `gemminer mine`; it records what
    gemminer's `distributed.wrap` made of each model."""
    ensure_cifar(check)
    folder = check.work / "runs" / "torchrun"
    shutil.rmtree(folder, ignore_errors=True)
    probe = check.work / "runs" / "torchrun-probe.json"
    probe.unlink(missing_ok=True)
    argv = check.python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(DRIVER), "_ddp",
                        *check.small_flags(folder))
    job = check.run("torchrun", argv, limit=check.sizes.limits["torchrun"], env={**check.env,
                                                                               "GPU_CHECK_PROBE": str(probe)})
    details: dict[str, Any] = {}
    if probe.is_file():
        details["probe"] = json.loads(probe.read_text())
    if not job.ok or not (folder / "summary.json").is_file():
        raise StepFailed(job.failure("torchrun"), details)
    details["run"] = describe(Run("torchrun", folder, job), check.dry_run)
    expected = "nccl" if check.sizes.device == "cuda" else "gloo"
    wrapped = details.get("probe", {}).get("wrapped", [])
    problems = []
    if details.get("probe", {}).get("backend") != expected:
        problems.append(f"backend {details.get('probe', {}).get('backend')}, expected {expected}")
    if not wrapped or not all(entry["ddp"] for entry in wrapped):
        problems.append("a model was not wrapped in DistributedDataParallel")
    if check.sizes.device == "cuda" and not all(entry["sync_batchnorm"] > 0 for entry in wrapped):
        problems.append("BatchNorm did not become SyncBatchNorm")
    if problems:
        raise StepFailed("; ".join(problems), details)
    return details


def worker_ddp(argv: list[str]) -> int:
    """Under torchrun: join the process group (NCCL on CUDA, else gloo), record what
    `gemminer.distributed.wrap` makes of each model, run `gemminer`."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from gemminer import cli, distributed

    cuda = argv[argv.index("--device") + 1].startswith("cuda") if "--device" in argv else torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    probe: dict[str, Any] = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "wrapped": []}
    original = distributed.wrap

    def spy(model: nn.Module) -> nn.Module:
        wrapped = original(model)
        modules = list(wrapped.modules())
        probe["wrapped"].append({
            "ddp": isinstance(wrapped, nn.parallel.DistributedDataParallel),
            "sync_batchnorm": sum(isinstance(m, nn.SyncBatchNorm) for m in modules),
            "batchnorm": sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)})
        return wrapped

    distributed.wrap = spy
    code = cli.main(argv)
    if os.environ.get("RANK", "0") == "0" and os.environ.get("GPU_CHECK_PROBE"):
        Path(os.environ["GPU_CHECK_PROBE"]).write_text(json.dumps(probe))
    return code
