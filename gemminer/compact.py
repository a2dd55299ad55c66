"""Exact channel compaction: a pruned network rebuilt with only the channels that matter.

From the facts of `gemminer.liveness`, a channel of a tensor is *needed* when at some element it may be
nonzero and is read on the way to the output. Tensors that must share channels (the two sides of an
element-wise op or a residual add, BatchNorm's input and output, a depthwise convolution's in and out)
form one group, which keeps every channel that any member needs. Each Conv / Linear keeps the rows of its
output group and the columns of its input group; BatchNorm keeps its channels' statistics; flatten maps
kept channels to kept features. Operations that move channels (concatenation, channel padding such as
option-A shortcuts, channel slicing) run at full width: their inputs are scattered into zeros, their
output gathered. A removed channel is exactly zero, or unread, wherever it is read, so the compacted
network computes the same outputs (up to float summation order).

Constant channels (an affine BatchNorm's shift under a dead filter, or a bias) are kept: a constant
cannot be folded into a zero-padded convolution exactly (the borders differ).

The compacted model is an `fx.GraphModule`. `save_compact` writes its weights as safetensors with the
model's spec and the *plan* (kept channels per graph node); `load_compact` rebuilds it from them.
"""

from __future__ import annotations

import json
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn

from gemminer import liveness as lv
from gemminer.errors import GemminerError
from gemminer.masking import PRUNABLE_TYPES
from gemminer.ticket import decode_header, read_safetensors, save_state

COMPACT_FORMAT = "gemminer-compact-1"
POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
                nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample)
POOL_FUNCTIONS = {torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d, torch.nn.functional.avg_pool3d,
                  torch.nn.functional.adaptive_avg_pool1d, torch.nn.functional.adaptive_avg_pool2d,
                  torch.nn.functional.adaptive_avg_pool3d, torch.nn.functional.interpolate}
FLATTENS = {"flatten", "view", "reshape"}


@dataclass
class Plan:
    """Kept channels (dimension 1) per graph node name, with each node's per-sample shape."""

    kept: dict[str, list[int]]
    shapes: dict[str, list[int]]

    def to_json(self) -> str:
        return json.dumps({"kept": self.kept, "shapes": self.shapes}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        return cls({k: list(v) for k, v in data["kept"].items()}, {k: list(v) for k, v in data["shapes"].items()})


# ---- what each node does to channels ------------------------------------------------------------------
def _kind(node: fx.Node, modules: dict[str, nn.Module], shapes: dict[str, list[int]]) -> str:
    """'weighted' (Conv/Linear that slices freely), 'depthwise', 'batchnorm', 'tied' (channel c of the
    output is made of channel c of the inputs), 'flatten', 'value' (not a tensor), or 'full' (run at full width)."""
    module = modules.get(node.target) if node.op == "call_module" else None
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    if node.name not in shapes:
        return "value"
    if isinstance(module, PRUNABLE_TYPES):
        source = shapes.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None
        if source is None:
            return "full"
        if isinstance(module, nn.Linear):
            return "weighted" if len(source) == 1 else "full"
        if module.groups == 1:
            return "weighted"
        return "depthwise" if module.groups == module.in_channels == module.out_channels else "full"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    elementwise = (lv.calls(node, module, lv.ZERO_PRESERVING_MODULES, lv.ZERO_PRESERVING_FUNCTIONS,
                            lv.ZERO_PRESERVING_METHODS)
                   or lv.calls(node, module, lv.CONSTANT_MODULES, lv.CONSTANT_FUNCTIONS, lv.CONSTANT_METHODS))
    if elementwise:
        return "tied" if _single_tensor(node, shapes) else "full"
    if node.op == "call_function" and node.target in lv.ADDS | lv.MULS:
        # a parameter that is not laid out per sample (a (C,) offset) would need its own indexing
        constant = any(arg.op == "get_attr" and arg.name not in shapes for arg in node.all_input_nodes)
        return "full" if constant else "tied"
    if lv.calls(node, module, POOL_MODULES, POOL_FUNCTIONS, set()) or (
            node.op == "call_function" and getattr(node.target, "__name__", "").lstrip("_") in lv.MAX_POOLS):
        return "tied" if _single_tensor(node, shapes) else "full"
    if lv.calls(node, module, (nn.Flatten,), {torch.flatten}, FLATTENS) and _flattens_per_sample(node, module):
        source = node.args[0] if isinstance(node.args[0], fx.Node) else None
        if source is not None and source.name in shapes:
            before, after = shapes[source.name], shapes[node.name]
            if len(before) >= 2 and len(after) == 1 and after[0] == _product(before):
                return "flatten"
    if node.op == "call_function" and node.target is operator.getitem and _spatial_index(node):
        return "tied"
    return "full"


def _flattens_per_sample(node: fx.Node, module: nn.Module | None) -> bool:
    """flatten from dimension 1 to the end, or view/reshape(batch or -1, -1 or the size): the batch stays."""
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    if node.target in (torch.flatten, "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], tuple | list):
        sizes = tuple(sizes[0])
    return len(sizes) == 2 and (sizes[0] == -1 or isinstance(sizes[0], fx.Node))


def _single_tensor(node: fx.Node, shapes: dict[str, list[int]]) -> bool:
    return sum(arg.name in shapes for arg in node.all_input_nodes) == 1


def _spatial_index(node: fx.Node) -> bool:
    """x[:, :, ...spatial slices]: keeps batch and channels as they are."""
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) < 2:
        return False
    full = slice(None, None, None)
    return index[0] == full and index[1] == full and all(isinstance(part, slice) for part in index[2:])


def _product(shape: list[int]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def _tied_inputs(node: fx.Node, shapes: dict[str, list[int]], constants: bool = False) -> list[fx.Node]:
    """The tensor inputs whose channel c meets the output's channel c (not broadcast ones; parameters
    only with `constants`: they are indexed to the group's channels, never widen it)."""
    out = shapes[node.name]
    return [arg for arg in node.all_input_nodes
            if arg.name in shapes and (constants or arg.op != "get_attr") and shapes[arg.name][:1] == out[:1]
            and len(shapes[arg.name]) == len(out)]


# ---- the plan ----------------------------------------------------------------------------------------
def plan_compaction(analysis: lv.Analysis) -> Plan:
    """Kept channels per node: the union, over each group of tied tensors, of the channels needed."""
    graph = analysis.graph
    modules = dict(graph.named_modules())
    shapes = {name: list(facts.live.shape[1:]) for name, facts in analysis.facts.items()
              if facts.live.dim() >= 2 and facts.live.shape[0] == 1}
    parent = {name: name for name in shapes}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    nodes = list(graph.graph.nodes)
    for node in nodes:
        kind = _kind(node, modules, shapes)
        inputs = []
        if kind in ("tied", "batchnorm"):
            inputs = _tied_inputs(node, shapes)
        elif kind == "depthwise":
            inputs = [node.args[0]]
        for arg in inputs:
            parent[find(arg.name)] = find(node.name)
    kept: dict[str, set[int]] = {}
    for name in shapes:
        facts = analysis.facts[name]
        needed = (facts.nonzero & facts.read)[0]
        needed = needed.reshape(needed.shape[0], -1).any(1).nonzero().flatten().tolist()
        kept.setdefault(find(name), set()).update(needed)
    for node in nodes:  # inputs and constants stay whole; a flatten keeps every feature of its kept channels
        if node.name in shapes and node.op in ("placeholder", "get_attr"):
            kept[find(node.name)].update(range(shapes[node.name][0]))
        if node.name in shapes and _kind(node, modules, shapes) == "flatten":
            source = node.args[0].name
            per_channel = _product(shapes[source][1:])
            kept[find(node.name)].update(c * per_channel + i for c in kept[find(source)] for i in range(per_channel))
    return Plan({name: sorted(kept[find(name)]) or [0] for name in shapes}, shapes)


# ---- building the compacted graph ---------------------------------------------------------------------
class ChannelIndex(nn.Module):
    """Moves channels between two kept sets: gathers `source` positions into `target` positions of a
    tensor of `channels` channels (zeros elsewhere)."""

    def __init__(self, source: list[int], target: list[int], channels: int) -> None:
        super().__init__()
        self.register_buffer("source", torch.tensor(source, dtype=torch.long), persistent=False)
        self.register_buffer("target", torch.tensor(target, dtype=torch.long), persistent=False)
        self.channels = channels
        self.gather_only = target == list(range(channels))

    def forward(self, x: Tensor) -> Tensor:
        picked = x.index_select(1, self.source)
        if self.gather_only:
            return picked
        out = x.new_zeros((x.shape[0], self.channels, *x.shape[2:]))
        return out.index_copy(1, self.target, picked)


def _effective_weight(module: nn.Module, name: str, masks: dict[str, Tensor] | None) -> Tensor:
    weight = module.weight.detach()
    if masks and name in masks:
        weight = weight * masks[name].to(weight.device, weight.dtype)
    return weight


def _plain_layer(module: nn.Module, weight: Tensor, bias: Tensor | None, groups: int | None = None) -> nn.Module:
    """A plain (unparametrized) copy of a Conv / Linear layer holding `weight` and `bias`."""
    if isinstance(module, nn.Linear):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        base = next(cls for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(module, cls))
        groups = module.groups if groups is None else groups
        layer = base(weight.shape[1] * groups, weight.shape[0], module.kernel_size, stride=module.stride,
                     padding=module.padding, dilation=module.dilation, groups=groups, bias=bias is not None,
                     padding_mode=module.padding_mode)
    layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return layer.to(weight.device)


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, index: Tensor, dims: int) -> nn.Module:
    """BatchNorm over the channels `index` of `module` (a SyncBatchNorm becomes the plain one of its rank)."""
    base = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}[dims]
    layer = base(len(index), eps=module.eps, momentum=module.momentum, affine=module.affine,
                 track_running_stats=module.track_running_stats)
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(module, name) is not None:
                setattr(layer, name, nn.Parameter(getattr(module, name).detach()[index].clone(), requires_grad=False))
        for name in ("running_mean", "running_var"):
            if getattr(module, name) is not None:
                setattr(layer, name, getattr(module, name).detach()[index].clone())
    if module.num_batches_tracked is not None:
        layer.num_batches_tracked = module.num_batches_tracked.clone()
    return layer.to(module.running_mean.device if module.running_mean is not None else index.device).eval()


class _Builder:
    def __init__(self, graph: fx.GraphModule, plan: Plan, masks: dict[str, Tensor] | None) -> None:
        self.old, self.plan, self.masks = graph, plan, masks
        self.modules = dict(graph.named_modules())
        self.graph = fx.Graph()
        self.root: dict[str, Any] = {}
        self.env: dict[str, tuple[fx.Node, list[int] | None]] = {}  # name -> (new node, kept channels)
        self.cache: dict[tuple[str, tuple[int, ...] | None], fx.Node] = {}
        self.layers: dict[str, tuple[int, int, int, int]] = {}  # weight name -> kept in, in, kept out, out

    def full(self, name: str) -> list[int] | None:
        return list(range(self.plan.shapes[name][0])) if name in self.plan.shapes else None

    def fetch(self, node: fx.Node, want: list[int] | None) -> fx.Node:
        """`node`'s new value holding the channels `want` (None: as produced)."""
        new, have = self.env[node.name]
        if want is None or have is None or want == have:
            return new
        key = (node.name, tuple(want))
        if key not in self.cache:
            position = {channel: index for index, channel in enumerate(have)}
            pairs = [(position[c], index) for index, c in enumerate(want) if c in position]
            name = f"channel_index_{len(self.cache)}"
            self.root[name] = ChannelIndex([p[0] for p in pairs], [p[1] for p in pairs], len(want))
            self.cache[key] = self.graph.call_module(name, (new,))
        return self.cache[key]

    def args(self, node: fx.Node, want: dict[str, list[int] | None]) -> tuple[Any, Any]:
        def replace(arg: fx.Node) -> fx.Node:
            return self.fetch(arg, want.get(arg.name))
        return fx.node.map_arg(node.args, replace), fx.node.map_arg(node.kwargs, replace)

    def emit(self, node: fx.Node, args: Any, kwargs: Any) -> fx.Node:
        if node.op == "call_module":
            if node.target not in self.root:
                self.root[node.target] = self.modules[node.target]
            return self.graph.call_module(node.target, args, kwargs)
        if node.op == "call_method":
            return self.graph.call_method(node.target, args, kwargs)
        return self.graph.call_function(node.target, args, kwargs)

    def build(self) -> fx.GraphModule:
        shapes = self.plan.shapes
        for node in self.old.graph.nodes:
            kind = _kind(node, self.modules, shapes)
            kept = self.plan.kept.get(node.name)
            if kind == "placeholder":
                self.env[node.name] = (self.graph.placeholder(node.target), self.full(node.name))
            elif kind == "get_attr":
                self.root[node.target] = lv.attribute(self.old, node.target)
                self.env[node.name] = (self.graph.get_attr(node.target), self.full(node.name))
            elif kind == "output":
                args, _ = self.args(node, {arg.name: self.full(arg.name) for arg in node.all_input_nodes})
                self.graph.output(args[0])
            elif kind in ("weighted", "depthwise"):
                self.env[node.name] = (self.weighted(node, kind, kept), kept)
            elif kind == "batchnorm":
                module = self.modules[node.target]
                index = torch.tensor(kept, dtype=torch.long)
                self.root[node.target] = _batch_norm(module, index, len(shapes[node.name]))
                new = self.graph.call_module(node.target, (self.fetch(node.args[0], kept),))
                self.env[node.name] = (new, kept)
            elif kind == "tied":
                want = {arg.name: kept for arg in _tied_inputs(node, shapes, constants=True)}
                want.update({arg.name: self.full(arg.name) for arg in node.all_input_nodes if arg.name not in want})
                self.env[node.name] = (self.emit(node, *self.args(node, want)), kept)
            elif kind == "flatten":
                source = node.args[0]
                per_channel = _product(shapes[source.name][1:])
                have = self.env[source.name][1] or self.full(source.name)
                features = [c * per_channel + i for c in have for i in range(per_channel)]
                new = self.graph.call_function(torch.flatten, (self.fetch(source, None), 1))
                self.env[node.name] = (new, features)
                if features != kept:
                    self.env[node.name] = (self.fetch(node, kept), kept)
            else:  # 'value' and 'full': run on full-width inputs, keep the planned channels of the result
                want = {arg.name: self.full(arg.name) for arg in node.all_input_nodes}
                new = self.emit(node, *self.args(node, want))
                if kind == "full" and node.name in self.plan.kept:
                    if node.op == "call_module" and isinstance(self.modules[node.target], PRUNABLE_TYPES):
                        new = self.dense_layer(node, new)
                    self.env[node.name] = (new, self.full(node.name))
                    self.env[node.name] = (self.fetch(node, kept), kept)
                else:
                    self.env[node.name] = (new, None)
        model = fx.GraphModule(self.root, self.graph)
        return model.eval()

    def dense_layer(self, node: fx.Node, new: fx.Node) -> fx.Node:
        """A layer kept at full width still loses its parametrization: its weight becomes weight x mask."""
        module, name = self.modules[node.target], f"{node.target}.weight"
        bias = module.bias.detach() if module.bias is not None else None
        self.root[node.target] = _plain_layer(module, _effective_weight(module, name, self.masks), bias)
        shape = self.plan.shapes[node.name]
        self.layers[name] = (module.weight.shape[1] * getattr(module, "groups", 1),) * 2 + (shape[0], shape[0])
        return new

    def weighted(self, node: fx.Node, kind: str, kept: list[int]) -> fx.Node:
        module = self.modules[node.target]
        source = node.args[0]
        name = f"{node.target}.weight" if node.target else "weight"
        have = self.env[source.name][1] if kind == "weighted" else kept
        have = have if have is not None else self.full(source.name)
        weight = _effective_weight(module, name, self.masks)
        rows = torch.tensor(kept, dtype=torch.long, device=weight.device)
        weight = weight.index_select(0, rows)
        if kind == "weighted":
            weight = weight.index_select(1, torch.tensor(have, dtype=torch.long, device=weight.device))
        bias = module.bias.detach().index_select(0, rows) if module.bias is not None else None
        groups = len(kept) if kind == "depthwise" else None
        self.root[node.target] = _plain_layer(module, weight.contiguous(), bias, groups)
        in_full = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        out_full = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        self.layers[name] = (len(have), in_full, len(kept), out_full)
        return self.graph.call_module(node.target, (self.fetch(source, have),))


@dataclass
class Compacted:
    """A compacted model, its plan, and per prunable weight: (kept in, in, kept out, out) channels."""

    model: fx.GraphModule
    plan: Plan
    layers: dict[str, tuple[int, int, int, int]]


def compact(model: nn.Module, masks: dict[str, Tensor], example_input: Tensor) -> Compacted:
    """The exact channel compaction of `model` under `masks` (eval mode; pruned weights set to 0).
    Raises LivenessError (a GemminerError) when the graph cannot be traced or analysed."""
    with torch.no_grad():
        analysis = lv.analyse(model, masks, example_input)
        plan = plan_compaction(analysis)
        builder = _Builder(analysis.graph, plan, analysis.masks)
        return Compacted(builder.build(), plan, builder.layers)


def compact_from_plan(model: nn.Module, plan: Plan) -> Compacted:
    """Rebuild the compacted structure of `model` from a saved plan (weights to be loaded afterwards)."""
    with torch.no_grad():
        builder = _Builder(lv.trace(model), plan, None)
        return Compacted(builder.build(), plan, builder.layers)


# ---- files -------------------------------------------------------------------------------------------
def save_compact(compacted: Compacted, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write the compacted weights as safetensors; the header holds `metadata` (JSON values, with the
    ``model_spec`` that `load_compact` rebuilds from) and the plan."""
    header = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    header.update(format=COMPACT_FORMAT, plan=compacted.plan.to_json(),
                  layers=json.dumps({name: list(counts) for name, counts in compacted.layers.items()}))
    save_state(compacted.model.state_dict(), path, metadata=header)
    return Path(path)


def load_compact(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The compacted model of a ``gemminer export --format compact`` file, in eval mode on `device`."""
    from gemminer.models import build_model

    tensors, header = read_safetensors(path, what="compacted model")
    metadata = decode_header(header, keep_strings=("plan",))
    if metadata.get("format") != COMPACT_FORMAT:
        raise GemminerError(f"{path} is not a compacted gemminer export (format {metadata.get('format')!r})")
    spec = metadata.get("model_spec")
    if not isinstance(spec, dict):
        raise GemminerError(f"{path} names no model (no model_spec)")
    model = build_model(spec["name"], tuple(spec["input_shape"]), spec["num_classes"],
                        affine_bn=spec.get("affine_bn", False), bias=spec.get("bias", False), width=spec.get("width"))
    compacted = compact_from_plan(model.eval(), Plan.from_json(metadata["plan"]))
    try:
        compacted.model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise GemminerError(f"{path} does not fit its plan: {str(err).splitlines()[0]}") from err
    return compacted.model.to(device).eval()


def macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of `model`'s Conv / Linear layers for one input, as they run (zeros included)."""
    from gemminer.report import layer_macs

    return sum(layer_macs(model, input_shape).values())


def mac_counts(model: nn.Module, masks: dict[str, Tensor], input_shape: tuple[int, ...]) -> dict[str, float]:
    """Per input: the dense network's MACs, those the mask leaves (each layer's MACs x its density) and
    their ratio, ``macs_density`` (global pruning hits the large layers hardest, so it differs from the
    weight density)."""
    from gemminer.report import layer_macs

    dense = layer_macs(model, input_shape)
    remaining = sum(dense[name] * int(mask.sum()) // mask.numel() for name, mask in masks.items() if name in dense)
    total = sum(dense.values())
    return {"macs_total": total, "macs_remaining": remaining, "macs_density": remaining / total if total else 0.0}


def export_compact(model: nn.Module, ticket: Any, metadata: dict[str, Any], path: str | os.PathLike) -> Path:
    """Compact `model` (the registered model of ``metadata["model_spec"]``, its weights already masked by
    `ticket`) and write it with `save_compact`; the header also gets the MACs per input: dense, left by
    the mask (``macs_remaining``) and run by the compacted network (``macs_compact``)."""
    input_shape = tuple(metadata["model_spec"]["input_shape"])
    compacted = compact(model, ticket.masks, torch.zeros((1, *input_shape)))
    header = {**metadata, "density": ticket.density, **mac_counts(model, ticket.masks, input_shape),
              "macs_compact": macs(compacted.model, input_shape)}
    return save_compact(compacted, path, header)


def describe(path: str | os.PathLike) -> str:
    """One line on a compacted export: its MACs per input against the dense and the masked network's."""
    _, header = read_safetensors(path, what="compacted model")
    meta = decode_header(header, keep_strings=("plan",))
    total, left, run = meta.get("macs_total"), meta.get("macs_remaining"), meta.get("macs_compact")
    if not all(isinstance(value, int) and value > 0 for value in (total, run)):
        return "MACs per input: unknown"
    return (f"MACs per input: dense {total:,}, left by the mask {left:,} ({left / total:.4f}), run by the "
            f"compacted model {run:,} ({run / total:.4f}, {total / run:.1f}x fewer than dense)")
