"""Step `smoke`: this machine's PyTorch imports, sees the GPU, runs a channels_last bf16 convolution and a
CUDA generator."""

from __future__ import annotations

import shutil
import sys
from typing import Any

from gpu_steps.plumbing import (
    Check,
    StepFailed,
    tagged_json,
)

SMOKE = r"""
import json, sys, time
start = time.perf_counter()
import torch
device = torch.device(sys.argv[1])
info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda, "import_torch_s": round(time.perf_counter() - start, 2)}
if torch.backends.cudnn.is_available():
    info["cudnn"] = torch.backends.cudnn.version()
if device.type == "cuda":
    props = torch.cuda.get_device_properties(device)
    info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
conv = torch.nn.Conv2d(3, 16, 3, padding=1).to(device, memory_format=torch.channels_last)
inputs = torch.randn(64, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
    outputs = conv(inputs)
outputs.float().square().mean().backward()
generator = torch.Generator(device=device).manual_seed(0)
info["generator_draw"] = float(torch.rand(1, generator=generator, device=device))
info["bf16_output"] = str(outputs.dtype)
if device.type == "cuda":
    torch.cuda.synchronize()
info["total_s"] = round(time.perf_counter() - start, 2)
print("SMOKE " + json.dumps(info))
"""


def step_smoke(check: Check) -> dict[str, Any]:
    """PyTorch of this machine: imports, sees the GPU, a channels_last bf16 convolution, a CUDA generator."""
    details: dict[str, Any] = {"executable": sys.executable}
    if shutil.which("nvidia-smi"):
        smi = check.run("nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                       "--format=csv,noheader"], limit=30)
        details["nvidia_smi"] = smi.output.strip()
    job = check.run("smoke", check.python("-c", SMOKE, check.sizes.device), limit=check.sizes.limits["smoke"])
    if not job.ok:
        raise StepFailed(job.failure("the import smoke test"), details)
    details.update(tagged_json(job.output, "SMOKE"))
    if check.sizes.device == "cuda" and not details.get("cuda_available"):
        raise StepFailed("torch.cuda.is_available() is False on the GPU machine", details)
    return details
