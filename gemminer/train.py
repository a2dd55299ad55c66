"""The training loop, evaluation and BatchNorm recalibration, shared by every method."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import time
import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from gemminer import distributed
from gemminer.checkpoint import Checkpointer, StopRequested
from gemminer.errors import GemminerError
from gemminer.masking import attach_fixed_masks

Batch = tuple[Tensor, Tensor]
STOP_CHECK_STEPS = 16  # under torchrun, ranks agree on a SIGINT/SIGTERM stop every this many steps


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise GemminerError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GemminerError(f"device {name!r} asked for, but CUDA is not available")
    return device


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


AUTOCAST_ATTRIBUTE = "_gemminer_autocast_dtype"


def enable_autocast(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Opt-in: gemminer's loops run `model`'s forward passes under ``torch.autocast(dtype)``.
    Kept as an attribute of the model, so copies (the search's, fine-tuning's) keep it."""
    setattr(model, AUTOCAST_ATTRIBUTE, dtype)
    return model


def known_length(batches: Iterable[Any]) -> int | None:
    """``len(batches)``, or None where it has none: a DataLoader over an IterableDataset has ``__len__``
    but raises TypeError from it."""
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def forward(model: nn.Module, inputs: Tensor, eager: bool = False) -> Tensor:
    """model(inputs), under autocast where `enable_autocast` asked for it; logits in fp32. Inside
    `compiled`, the compiled forward of `model` runs instead (unless `eager`: the training and evaluation
    loops run a batch shorter than the first eagerly, rather than compile a graph for the last batch's
    shape, which took about 15 s per loop on a GPU for one step per epoch)."""
    run = model if eager else _COMPILED.get(id(model), model)
    dtype = getattr(getattr(model, "module", model), AUTOCAST_ATTRIBUTE, None)  # through a DDP wrapper
    if dtype is None:
        return class_scores(run(inputs))
    with torch.autocast(inputs.device.type, dtype=dtype):
        logits = class_scores(run(inputs))
    return logits.float()


def class_scores(output: object) -> Tensor:
    """A model's output, which must be one tensor of class scores per sample: a tuple or dict (auxiliary
    heads, a Hugging Face output) is one clear error, not a TypeError deep inside a loss."""
    if not isinstance(output, Tensor):
        raise GemminerError(f"the model returns a {type(output).__name__}: gemminer trains and scores on one "
                            "tensor of class scores per sample (wrap the model to return its logits)")
    return output


# torch.compile's mode per device type. CUDA graphs on CUDA, where a small network at batch 128 is
# bound by kernel launches and Python, not arithmetic; inductor's default elsewhere, and under torchrun
# (DDP all-reduces gradients from autograd hooks between the graphs).
COMPILE_MODES = {"cuda": "reduce-overhead"}
_COMPILED: dict[int, Callable[[Tensor], Tensor]] = {}  # id(module) -> its compiled forward, inside `compiled`


def _own_code(function: Callable) -> Callable:
    """`function` with a code object of its own. Dynamo keeps compiled graphs per code object and stops
    compiling one after 8 variants (`recompile_limit`): each network compiled here gets its own cache,
    not one shared with every network compiled before it in this process."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)


def _compile_forward(module: nn.Module, mode: str | None) -> Callable[[Tensor], Tensor]:
    def call(inputs: Tensor) -> Tensor:
        return module(inputs)

    # static shapes: a graph per batch shape (the training batch, the evaluation batch; a shorter last
    # batch runs eagerly, `forward`), each compiled once, rather than slower graphs for any size
    compiled_call = torch.compile(_own_code(call), mode=mode, dynamic=False)
    if mode != "reduce-overhead":
        return compiled_call

    def graphed(inputs: Tensor) -> Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # a training step or an evaluation batch: a new run
        return compiled_call(inputs)

    return graphed


@contextlib.contextmanager
def compiled(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    """Run `model`'s forward passes (through `forward`: training, evaluation) and `optimizer`'s step
    under torch.compile inside the block; yields the step to call in place of ``optimizer.step``.

    The learning rates become tensors that a scheduler fills in place: a Python float would be a
    constant of the compiled step, recompiled at every change. Masks through parametrize are
    graph inputs (the masked weight is computed inside the graph), so masks changed in place
    between steps (freezing events) are seen at the next step. BatchNorm recalibration stays
    eager (`recalibrate_batchnorm`)."""
    mode = None if distributed.active() else COMPILE_MODES.get(model_device(model).type)
    _lr_as_tensor(optimizer, True)
    inner = getattr(model, "module", model)  # DDP's own module too: evaluation calls it directly
    modules = {id(model): model, id(inner): inner}
    for key, module in modules.items():
        _COMPILED[key] = _compile_forward(module, mode)
    # The optimizer's own step without its wrappers (profiling and hooks, grad mode, the scheduler's
    # call tracking): their deliberate graph breaks would compile it as frames that every optimizer
    # in the process shares, and so shares their recompile limit.
    algorithm = inspect.unwrap(type(optimizer).step)

    def step() -> None:
        with torch.no_grad():
            algorithm(optimizer)

    compiled_step = torch.compile(_own_code(step))
    first = True

    def first_eager_then_compiled() -> None:
        # the first step creates the optimizer's state (momentum buffers) and lets a scheduler see a
        # step: eager, so the compiled step has one variant, the steady state
        nonlocal first
        if first:
            first = False
            optimizer.step()
        else:
            compiled_step()

    try:
        yield first_eager_then_compiled
    finally:
        for key in modules:
            _COMPILED.pop(key, None)


def _lr_as_tensor(optimizer: torch.optim.Optimizer, tensor: bool) -> None:
    """Learning rates as 0-dim float64 tensors on the parameters' device (the values a scheduler
    computes as Python floats; for a compiled step), or as Python floats (eager; a checkpoint of a
    compiled run holds tensors)."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        if tensor and not isinstance(lr, Tensor):
            group["lr"] = torch.tensor(lr, dtype=torch.float64, device=group["params"][0].device)
            if group.get("capturable") is False and group.get("foreach") is None:
                group["foreach"] = False  # Adam's foreach path takes a tensor lr only when capturable
        elif not tensor and isinstance(lr, Tensor):
            group["lr"] = lr.item()


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    samples: int


class Diverged(GemminerError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochProgress:
    """Running sums of a training pass; checkpointed mid-epoch so a resumed pass
    reports the same numbers as an uninterrupted one."""

    steps: int
    loss_sum: Tensor
    correct: Tensor
    samples: int

    def as_state(self) -> dict[str, Any]:
        """The sums over all ranks (rank 0 carries them on resume; the others restart at 0)."""
        totals = torch.stack([self.loss_sum.detach().double(), self.correct.double(),
                              torch.tensor(float(self.samples), dtype=torch.float64, device=self.loss_sum.device)])
        if distributed.active():
            totals = distributed.all_reduce_sum(totals.clone())
        loss_sum, correct, samples = totals.cpu()
        return {"steps": self.steps, "loss_sum": loss_sum.to(self.loss_sum.dtype), "correct": correct.long(),
                "samples": int(samples)}

    @classmethod
    def start(cls, device: torch.device, state: dict[str, Any] | None = None) -> EpochProgress:
        zero_loss, zero_correct = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
        if state is None:
            return cls(0, zero_loss, zero_correct, 0)
        if distributed.rank() != 0:
            return cls(state["steps"], zero_loss, zero_correct, 0)
        return cls(state["steps"], state["loss_sum"].to(device), state["correct"].to(device), state["samples"])


def train_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                after_step: Callable[[], None] | None = None, progress: bool = False,
                description: str = "", resume: dict[str, Any] | None = None,
                on_step: Callable[[EpochProgress], None] | None = None,
                step: Callable[[], None] | None = None) -> EpochStats:
    """One pass of cross-entropy training.

    `after_step` runs after every optimizer step (e.g. clamping); `on_step` after that
    with the running sums (checkpointing on a stop request). `resume` continues a
    pass whose batch stream was restored to the same position. `step` replaces
    ``optimizer.step`` (a compiled one).
    """
    device = model_device(model)
    model.train()
    running = EpochProgress.start(device, resume)
    full = None  # the epoch's batch size: a shorter (last) batch runs eagerly, not as a graph of its own
    for inputs, targets in tqdm(batches, desc=description, leave=False, disable=not progress,
                                initial=running.steps, total=known_length(batches)):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        full = full or len(inputs)
        logits = forward(model, inputs, eager=len(inputs) < full)
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step is None:
            optimizer.step()
        else:
            step()
        if after_step is not None:
            after_step()
        # accumulate on the device: no host sync per step
        running.loss_sum += loss.detach() * len(targets)
        running.correct += (logits.detach().argmax(1) == targets).sum()
        running.samples += len(targets)
        running.steps += 1
        if on_step is not None:
            on_step(running)
    totals = torch.stack([running.loss_sum.float(), running.correct.float(),
                          torch.tensor(float(running.samples), device=device)])
    loss_sum, correct, samples = distributed.all_reduce_sum(totals).tolist()
    if samples == 0:  # an empty data set (or an iterable without len that yields nothing) trains nothing
        raise GemminerError("the training data is empty: a training epoch saw no batch")
    mean_loss = loss_sum / max(samples, 1)
    if not math.isfinite(mean_loss):
        raise Diverged(f"training diverged (mean loss {mean_loss}); lower the learning rate")
    return EpochStats(mean_loss, correct / max(samples, 1), int(samples))


def stateful_streams(**streams: object) -> dict[str, object]:
    """The data streams whose position can be checkpointed (the toolkit's Batches; a
    plain DataLoader has no state_dict and restarts its epoch on resume)."""
    return {name: stream for name, stream in streams.items()
            if stream is not None and hasattr(stream, "state_dict") and hasattr(stream, "load_state_dict")}


def fit(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None, epochs: int, *, phase: str,
        end_of_epoch: Callable[[int], dict[str, Any]] | None = None, after_step: Callable[[], None] | None = None,
        log: Callable[[dict[str, Any]], None] | None = None, checkpoint: Checkpointer | None = None,
        state: dict[str, Any] | None = None, progress: bool = False, first_epoch: int = 0,
        evaluation: Callable[[], dict[str, Any]] | None = None, eval_every: int = 1,
        compile: bool = False) -> list[dict[str, Any]]:
    """The training loop every method and fine-tuning share.

    Per epoch: a pass over `batches`, the scheduler step, `end_of_epoch(epoch)` (which
    may freeze weights and returns extra metric columns; a true ``search_exit`` column ends the
    phase), `evaluation()` every `eval_every` epochs and always after the last one, a metrics row to `log`.
    With a `checkpoint`, `state` (name -> object with state_dict/load_state_dict) is
    saved every `checkpoint.every_epochs` epochs, at freezing events and on SIGINT or
    SIGTERM (after the current step), and restored when the run stopped inside `phase`.
    `first_epoch` starts the schedule later (IMP's rounds after a rewind to epoch E).
    With `compile`, the forward passes (training and evaluation) and the optimizer step
    run under torch.compile (`compiled`).
    """
    history: list[dict[str, Any]] = []
    partial, elapsed = None, 0.0
    saved = checkpoint.phase_state(phase) if checkpoint is not None else None
    if saved is not None:
        checkpoint.restore_objects(state or {})
        _lr_as_tensor(optimizer, compile)  # the checkpoint may come from a run with the other setting
        first_epoch, partial, history, elapsed = saved["epoch"], saved["partial"], saved["history"], saved["elapsed"]
    start = time.perf_counter()
    device = model_device(model)

    def save(epoch: int, running: EpochProgress | None) -> None:
        loop = {"phase": phase, "epoch": epoch, "partial": running.as_state() if running else None,
                "history": history, "elapsed": elapsed + time.perf_counter() - start}
        checkpoint.save(loop, state)

    def stop_if_requested(epoch: int, running: EpochProgress | None) -> None:
        if checkpoint is None:
            return
        if running is not None and distributed.active() and running.steps % STOP_CHECK_STEPS:
            return  # agreeing on a stop is a collective (and a host sync): not on every step
        name = checkpoint.stop_requested()
        if distributed.any_rank(name is not None, device):
            if running is not None and not bool(torch.isfinite(running.loss_sum)):
                raise Diverged("training diverged (loss is not finite); the last good checkpoint is kept")
            save(epoch, running)
            raise StopRequested(name or "SIGTERM")

    if history and history[-1].get("search_exit"):
        first_epoch = epochs  # the run stopped at its search's early exit: nothing is left to train
    with compiled(model, optimizer) if compile else contextlib.nullcontext() as step:
        for epoch in range(first_epoch, epochs):
            lr = float(optimizer.param_groups[0]["lr"])  # a tensor when compiled
            stats = train_epoch(model, batches, optimizer, after_step, progress, f"{phase} {epoch + 1}/{epochs}",
                                resume=partial, on_step=lambda running, epoch=epoch: stop_if_requested(epoch, running),
                                step=step)
            partial = None
            if scheduler is not None:
                scheduler.step()
            row = {"phase": phase, "epoch": epoch + 1, "lr": lr, "train_loss": stats.loss, "train_acc": stats.accuracy}
            if end_of_epoch is not None:
                row.update(end_of_epoch(epoch))
            if evaluation is not None and evaluation_due(epoch, epochs, eval_every):
                row.update(evaluation())
            row["seconds"] = elapsed + time.perf_counter() - start
            history.append(row)
            if log is not None:
                log(row)
            if checkpoint is not None:
                due = checkpoint.every_epochs > 0 and (epoch + 1) % checkpoint.every_epochs == 0
                if due or row.get("freeze_event"):
                    save(epoch + 1, None)
                stop_if_requested(epoch + 1, None)
            if row.get("search_exit"):
                break  # `end_of_epoch` ended the phase early (Gem-Miner's exit when no score is above 0.5)
    return history


def evaluation_due(epoch: int, epochs: int, eval_every: int) -> bool:
    """Whether epoch `epoch` (0-based) of `epochs` is evaluated: every `eval_every`-th and the last."""
    return (epoch + 1) % max(eval_every, 1) == 0 or epoch + 1 == epochs


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch]) -> EpochStats:
    """Loss and top-1 accuracy in eval mode."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    loss_sum, correct, samples, full = 0.0, 0, 0, None
    for inputs, targets in batches:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        full = full or len(inputs)
        logits = forward(model, inputs, eager=len(inputs) < full)  # the last, shorter batch: eagerly
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += int((logits.argmax(1) == targets).sum())
        samples += len(targets)
    model.train(was_training)
    return EpochStats(loss_sum / max(samples, 1), correct / max(samples, 1), samples)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Batch], num_batches: int) -> None:
    """Recompute BatchNorm running statistics as an exact average over `num_batches`
    training batches (train mode, no gradients). A changed mask makes the old
    statistics wrong, and a fresh model has none."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if num_batches <= 0 or not norms:
        return
    device = model_device(model)
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches seen
    was_training = model.training
    model.train()
    stream = iter(batches)
    try:
        for _, (inputs, _) in zip(range(num_batches), stream, strict=False):
            # eager: momentum None makes BatchNorm read its batch count (.item()), which would split a graph
            forward(model, inputs.to(device, non_blocking=True), eager=True)
    finally:
        getattr(stream, "close", lambda: None)()  # an abandoned pass is over (resumable Batches rely on it)
    for norm, momentum in zip(norms, momenta, strict=False):
        norm.momentum = momentum
    model.train(was_training)


def masked_accuracy(init_model: nn.Module, masks: dict[str, Tensor], test: Iterable[Batch],
                    recalibration: Iterable[Batch], recalibration_batches: int) -> float:
    """Accuracy of `init_model`'s weights under `masks`, untrained, with recalibrated BN.
    `init_model` is not changed."""
    model = copy.deepcopy(init_model)
    attach_fixed_masks(model, masks)
    recalibrate_batchnorm(model, recalibration, recalibration_batches)
    return evaluate(model, test).accuracy
