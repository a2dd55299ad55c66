"""``search.reg_lambda: auto``: the score penalty that puts the rare gem at the target, in time.

Where λ must be. The search minimises L(s) + λ Σ s² with s clamped to [0, 1]. Where a score settles, its
mean update is zero, so with ḡ its mean task gradient ḡ + 2λ s = 0, i.e. s* = clamp(-ḡ / 2λ, 0, 1). The
weight stays in the gem (s* > 0.5) exactly when -ḡ > λ. That holds for SGD with or without momentum and
for Adam with coupled L2 alike: their step sizes decide how fast a score gets there, not where it stops.
So the gem's equilibrium size at a given λ is the number of alive weights whose -ḡ exceeds λ, and the
λ whose equilibrium is k weights lies between the k-th and the (k+1)-th largest -ḡ: the *equilibrium λ*.

How fast it gets there. Under SGD a score the task does not hold sinks as ds = -lr_eff · 2λ s per step
(lr_eff = lr / (1 - momentum)), so from 1 to 0.5 it needs 2λ Σ lr_eff = ln 2. With a small equilibrium λ
(a high target density) that takes longer than the search has: the gem is still large when the last
freezing events come, and they cut into it. The *speed floor* is the λ that lets a score fall from 1 to
0.5 within the first `REACH` of the search's learning-rate schedule; λ is never below it, so the gem
settles at or below the target while the learning rate can still move it. Adam's step does not scale
with the gradient's size, so under Adam the floor is 0.

The paper raises λ by hand as the density falls, so that the gem ends at or just below the target and
freezing events never remove a weight the gem holds (a fixed λ leaves the gem at one density whatever the
target: the last freezing events then cut into it, or the gem empties). `AutoLambda` sets it from the
search itself: it averages each score's task gradient over the steps of an epoch (``p.grad`` after the
optimizer step holds the task gradient alone, as λ enters through the optimizer's weight decay), smooths
the epoch means exponentially, and sets the next epoch's λ to max(equilibrium λ for k = `TARGET_SHARE`
* target * N, speed floor), rising by at most `MAX_RISE` per epoch: early in the search the k-th largest
of noisy means reads high (at 0.1% density an unlimited first estimate emptied the gem). No separate
calibration runs: every epoch is a search epoch, counted in the cost. The first epoch, before any
gradient was seen, runs at the speed floor (the fallback). It works on any model and density without a
table of published values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

# The equilibrium aims a little below the target, so the gem's noise around it stays under the last
# freezing bound ("at or just below the target").
TARGET_SHARE = 0.9
# The share of the search within which the speed floor lets a score fall from 1 to 0.5 (`speed_floor`).
REACH = 0.5
# The most λ may grow from one epoch to the next (a fall is not limited).
MAX_RISE = 1.5
# Weight of the newest epoch's mean gradient in the running average: a score integrates its gradient
# over many epochs, a single epoch's mean is noisy, and the mask (hence the gradients) keeps changing.
NEWEST_EPOCH_WEIGHT = 0.5


class AutoLambda:
    """Sets λ once per epoch from the scores' mean task gradients (module docstring).

    `scores` are the trained score tensors, `alive` their 0/1 flags (read at each update, so frozen weights
    leave the ranking), `target` the count of weights the gem should keep at equilibrium. `accumulate`
    runs after every optimizer step; `update` at the end of every epoch returns the λ for the next one.
    Has `state_dict`/`load_state_dict` for checkpoints (a resumed search continues bit for bit).
    """

    def __init__(self, scores: list[Tensor], alive: list[Tensor], target: int, floor: float = 0.0) -> None:
        self.scores, self.alive, self.target, self.floor = scores, alive, max(int(target), 1), floor
        self.equilibrium = 0.0  # the λ whose fixed point is the target (module docstring)
        self.value = floor
        self.steps = 0
        self.epoch_sum = [torch.zeros_like(s, dtype=torch.float32) for s in scores]
        self.average: list[Tensor] | None = None

    @torch.no_grad()
    def accumulate(self) -> None:
        grads = [s.grad for s in self.scores]
        if any(g is None for g in grads):
            return  # a step without a backward through every score (not the search's own loop)
        torch._foreach_add_(self.epoch_sum, [g.float() for g in grads])
        self.steps += 1

    @torch.no_grad()
    def update(self) -> float:
        """λ for the next epoch: max(equilibrium λ from the epoch's gradients, speed floor)."""
        if self.steps:
            self.equilibrium = self._equilibrium()
        wanted = max(self.equilibrium, self.floor)
        # the first epochs' means are noisy, and the top of a noisy ranking reads high: rise gradually
        self.value = min(wanted, MAX_RISE * self.value) if self.value > 0 else wanted
        return self.value

    def _equilibrium(self) -> float:
        """Midway between the `target`-th and the next largest smoothed -ḡ among the alive weights, >= 0."""
        means = torch._foreach_div(self.epoch_sum, float(self.steps))
        if self.average is None:
            self.average = means
        else:
            torch._foreach_lerp_(self.average, means, NEWEST_EPOCH_WEIGHT)
        for tensor in self.epoch_sum:
            tensor.zero_()
        self.steps = 0
        pull = torch.cat([(-mean).masked_fill(flags == 0, float("-inf")).flatten()
                          for mean, flags in zip(self.average, self.alive, strict=True)])
        count = min(self.target, int((pull > float("-inf")).sum()))
        if count < 1:
            return self.equilibrium
        ranked = torch.topk(pull.cpu().double(), min(count + 1, pull.numel())).values
        # between the k-th and the (k+1)-th pull: the k-th settles above 0.5, the next one below
        # (at exactly the k-th pull its score would settle at 0.5, which is off)
        finite = ranked[torch.isfinite(ranked)]
        threshold = (finite[count - 1] + finite[count]) / 2 if finite.numel() > count else finite[count - 1]
        return max(float(threshold), 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "equilibrium": self.equilibrium, "steps": self.steps,
                "epoch_sum": [t.clone() for t in self.epoch_sum],
                "average": None if self.average is None else [t.clone() for t in self.average]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.steps = float(state["value"]), int(state["steps"])
        self.equilibrium = float(state["equilibrium"])
        for tensor, saved in zip(self.epoch_sum, state["epoch_sum"], strict=True):
            tensor.copy_(saved)
        self.average = None if state["average"] is None else [
            saved.to(tensor.device).clone() for tensor, saved in zip(self.epoch_sum, state["average"], strict=True)]


def speed_floor(optimizer: str, lr: float, momentum: float, lr_schedule: str, epochs: int,
                steps_per_epoch: int | None) -> float:
    """The smallest λ under which a score the task does not hold falls from 1 to 0.5 within the first
    `REACH` of the search (module docstring): ln 2 / (2 Σ lr_eff) over those steps, with the epoch's lr
    of the schedule (cosine: lr (1 + cos(π e / E)) / 2). 0 under Adam, or where the epoch length is
    unknown (a stream without ``len``)."""
    if optimizer != "sgd" or not steps_per_epoch or lr <= 0:
        return 0.0
    reach = max(1, round(REACH * epochs))
    rates = [lr * (1 + math.cos(math.pi * epoch / epochs)) / 2 if lr_schedule == "cosine" else lr
             for epoch in range(reach)]
    effective = sum(rates) * steps_per_epoch / (1 - momentum)
    return math.log(2) / (2 * effective)


def scheduled(values: list[float], epoch: int) -> float:
    """λ of 0-based `epoch` in a replayed schedule (one value per epoch; the last holds after its end)."""
    return float(values[min(epoch, len(values) - 1)])
