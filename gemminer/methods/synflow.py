"""SynFlow (Tanaka, Kunin, Yamins and Ganguli, "Pruning neural networks without any data by
iteratively conserving synaptic flow", NeurIPS 2020).

Data-free: in eval mode, with every parameter and floating buffer replaced by its absolute
value, R = sum of the network's outputs on one all-ones input; the score of weight j is
|w_j * dR/dw_j| (the reference's ``linearize`` / ``score``). Iterative: round k = 1..K keeps
round(N * density^(k/K)) of the weights still alive (the exponential schedule), re-scoring
the masked network each round, so the last round keeps exactly round(N * density). The
reference recomputes the mask over all weights with pruned ones scoring 0; ranking only the
alive ones is the same without ties at 0. Computed in float64 by default so that deep
networks do not overflow; a score that still overflows ranks as the tie rule says (NaN last).

`SearchResult.scores` is the elimination order as one global ranking (higher = kept
longer): weights pruned in round k rank below those alive after it, and within a round
by that round's score, so ``keep_top(scores, keep)`` is the ticket.

``prune: highest`` is Frankle et al. 2021's inverted SynFlow (the ``invert`` sanity check):
every round prunes the HIGHEST-scored weights still alive instead of the lowest, on the same
schedule, re-scoring the masked network in between (their code prunes the highest per
iteration, ``--prune_highest``). That is another ticket than the bottom d*N of the normal
run's ranking, since each round scores a network that the inverted rounds before it pruned.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gemminer.checkpoint import Checkpointer
from gemminer.errors import GemminerError
from gemminer.masking import weights
from gemminer.methods.base import MetricsLog, PruningMethod, SearchResult
from gemminer.methods.scoring import exact_count, keep_top
from gemminer.methods.snip import first_batches
from gemminer.train import Batch, class_scores

DTYPES = {"float64": torch.float64, "float32": torch.float32}
# search.prune: which end of each round's scores goes; the sign that makes it the lowest of the keep key
PRUNE_ORDERS = {"lowest": 1.0, "highest": -1.0}


@dataclass
class SynFlowConfig:
    """SynFlow's options; 100 rounds as in the paper, float64 so deep nets do not overflow."""

    iterations: int = field(default=100, metadata={"help": "pruning rounds K, density^(k/K) kept after round k "
                                                           "(paper: 100)"})
    dtype: str = field(default="float64", metadata={"help": "float64 | float32: precision of the scoring pass "
                                                            "(float64 keeps deep networks from overflowing)"})
    prune: str = field(default="lowest", metadata={
        "help": "lowest (paper) | highest: every round prunes the highest-scored weights still alive instead "
                "(Frankle et al. 2021's inverted SynFlow, the invert sanity check)"})

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise GemminerError(f"unknown search.dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.prune not in PRUNE_ORDERS:
            raise GemminerError(f"unknown search.prune {self.prune!r}; allowed: {', '.join(PRUNE_ORDERS)}")


def synflow_scores(net: nn.Module, names: list[str], input_shape: tuple[int, ...],
                   masks: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """|w * dR/dw| for the prunable weights, R = sum(net(ones)) on |parameters| and |buffers|,
    with `masks` (0/1) multiplied into the weights; pruned weights score 0. `net` is scored
    as it is (eval mode is the caller's job) and left with its own values afterwards."""
    state = {key: tensor for key, tensor in net.state_dict(keep_vars=True).items() if tensor.is_floating_point()}
    saved = {key: tensor.detach().clone() for key, tensor in state.items()}
    params = weights(net, names)
    try:
        with torch.no_grad():
            for tensor in state.values():
                tensor.abs_()
            if masks is not None:
                for name, parameter in params.items():
                    parameter.mul_(masks[name].to(parameter.device, parameter.dtype))
        tensors = list(params.values())
        for parameter in tensors:
            parameter.requires_grad_(True)
        reference = tensors[0]
        ones = torch.ones((1, *input_shape), dtype=reference.dtype, device=reference.device)
        with torch.enable_grad():
            flow = class_scores(net(ones)).sum()
            grads = torch.autograd.grad(flow, tensors, allow_unused=True)
        return {name: (parameter.detach() * grad).abs() if grad is not None else torch.zeros_like(parameter.detach())
                for (name, parameter), grad in zip(params.items(), grads, strict=True)}
    finally:
        with torch.no_grad():
            for key, tensor in state.items():
                tensor.copy_(saved[key])


def _elimination_ranks(flat_scores: Tensor, removed: Tensor, ranks: Tensor, lowest: int) -> int:
    """Give the `removed` indices ranks lowest, lowest + 1, ... in reverse keep order
    (lowest score first; among equal scores the later index first, the tie rule's loser)."""
    indices = removed.nonzero().flatten()
    key = torch.nan_to_num(flat_scores[indices], nan=-math.inf)
    kept_first = indices[torch.sort(-key, stable=True).indices]
    ranks[kept_first.flip(0)] = torch.arange(lowest, lowest + indices.numel(), dtype=ranks.dtype)
    return lowest + indices.numel()


class SynFlow(PruningMethod):
    """Data-free iterative synaptic-flow pruning; the data only gives the input shape."""

    name = "synflow"
    needs_data = False  # data-free: the ticket depends on the weights alone
    Config = SynFlowConfig
    ranked = True

    def _search(self, model: nn.Module, train: Iterable[Batch], test: Iterable[Batch] | None = None,
                log: MetricsLog | None = None, recalibration: Iterable[Batch] | None = None,
                checkpoint: Checkpointer | None = None) -> SearchResult:
        start = time.perf_counter()
        batches = first_batches(train, 1)  # the data only gives the input shape
        if not batches:
            raise GemminerError("synflow needs one training batch for the input shape; the training data is empty")
        input_shape = tuple(batches[0][0].shape[1:])
        net = copy.deepcopy(model).to(self.device, DTYPES[self.config.dtype])
        net.eval()  # the reference scores in eval mode: BatchNorm on its (absolute) running statistics
        names = self.prunable(net)
        sizes = {name: w.numel() for name, w in weights(net, names).items()}
        total, rounds = sum(sizes.values()), self.config.iterations
        ranks = torch.empty(total, dtype=torch.float64)
        lowest, alive, overflowed = 0, None, False
        sign = PRUNE_ORDERS[self.config.prune]  # -1: the keep key is -score, so the highest scores go first
        for k in range(1, rounds + 1):
            keep = exact_count(total, self.density ** (k / rounds))  # k = K: density ** 1.0, exactly round(N * d)
            scores = {name: sign * s.to("cpu", torch.float64) for name, s in synflow_scores(net, names, input_shape,
                                                                                            alive).items()}
            flat = torch.cat([s.flatten() for s in scores.values()])
            overflowed = overflowed or not bool(torch.isfinite(flat).all())
            chosen = keep_top(scores, keep, eligible=alive)
            was_alive = (torch.cat([m.flatten() for m in alive.values()]) if alive is not None
                         else torch.ones(total, dtype=torch.bool))
            now_alive = torch.cat([m.flatten() for m in chosen.values()])
            lowest = _elimination_ranks(flat, was_alive & ~now_alive, ranks, lowest)
            alive = chosen
        _elimination_ranks(flat, now_alive, ranks, lowest)  # the survivors rank highest
        if overflowed:
            warnings.warn(f"synflow scores overflowed in {self.config.dtype}; those weights ranked by the tie rule"
                          + ("; try --search-dtype float64" if self.config.dtype != "float64" else ""), stacklevel=2)
        ranking, offset = {}, 0
        for name, size in sizes.items():
            ranking[name] = ranks[offset:offset + size].view(scores[name].shape).clone()
            offset += size
        seconds = time.perf_counter() - start
        inverted = {"synflow_prune": self.config.prune} if sign < 0 else {}  # a plain ticket's header as before
        ticket = self.make_ticket(model, alive, synflow_iterations=rounds, **inverted)
        return SearchResult(ticket=ticket, gem=ticket, epochs=0, seconds=seconds, scores=ranking)
