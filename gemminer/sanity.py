"""Sanity checks of a ticket (Frankle et al. 2021): is it a real ticket, or only layerwise ratios?

Each check trains a variant of a finished run's ticket with the run's own recipe (the same
start weights, schedule and epochs as the ticket's training) into ``RUN/sanity/<check>/``:

- ``shuffle``: the mask permuted within each layer (every layer keeps its count);
- ``reinit``: the same mask on weights freshly drawn from the run's init scheme with another seed
  (they start the schedule at step 0: they are initial weights);
- ``invert``: for one-shot score-then-keep methods the lowest-ranked d·N weights by the method's own
  global ranking (``scores.safetensors``); for Gem-Miner and SynFlow a new search that inverts every
  step (`INVERTED_SEARCH`): Gem-Miner freezes out the highest scores instead of the lowest, SynFlow
  prunes the highest-scored weights still alive in each of its rounds (Frankle et al.'s code prunes
  the highest at every iteration, ``--prune_highest``), which is not the bottom of the normal run's
  ranking. Methods without a ranking refuse it.

A method that learns only layerwise ratios loses nothing under these checks; a real ticket does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gemminer.config import RunConfig, load_run_config, resolve, to_dict
from gemminer.errors import GemminerError
from gemminer.init import init_hash
from gemminer.methods import method_class
from gemminer.methods.scoring import keep_bottom
from gemminer.runs import RunFolder, read_json, write_atomic
from gemminer.seeding import derive_seed, make_generator
from gemminer.threads import parse_threads
from gemminer.ticket import Ticket, masks_digest, read_safetensors

CHECKS = ("shuffle", "reinit", "invert")
# The methods that prune in steps at initialization (Gem-Miner, SynFlow), whose inverted ticket is a new
# search with every step inverted: the search options that do it. Any other ranked method inverts its saved
# ranking (one shot: the same thing); IMP, which trains between its steps, keeps no ranking and refuses.
INVERTED_SEARCH: dict[str, dict[str, Any]] = {"gemminer": {"freeze": "highest"}, "synflow": {"prune": "highest"}}


def invertible(method: str) -> bool:
    """Whether `method`'s ticket has an inverted one: a search with every step inverted, or its ranking."""
    return method in INVERTED_SEARCH or method_class(method).ranked


def shuffle_layers(ticket: Ticket, generator: torch.Generator) -> Ticket:
    """The mask permuted within each layer: per-layer counts kept, positions random."""
    masks = {}
    for name, mask in ticket.masks.items():
        flat = mask.flatten()
        masks[name] = flat[torch.randperm(flat.numel(), generator=generator)].view(mask.shape)
    return Ticket(masks, {**ticket.metadata, "sanity": "shuffle"})


def invert_ranking(ticket: Ticket, scores: dict[str, torch.Tensor]) -> Ticket:
    """The lowest-ranked weights, as many as the ticket keeps, by the method's own scores."""
    if set(scores) != set(ticket.masks):
        raise GemminerError("the run's scores.safetensors names other layers than its ticket")
    ordered = {name: scores[name] for name in ticket.masks}
    return Ticket(keep_bottom(ordered, ticket.remaining), {**ticket.metadata, "sanity": "invert"})


def _parse_checks(checks: str | list[str]) -> list[str]:
    names = [c.strip() for c in checks.split(",") if c.strip()] if isinstance(checks, str) else list(checks)
    for name in names:
        if name not in CHECKS:
            raise GemminerError(f"unknown sanity check {name!r}; allowed: {', '.join(CHECKS)}")
    if not names:
        raise GemminerError("give at least one sanity check")
    return names


def sanity(run_dir: str | Path, checks: str | list[str] = CHECKS, force: bool = False, progress: bool = False,
           report: Callable[[str], None] | None = print, threads: int | str | None = None) -> dict[str, Any]:
    """Train each check's variant of the finished run in `run_dir`; write ``sanity.json`` there.

    Returns ``{check: {"acc_after_finetune", "drop", "run"}}`` with drop = the ticket's accuracy after
    training minus the variant's (percentage points / 100). Finished variants are reused.
    """
    from gemminer.experiment import finetune_saved, load_run, mine, read_start, setup

    run_dir = Path(run_dir)
    folder = RunFolder(run_dir)
    names = _parse_checks(checks)
    config, ticket, _, init = load_run(run_dir)
    if threads is not None:  # "auto" or N; None: as the run had
        config.threads = parse_threads(threads)
    summary = folder.summary()  # refuses an unfinished run
    if config.method == "dense":
        raise GemminerError("the dense reference keeps every weight: it has no ticket to check")
    if "invert" in names and not invertible(config.method):
        raise GemminerError(f"method {config.method} keeps no ranking of weights, so its ticket cannot be "
                            "inverted; run --checks shuffle,reinit")
    start = read_start(folder)
    previous = (read_json(folder.file("sanity.json"), "sanity results", "delete it: the checks write it again")
                if folder.file("sanity.json").is_file() else {})
    digest = masks_digest(ticket.masks)
    if previous.get("ticket_sha256") not in (None, digest):  # the run was redone: its old variants are stale
        force, previous = True, {}
    results: dict[str, Any] = {}
    for check in names:
        out = run_dir / "sanity" / check
        variant = RunFolder(out)
        stale = _stale_inversion(check, config, variant)
        if variant.finished and not force and not stale:
            variant_summary = variant.summary()
        elif check == "invert" and config.method in INVERTED_SEARCH:
            inverted = resolve({**to_dict(config), "search": {**to_dict(config.search),
                                                              **INVERTED_SEARCH[config.method],
                                                              **replayed_lambda(config, summary)}})
            variant_summary = mine(inverted, out, force=force or stale, progress=progress)
        else:
            weights, variant_ticket = _variant(check, config, ticket, init, start, folder, setup)
            variant_summary = finetune_saved(config, variant_ticket, weights, out, force=force, progress=progress)
        accuracy = variant_summary["acc_after_finetune"]
        drop = summary["acc_after_finetune"] - accuracy
        results[check] = {"acc_after_finetune": accuracy, "drop": drop,
                          "run": str(out)}
        if report is not None:
            report(f"{check:>8}: {100 * accuracy:.2f}% after training; drop from the ticket's "
                   f"{100 * summary['acc_after_finetune']:.2f}%: {100 * drop:+.2f} points")
    document = {"run": str(run_dir), "method": config.method, "density": ticket.density, "ticket_sha256": digest,
                "acc_after_finetune": summary["acc_after_finetune"],
                "checks": {**previous.get("checks", {}), **results}}
    write_atomic(folder.file("sanity.json"), json.dumps(document, indent=2) + "\n")
    return results


def replayed_lambda(config: RunConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """The search keys that give an inverted Gem-Miner run the normal run's lambda: an ``auto`` run's
    lambda follows its own gem, and the inverted search's gem is another, so the variant replays the
    normal run's per-epoch trajectory instead (the same penalty, only the freezing inverted)."""
    if getattr(config.search, "reg_lambda", None) != "auto" or not summary.get("reg_lambda_trajectory"):
        return {}
    return {"reg_lambda_schedule": [float(value) for value in summary["reg_lambda_trajectory"]]}


def _stale_inversion(check: str, config: RunConfig, variant: RunFolder) -> bool:
    """Whether an ``invert`` variant of Gem-Miner or SynFlow, finished or stopped halfway, was made by an
    earlier rule (SynFlow's was the bottom of its ranking before the search with every round inverted): it
    is made again."""
    if check != "invert" or config.method not in INVERTED_SEARCH or not variant.file("config.yaml").is_file():
        return False
    search = load_run_config(variant.file("config.yaml")).search
    return any(getattr(search, key) != value for key, value in INVERTED_SEARCH[config.method].items())


def _variant(check: str, config: RunConfig, ticket: Ticket, init: dict[str, torch.Tensor],
             start: dict[str, torch.Tensor] | None, folder: RunFolder, setup: Callable) -> tuple[dict, Ticket]:
    """The weights and mask a check trains (the run's start weights unless re-drawn)."""
    weights = start if start is not None else init
    if check == "shuffle":
        return weights, shuffle_layers(ticket, make_generator(config.seed, "sanity-shuffle"))
    if check == "invert":
        path = folder.file("scores.safetensors")
        if not path.is_file():
            raise GemminerError(f"{folder.path} has no scores.safetensors (the method's ranking) to invert")
        scores, _ = read_safetensors(path, what="scores")
        return weights, invert_ranking(ticket, scores)
    # reinit: another draw of the same scheme; the ticket names those weights as its own
    fresh = setup(config, weights_seed=derive_seed(config.seed, "sanity-reinit") % (2 ** 31)).model
    state = {name: tensor.detach().to("cpu") for name, tensor in fresh.state_dict().items()}
    metadata = {key: value for key, value in ticket.metadata.items() if key not in ("start_hash", "start_step")}
    return state, Ticket(dict(ticket.masks), {**metadata, "init_hash": init_hash(fresh), "sanity": "reinit"})
