"""GraSP (Wang, Zhang and Grosse, "Picking Winning Tickets Before Training by Preserving
Gradient Flow", ICLR 2020).

Removing weights delta changes the gradient norm by about S(delta) = 2 delta^T H g, with
g the loss gradient and H the Hessian. Pruning weight j (delta = -w_j) scores
S(-w) = -w * (H g); GraSP removes the weights with the largest -w * Hg, i.e. keeps those
with the LARGEST w * Hg (the reference's ``-w * grad`` scores, pruned from the top). The
loss is the cross-entropy of logits / T (T = 200), on `samples_per_class` training samples
of each class, in train mode.

As the reference (``GraSP.py``, num_iters = 1): the samples are grouped by class (class 0
first) and split into two halves; g is the sum of the two halves' gradients, detached, and
Hg = d/dw sum over halves of (g . grad L_half), through a graph of the gradient. Only the
prunable weights enter g and H (the weight block of the Hessian). The ranking is global
and keeps exactly round(N * density) weights (the reference's ``<=`` threshold keeps ties).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemminer.checkpoint import Checkpointer
from gemminer.errors import GemminerError
from gemminer.masking import weights
from gemminer.methods.base import MetricsLog, PruningMethod, SearchResult
from gemminer.methods.scoring import exact_count, keep_top
from gemminer.train import Batch, class_scores


@dataclass
class GraspConfig:
    """GraSP's options; the defaults are the paper's (T = 200, 10 samples per class)."""

    temperature: float = field(default=200.0, metadata={"help": "T: the loss sees logits / T (paper: 200)"})
    samples_per_class: int = field(default=10, metadata={"help": "training samples of each class scored (paper: 10)"})

    def validate(self) -> None:  # its numbers: `check_ranges` (temperature > 0, samples_per_class >= 1)
        pass


def class_balanced_samples(train: Iterable[Batch], per_class: int,
                           num_classes: int | Callable[[Tensor], int]) -> Batch:
    """The first `per_class` samples of each class in one pass over `train`, grouped by class
    (ascending label, as the reference concatenates them); stops once every one of
    `num_classes` classes is full, or when the data runs out (classes may then hold fewer).
    `num_classes` may be a function of the first batch's inputs (the model's output width)."""
    inputs: dict[int, list[Tensor]] = {}
    full = 0
    iterator = iter(train)
    try:
        for batch_inputs, batch_targets in iterator:
            if callable(num_classes):
                num_classes = num_classes(batch_inputs)
            for x, y in zip(batch_inputs, batch_targets.tolist(), strict=True):
                taken = inputs.setdefault(int(y), [])
                if len(taken) < per_class:
                    taken.append(x.clone())  # not a view: the batch itself can go
                    full += len(taken) == per_class
            if full >= num_classes:
                break
    finally:
        close = getattr(iterator, "close", None)
        if callable(close):
            close()
    if not inputs:
        raise GemminerError("grasp needs training samples; the training data is empty")
    labels = sorted(inputs)
    x = torch.stack([sample for label in labels for sample in inputs[label]])
    y = torch.tensor([label for label in labels for _ in inputs[label]], dtype=torch.long)
    return x, y


def short_of(targets: Tensor, per_class: int, num_classes: int) -> None:
    """Warn (naming the classes) when the data held fewer than `per_class` samples of some class:
    GraSP then scores on fewer samples than configured, recorded as the ticket's `grasp_samples`."""
    counts = torch.bincount(targets, minlength=num_classes).tolist()
    short = [f"{label}: {count}" for label, count in enumerate(counts) if count < per_class]
    if short:
        listed = ", ".join(short[:10]) + (f" and {len(short) - 10} more" if len(short) > 10 else "")
        warnings.warn(f"grasp: the training data has fewer than samples_per_class={per_class} samples of "
                      f"{len(short)} class(es) ({listed}); it scores on {len(targets)} samples, not "
                      f"{per_class * num_classes}", stacklevel=2)


def halves(inputs: Tensor, targets: Tensor) -> list[Batch]:
    """The reference's two halves [:N//2], [N//2:] (an empty one is dropped)."""
    middle = inputs.shape[0] // 2
    parts = [(inputs[:middle], targets[:middle]), (inputs[middle:], targets[middle:])]
    return [part for part in parts if part[0].shape[0] > 0]


def gradient_and_hessian_gradient(net: nn.Module, names: list[str], parts: list[Batch], temperature: float
                                  ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(g, H g) over the prunable weights: g = sum_p dL_p/dw with L_p the cross-entropy of
    net(x_p) / T, detached; H g = d/dw sum_p (g . dL_p/dw). On `net` as it is (mode
    included); sets requires_grad on the weights of `net`."""
    params = weights(net, names)
    tensors = list(params.values())
    for parameter in tensors:
        parameter.requires_grad_(True)

    def loss(part: Batch) -> Tensor:
        inputs, targets = part
        return F.cross_entropy(class_scores(net(inputs)) / temperature, targets)

    g = [torch.zeros_like(p) for p in tensors]
    hg = [torch.zeros_like(p) for p in tensors]
    with torch.enable_grad():
        for part in parts:
            for total, grad in zip(g, torch.autograd.grad(loss(part), tensors, allow_unused=True), strict=True):
                if grad is not None:
                    total += grad
        for part in parts:
            grads = torch.autograd.grad(loss(part), tensors, create_graph=True, allow_unused=True)
            z = sum(((stopped * grad).sum() for stopped, grad in zip(g, grads, strict=True) if grad is not None),
                    torch.zeros((), dtype=tensors[0].dtype, device=tensors[0].device))
            if not z.requires_grad:  # the gradient does not depend on the weights: H g = 0
                continue
            for total, second in zip(hg, torch.autograd.grad(z, tensors, allow_unused=True), strict=True):
                if second is not None:
                    total += second
    return dict(zip(params, g, strict=True)), dict(zip(params, hg, strict=True))


def grasp_scores(net: nn.Module, names: list[str], parts: list[Batch], temperature: float) -> dict[str, Tensor]:
    """w * (H g): the higher, the more a weight is worth keeping."""
    _, hg = gradient_and_hessian_gradient(net, names, parts, temperature)
    params = weights(net, names)
    return {name: params[name].detach() * hg[name] for name in names}


class Grasp(PruningMethod):
    """Keeps the weights whose removal would most reduce gradient flow: largest w * Hg."""

    name = "grasp"
    Config = GraspConfig
    ranked = True

    def _search(self, model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None,
                log: MetricsLog | None = None, recalibration: Iterable[Batch] | None = None,
                checkpoint: Checkpointer | None = None) -> SearchResult:
        start = time.perf_counter()
        net = copy.deepcopy(model).to(self.device)
        names = self.prunable(net)
        width = self._output_width(net)
        inputs, targets = class_balanced_samples(train, self.config.samples_per_class, width)
        short_of(targets, self.config.samples_per_class, width(inputs))
        parts = halves(inputs.to(self.device), targets.to(self.device))
        net.train()  # as the reference scores: BatchNorm on the statistics of each half
        scores = {name: s.to("cpu") for name, s in grasp_scores(net, names, parts, self.config.temperature).items()}
        masks = keep_top(scores, exact_count({name: s.numel() for name, s in scores.items()}, self.density))
        seconds = time.perf_counter() - start
        ticket = self.make_ticket(model, masks, grasp_samples=int(inputs.shape[0]))
        return SearchResult(ticket=ticket, gem=ticket, epochs=0, seconds=seconds, scores=scores)

    def _output_width(self, net: nn.Module) -> Callable[[Tensor], int]:
        """The number of classes: the width of the model's output on one sample (eval mode,
        no gradient; the scores are computed in train mode afterwards)."""

        found: list[int] = []  # asked for twice (the samples, the short-class check): measured once

        def width(inputs: Tensor) -> int:
            if not found:
                net.eval()
                with torch.no_grad():
                    found.append(int(class_scores(net(inputs[:1].to(self.device))).shape[-1]))
            return found[0]

        return width
