"""Channel liveness of a pruned network: which channels carry signal from the input, which reach the output.

The model is traced with `torch.fx` and every tensor of the graph gets three element-wise facts for one
sample (batch dimension 1):

- ``live``: the element depends on the input;
- ``nonzero``: the element may be nonzero (it is live, or a nonzero constant such as an affine
  BatchNorm's shift or a bias under a dead filter); where it is False the element is exactly 0 for every
  input, in eval mode;
- ``read``: the element influences the output through kept weights.

Conv / Linear layers propagate the facts through their mask (a kept weight is a possible connection);
structural operations (slicing, padding, concatenation, flatten, pooling, adds) are applied to 0/1
indicator tensors, and their vector-Jacobian products give ``read``; element-wise activations keep the
facts; BatchNorm keeps them per channel and adds its eval-mode shift where it is nonzero. Facts are
exact for the connectivity of the graph: no value is assumed to cancel another.

A kept weight is *on a path* when, at some output position, it reads a nonzero element (live input or a
nonzero constant: constants count as live here) and writes a read element; taps that only ever meet
padding are off-path. `density_on_path` is the fraction of kept weights on a path; `channel_liveness`
gives the per-layer channel facts, and `analyse` the per-node facts compaction works from.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from gemminer.errors import GemminerError
from gemminer.masking import PRUNABLE_TYPES


class LivenessError(GemminerError):
    """The model's graph cannot be traced, or holds an operation the analysis does not know."""


# element-wise operations with f(0) = 0: they keep every fact as it is
ZERO_PRESERVING_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardtanh, nn.ELU,
                           nn.Hardswish, nn.Mish, nn.SELU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                           nn.Identity, nn.Softsign, nn.Tanhshrink)
ZERO_PRESERVING_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardtanh, F.elu,
                             F.hardswish, F.mish, F.selu, F.dropout, F.dropout1d, F.dropout2d, torch.tanh, F.tanh,
                             torch.abs, operator.neg, torch.neg, operator.pos}
ZERO_PRESERVING_METHODS = {"relu", "relu_", "tanh", "abs", "neg", "contiguous", "clone", "float", "double", "to"}
# element-wise with f(0) != 0: a dead element becomes a nonzero constant
CONSTANT_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
CONSTANT_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.exp, F.softplus}
CONSTANT_METHODS = {"sigmoid", "exp"}
# linear maps with nonnegative coefficients (or max pools, whose reads are their windows'): applied to
# 0/1 indicators they give the support of their output, their vector-Jacobian product the support read
STRUCTURAL_MODULES = (nn.Flatten, nn.Unflatten, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                      nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                      nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ZeroPad1d, nn.ZeroPad2d,
                      nn.ZeroPad3d, nn.ChannelShuffle)
STRUCTURAL_FUNCTIONS = {torch.flatten, torch.reshape, operator.getitem, F.pad, torch.cat, torch.concat, torch.stack,
                        F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                        F.adaptive_avg_pool3d, torch.mean, torch.sum, torch.transpose, torch.permute, torch.squeeze,
                        torch.unsqueeze, torch.movedim, torch.narrow, torch.chunk}
STRUCTURAL_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "mean", "sum", "squeeze", "unsqueeze",
                      "expand", "expand_as", "view_as", "reshape_as", "narrow", "movedim", "unflatten"}
MAX_POOLS = {"max_pool1d": F.avg_pool1d, "max_pool2d": F.avg_pool2d, "max_pool3d": F.avg_pool3d,
             "adaptive_max_pool1d": F.adaptive_avg_pool1d, "adaptive_max_pool2d": F.adaptive_avg_pool2d,
             "adaptive_max_pool3d": F.adaptive_avg_pool3d}
ADDS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
MULS = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}
VALUE_METHODS = {"size", "dim", "numel"}  # results that are not tensors
LEAF_TYPES = (*PRUNABLE_TYPES, nn.modules.batchnorm._BatchNorm, *ZERO_PRESERVING_MODULES, *CONSTANT_MODULES,
              *STRUCTURAL_MODULES)
CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear}


@dataclass
class Facts:
    """The facts of one tensor of the graph, batch dimension 1 (see the module docstring)."""

    live: Tensor
    nonzero: Tensor
    read: Tensor | None = None  # filled by the backward sweep


@dataclass
class LayerLiveness:
    """One prunable layer's channels (a Linear's input features) and the kept weights on a path.

    `in_live`: input channel depends on the input; `in_nonzero`: may be nonzero (live or a nonzero
    constant, which counts as live for paths); `out_read`: output channel read by something that
    reaches the output; `out_nonzero`: output channel may be nonzero; `on_path`: kept weights (weight
    shape) on at least one input-to-output path. A layer used several times gets the union of its uses.
    """

    name: str
    in_live: Tensor
    in_nonzero: Tensor
    out_read: Tensor
    out_nonzero: Tensor
    on_path: Tensor
    kept: int

    @property
    def on_path_count(self) -> int:
        return int(self.on_path.sum())


@dataclass
class Analysis:
    """Everything `analyse` found: the traced graph, the facts per node name, the layers by weight name."""

    graph: fx.GraphModule
    facts: dict[str, Facts]
    layers: dict[str, LayerLiveness]
    masks: dict[str, Tensor]
    values: dict[str, Any] = field(default_factory=dict)  # non-tensor node values (sizes, shapes)


class _Tracer(fx.Tracer):
    """Keeps the layers the analysis has rules for as single calls (parametrized ones included)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, LEAF_TYPES) or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """`model` as an fx graph; LivenessError when it cannot be traced (data-dependent control flow, ...)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # fx fails in many ways (TraceError, TypeError on proxies, ...): all mean "not traceable"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise LivenessError(f"the model cannot be traced with torch.fx: {reason}") from err
    return fx.GraphModule(model, graph)


def _channel_any(tensor: Tensor, dim: int) -> Tensor:
    """Per index of `dim`: any element True."""
    return tensor.movedim(dim, 0).reshape(tensor.shape[dim], -1).any(1)


def _weight_name(target: str) -> str:
    return f"{target}.weight" if target else "weight"


class _Rule:
    """How one node maps facts forward and reads backward. `inputs` are the tensor-valued argument nodes."""

    inputs: list[fx.Node]

    def backward(self, read: Tensor) -> list[Tensor]:
        raise NotImplementedError


class _Elementwise(_Rule):
    def __init__(self, source: fx.Node) -> None:
        self.inputs = [source]

    def backward(self, read: Tensor) -> list[Tensor]:
        return [read]


class _Linear(_Rule):
    """A linear map with nonnegative coefficients of the tensor inputs (constants aside)."""

    def __init__(self, inputs: list[fx.Node], function: Callable[..., Tensor], shapes: list[torch.Size],
                 template: Tensor) -> None:
        self.inputs, self.function, self.shapes, self.template = inputs, function, shapes, template

    def backward(self, read: Tensor) -> list[Tensor]:
        points = [self.template.new_ones(shape).requires_grad_() for shape in self.shapes]
        with torch.enable_grad():
            out = self.function(*points)
            grads = torch.autograd.grad(out, points, read.to(out.dtype), allow_unused=True)
        return [torch.zeros(shape, dtype=torch.bool, device=read.device) if grad is None else grad != 0
                for grad, shape in zip(grads, self.shapes, strict=True)]


class _Product(_Rule):
    """x * y of two tensors: x is read where y may be nonzero, and the other way round."""

    def __init__(self, inputs: list[fx.Node], nonzero: list[Tensor]) -> None:
        self.inputs, self.nonzero = inputs, nonzero

    def backward(self, read: Tensor) -> list[Tensor]:
        out = []
        for index, other in ((0, 1), (1, 0)):
            shape = self.nonzero[index].shape
            product = read.float() * self.nonzero[other].float()
            out.append(_sum_to(product, shape) != 0)
        return out


def _sum_to(tensor: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast result back to `shape`."""
    while tensor.dim() > len(shape):
        tensor = tensor.sum(0)
    for dim, size in enumerate(shape):
        if size == 1 and tensor.shape[dim] != 1:
            tensor = tensor.sum(dim, keepdim=True)
    return tensor


class _Weighted(_Rule):
    """A Conv / Linear layer: its mask is the connection pattern, its bias a constant."""

    def __init__(self, source: fx.Node, name: str, function: Callable[[Tensor, Tensor], Tensor], mask: Tensor,
                 in_nonzero: Tensor, channel_dim: int) -> None:
        self.inputs, self.name, self.function, self.mask = [source], name, function, mask
        self.in_nonzero, self.channel_dim = in_nonzero, channel_dim
        self.on_path: Tensor | None = None

    def backward(self, read: Tensor) -> list[Tensor]:
        pattern = self.mask.float().requires_grad_()
        point = self.in_nonzero.float().requires_grad_()
        with torch.enable_grad():
            out = self.function(point, pattern)
            read_in, weight_use = torch.autograd.grad(out, (point, pattern), read.float())
        self.on_path = (weight_use != 0) & self.mask  # a kept tap meeting a nonzero input and a read output
        return [read_in != 0]


class _Analyser:
    def __init__(self, model: nn.Module, masks: dict[str, Tensor], example_input: Tensor) -> None:
        self.graph = trace(model)
        self.modules = dict(self.graph.named_modules())
        self.example = example_input[:1].detach()
        self.masks = {name: mask.to(self.example.device, torch.bool) for name, mask in masks.items()}
        self.facts: dict[str, Facts] = {}
        self.values: dict[str, Any] = {}
        self.rules: dict[str, _Rule] = {}

    # ---- forward ---------------------------------------------------------------------------
    def run(self) -> Analysis:
        for node in self.graph.graph.nodes:
            try:
                self._forward(node)
            except LivenessError:
                raise
            except Exception as err:  # a rule met shapes or arguments it cannot take
                raise LivenessError(f"cannot analyse node {node.name} ({_describe(node)}): "
                                    f"{(str(err).splitlines() or [type(err).__name__])[0][:200]}") from err
        self._backward()
        return Analysis(self.graph, self.facts, self._layers(), self.masks, self.values)

    def _value(self, argument: Any, which: str) -> Any:
        """An argument with its nodes replaced: tensors by their `which` indicator (float), others by value."""
        def replace(node: fx.Node) -> Any:
            if node.name in self.facts:
                return getattr(self.facts[node.name], which).float()
            return self.values[node.name]
        return fx.node.map_arg(argument, replace)

    def _tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [arg for arg in node.all_input_nodes if arg.name in self.facts]

    def _forward(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            if node.name in self.facts or self.facts:
                raise LivenessError("only models with one tensor input can be analysed")
            ones = torch.ones_like(self.example, dtype=torch.bool)
            self.facts[node.name] = Facts(ones, ones.clone())
            return
        if node.op == "output":
            return
        if node.op == "get_attr":
            value = _attribute(self.graph, node.target)
            if isinstance(value, Tensor):
                self.facts[node.name] = Facts(torch.zeros_like(value, dtype=torch.bool), value.detach() != 0)
            else:
                self.values[node.name] = value
            return
        tensors = self._tensor_inputs(node)
        if not tensors:  # arithmetic on sizes and the like
            self.values[node.name] = _call(self.graph, node, self._value(node.args, "live"),
                                           self._value(node.kwargs, "live"))
            return
        if _is(node, None, set(), {getattr}, VALUE_METHODS):
            self.values[node.name] = _call(self.graph, node, self._value(node.args, "nonzero"),
                                           self._value(node.kwargs, "nonzero"))
            return
        module = self.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, PRUNABLE_TYPES):
            self._weighted_module(node, module)
        elif node.op == "call_function" and node.target in CONV_FUNCTIONS:
            self._weighted_function(node)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            self._batch_norm(node, module)
        elif _is(node, module, ZERO_PRESERVING_MODULES, ZERO_PRESERVING_FUNCTIONS, ZERO_PRESERVING_METHODS):
            source = self.facts[node.args[0].name]
            self.facts[node.name] = Facts(source.live.clone(), source.nonzero.clone())
            self.rules[node.name] = _Elementwise(node.args[0])
        elif _is(node, module, CONSTANT_MODULES, CONSTANT_FUNCTIONS, CONSTANT_METHODS):
            source = self.facts[node.args[0].name]
            self.facts[node.name] = Facts(source.live.clone(), torch.ones_like(source.nonzero))
            self.rules[node.name] = _Elementwise(node.args[0])
        elif node.op == "call_function" and node.target in ADDS | MULS:
            self._arithmetic(node, tensors)
        elif _is(node, module, STRUCTURAL_MODULES, STRUCTURAL_FUNCTIONS, STRUCTURAL_METHODS) or (
                node.op == "call_function" and getattr(node.target, "__name__", "") in MAX_POOLS):
            self._structural(node, tensors, module)
        else:
            raise LivenessError(f"unsupported operation in the model's graph: {_describe(node)} (node {node.name})")

    def _weighted_module(self, node: fx.Node, module: nn.Module) -> None:
        name = _weight_name(node.target)
        weight = module.weight
        if isinstance(module, nn.Linear):
            def function(inputs: Tensor, pattern: Tensor) -> Tensor:
                return F.linear(inputs, pattern)
            channel_dim = -1
        else:
            def function(inputs: Tensor, pattern: Tensor) -> Tensor:
                return module._conv_forward(inputs, pattern, None)
            channel_dim = 1
        self._weighted(node, name, weight, module.bias, function, channel_dim)

    def _weighted_function(self, node: fx.Node) -> None:
        arguments = list(node.args) + [node.kwargs[key] for key in ("weight", "bias") if key in node.kwargs]
        weight_node = arguments[1] if len(arguments) > 1 else None
        if not isinstance(weight_node, fx.Node) or weight_node.op != "get_attr":
            raise LivenessError(f"{_describe(node)} with a weight that is not a parameter (node {node.name})")
        bias_node = arguments[2] if len(arguments) > 2 else None
        weight = _attribute(self.graph, weight_node.target)
        bias = _attribute(self.graph, bias_node.target) if isinstance(bias_node, fx.Node) else bias_node
        rest, kwargs = node.args[3:], {k: v for k, v in node.kwargs.items() if k not in ("weight", "bias", "input")}
        target = node.target

        def function(inputs: Tensor, pattern: Tensor) -> Tensor:
            return target(inputs, pattern, None, *rest, **kwargs)
        self._weighted(node, weight_node.target, weight, bias, function, -1 if target is F.linear else 1)

    def _weighted(self, node: fx.Node, name: str, weight: Tensor, bias: Tensor | None,
                  function: Callable[[Tensor, Tensor], Tensor], channel_dim: int) -> None:
        mask = self.masks.get(name)
        if mask is None:
            mask = torch.ones(weight.shape, dtype=torch.bool, device=self.example.device)
        source = self.facts[node.args[0].name]
        with torch.no_grad():
            pattern = mask.float()
            live = function(source.live.float(), pattern) != 0
            nonzero = function(source.nonzero.float(), pattern) != 0
            if bias is not None:
                shape = [1] * nonzero.dim()
                shape[channel_dim] = -1
                nonzero |= (bias.detach() != 0).to(nonzero.device).view(shape)
        self.facts[node.name] = Facts(live, nonzero)
        self.rules[node.name] = _Weighted(node.args[0], name, function, mask, source.nonzero, channel_dim)

    def _batch_norm(self, node: fx.Node, module: nn.modules.batchnorm._BatchNorm) -> None:
        """Eval mode: y = x * scale + shift per channel; a channel with scale 0 is cut off."""
        source = self.facts[node.args[0].name]
        channels = source.live.shape[1]
        gamma = module.weight.detach() if module.weight is not None else torch.ones(channels)
        beta = module.bias.detach() if module.bias is not None else torch.zeros(channels)
        gamma, beta = gamma.to(source.live.device), beta.to(source.live.device)
        if module.running_mean is not None:
            std = torch.sqrt(module.running_var.detach().to(gamma.device) + module.eps)
            shift = beta - module.running_mean.detach().to(gamma.device) * gamma / std
        else:  # batch statistics even in eval: a zero channel has mean 0
            shift = beta
        shape = [1, -1] + [1] * (source.live.dim() - 2)
        passes = (gamma != 0).view(shape)
        self.facts[node.name] = Facts(source.live & passes, (source.nonzero & passes) | (shift != 0).view(shape))
        self.rules[node.name] = _Linear([node.args[0]], lambda x: x * passes.float(), [source.live.shape],
                                        source.live.float())

    def _arithmetic(self, node: fx.Node, tensors: list[fx.Node]) -> None:
        operands = list(node.args) + [node.kwargs[key] for key in ("other",) if key in node.kwargs]
        if len(operands) != 2 or set(node.kwargs) - {"other"}:
            raise LivenessError(f"{_describe(node)} with other than two operands (node {node.name})")
        first, second = operands
        if node.target in MULS and len(tensors) == 2:
            if node.target in (operator.truediv, torch.div):
                raise LivenessError(f"division by a tensor is not supported (node {node.name})")
            x, y = self.facts[first.name], self.facts[second.name]
            live = (x.live.float() * y.nonzero.float() + x.nonzero.float() * y.live.float()) != 0
            self.facts[node.name] = Facts(live, (x.nonzero.float() * y.nonzero.float()) != 0)
            self.rules[node.name] = _Product([first, second], [x.nonzero, y.nonzero])
            return
        if len(tensors) == 2:  # x + y, x - y: supports add, nothing cancels
            x, y = self.facts[first.name], self.facts[second.name]
            self.facts[node.name] = Facts(x.live | y.live, x.nonzero | y.nonzero)
            self.rules[node.name] = _Linear([first, second], lambda a, b: a + b, [x.live.shape, y.live.shape],
                                            x.live.float())
            return
        tensor_node = tensors[0]
        scalar = self._value(second if first is tensor_node else first, "nonzero")
        if isinstance(scalar, Tensor) or not isinstance(scalar, int | float | bool):
            raise LivenessError(f"{_describe(node)} with a non-scalar operand (node {node.name})")
        source = self.facts[tensor_node.name]
        if node.target in ADDS:
            nonzero = torch.ones_like(source.nonzero) if scalar != 0 else source.nonzero.clone()
            self.facts[node.name] = Facts(source.live.clone(), nonzero)
            self.rules[node.name] = _Elementwise(tensor_node)
        elif node.target in (operator.truediv, torch.div) and first is not tensor_node:
            raise LivenessError(f"a scalar divided by a tensor is not supported (node {node.name})")
        else:
            factor = float(scalar != 0)
            self.facts[node.name] = Facts(source.live & bool(factor), source.nonzero & bool(factor))
            self.rules[node.name] = _Linear([tensor_node], lambda x: x * factor, [source.live.shape],
                                            source.live.float())

    def _structural(self, node: fx.Node, tensors: list[fx.Node], module: nn.Module | None) -> None:
        target = module if module is not None else node.target
        pool_name = type(module).__name__.lower() if module is not None else getattr(target, "__name__", "")
        if "maxpool" in pool_name or pool_name in MAX_POOLS:
            function, backward = self._max_pool(node, module)
        else:
            def function(*points: Tensor, which: str = "live") -> Tensor:
                return self._apply(node, target, tensors, points, which)
            backward = function
        live = function(*(self.facts[t.name].live.float() for t in tensors))
        if not isinstance(live, Tensor):
            raise LivenessError(f"{_describe(node)} returns {type(live).__name__}, not a tensor (node {node.name})")
        nonzero = function(*(self.facts[t.name].nonzero.float() for t in tensors), which="nonzero")
        self.facts[node.name] = Facts(live != 0, nonzero != 0)
        self.rules[node.name] = _Linear(tensors, backward, [self.facts[t.name].live.shape for t in tensors],
                                        self.facts[tensors[0].name].live.float())

    def _apply(self, node: fx.Node, target: Any, tensors: list[fx.Node], points: tuple[Tensor, ...],
               which: str) -> Any:
        by_name = {t.name: point for t, point in zip(tensors, points, strict=True)}

        def replace(arg: fx.Node) -> Any:
            return by_name[arg.name] if arg.name in by_name else self.values[arg.name]
        args, kwargs = fx.node.map_arg(node.args, replace), fx.node.map_arg(node.kwargs, replace)
        if target is F.pad and which == "live":  # a pad value is a constant, never input-dependent
            args, kwargs = args[:2], {key: value for key, value in kwargs.items() if key != "value"}
        if target is F.pad and (kwargs.get("mode", args[2] if len(args) > 2 else "constant") != "constant"):
            raise LivenessError(f"only constant padding is supported (node {node.name})")
        if node.op == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        return target(*args, **kwargs)

    def _max_pool(self, node: fx.Node, module: nn.Module | None) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
        """Forward: the max pool of the indicators; backward: an average pool over the same windows."""
        if module is not None:
            name = type(module).__name__.lower().replace("maxpool", "max_pool").replace("adaptivemax", "adaptive_max")
            options = {key: getattr(module, key) for key in ("kernel_size", "stride", "padding", "dilation",
                                                             "ceil_mode", "output_size", "return_indices")
                       if hasattr(module, key)}
        else:
            name = node.target.__name__
            signature = {"kernel_size": 1, "stride": 2, "padding": 3, "dilation": 4, "ceil_mode": 5,
                         "return_indices": 6} if "adaptive" not in name else {"output_size": 1, "return_indices": 2}
            options = {key: node.args[index] for key, index in signature.items() if index < len(node.args)}
            options.update(node.kwargs)
        if options.get("return_indices"):
            raise LivenessError(f"max pooling with return_indices is not supported (node {node.name})")
        name = name.lstrip("_")
        if "adaptive" in name:
            forward_options = backward_options = {"output_size": options["output_size"]}
        else:
            dilation = options.get("dilation", 1)
            if dilation not in (1, (1,), (1, 1), (1, 1, 1), None):
                raise LivenessError(f"dilated max pooling is not supported (node {node.name})")
            forward_options = {key: options[key] for key in ("kernel_size", "stride", "padding", "ceil_mode")
                               if key in options}
            backward_options = {**forward_options, "count_include_pad": True}
        maximum, average = getattr(F, name), MAX_POOLS[name]

        def forward(point: Tensor, which: str = "live") -> Tensor:
            return maximum(point, **forward_options)

        def backward(point: Tensor) -> Tensor:
            return average(point, **backward_options)
        return forward, backward

    # ---- backward --------------------------------------------------------------------------
    def _backward(self) -> None:
        output = next(node for node in self.graph.graph.nodes if node.op == "output")
        for arg in output.all_input_nodes:
            if arg.name in self.facts:
                self.facts[arg.name].read = torch.ones_like(self.facts[arg.name].live)
        for node in reversed(list(self.graph.graph.nodes)):
            facts = self.facts.get(node.name)
            if facts is None:
                continue
            if facts.read is None:
                facts.read = torch.zeros_like(facts.live)
            rule = self.rules.get(node.name)
            if rule is None:
                continue
            for source, read in zip(rule.inputs, rule.backward(facts.read), strict=True):
                target = self.facts[source.name]
                read = read.reshape(target.live.shape) if read.shape != target.live.shape else read
                target.read = read if target.read is None else target.read | read

    def _layers(self) -> dict[str, LayerLiveness]:
        layers: dict[str, LayerLiveness] = {}
        for node_name, rule in self.rules.items():
            if not isinstance(rule, _Weighted):
                continue
            source, out = self.facts[rule.inputs[0].name], self.facts[node_name]
            dim = rule.channel_dim
            found = LayerLiveness(rule.name, _channel_any(source.live, dim), _channel_any(source.nonzero, dim),
                                  _channel_any(out.read, dim), _channel_any(out.nonzero, dim),
                                  rule.on_path, int(rule.mask.sum()))
            seen = layers.get(rule.name)
            if seen is not None:  # a layer called more than once: the union of its uses
                found = LayerLiveness(rule.name, seen.in_live | found.in_live, seen.in_nonzero | found.in_nonzero,
                                      seen.out_read | found.out_read, seen.out_nonzero | found.out_nonzero,
                                      seen.on_path | found.on_path, found.kept)
            layers[rule.name] = found
        return layers


def _is(node: fx.Node, module: nn.Module | None, modules: Any, functions: set, methods: set) -> bool:
    """Whether `node` calls one of `modules` (types), `functions` or `methods` (names)."""
    if node.op == "call_module":
        return bool(modules) and isinstance(module, modules)
    if node.op == "call_method":
        return node.target in methods
    return node.op == "call_function" and node.target in functions


def _attribute(graph: fx.GraphModule, target: str) -> Any:
    value: Any = graph
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _call(graph: fx.GraphModule, node: fx.Node, args: Any, kwargs: Any) -> Any:
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return graph.get_submodule(node.target)(*args, **kwargs)
    return node.target(*args, **kwargs)


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target} ({type(node.graph.owning_module.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"function {getattr(node.target, '__name__', node.target)}"


def analyse(model: nn.Module, masks: dict[str, Tensor], example_input: Tensor) -> Analysis:
    """Trace `model` and find the facts of every tensor of its graph under `masks` (weight name ->
    bool tensor; a prunable layer without a mask counts as dense). Raises LivenessError."""
    with torch.no_grad():
        return _Analyser(model, masks, example_input).run()


def channel_liveness(model: nn.Module, masks: dict[str, Tensor], example_input: Tensor) -> dict[str, LayerLiveness]:
    """Per prunable weight name reached by the graph: its live input / read output channels and on-path
    weights (`LayerLiveness`). Raises LivenessError where the graph cannot be analysed."""
    return analyse(model, masks, example_input).layers


def density_on_path(model: nn.Module, masks: dict[str, Tensor], example_input: Tensor) -> float | None:
    """Fraction of the kept weights (mask True) that lie on at least one input-to-output path, exactly;
    a layer the graph never uses is off-path. None, with one warning saying why, where the graph cannot
    be traced or holds an operation the analysis does not know."""
    try:
        layers = channel_liveness(model, masks, example_input)
    except LivenessError as err:
        warnings.warn(f"density on path unavailable: {err}", stacklevel=2)
        return None
    kept = sum(int(mask.sum()) for mask in masks.values())
    if kept == 0:
        return 0.0
    on_path = sum(layers[name].on_path_count for name in masks if name in layers)
    return on_path / kept


__all__ = ["Analysis", "Facts", "LayerLiveness", "LivenessError", "analyse", "channel_liveness", "density_on_path",
           "trace"]
