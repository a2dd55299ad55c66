"""What a ticket costs per layer: multiply-accumulates (dense and remaining) and a density chart."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from gemminer.errors import GemminerError
from gemminer.masking import PRUNABLE_TYPES, original_weight
from gemminer.safety import check_output_file
from gemminer.ticket import Ticket
from gemminer.train import model_device


@torch.no_grad()
def layer_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Dense multiply-accumulates per prunable weight name for one input of `input_shape`.

    Measured with forward hooks: each weight is used once per output position (a
    Linear's leading dims, a convolution's output length/area), so MACs = weight
    entries x output positions. Under a mask, the remaining MACs are that times the
    layer's density, exactly: every weight is used equally often (padding aside).
    """
    names, first_use = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            # a tied weight's MACs add up under the name of its first layer, the name its mask has
            key = id(module)
            with contextlib.suppress(GemminerError):  # a weight computed by the user's own hooks: its layer's
                key = id(original_weight(module))
            names[module] = first_use.setdefault(key, f"{name}.weight" if name else "weight")
    macs: dict[str, int] = {}

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        channels_last = isinstance(module, nn.Linear)
        positions = output[0].numel() // (output.shape[-1] if channels_last else output.shape[1])
        macs[names[module]] = macs.get(names[module], 0) + module.weight.numel() * positions

    hooks = [module.register_forward_hook(count) for module in names]
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros((1, *input_shape), device=model_device(model)))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return macs


def plot_layer_density(ticket: Ticket, path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """A bar chart of per-layer density (log scale) as PNG; collapsed layers in red. `path` must not be a
    run's own file or one of `inputs`, and its suffix must name an image format matplotlib writes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.backend_bases import FigureCanvasBase

    check_output_file(path, "density chart", inputs, flag="--png")
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix not in formats:
        raise GemminerError(f"cannot write the density chart {path}: {('.' + suffix) if suffix else 'no suffix'} "
                            f"is not an image format; end the name in one of {', '.join('.' + f for f in formats)}")

    layers = ticket.layers()
    figure, axes = plt.subplots(figsize=(max(4.0, 0.6 * len(layers) + 2), 3.5))
    try:
        floor = 0.5 / max(layer.parameters for layer in layers)  # collapsed layers still get a visible bar
        heights = [max(layer.density, floor) for layer in layers]
        colors = ["tab:red" if layer.remaining == 0 else "tab:blue" for layer in layers]
        axes.bar(range(len(layers)), heights, color=colors)
        axes.axhline(ticket.density, color="gray", linestyle="--", label=f"overall {ticket.density:.4f}")
        axes.set_yscale("log")
        axes.set_xticks(range(len(layers)), [layer.name for layer in layers], rotation=45, ha="right", fontsize=8)
        axes.set_ylabel("density (remaining / parameters)")
        collapsed = sum(layer.remaining == 0 for layer in layers)
        axes.set_title(f"per-layer density{f'; {collapsed} collapsed layer(s) in red' if collapsed else ''}")
        axes.legend(fontsize=8)
        figure.tight_layout()
        try:
            figure.savefig(path, dpi=100)
        except OSError as err:
            raise GemminerError(f"cannot write the density chart {path}: {err.strerror or err}") from err
    finally:
        plt.close(figure)
    return Path(path)
