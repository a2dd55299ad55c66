"""Masks on any nn.Module, through torch.nn.utils.parametrize.

A prunable weight is the `weight` of every nn.Linear / nn.Conv{1,2,3}d, walked by
`named_modules()` (registration order, which is fixed for a given model class).
Masks are attached as parametrizations, so the user's own layers keep working and
`remove_masks` leaves a plain model whose pruned weights are exactly zero.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from gemminer.errors import GemminerError

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_names(model: nn.Module, prune_first: bool = True, prune_last: bool = True) -> list[str]:
    """Names (``"layer.weight"``) of the prunable weights, in `named_modules()` order. A weight tied
    to others (one Parameter in several layers) is named once, by its first layer: it gets one mask
    and counts once; `prune_first` / `prune_last` off keep the first / last layer's Parameter dense,
    wherever else it is used."""
    layers = prunable_layers(model)
    if not layers:
        raise GemminerError("the model has no prunable layer (nn.Linear or nn.Conv1d/2d/3d)")
    kept = layers[(0 if prune_first else 1):(len(layers) if prune_last else len(layers) - 1)]
    excluded = set()  # the Parameters of layers kept dense: dense wherever they are used (tied)
    for _, module in (layers[:1] if not prune_first else []) + (layers[-1:] if not prune_last else []):
        with contextlib.suppress(GemminerError):  # a layer kept dense may carry the user's own hooks
            excluded.add(id(original_weight(module)))
    names, seen = [], set(excluded)
    for module_name, module in kept:
        weight = _weight_of(module, module_name)  # a layer the user parametrized is refused here, by name
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        names.append(f"{module_name}.weight" if module_name else "weight")
    if not names:
        raise GemminerError("the model has no prunable layer left (nn.Linear or nn.Conv1d/2d/3d) once the first "
                            "and last are kept dense")
    return names


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear / Conv layer, in `named_modules()` order, tied or not."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, PRUNABLE_TYPES)]


def _weight_of(module: nn.Module, module_name: str) -> Tensor:
    try:
        return original_weight(module)
    except GemminerError as err:
        raise GemminerError(f"layer {module_name or '(root)'}: {err}") from None


def owner(model: nn.Module, weight_name: str) -> nn.Module:
    """The module that holds `weight_name` (``"a.b.weight"`` -> module ``a.b``)."""
    module_name = weight_name.rsplit(".", 1)[0] if "." in weight_name else ""
    try:
        return model.get_submodule(module_name)
    except AttributeError as err:
        raise GemminerError(f"the model has no layer named {module_name!r}") from err


def original_weight(module: nn.Module) -> Tensor:
    """The unmasked weight tensor of a module, parametrized or not."""
    if parametrize.is_parametrized(module, "weight"):
        chain = module.parametrizations.weight
        foreign = [type(p).__name__ for p in chain if not isinstance(p, MASK_TYPES)]
        if foreign or not hasattr(chain, "original"):
            raise GemminerError(f"a {type(module).__name__} weight is already parametrized ({', '.join(foreign)}): "
                                "gemminer masks plain weights; fold it in first with torch.nn.utils.parametrize."
                                "remove_parametrizations(layer, 'weight', leave_parametrized=True)")
        return chain.original
    if "weight" not in module._parameters:  # hook-based weight_norm / spectral_norm, or torch.nn.utils.prune
        extra = ", ".join(sorted(name for name in module._parameters if name.startswith("weight"))) or "none"
        raise GemminerError(f"a {type(module).__name__} weight is computed by a hook (its weight parameters: "
                            f"{extra}): gemminer masks plain weights; remove it first (torch.nn.utils."
                            "remove_weight_norm / remove_spectral_norm, or torch.nn.utils.prune.remove)")
    return module.weight


def weights(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """The unmasked prunable weights by name."""
    return {name: original_weight(owner(model, name)) for name in names}


def like_weight(values: Tensor, weight: Tensor) -> Tensor:
    """`values` (scores drawn on the CPU) copied onto `weight`'s device, dtype and memory format. On CUDA
    the network is channels_last: scores in that layout keep the masked weights and the scores'
    gradients in it too, where NCHW scores made the grouped masked weights NCHW beside NHWC inputs (a
    layout conversion per layer and step). The values, index for index, are the same."""
    return torch.empty_like(weight, requires_grad=False).copy_(values)


def straight_through_threshold(scores: Tensor) -> Tensor:
    """1[s > 0.5] as a float tensor whose gradient is the identity (straight-through).

    Written as ``s + (r - s).detach()`` with native operations rather than an autograd Function: the
    backward is one pass-through node, and no Python runs per layer and step, which was half of what
    the CPU search cost over dense training (docs/benchmarks.md, "What a search epoch costs"). The
    value is exactly r for every s in [0, 2] (r - s is exact there by Sterbenz's lemma, and so is the
    sum); scores stay in [0, 1] by the search's clamp. A NaN score stays NaN."""
    detached = scores.detach()
    if torch.compiler.is_compiling():
        # the graph fuses the comparison and the conversion; and dynamo breaks the graph at an `out=`
        # tensor that is not contiguous (channels_last scores on CUDA), which cost a compiled search
        # on an H100 nine tenths of its speed
        kept = (detached > 0.5).to(detached.dtype)
    else:
        # 1[s > 0.5] written straight into a float tensor: half the time of a comparison to bool and a
        # conversion (0.5 itself is off, as round-half-to-even would have it too)
        kept = torch.gt(detached, 0.5, out=torch.empty_like(detached))
    return scores + (kept - detached)


def gem_mask(weight: Tensor, scores: Tensor, alive: Tensor) -> Tensor:
    """w * r(s) * alive with r(s) = 1[s > 0.5] and a straight-through gradient to `s` (ds = grad * w
    * alive); a trainable `weight` gets grad * r(s) * alive."""
    return weight * alive * straight_through_threshold(scores)


class FixedMask(nn.Module):
    """Parametrization ``w -> w * mask`` with a fixed 0/1 mask (fine-tuning, evaluation)."""

    def __init__(self, mask: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(dtype))

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


class ScoreMask(nn.Module):
    """Gem-Miner's parametrization ``w -> w * r(s) * alive``.

    `scores` is the only trainable tensor; `alive` holds the 0/1 flags that freezing
    events set to 0 for good.
    """

    def __init__(self, scores: Tensor) -> None:
        super().__init__()
        self.scores = nn.Parameter(scores)
        self.register_buffer("alive", torch.ones_like(scores))
        self._weight_alive: tuple[tuple, Tensor] | None = None
        self._clamped: tuple[int, int] | None = None  # the scores' (version, storage) when `clamp_scores` ran
        self.group: ScoreMaskGroup | None = None  # set by ScoreMaskGroup.add

    def forward(self, weight: Tensor) -> Tensor:
        if weight.requires_grad or torch.compiler.is_compiling():
            return gem_mask(weight, self.scores, self.alive)  # in the graph (a compiled one fuses it)
        if self.group is not None:
            masked = self.group.masked(self, weight)
            if masked is not None:
                return masked
        return self.weight_alive(weight) * straight_through_threshold(self.scores)

    def weight_alive(self, weight: Tensor) -> Tensor:
        """``w * alive`` of a fixed weight (no gradient to it), kept until the weight or the flags change
        (a freezing event, a restored checkpoint, a device move: seen in version counters and storage;
        a write through ``.data`` bypasses them, so `release` after one): the search's weights are
        fixed, so this saves one multiplication per layer and step."""
        alive = self._buffers["alive"]
        try:
            # inference mode too: a tensor made under it cannot be saved for a later backward
            key = (weight._version, weight.data_ptr(), weight.dtype, alive._version, alive.data_ptr(),
                   torch.is_inference_mode_enabled())
        except RuntimeError:  # inference tensors keep no version counter
            with torch.no_grad():
                return weight * alive
        cached = self._weight_alive
        if cached is None or cached[0] != key:
            with torch.no_grad():  # a constant: a weight that trains takes `gem_mask`, not this
                cached = self._weight_alive = (key, weight * alive)
        return cached[1]

    def release(self) -> None:
        """Forget the kept ``w * alive``, and that the scores were clamped."""
        self._weight_alive = None
        self._clamped = None

    def in_range(self) -> bool:
        """Whether the scores are as `clamp_scores` left them (in [0, 1]): not changed in place since (version
        counter) nor replaced (storage). A write that skips the version counter (through ``.data`` or a
        numpy view; a fused optimizer step on the CPU) is not seen: `release` after one."""
        scores = self._parameters["scores"]
        return self._clamped == (scores._version, scores.data_ptr())


@torch.no_grad()
def clamp_scores(masks: list[ScoreMask]) -> None:
    """Every score into [0, 1] in place, after each optimizer step: min(max(s, 0), 1) over all layers in
    two calls (on a GPU two kernel launches, not one per layer); the values of a clamp_(0, 1) per tensor.
    Each mask notes it, so that its group's r(s) skips its own clamp until the scores change again."""
    scores = [mask._parameters["scores"] for mask in masks]
    torch._foreach_clamp_min_(scores, 0.0)
    torch._foreach_clamp_max_(scores, 1.0)
    for mask, tensor in zip(masks, scores, strict=True):
        mask._clamped = (tensor._version, tensor.data_ptr())


_TOP_SAVED_TENSOR_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _saved_tensor_hooks() -> object:
    """The innermost saved-tensor hooks in force (activation checkpointing sets some), or None."""
    return _TOP_SAVED_TENSOR_HOOKS(False) if _TOP_SAVED_TENSOR_HOOKS is not None else None


def _own_tensors(mask: ScoreMask) -> tuple[Tensor, Tensor]:
    """(scores, alive) of a mask, read from its dicts: `nn.Module.__getattr__` took a fifth of the group's
    own Python time per step."""
    return mask._parameters["scores"], mask._buffers["alive"]


def _tensor_key(scores: Tensor, alive: Tensor, weight: Tensor) -> tuple[int, ...]:
    """Versions and data pointers: they change with any in-place write (not one through ``.data``) and
    any move. Raises RuntimeError for an inference tensor, which keeps no version counter. (Written
    out: it runs for every layer twice a step, and a generator took twice as long.)"""
    return (scores._version, scores.data_ptr(), alive._version, alive.data_ptr(), weight._version, weight.data_ptr())


class ScoreMaskGroup:
    """The ScoreMasks of one network, computed together: w * r(s) * alive of every layer in four
    `torch._foreach_*` calls (two for scores `clamp_scores` left in [0, 1]) and one autograd node
    (`_GroupedGemMask`; one more call in the backward) when the first layer asks for its weight, handed
    out as each layer asks. On a GPU that is a few
    launches for all layers instead of about eight per layer and step, and on a CPU fewer passes over
    the scores; the values and gradients are the layer-by-layer ones.

    Kept while nothing changed (scores, flags, weights: version counters and storage; grad
    mode) and no backward has run through it; a layer asking twice (a second forward, a tied weight)
    gets a fresh computation. A layer computes alone where the group cannot serve it: its weight is not
    the Parameter it was added with or trains, inference tensors or inference mode, saved-tensor hooks
    (activation checkpointing recomputes one region at a time). Writes through ``.data`` bypass the
    version counters: `release` after one. A plain object, not a module; a deep copy of a network gets
    its own group, without the computed tensors.
    """

    def __init__(self) -> None:
        self.members: list[ScoreMask] = []
        self.weights: list[Tensor] = []  # the frozen original weights (Parameters), by member
        self._reset()

    def add(self, member: ScoreMask, weight: Tensor) -> None:
        member.group, member.group_index = self, len(self.members)
        self.members.append(member)
        self.weights.append(weight)
        self._grad_enabled = None

    def release(self) -> None:
        """Forget everything computed (the next layer to ask computes afresh): the end of a search,
        or after writing through ``.data``."""
        self._reset()
        for member in self.members:
            member.release()

    def _reset(self) -> None:
        self._outputs: list[Tensor] = []
        self._taken: list[bool] = []
        self._keys: list[tuple[int, ...]] = []  # each member's `_tensor_key` of scores, flags and weight
        self._grad_enabled: bool | None = None  # grad mode as last computed (inference mode never is); None: compute

    def __deepcopy__(self, memo: dict) -> ScoreMaskGroup:
        copied = ScoreMaskGroup.__new__(ScoreMaskGroup)
        memo[id(self)] = copied
        copied.members = copy.deepcopy(self.members, memo)
        copied.weights = copy.deepcopy(self.weights, memo)
        copied._reset()  # the members may still be half copied: their own caches key on storage anyway
        return copied

    def masked(self, member: ScoreMask, weight: Tensor) -> Tensor | None:
        """`member`'s masked weight from the joint computation; None: compute it alone."""
        index = member.group_index
        if (weight is not self.weights[index] or torch.is_inference_mode_enabled() or weight.is_inference()
                or _saved_tensor_hooks() is not None):
            return None
        try:
            # a layer's output depends on its own scores, flags and weight alone: their versions (which
            # grow at every in-place change) and storage (a device or dtype move) tell whether it holds
            if (self._grad_enabled is not torch.is_grad_enabled() or self._taken[index]
                    or self._keys[index] != _tensor_key(*_own_tensors(member), weight)):
                self.compute()
        except RuntimeError:  # a member's tensor became an inference tensor (no version counter)
            self.release()
            return None
        self._taken[index] = True
        return self._outputs[index]

    def compute(self) -> None:
        owned = [_own_tensors(m) for m in self.members]
        scores, alive = [pair[0] for pair in owned], [pair[1] for pair in owned]
        weight_alive = [m.weight_alive(w) for m, w in zip(self.members, self.weights, strict=True)]
        in_range = all(m.in_range() for m in self.members)
        self._outputs = list(_GroupedGemMask.apply(len(self.members), in_range, *scores, *weight_alive))
        self._taken = [False] * len(self.members)
        self._keys = [_tensor_key(*tensors) for tensors in zip(scores, alive, self.weights, strict=True)]
        self._grad_enabled = torch.is_grad_enabled()
        node = self._outputs[0].grad_fn if self._outputs else None
        if node is not None:  # one node for every layer: once a backward ran through it, its graph is gone
            node.register_prehook(self._forget_graph)

    def _forget_graph(self, grad_outputs: object) -> None:
        self._grad_enabled = None


class _GroupedGemMask(torch.autograd.Function):
    """w * alive * r(s) of every layer of a group, r(s) = 1[s > 0.5], as one autograd node with a
    straight-through gradient: ds = grad * w * alive. Four `torch._foreach_*` calls forward (two with
    scores known to be in [0, 1], the search's case after its first step) and one backward, against six
    and one (plus two nodes' bookkeeping) for the native `s + (r - s).detach()` form. For scores in
    [0, 2] the values and gradients are that form's exactly; beyond (s = inf, or 2^24 and more) that
    form's sum is no longer exact, and this one still gives w * alive * 1[s > 0.5]."""

    @staticmethod
    def forward(ctx, count: int, in_range: bool, *tensors: Tensor) -> tuple[Tensor, ...]:
        scores, weight_alive = list(tensors[:count]), list(tensors[count:])
        ctx.save_for_backward(*weight_alive)
        ctx.set_materialize_grads(False)  # a layer left out of the loss gets no gradient, not zeros
        # r(s) = round(clamp(s, 0, 1)) (half to even sends 0.5 to 0; a NaN score stays NaN), times w * alive;
        # scores in [0, 1] need no clamp (two passes of four)
        if in_range:
            masked = torch._foreach_round(scores)
        else:
            masked = torch._foreach_clamp_min(scores, 0.0)
            torch._foreach_clamp_max_(masked, 1.0)
            torch._foreach_round_(masked)
        torch._foreach_mul_(masked, weight_alive)
        return tuple(masked)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        weight_alive = ctx.saved_tensors
        present = [i for i, grad in enumerate(grads) if grad is not None]
        if not present:  # every use of the outputs gave None (an op that passes no gradient back)
            return (None,) * (2 + 2 * len(grads))
        products = torch._foreach_mul([grads[i] for i in present], [weight_alive[i] for i in present])
        score_grads: list[Tensor | None] = [None] * len(grads)
        for i, product in zip(present, products, strict=True):
            score_grads[i] = product
        return (None, None, *score_grads, *([None] * len(grads)))


class _SelectionSTE(torch.autograd.Function):
    """A precomputed 0/1 selection forward; the gradient passes to the ranked values unchanged,
    selected or not (edge-popup's GetSubnet: the mask's derivative is taken as identity)."""

    @staticmethod
    def forward(ctx, scores: Tensor, selection: Tensor) -> Tensor:
        return selection.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def kth_smallest(values: Tensor, k: int) -> Tensor:
    """The k-th smallest (1-based) of the 1-D `values`, a 0-dim tensor: ``torch.kthvalue(values, k).values``.
    On the CPU through numpy's introselect, which took 0.1 ms for 92,736 scores where kthvalue took
    1.4 ms (a freezing event's ranking; edge-popup ranks every step); the same value."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        return torch.as_tensor(np.partition(values.detach().numpy(), k - 1)[k - 1])
    return torch.kthvalue(values, k).values


def largest(values: Tensor, count: int) -> Tensor:
    """Bool mask of the `count` largest of the 1-D `values` (no NaN); equal values go to the lower
    index, as a stable descending sort would pick them. Linear time (kthvalue plus a cumulative count
    of ties), so it can run every step."""
    if count <= 0 or count >= values.numel():
        return torch.full(values.shape, count > 0, dtype=torch.bool, device=values.device)
    threshold = kth_smallest(values, values.numel() - count + 1)  # the count-th largest
    above = values > threshold
    tied = values == threshold
    room = count - above.sum()
    return above | (tied & (torch.cumsum(tied, 0) <= room))


def top_k_mask(scores: Tensor, keep: int) -> Tensor:
    """Bool mask of the `keep` largest |scores|; equal values go to the lower flat index."""
    flat = scores.detach().abs().flatten()
    if not 0 <= keep <= flat.numel():
        raise GemminerError(f"cannot keep {keep} of {flat.numel()} weights")
    return largest(flat, keep).view(scores.shape)


class GlobalTopK:
    """Edge-popup's global scope: the top `keep` |scores| over several layers together.

    Each layer's parametrization asks for its own slice; the joint ranking is redone only
    when a score tensor changed since the last one (optimizer step, restored checkpoint,
    device move: seen in version counters and storage), so a forward pass ranks once. A
    plain object, not a module: deep copies share one per copied network.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.members: list[TopKScoreMask] = []
        self._key: tuple | None = None
        self._masks: list[Tensor] = []

    def mask_of(self, member: TopKScoreMask) -> Tensor:
        if torch.compiler.is_compiling():  # the ranking is part of the graph (which reads no version counters)
            flat = torch.cat([m.scores.detach().flatten() for m in self.members])
            chosen = top_k_mask(flat, self.keep).split([m.scores.numel() for m in self.members])
            index = next(i for i, m in enumerate(self.members) if m is member)
            return chosen[index].view(member.scores.shape)
        key = tuple((id(m.scores), m.scores._version, m.scores.data_ptr()) for m in self.members)
        if key != self._key:
            flat = torch.cat([m.scores.detach().flatten() for m in self.members])
            chosen = top_k_mask(flat, self.keep).split([m.scores.numel() for m in self.members])
            self._masks = [part.view(m.scores.shape) for part, m in zip(chosen, self.members, strict=True)]
            self._key = key
        index = next(i for i, m in enumerate(self.members) if m is member)
        return self._masks[index]


class TopKScoreMask(nn.Module):
    """Edge-popup's parametrization ``w -> w * 1[|s| is among the top k]``.

    `scores` is the only trainable tensor and every score gets the straight-through
    gradient, kept or not. k is `keep` for this layer alone, or, with a shared
    `GlobalTopK`, the top over all its layers together (build all members before
    attaching any, so the first forward already ranks every layer).
    """

    def __init__(self, scores: Tensor, keep: int | None = None, shared: GlobalTopK | None = None) -> None:
        if (keep is None) == (shared is None):
            raise GemminerError("TopKScoreMask takes either a per-layer keep or a shared GlobalTopK")
        super().__init__()
        self.scores = nn.Parameter(scores)
        self.keep, self.shared = keep, shared
        self._key: tuple | None = None
        self._mask: Tensor | None = None
        if shared is not None:
            shared.members.append(self)

    def mask(self) -> Tensor:
        """The current selection (bool), recomputed only when the scores changed."""
        if self.shared is not None:
            return self.shared.mask_of(self)
        if torch.compiler.is_compiling():  # inside a compiled graph: ranked in the graph, on every call
            return top_k_mask(self.scores, self.keep)
        key = (id(self.scores), self.scores._version, self.scores.data_ptr())
        if key != self._key or self._mask is None:
            self._mask, self._key = top_k_mask(self.scores, self.keep), key
        return self._mask

    def forward(self, weight: Tensor) -> Tensor:
        # through |s|, as the reference GetSubnet gets the absolute scores: d|s|/ds = sign(s)
        return weight * _SelectionSTE.apply(self.scores.abs(), self.mask())


def attach(model: nn.Module, names: list[str], make: Callable[[str, Tensor], nn.Module]) -> dict[str, nn.Module]:
    """Register ``make(name, weight)`` as the parametrization of each named weight."""
    attached = {}
    for name in names:
        module = owner(model, name)
        if parametrize.is_parametrized(module, "weight"):
            original_weight(module)  # a parametrization of the user's own is refused with its name
            raise GemminerError(f"{name} already carries a mask; remove it first")
        weight = module.weight
        parametrization = make(name, weight.detach())
        # every layer that uses this Parameter (tied weights, an embedding tied to a decoder) gets the
        # same mask, so the tied layers keep one and the same weight
        for user, attribute in parameter_users(model, weight):
            parametrize.register_parametrization(user, attribute, parametrization)
        attached[name] = parametrization
    return attached


def attach_score_masks(model: nn.Module, names: list[str], make: Callable[[str, Tensor], ScoreMask],
                       grouped: bool = True) -> dict[str, ScoreMask]:
    """Gem-Miner's masks on the named weights (`attach`), computed together (`ScoreMaskGroup`) unless
    not `grouped`: under DDP each layer's own backward node lets its gradients' all-reduce start while
    the backward goes on, where one node for all layers would hold every score gradient to the end."""
    masks = attach(model, names, make)
    if grouped:
        group = ScoreMaskGroup()
        for name, mask in masks.items():
            group.add(mask, original_weight(owner(model, name)))
    return masks


def release_score_masks(masks: list[ScoreMask]) -> None:
    """Forget what the masks keep computed (their group's tensors, w x alive): a network handed back
    after a search holds only its own weights, scores and flags."""
    for group in {id(mask.group): mask.group for mask in masks if mask.group is not None}.values():
        group.release()  # its members too
    for mask in masks:
        if mask.group is None:
            mask.release()


def tied_names(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """For each of `names` whose Parameter other modules use too (tied weights), the state-dict names
    of those other uses (``{"encoder.weight": ["decoder.weight"]}``): what a file of the weights holds
    as separate copies, and what a mask of the first must mask too."""
    places = parameter_places(model)
    tied = {}
    for name in names:
        others = {place for place, _, _ in places.get(id(original_weight(owner(model, name))), [])} - {name}
        if others:
            tied[name] = sorted(others)
    return tied


def parameter_places(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(Parameter) -> every place holding it directly: (state-dict name, module, attribute), once per
    path to the module (a module reached by two paths has two state-dict names)."""
    places: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attribute, parameter in module._parameters.items():
            if parameter is not None:
                name = f"{module_name}.{attribute}" if module_name else attribute
                places.setdefault(id(parameter), []).append((name, module, attribute))
    return places


def parameter_users(model: nn.Module, weight: Tensor) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) that holds the Parameter `weight` (tied weights: several), each once."""
    users = {(id(module), attribute): (module, attribute) for _, module, attribute in
             parameter_places(model).get(id(weight), [])}
    return list(users.values())


def attach_fixed_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Mask `model` in place with fixed 0/1 masks (one per weight name)."""
    attach(model, list(masks), lambda name, weight: FixedMask(masks[name].to(weight.device), weight.dtype))


MASK_TYPES = (FixedMask, ScoreMask, TopKScoreMask)


def remove_masks(model: nn.Module) -> nn.Module:
    """Remove every parametrization, leaving plain weights with pruned entries exactly 0."""
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return model
