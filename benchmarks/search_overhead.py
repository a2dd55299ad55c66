"""Where the search's extra time over dense training goes, piece by piece, on any device.

    python benchmarks/search_overhead.py [--model cnn1d] [--device auto] [--batch 128] [--repeats 200]
    python benchmarks/search_overhead.py --model resnet20 --device cuda

`search_speed.py` gives the ratio of whole epochs; this splits the difference. On random inputs of
the data's shape (no data files), in one process, after warm-up. The five kinds of whole step take
turns one call at a time, in an order that rotates and reverses, 5 x `--repeats` calls of each, and
each gives the median of its calls (so that drift in machine load hits all alike: timed in rounds of
many calls each, two kinds of step that cost the same differed by 6% here); the other pieces are
timed over `--repeats` calls (median of 5 rounds):
- `dense_step_ms`: forward, backward and SGD step of the plain network (every weight trains);
- `search_step_ms`: the same for Gem-Miner's search network (frozen weights, scores through
  parametrize, the score clamp after the step): what a search step costs;
- `weights_only_step_ms`: the plain network training its prunable weights alone (the search's
  arithmetic: the same gradients, SGD over as many values, nothing else trains), no mask;
- `parametrized_step_ms`: the same with each of those weights through an identity parametrization:
  what parametrize itself costs in a step;
- `search_no_clamp_step_ms`: the search step without the clamp after it (the mask then clamps the scores
  in its forward, which it skips for scores the clamp left in [0, 1]);
- `masked_weights_ms`: the parametrized weights alone, forward and backward (random gradients): the
  mask's share of a search step, measured apart (its Python and small passes cost more inside a step,
  where the layers' work has filled the caches: the `in_step_*` differences below);
- `clamp_ms`: the clamp of every score to [0, 1] after a step;
- `freezing_event_ms`: one freezing event (`freeze_lowest`), every `freeze_period` epochs;
- `epoch_statistics_ms`: the end-of-epoch density and penalty sums (`score_statistics`), every epoch.
Printed as one JSON line, with `steps_per_epoch` of CIFAR-10 / MNIST-1D at this batch, so that the
per-epoch pieces can be set against the steps, and the search's extra per step split by differences of
whole steps: `in_step_other_ms` (weights-only minus dense), `in_step_parametrize_ms`,
`in_step_mask_ms` (the search without its clamp minus the parametrized step) and `in_step_clamp_ms`.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from gemminer.allocator import keep_freed_memory
from gemminer.masking import ScoreMask, attach, attach_score_masks, clamp_scores, like_weight, owner, prunable_names
from gemminer.methods.gemminer import freeze_lowest, score_statistics
from gemminer.models import build_model
from gemminer.train import resolve_device

SHAPES = {"resnet20": ((3, 32, 32), 10, 50_000), "cnn1d": ((1, 40), 10, 4_000)}  # input, classes, train size


def timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def milliseconds(work: Callable[[], object], repeats: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        sync()
        return (time.perf_counter() - start) / repeats * 1e3

    return milliseconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", default="cnn1d", choices=sorted(SHAPES))
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=200, help="calls per timing round (5 rounds)")
    parser.add_argument("--no-group", action="store_true",
                        help="each layer's mask on its own, not in one ScoreMaskGroup (as the search runs)")
    args = parser.parse_args()
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be at least 1")
    keep_freed_memory()  # as the command line does (gemminer.allocator)
    device = resolve_device(args.device)
    shape, classes, train_size = SHAPES[args.model]
    channels_last = device.type == "cuda" and len(shape) == 3  # as gemminer lays images out there
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn((args.batch, *shape), generator=generator).to(device)
    targets = torch.randint(0, classes, (args.batch,), generator=generator).to(device)
    dense = build_model(args.model, shape, classes, width=args.width).to(device)
    if channels_last:
        dense = dense.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    search = copy.deepcopy(dense)
    for parameter in search.parameters():
        parameter.requires_grad_(False)
    names = prunable_names(search)
    attach_masks = attach if args.no_group else attach_score_masks
    masks = list(attach_masks(search, names, lambda name, weight: ScoreMask(  # as the search makes them
        like_weight(torch.rand(weight.shape, generator=generator), weight))).values())
    scores = [mask.scores for mask in masks]
    dense_optimizer = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    score_optimizer = torch.optim.SGD(scores, lr=0.1, momentum=0.9, weight_decay=2e-4)
    weights_only, weights_only_optimizer = prunable_weights_only(dense, names, parametrized=False)
    parametrized, parametrized_optimizer = prunable_weights_only(dense, names, parametrized=True)

    def clamp() -> None:  # GemMiner's after_step
        clamp_scores(masks)

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, after: Callable[[], None] | None) -> None:
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after is not None:
            after()

    layers = [owner(search, name) for name in names]
    weight_grads = [torch.randn_like(mask.scores) for mask in masks]

    def masked_weights() -> None:
        torch.autograd.backward([layer.weight for layer in layers], weight_grads)
        for score in scores:
            score.grad = None

    total = sum(score.numel() for score in scores)
    pieces: dict[str, Callable[[], object]] = {
        "dense_step_ms": lambda: step(dense, dense_optimizer, None),
        "search_step_ms": lambda: step(search, score_optimizer, clamp),
        "weights_only_step_ms": lambda: step(weights_only, weights_only_optimizer, None),
        "parametrized_step_ms": lambda: step(parametrized, parametrized_optimizer, None),
        "search_no_clamp_step_ms": lambda: step(search, score_optimizer, None),
        "masked_weights_ms": masked_weights,
        "clamp_ms": clamp,
        # the same keep each time: the event's work does not depend on how many are already frozen
        "freezing_event_ms": lambda: freeze_lowest(masks, total // 2),
        "epoch_statistics_ms": lambda: score_statistics(masks),
    }
    per_event = {"freezing_event_ms", "epoch_statistics_ms"}
    milliseconds = timer(device)
    for work in pieces.values():  # warm-up (and cuDNN's choices)
        milliseconds(work, 3)
    steps = [name for name in pieces if name.endswith("_step_ms")]
    calls: dict[str, list[float]] = {name: [] for name in steps}
    for turn in range(5 * args.repeats):
        order = steps[turn % len(steps):] + steps[:turn % len(steps)]
        for name in (order if turn % 2 == 0 else order[::-1]):
            calls[name].append(milliseconds(pieces[name], 1))
    rounds: dict[str, list[float]] = {name: [] for name in pieces if name not in calls}
    for _ in range(5):
        for name in rounds:
            rounds[name].append(milliseconds(pieces[name], max(args.repeats // 20, 3) if name in per_event
                                             else args.repeats))
    result = {name: round(statistics.median(values), 4) for name, values in {**calls, **rounds}.items()}
    result = {name: result[name] for name in pieces}  # in the documented order
    extra = result["search_step_ms"] - result["dense_step_ms"]
    print(json.dumps({
        "model": args.model, "grouped": not args.no_group, "device": str(device), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "batch": args.batch,
        "prunable_layers": len(names), "scores": total, "steps_per_epoch": -(-train_size // args.batch),
        **result, "search_over_dense_per_step": round(result["search_step_ms"] / result["dense_step_ms"], 4),
        "extra_step_ms": round(extra, 4),
        **{f"in_step_{piece}_ms": round(result[later] - result[earlier], 4) for piece, later, earlier in (
            ("other", "weights_only_step_ms", "dense_step_ms"),
            ("parametrize", "parametrized_step_ms", "weights_only_step_ms"),
            ("mask", "search_no_clamp_step_ms", "parametrized_step_ms"),
            ("clamp", "search_step_ms", "search_no_clamp_step_ms"))}}))


def prunable_weights_only(dense: nn.Module, names: list[str], parametrized: bool
                          ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A copy of `dense` whose prunable weights alone train (SGD as the scores'), each through an identity
    parametrization if `parametrized`: the search's arithmetic without (or with only parametrize of) its mask."""
    model = copy.deepcopy(dense)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trained = []
    for name in names:
        layer = owner(model, name)
        layer.weight.requires_grad_(True)
        trained.append(layer.weight)
        if parametrized:
            parametrize.register_parametrization(layer, "weight", nn.Identity(), unsafe=True)
    # a small lr: these weights train on random inputs, and only the time of a step is wanted
    return model, torch.optim.SGD(trained, lr=1e-4, momentum=0.9, weight_decay=2e-4)


if __name__ == "__main__":
    main()
