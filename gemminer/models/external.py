"""Models from outside the registry: ``module.path:factory``, ``timm:<name>``, ``torchvision:<name>``."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from torch import nn

from gemminer.errors import GemminerError


def _failure(err: BaseException) -> str:
    """The user's exception in a few words; GEMMINER_DEBUG=1 prints its traceback first."""
    if os.environ.get("GEMMINER_DEBUG"):
        traceback.print_exception(err)
    if isinstance(err, SystemExit):
        return f"it called sys.exit({err.code!r})"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _debug_hint() -> str:
    return "" if os.environ.get("GEMMINER_DEBUG") else " (GEMMINER_DEBUG=1 shows its traceback)"


def _call(factory: Callable[..., Any], what: str, options: dict[str, Any]) -> nn.Module:
    """Call `factory` with those of `options` its signature accepts; check it returns a Module."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {key: value for key, value in options.items() if takes_any or key in parameters}
    try:
        model = factory(**kwargs)
    except (Exception, SystemExit) as err:  # the user's code: any failure, or an exit, becomes one line
        raise GemminerError(f"{what}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: "
                            f"{_failure(err)}{_debug_hint()}") from err
    if not isinstance(model, nn.Module):
        raise GemminerError(f"{what} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def user_model(spec: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``module.path:factory``: any importable callable returning an nn.Module. It is called
    with ``num_classes=`` and ``input_shape=`` where its signature accepts them, else bare."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise GemminerError(f"a user model is module.path:factory, got {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: a mymod.py beside the user imports from the CLI too
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as err:  # the user's module runs here: it may raise anything, or exit
        missing = isinstance(err, ModuleNotFoundError) and err.name == module_name  # no such module: no traceback
        raise GemminerError(f"cannot import {module_name!r} for model {spec!r}: {_failure(err)}"
                            f"{'' if missing else _debug_hint()}") from None
    factory = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise GemminerError(f"module {module_name!r} has no {attribute!r} (model {spec!r})")
    if not callable(factory):
        raise GemminerError(f"{spec} is not callable")
    return _call(factory, spec, {"num_classes": num_classes, "input_shape": input_shape})


def library_model(library: str, name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``timm:<name>`` / ``torchvision:<name>``: untrained models of those packages, when they import."""
    try:
        package = importlib.import_module("timm" if library == "timm" else "torchvision.models")
    except Exception as err:  # a broken install (PyPI torchvision beside a local torch) raises more than ImportError
        raise GemminerError(f"model {library}:{name} needs the {library} package, which does not import here "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if library == "timm":
        return _call(lambda **kw: package.create_model(name, pretrained=False, **kw), f"timm:{name}",
                     {"num_classes": num_classes, "in_chans": input_shape[0]})
    try:
        factory = package.get_model_builder(name)
    except ValueError:
        raise GemminerError(f"torchvision has no model {name!r}") from None
    return _call(factory, f"torchvision:{name}", {"num_classes": num_classes, "weights": None})
