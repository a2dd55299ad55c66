"""``search.reg_lambda: auto``: the score penalty that puts the rare gem's equilibrium at the target.

Why this rule. The search minimises L(s) + λ Σ s² with s clamped to [0, 1]. Where a score settles, its
mean update is zero, so with ḡ its mean task gradient ḡ + 2λ s = 0, i.e. s* = clamp(-ḡ / 2λ, 0, 1). The
weight stays in the gem (s* > 0.5) exactly when -ḡ > λ. That holds for SGD with or without momentum and
for Adam with coupled L2 alike: their step sizes decide how fast a score gets there, not where it stops
(Adam divides the whole mean update, penalty included, by one positive number). So the gem's equilibrium
density at a given λ is the fraction of alive weights whose -ḡ exceeds λ, and the λ whose equilibrium is
a given count k lies between the k-th and the (k+1)-th largest -ḡ among the alive weights.

The paper raises λ by hand as the density falls, so that the gem ends at or just below the target and
freezing events never remove a weight the gem holds (a fixed λ leaves the gem at one density whatever the
target: the last freezing events then cut into it, or the gem empties). `AutoLambda` reads that λ off
the search itself: it averages each score's task gradient over every step of an epoch (``p.grad`` after
the optimizer step holds the task gradient alone, as λ enters through the optimizer's weight decay),
smooths the epoch means exponentially, and sets the next epoch's λ just below the k-th largest -ḡ, with
k = `TARGET_SHARE` * target * N. No separate calibration runs: every epoch is a search epoch, counted in
the cost. The first epoch, before any gradient was seen, runs at λ = 0 (the fallback: a one-epoch search
has no penalty). It works on any model and density without a table of published values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# The equilibrium aims a little below the target, so the gem's noise around it stays under the last
# freezing bound ("at or just below the target").
TARGET_SHARE = 0.9
# The share of the search epochs after which the gem should be at its target size (`gem_path`).
REACH = 0.6
# Each epoch the gem stays under the schedule, the feedback push keeps this share of itself.
PUSH_FADE = 0.7
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

    def __init__(self, scores: list[Tensor], alive: list[Tensor], target: int) -> None:
        self.scores, self.alive, self.target = scores, alive, max(int(target), 1)
        self.value = 0.0
        self.equilibrium = 0.0  # the λ whose fixed point is the target (module docstring)
        self.push = 0.0  # the feedback λ while the gem runs ahead of the freezing schedule
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
    def update(self, gem: int | None = None, allowed: float | None = None) -> float:
        """λ for the next epoch, from the epoch's gradients and, where given, the gem's size `gem` against
        the count `allowed` that the freezing schedule leaves it (`AutoLambda` docstring)."""
        if self.steps:
            self.equilibrium = self._equilibrium()
        if gem is not None and allowed is not None:
            if gem > allowed:  # the gem is still too large for the schedule: push harder, at most 2x a time
                self.push = max(self.push, self.value) * min(2.0, gem / max(allowed, 1.0))
            else:  # it is under the schedule: let the push fade back to the equilibrium
                self.push *= PUSH_FADE
        self.value = max(self.equilibrium, self.push)
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
        return {"value": self.value, "equilibrium": self.equilibrium, "push": self.push, "steps": self.steps, "epoch_sum": [t.clone() for t in self.epoch_sum],
                "average": None if self.average is None else [t.clone() for t in self.average]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.steps = float(state["value"]), int(state["steps"])
        self.equilibrium, self.push = float(state["equilibrium"]), float(state["push"])
        for tensor, saved in zip(self.epoch_sum, state["epoch_sum"], strict=True):
            tensor.copy_(saved)
        self.average = None if state["average"] is None else [
            saved.to(tensor.device).clone() for tensor, saved in zip(self.epoch_sum, state["average"], strict=True)]


def gem_path(epoch: int, epochs: int, total: int, target: int) -> float:
    """The gem size `AutoLambda`'s feedback keeps under after 0-based `epoch`: a geometric path from half
    the weights (U(0,1) scores at init) down to `TARGET_SHARE` * `target`, reached after `REACH` of the
    epochs and held after. Scores take epochs to follow a new λ, and with a cosine lr they barely move
    late in the search, so the gem must be at its size well before the last freezing events; the path
    also stays below every freezing bound (they fall from all weights to the target over all epochs)."""
    progress = min((epoch + 1) / max(REACH * epochs, 1.0), 1.0)
    return TARGET_SHARE * (0.5 * total) ** (1 - progress) * max(target, 1) ** progress


def scheduled(values: list[float], epoch: int) -> float:
    """λ of 0-based `epoch` in a replayed schedule (one value per epoch; the last holds after its end)."""
    return float(values[min(epoch, len(values) - 1)])
