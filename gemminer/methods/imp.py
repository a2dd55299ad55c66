"""Iterative Magnitude Pruning (Frankle & Carbin 2019), with rewinding, as OpenLTH and the official
Gem-Miner code run it.

A round trains the weights with the ticket's own recipe (the data set's dense recipe by
default), then prunes the globally smallest-magnitude survivors. **The path**: round k trains the
mask of density (1 - f)^(k-1) and prunes it to (1 - f)^k (f = `prune_fraction`, 20%), each
keeping exactly round(N * density) weights. **A branch**: a requested density off the path (the
target, or one of `keep_densities`) is pruned once by magnitude, from the trained weights of the
round that trains the nearest path mask above it, to exactly round(N * density); its ticket trains
with the normal recipe from the rewind point. It is not a round of its own, so a stop's mask and its
epochs to ticket (the rounds on its path plus its branch) do not depend on which other stops were
asked for. A density within `NEAR_GRID` below a path point branches where that point is pruned (the
paper's 1.44% is 0.8^19 = 1.4412%: 19 rounds, not a 20th round that prunes 3 weights).

Between rounds the survivors are rewound:

- ``init``: to their step-0 values (Frankle & Carbin 2019);
- ``epoch:E``: to their values after E epochs of the first round, E possibly fractional
  ("IMP with warmup", Frankle et al. 2020; the official ResNet-20 comparison rewinds to
  iteration 1000, about 2.6 epochs of 150). `round_length` says how long a round after the
  rewind trains: ``remaining`` the rest of the schedule, from step E to its end (E_total - E
  epochs, OpenLTH), or ``full`` a whole round of E_total epochs with the schedule from its start
  (the official Gem-Miner code's IMP);
- ``lr``: not at all; they keep their trained values and the next round replays the whole
  learning-rate schedule (learning-rate rewinding, Renda et al. 2020).

The ticket's training is IMP's own last round: `SearchResult.start_state` and
`start_step` say where it starts. Every stop's mask is kept (`SearchResult.tickets`), so one
run serves a whole density curve; `rounds.csv` gives each its round, its epochs to ticket (under
both round lengths) and its seconds.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gemminer.checkpoint import Checkpointer
from gemminer.errors import GemminerError
from gemminer.init import init_hash, state_hash
from gemminer.masking import attach_fixed_masks, weights
from gemminer.methods.base import MetricsLog, PruningMethod, SearchResult
from gemminer.methods.scoring import keep_top
from gemminer.train import Batch, evaluate, known_length


@dataclass
class IMPConfig:
    epochs: int = field(default=150, metadata={"help": "training epochs per round"})
    prune_fraction: float = field(default=0.2, metadata={"help": "largest fraction of the survivors a round prunes",
                                                         "tune": {"low": 0.1, "high": 0.5}})
    keep_densities: list[float] | None = field(
        default=None, metadata={"help": "further densities whose tickets the run keeps: each a branch off the "
                                        "nearest round above it, or a point of the 0.8^k path"})
    rewind: str = field(default="init", metadata={
        "help": "init (step 0) | epoch:E (weights after E epochs of round 1, 'IMP with warmup') | lr (keep the "
                "trained weights, replay the lr schedule)"})
    round_length: str = field(default="remaining", metadata={
        "help": "after a rewind to epoch:E, each round trains: remaining (the schedule from E to its end, "
                "E_total - E epochs, OpenLTH) | full (E_total epochs from the schedule's start, the official "
                "Gem-Miner code)"})

    def validate(self) -> None:
        for density in self.keep_densities or []:
            if not (math.isfinite(density) and 0 < density <= 1):
                raise GemminerError(f"search.keep_densities must lie in (0, 1], got {density}")
        if self.round_length not in ROUND_LENGTHS:
            raise GemminerError(f"unknown search.round_length {self.round_length!r}; allowed: "
                                f"{', '.join(ROUND_LENGTHS)}")
        rewind_epoch(self.rewind, self.epochs)


ROUND_LENGTHS = ("remaining", "full")


def rewind_epoch(rewind: str, epochs: int) -> float | None:
    """E of ``epoch:E`` (None for init and lr), checked to lie inside the first round."""
    if rewind in ("init", "lr"):
        return None
    prefix, _, value = rewind.partition(":")
    try:
        epoch = float(value) if prefix == "epoch" else math.nan
    except ValueError:
        epoch = math.nan
    if not math.isfinite(epoch):
        raise GemminerError(f"unknown search.rewind {rewind!r}; allowed: init, lr, epoch:E (e.g. epoch:2.6)")
    if not 0 < epoch < epochs:
        raise GemminerError(f"search.rewind epoch:{value} must lie inside the first round (0 < E < {epochs})")
    return epoch


NEAR_GRID = 0.01  # a requested density this little (relatively) below a path point branches where it is pruned


def path_density(k: int, prune_fraction: float = 0.2) -> float:
    """The path's k-th density, (1 - f)^k, as 12 significant digits (0.512, not 0.5120000000000001:
    it names files and keys)."""
    return float(f"{(1 - prune_fraction) ** k:.12g}")


def stop_round(density: float, prune_fraction: float = 0.2) -> int:
    """The round whose trained weights prune to `density`: the first k whose path point (1 - f)^k lies
    at, just above (within `NEAR_GRID`) or below it. That round trains the path mask of density
    (1 - f)^(k-1), the nearest path point above `density`; k rounds are the stop's cost."""
    k = 1
    while (1 - prune_fraction) ** k * (1 - NEAR_GRID) - 1e-12 > density:
        k += 1
    return k


def requested_densities(target: float, keep: Iterable[float] = ()) -> list[float]:
    """The stops a run is asked for (the target and every kept density at or above it, below 1),
    in decreasing order."""
    return sorted({float(d) for d in (*keep, target) if target <= d < 1}, reverse=True)


def density_stops(target: float, prune_fraction: float = 0.2, keep: Iterable[float] = ()) -> list[float]:
    """Every density a run writes a ticket of, in decreasing order: the path points its rounds prune
    to before the last round, and every requested density (each a branch or a path point)."""
    requested = requested_densities(target, keep)
    rounds = stop_round(requested[-1], prune_fraction) if requested else 0
    path = [path_density(k, prune_fraction) for k in range(1, rounds)]
    return sorted(set(path) | set(requested), reverse=True)


def round_epochs(rounds: int, epochs: int, rewind_at: float) -> dict[str, float]:
    """Training epochs of `rounds` rounds of `epochs` each under both round lengths, where the rounds after
    the first start from a rewind to epoch `rewind_at` (0: from step 0, where both agree)."""
    return {"remaining": epochs + (rounds - 1) * (epochs - rewind_at) if rounds else 0.0,
            "full": float(rounds * epochs)}


def plain_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict under plain names (``layer.weight``), masks left out: the
    unmasked weights and every buffer, cloned to the CPU."""
    state = {}
    for name, tensor in model.state_dict().items():
        if ".parametrizations.weight." in name:
            if not name.endswith(".parametrizations.weight.original"):
                continue  # the mask itself
            name = name.replace(".parametrizations.weight.original", ".weight")
        state[name] = tensor.detach().to("cpu").clone()
    return state


class _StepCounter:
    """Optimizer steps of the first round, checkpointed with the loop (for the rewind point)."""

    def __init__(self) -> None:
        self.steps = 0

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])


class IMP(PruningMethod):
    name = "imp"
    Config = IMPConfig

    def __init__(self, density: float, config: Any = None, **kwargs: Any) -> None:
        super().__init__(density, config, **kwargs)
        below = [d for d in self.config.keep_densities or () if d < self.density]
        if below:  # the rounds end at the target: a stop below it would never be reached
            raise GemminerError(f"search.keep_densities {', '.join(f'{d:g}' for d in below)} lie below the target "
                                f"density {self.density:g}, where the rounds end; keep densities above it, or lower "
                                "--density")

    def _search(self, model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None,
                log: MetricsLog | None = None, recalibration: Iterable[Batch] | None = None,
                checkpoint: Checkpointer | None = None) -> SearchResult:
        from gemminer.finetune import finetune  # finetune imports the method base: import late

        config = self.config
        if self.density >= 1:
            raise GemminerError("imp prunes: its density must be below 1")
        names = self.prunable(model)
        sizes = {name: w.numel() for name, w in weights(model, names).items()}
        total = sum(sizes.values())
        requested = requested_densities(self.density, config.keep_densities or ())
        branches: dict[int, list[float]] = {}  # round -> the requested densities its trained weights prune to
        for density in requested:
            branches.setdefault(stop_round(density, config.prune_fraction), []).append(density)
        rounds = max(branches)  # the target's round: every other stop lies above it
        rewind_at = rewind_epoch(config.rewind, config.epochs)
        rewind_step = 0
        if rewind_at is not None:
            steps = known_length(train)
            if steps is None:
                raise GemminerError("search.rewind epoch:E needs training batches with a length")
            rewind_step = round(rewind_at * steps)
            if not 0 < rewind_step < config.epochs * steps:
                raise GemminerError(f"search.rewind {config.rewind} is step {rewind_step}, not inside the first round")
        # where a round after the first starts in the schedule: the rewind step, or 0 for a full round
        later_start = rewind_step if config.round_length == "remaining" else 0
        initial = plain_state(model)
        # progress survives a kill: it lives in the checkpoint's pipeline, saved with every checkpoint
        progress = checkpoint.pipeline.setdefault("method_state", {}) if checkpoint is not None else {}
        if progress.get("round") and "stop_rounds" not in progress:
            raise GemminerError("this IMP run was checkpointed by an earlier gemminer, whose rounds stopped at every "
                                "requested density: start it over with --force")
        progress.setdefault("round", 0)
        progress.setdefault("masks", {name: torch.ones(w.shape, dtype=torch.bool)
                                      for name, w in weights(model, names).items()})
        for key in ("history", "rounds", "tickets", "starts", "stop_rounds"):
            progress.setdefault(key, [] if key in ("history", "rounds") else {})
        progress.setdefault("seconds", 0.0)

        while progress["round"] < rounds:
            index = progress["round"]
            round_start = time.perf_counter()
            if index == 0 or config.rewind == "init":
                weights_from, start_step = initial, 0
            elif config.rewind == "lr":
                weights_from, start_step = progress["trained"], 0
            else:
                weights_from, start_step = progress["rewind"], later_start
            phase = f"imp-round-{index + 1}"
            if "stream" in progress and (checkpoint is None or checkpoint.phase_state(phase) is None) \
                    and hasattr(train, "load_state_dict"):
                train.load_state_dict(progress["stream"])  # a resume between rounds continues the same stream
            net = copy.deepcopy(model).to(self.device)
            net.load_state_dict(weights_from)
            attach_fixed_masks(net, {name: mask.to(self.device) for name, mask in progress["masks"].items()})
            counter = _StepCounter()

            def capture(net: nn.Module = net, counter: _StepCounter = counter, first: bool = index == 0) -> None:
                counter.steps += 1
                if first and counter.steps == rewind_step:
                    progress["rewind"] = plain_state(net)

            rows = finetune(net, train, test, epochs=config.epochs, config=self.training, log=log,
                            progress=self.progress, phase=phase, checkpoint=checkpoint,
                            start_step=start_step, after_step=capture if rewind_step else None,
                            extra_state={"imp_steps": counter}, eval_every=self.eval_every, compile=self.compile)
            trained = plain_state(net)
            magnitudes = {name: trained[name].abs() for name in names}
            accuracy = rows[-1].get("test_acc") if rows else (evaluate(net, test).accuracy if test else None)
            progress["seconds"] += rows[-1]["seconds"] if rows else time.perf_counter() - round_start
            progress["history"] += rows
            cost = round_epochs(index + 1, config.epochs, rewind_step / len(train) if rewind_step else 0.0)
            trained_at = sum(int(m.sum()) for m in progress["masks"].values()) / total
            # the path point this round prunes to (needed by the next round), then its branches
            outputs = [(path_density(index + 1, config.prune_fraction), False)] if index + 1 < rounds else []
            outputs += [(density, True) for density in branches.get(index + 1, [])]
            path_masks = None
            for density, branch in outputs:
                key, keep = f"{density:.12g}", round(total * density)
                if config.rewind == "lr" and branch:  # every stop's own start would be a copy of the model each
                    progress["starts"][key] = trained
                if key in progress["tickets"]:
                    continue  # a requested density on the path: the same mask as the path point's
                masks = keep_top(magnitudes, keep, eligible=progress["masks"])
                path_masks = masks if not branch else path_masks
                progress["tickets"][key] = masks
                progress["stop_rounds"][key] = index + 1
                progress["rounds"].append({
                    "round": index + 1, "density": trained_at, "pruned_to": keep / total, "kept": keep,
                    "branch": branch, "test_acc": accuracy, "epochs": cost[config.round_length],
                    "epochs_remaining": cost["remaining"], "epochs_full": cost["full"],
                    "seconds": progress["seconds"]})
            if config.rewind == "lr":
                progress["trained"] = trained
            if path_masks is not None:
                progress["masks"] = path_masks
            if hasattr(train, "state_dict"):
                progress["stream"] = train.state_dict()
            progress["round"] = index + 1
            if checkpoint is not None:
                checkpoint.pipeline["rows"] = list(progress["history"])  # a resume keeps earlier rounds' rows
                checkpoint.save(None)  # the round is done: a resume starts the next one

        stops = sorted((float(key) for key in progress["tickets"]), reverse=True)
        epochs = next(row["epochs"] for row in progress["rounds"] if row["round"] == rounds)
        # the rounds' own seconds (a resumed run's too) and this process's set-up
        return self._result(model, progress, stops, later_start if rewind_step else 0, epochs, progress["seconds"])

    def _result(self, model: nn.Module, progress: dict[str, Any], stops: list[float],
                start_step: int, epochs: float, seconds: float) -> SearchResult:
        config = self.config
        if config.rewind == "init":
            start_state, start_point = None, "init"
        elif config.rewind == "lr":
            start_state, start_point = progress["trained"], "trained"
        else:
            start_state, start_point = progress["rewind"], config.rewind
        extra = {"rewind": config.rewind, "start_point": start_point, "start_step": start_step,
                 "round_length": config.round_length, "search_epochs": config.epochs, "init_hash": init_hash(model)}

        parameters = {name for name, _ in model.named_parameters()}  # init_hash covers parameters only

        def ticket_of(masks: dict[str, Tensor], density: float, start: dict[str, Tensor] | None) -> Any:
            ticket = self.make_ticket(model, masks, **extra, rounds=progress["stop_rounds"][f"{density:.12g}"])
            ticket.metadata["density_target"] = density
            if config.rewind == "lr" and start is None:  # a stop that was not asked for: its weights were not kept
                ticket.metadata["start_point"] = "trained (not kept: list the density in keep_densities)"
            if start is not None:  # the weights its training starts from: a fingerprint that eval checks
                ticket.metadata["start_hash"] = state_hash({k: v for k, v in start.items() if k in parameters})
            return ticket

        tickets, starts = {}, {}
        for density in stops:
            key = f"{density:.12g}"
            start = progress["starts"].get(key) if config.rewind == "lr" else start_state
            tickets[density] = ticket_of(progress["tickets"][key], density, start)
            if config.rewind == "lr" and key in progress["starts"]:
                starts[density] = start
        final = copy.deepcopy(tickets[float(f"{self.density:.12g}")])
        final.metadata["density_target"] = self.density
        return SearchResult(ticket=final, gem=final, epochs=_whole(epochs), seconds=seconds,
                            history=list(progress["history"]), start_state=start_state, start_step=start_step,
                            start_point=start_point,
                            tickets=tickets, start_states=starts,
                            tables={"rounds.csv": [{**row, **{k: _whole(row[k]) for k in
                                                              ("epochs", "epochs_remaining", "epochs_full")}}
                                                   for row in progress["rounds"]]})


def _whole(epochs: float) -> float | int:
    """Epoch counts as integers where they are whole (fractional only after a fractional rewind)."""
    return int(epochs) if float(epochs).is_integer() else round(epochs, 6)
