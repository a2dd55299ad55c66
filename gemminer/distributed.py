"""Data parallelism under torchrun: thin helpers that do nothing in a single process.

Rank and world size come from torch.distributed itself (initialized once by
`init_from_env`), so no module here holds state of its own.
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.distributed as dist
from torch import nn


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); returns
    this process's device (its own GPU under CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def first_problem(message: str | None) -> str | None:
    """On every rank, the message of the lowest rank that has one (None: no rank has). A collective:
    when one rank refuses a run, the others stop with it instead of waiting at the next barrier."""
    if not active():
        return message
    messages: list[str | None] = [None] * world_size()
    dist.all_gather_object(messages, message)
    return next((found for found in messages if found is not None), None)


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a no-op in one process)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast(tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
    """Rank `source`'s value on every rank, in place. NCCL moves only CUDA tensors (and no bool):
    a CPU mask goes over as uint8 on this process's GPU and comes back."""
    if active():
        if dist.get_backend() == "nccl" and (tensor.device.type != "cuda" or tensor.dtype == torch.bool):
            moved = tensor.to(torch.device("cuda", torch.cuda.current_device()), torch.uint8)
            dist.broadcast(moved, source)
            tensor.copy_(moved.to(tensor.device, tensor.dtype))
        else:
            dist.broadcast(tensor, source)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on one (so that all ranks stop at the same step)."""
    if not active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(value).item() > 0)


def wrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel when several processes train, else the model itself.

    Buffers are not broadcast: BatchNorm statistics stay per process on CPU (PyTorch's
    SyncBatchNorm needs CUDA), and masks are kept identical by the methods themselves.
    """
    if not active():
        return model
    ddp = nn.parallel.DistributedDataParallel
    # newer PyTorch renames the switch; buffers are identical at the start either way
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    if next(model.parameters()).device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return ddp(model, device_ids=[model_device_index(model)], **no_sync)
    return ddp(model, **no_sync)


def model_device_index(model: nn.Module) -> int:
    return next(model.parameters()).device.index or 0
