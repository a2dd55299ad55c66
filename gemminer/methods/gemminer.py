"""Gem-Miner (Sreenivasan et al., NeurIPS 2022): rare gems at initialization.

Weights stay fixed; each prunable weight has a score s in [0, 1]. The forward pass
uses ``w * 1[s > 0.5] * alive`` with a straight-through gradient to s; the loss is
cross-entropy + lambda * sum(s^2); every `freeze_period` epochs the globally
lowest-scored alive weights are frozen out so that the last event leaves exactly
round(N * density) alive. With `unflag` the ticket is `alive`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gemminer import distributed
from gemminer.checkpoint import Checkpointer
from gemminer.errors import GemminerError
from gemminer.init import init_hash
from gemminer.masking import ScoreMask, attach_score_masks, clamp_scores, largest, like_weight, release_score_masks
from gemminer.methods.base import MetricsLog, PruningMethod, SearchResult
from gemminer.methods.reg_lambda import TARGET_SHARE, AutoLambda, scheduled, speed_floor
from gemminer.seeding import make_generator
from gemminer.train import Batch, known_length


@dataclass
class GemMinerConfig:
    """Search settings; defaults are the paper's (ResNet-20 / CIFAR-10)."""

    epochs: int = field(default=150, metadata={"help": "search epochs E"})
    freeze_period: int = field(default=5, metadata={"help": "T: epochs between freezing events (0: no freezing)",
                                                    "tune": {"low": 1, "high": 10}})
    reg_lambda: float | str = field(default=1e-4, metadata={
        "help": "lambda of the lambda * sum(s^2) score penalty, or auto: set every epoch so that the gem "
                "settles at or just below the target density, in time (methods/reg_lambda.py)",
        "tune": {"low": 1e-6, "high": 1e-2, "log": True}})
    reg_lambda_schedule: list[float] = field(default_factory=list, metadata={
        "help": "lambda per epoch, replayed in place of reg_lambda (the last value holds to the end); the "
                "invert sanity check of an auto run replays the normal run's"})
    optimizer: str = field(default="sgd", metadata={"help": "sgd | adam"})
    lr: float = field(default=0.1, metadata={"help": "score learning rate",
                                             "tune": {"low": 1e-2, "high": 3.0, "log": True}})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    lr_schedule: str = field(default="cosine", metadata={"help": "cosine | constant"})
    score_init: str = field(default="uniform", metadata={"help": "uniform (U(0,1), paper) | ones"})
    unflag: bool = field(default=True, metadata={"help": "ticket = alive flags (paper); off: 1[s>0.5] * alive"})
    freeze: str = field(default="lowest", metadata={
        "help": "lowest (paper) | highest: freeze out the highest scores instead (the inversion sanity check)"})
    layer_floor: int = field(default=0, metadata={
        "help": "not the paper's: at every freezing event each layer keeps at least this many weights "
                "(its highest-scored alive ones); 0 = off"})

    def validate(self) -> None:  # numbers alone: `check_ranges`
        if isinstance(self.reg_lambda, str) and self.reg_lambda != "auto":
            raise GemminerError(f"search.reg_lambda must be a number >= 0 or auto, got {self.reg_lambda!r}")
        if self.reg_lambda == "auto" and self.freeze_period <= 0:
            raise GemminerError("search.reg_lambda auto aims the gem at the freezing schedule's target: it needs "
                                "freezing events (search.freeze_period > 0); give a number for Gem-Miner(0)")
        if self.freeze_period > 0 and self.epochs < self.freeze_period + 1:
            raise GemminerError(f"freezing every {self.freeze_period} epochs needs at least "
                                f"{self.freeze_period + 1} search epochs, got {self.epochs}")
        for key, value, allowed in (("optimizer", self.optimizer, ("sgd", "adam")),
                                    ("lr_schedule", self.lr_schedule, ("cosine", "constant")),
                                    ("score_init", self.score_init, ("uniform", "ones")),
                                    ("freeze", self.freeze, ("lowest", "highest"))):
            if value not in allowed:
                raise GemminerError(f"unknown search.{key} {value!r}; allowed: {', '.join(allowed)}")


def freeze_schedule(total: int, density: float, epochs: int, period: int) -> dict[int, int]:
    """{epoch (0-based): weights left alive after it}: event k of n = (E-1)//T, after
    epoch k*T, keeps round(total * density^(k/n)); the last keeps round(total * density)."""
    if period <= 0:
        return {}
    events = (epochs - 1) // period
    return {k * period: round(total * density ** (k / events)) for k in range(1, events + 1)}


def lowest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` lowest of the 1-D `values`, equal values by index (the earlier first):
    what a stable ascending sort's first `count` would pick, NaN last, in linear time (`largest`)
    rather than a sort of every score at each freezing event."""
    if values.isnan().any():  # a diverged search: the sort, which ranks NaN last, on this rare path
        chosen = torch.zeros_like(values, dtype=torch.bool)
        chosen[torch.sort(values, stable=True).indices[:max(count, 0)]] = True
        return chosen
    return largest(-values, count)


@torch.no_grad()
def freeze_lowest(masks: list[ScoreMask], keep: int, highest: bool = False, layer_floor: int = 0) -> None:
    """Freeze out all but `keep` alive weights, over all layers together: the lowest
    scores go first, ties broken by the global index (layer order, then position).
    `highest` freezes the highest scores first instead (the inverted sanity check).
    `layer_floor` (not the paper's) spares each layer's `layer_floor` best alive weights."""
    scores = torch.cat([m.scores.detach().flatten() for m in masks])
    if highest:
        scores = -scores
    alive = torch.cat([m.alive.flatten() for m in masks]).bool()
    if keep > int(alive.sum()):
        raise GemminerError("freezing cannot bring weights back")  # schedules only shrink
    key = scores.masked_fill(~alive, float("-inf"))  # already frozen weights go first
    if layer_floor > 0:
        spared, offset = [], 0
        for mask in masks:
            layer = key[offset:offset + mask.alive.numel()]
            alive_here = int(torch.isfinite(layer).sum())
            spared.append(offset + torch.nonzero(largest(layer.cpu(), min(layer_floor, alive_here))).flatten())
            offset += mask.alive.numel()
        spared_index = torch.cat(spared).to(key.device)
        if spared_index.numel() > keep:
            raise GemminerError(f"search.layer_floor {layer_floor} keeps {spared_index.numel()} weights, more than "
                                f"the {keep} a freezing event leaves: lower the floor")
        key[spared_index] = float("inf")
    # on the CPU: CUDA's kthvalue is refused under deterministic algorithms in older torch releases
    new_alive = (~lowest(key.cpu(), key.numel() - keep)).to(alive.device)
    distributed.broadcast(new_alive, source=0)  # rank 0 decides; every rank applies the same mask
    offset = 0
    for mask in masks:
        count = mask.alive.numel()
        mask.alive.copy_(new_alive[offset:offset + count].view_as(mask.alive))
        offset += count


@torch.no_grad()
def score_statistics(masks: list[ScoreMask]) -> tuple[int, int, float]:
    """(alive weights, weights alive and rounded on, sum of squared scores) over all layers. Each layer's
    three sums come back in one transfer (on a GPU one synchronisation, not three per layer) and are added
    up in Python, layer by layer, as float32 sums read one at a time would be. The squares are summed in
    index order (`flatten`), so a channels_last network (CUDA) logs the penalty of a contiguous one."""
    sums = torch.stack([torch.stack([m.alive.sum().double(), ((m.scores > 0.5) & m.alive.bool()).sum().double(),
                                     (m.scores * m.scores).flatten().sum().double()]) for m in masks]).tolist()
    return (sum(int(row[0]) for row in sums), sum(int(row[1]) for row in sums), sum(row[2] for row in sums))


class GemMiner(PruningMethod):
    name = "gemminer"
    Config = GemMinerConfig
    weight_init = "signed_constant"
    recipe = "gemminer"

    def _search(self, model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None,
                log: MetricsLog | None = None, recalibration: Iterable[Batch] | None = None,
                checkpoint: Checkpointer | None = None) -> SearchResult:
        config = self.config
        start = time.perf_counter()
        net = self.frozen_copy(model)
        names = self.prunable(net)
        generator = make_generator(self.seed, "scores")

        def make_scores(name: str, weight: torch.Tensor) -> ScoreMask:
            if config.score_init == "uniform":
                scores = torch.rand(weight.shape, generator=generator, dtype=weight.dtype)
            else:
                scores = torch.ones(weight.shape, dtype=weight.dtype)
            return ScoreMask(like_weight(scores, weight))

        score_masks = list(attach_score_masks(net, names, make_scores, grouped=not distributed.active()).values())
        scores = [mask.scores for mask in score_masks]
        total = sum(s.numel() for s in scores)
        schedule = freeze_schedule(total, self.density, config.epochs, config.freeze_period)
        final_keep = round(total * self.density)
        auto = None
        if config.reg_lambda == "auto":
            floor = speed_floor(config.optimizer, config.lr, config.momentum, config.lr_schedule, config.epochs,
                                known_length(train))
            auto = AutoLambda(scores, [m.alive for m in score_masks], round(TARGET_SHARE * final_keep), floor)

        def penalty(epoch: int) -> float:
            """λ in force during 0-based `epoch`."""
            if config.reg_lambda_schedule:
                return scheduled(config.reg_lambda_schedule, epoch)
            return auto.value if auto is not None else float(config.reg_lambda)

        def end_of_epoch(epoch: int) -> dict[str, Any]:
            row: dict[str, Any] = {"reg_lambda": penalty(epoch)}
            if epoch in schedule:
                gem_before = score_statistics(score_masks)[1]
                freeze_lowest(score_masks, schedule[epoch], highest=config.freeze == "highest",
                              layer_floor=config.layer_floor)
            alive, gem, squares = score_statistics(score_masks)
            if epoch in schedule:
                row["frozen_gem"] = gem_before - gem
            if gem == 0 and alive > final_keep and epoch + 1 < config.epochs:
                # the official exit: no score is above 0.5 any more, so later epochs cannot grow a gem;
                # prune to the target by score now and end the search
                freeze_lowest(score_masks, final_keep, highest=config.freeze == "highest",
                              layer_floor=config.layer_floor)
                alive, gem, squares = score_statistics(score_masks)
                row["search_exit"] = 1
            row.update({"reg_loss": row["reg_lambda"] * squares, "density": alive / total,
                        "density_gem": gem / total, "freeze_event": int(epoch in schedule or "search_exit" in row)})
            if auto is not None:
                auto.update()  # the next epoch's λ: `fit_scores` reads it through `penalty` after this
            return row

        setup_seconds = time.perf_counter() - start
        # lambda * sum(s^2) enters as weight decay 2 * lambda: the same gradient for SGD and Adam
        # (both add decay * s to the gradient), without an extra pass over every score per step.

        def after_step() -> None:
            clamp_scores(score_masks)
            if auto is not None:
                auto.accumulate()

        history = self.fit_scores(net, scores, train, epochs=config.epochs, optimizer=config.optimizer, lr=config.lr,
                                  momentum=config.momentum, weight_decay=lambda epoch: 2 * penalty(epoch),
                                  lr_schedule=config.lr_schedule, end_of_epoch=end_of_epoch,
                                  after_step=after_step, log=log, recalibration=recalibration,
                                  checkpoint=checkpoint, test=test,
                                  extra_state={"reg_lambda": auto} if auto is not None else None)
        release_score_masks(score_masks)
        seconds = setup_seconds + (history[-1]["seconds"] if history else 0.0)
        pairs = list(zip(names, score_masks, strict=True))
        alive_masks = {name: m.alive.bool() for name, m in pairs}
        gem_masks = {name: (m.scores.detach() > 0.5) & m.alive.bool() for name, m in pairs}
        trajectory = [row["reg_lambda"] for row in history]
        # one number for an auto or replayed lambda: the median over the epochs (its trajectory is in summary.json)
        representative = float(statistics.median(trajectory)) if trajectory else penalty(0)
        extra = {"init_hash": init_hash(model), "search_epochs": config.epochs, "freeze_period": config.freeze_period,
                 "reg_lambda": representative, "reg_lambda_mode": self.lambda_mode()}
        exit_epoch = next((row["epoch"] for row in history if row.get("search_exit")), None)
        summary = {"reg_lambda": extra["reg_lambda"], "reg_lambda_mode": self.lambda_mode(),
                   "reg_lambda_trajectory": trajectory, "search_exit_epoch": exit_epoch,
                   "frozen_gem": sum(row.get("frozen_gem", 0) for row in history)}
        gem = self.make_ticket(model, gem_masks, mask="gem", **extra)
        # Without freezing every weight stays alive: the found mask is 1[s > 0.5] (Gem-Miner(0)).
        use_alive = config.unflag and config.freeze_period > 0
        ticket = self.make_ticket(model, alive_masks if use_alive else gem_masks, mask="ticket", **extra)
        return SearchResult(ticket=ticket, gem=gem, epochs=len(history), seconds=seconds, history=history,
                            network=net, summary=summary)

    def lambda_mode(self) -> str:
        """How λ was set: "fixed", "auto" or "schedule" (replayed)."""
        if self.config.reg_lambda_schedule:
            return "schedule"
        return "auto" if self.config.reg_lambda == "auto" else "fixed"
