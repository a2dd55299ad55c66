"""Typed run configuration: dataclasses are the one source of truth for YAML, CLI and run folders.

Layering, lowest first: dataclass defaults (the paper's settings) < the data set's
preset (unless ``preset: paper``) < a YAML file < command-line flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gemminer import yamlkeys
from gemminer.errors import GemminerError, reading


@dataclass
class DataConfig:
    name: str = field(default="mnist1d", metadata={
        "help": "mnist1d | cifar10 | cifar100 | mnist | fashion-mnist | svhn | tiny-imagenet | imagefolder:PATH"})
    dir: str | None = field(default=None, metadata={
        "help": "data folder (default: ~/.cache/gemminer/data; for mnist1d its cache, ~/.cache/gemminer)"})
    num_samples: int = field(default=5000, metadata={"help": "MNIST-1D samples, train+test (5000 = canonical)"})
    batch_size: int = field(default=128, metadata={"help": "training batch size"})
    eval_batch_size: int | None = field(default=None, metadata={"auto": True,
        "help": "evaluation batch size (default auto: 256 on CPU, 1000 on CUDA; benchmarks/eval_batch.py)"})
    download: bool = field(default=False, metadata={"help": "fetch a missing data set's official files"})
    limit: int | None = field(default=None, metadata={"help": "train on this many training samples (a fixed subset)"})
    val_size: int = field(default=0, metadata={"help": "hold out this many training samples as a validation split"})
    eval_split: str = field(default="test", metadata={"help": "test | val: the split accuracies are measured on"})
    augment: bool = field(default=True, metadata={
        "help": "the data set's standard training augmentation (CIFAR: 4-pixel padded crop + flip)"})


@dataclass
class ModelConfig:
    name: str | None = field(default=None, metadata={"help": "model name (default: the data set's default model)"})
    width: int | None = field(default=None, metadata={
        "help": "channels of the bundled model's first stage (the rest keep their ratios; default: the published)"})
    affine_bn: bool = field(default=False, metadata={"help": "BatchNorm with affine parameters (paper: off)"})
    bias: bool = field(default=False, metadata={"help": "layers with biases (paper: off)"})
    weight_init: str | None = field(default=None, metadata={
        "help": "signed_constant | kaiming_normal | keep (the model's own); default: the method's published init "
                "(signed_constant for gemminer and edge-popup, kaiming_normal for the others)"})
    prune_first: bool = field(default=True, metadata={"help": "prune the first layer"})
    prune_last: bool = field(default=True, metadata={"help": "prune the last layer"})


@dataclass
class FinetuneConfig:
    """How the ticket trains. Defaults are the Gem-Miner paper's fine-tuning; methods published
    with standard dense training get the data set's dense recipe instead (`RECIPES`)."""

    epochs: int | None = field(default=None, metadata={"help": "fine-tuning epochs (default: the search epochs)",
                                                       "range": (0, math.inf, False, False)})
    lr: float = field(default=0.01, metadata={"help": "learning rate", "tune": {"low": 1e-3, "high": 1.0, "log": True}})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum", "tune": {"low": 0.5, "high": 0.99}})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay",
                                                        "tune": {"low": 1e-6, "high": 1e-2, "log": True}})
    lr_schedule: str = field(default="multistep", metadata={"help": "multistep (x0.1 at milestones) | cosine",
                                                            "tune": {"choices": ["multistep", "cosine"]}})
    milestones: list[int] | None = field(default=None,
                                         metadata={"help": "multistep epochs (default: the paper's rule)"})


@dataclass
class RunConfig:
    method: str = field(default="gemminer", metadata={"help": "pruning method"})
    density: float = field(default=0.0144, metadata={"help": "target fraction of prunable weights that remain"})
    seed: int = field(default=0, metadata={"help": "seed of every random stream",
                                           "range": (-math.inf, math.inf, False, False)})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    threads: int | None = field(default=None, metadata={
        "auto": True, "range": (1, math.inf, False, False),
        "help": "CPU threads of the tensor operations: auto (from the usable cores, how many are busy and the "
                "model's size, decided at start; see docs/robustness.md) | N"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast on CUDA (paper: off, fp32)"})
    preset: str = field(default="auto", metadata={"help": "auto (the data set's tuned defaults) | paper"})
    bn_recalibration_batches: int = field(
        default=20, metadata={"help": "training batches to recompute BatchNorm statistics before an at-init "
                                      "accuracy (0: off)"})
    eval_every: int = field(
        default=1, metadata={"help": "epochs between test accuracies in the search and fine-tuning (the last epoch "
                                     "is always measured)"})
    compile: bool = field(
        default=False, metadata={"help": "run training steps and evaluation under torch.compile (CUDA graphs on "
                                         "CUDA); the first epochs pay the compilation"})
    checkpoint_every: int = field(
        default=1, metadata={"help": "epochs between checkpoints (0: only at freezing events and on SIGINT/SIGTERM)"})
    tensorboard: bool = field(default=False, metadata={"help": "also log metrics to TensorBoard (needs tensorboard)"})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    search: Any = None  # the method's own config dataclass, filled in by `resolve`
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# Training recipes of tickets, over FinetuneConfig's defaults (the "gemminer" recipe): "dense" is
# the standard dense recipe a method was published with (ResNet-20 / CIFAR-10: SGD lr 0.1, momentum
# 0.9, weight decay 1e-4, multistep x0.1). A method's class names its recipe.
RECIPES: dict[str, dict[str, Any]] = {
    "gemminer": {},
    "dense": {"lr": 0.1},
    # the official edge-popup CIFAR config (allenai/hidden-networks, resnet18-usc-unsigned): SGD lr 0.1,
    # momentum 0.9, weight decay 5e-4, cosine; its batch size is in PUBLISHED_DATA
    "edge-popup": {"lr": 0.1, "weight_decay": 5e-4, "lr_schedule": "cosine"},
}

# Data settings a method was published with, by method name: used where the data set has no tuned
# preset of its own (CIFAR, ...) and under preset "paper"; flags and YAML still win.
PUBLISHED_DATA: dict[str, dict[str, Any]] = {
    "edge-popup": {"batch_size": 256},  # the same official config
}

# Tuned defaults per data set (the paper's stay available with preset "paper").
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "mnist1d": {
        # 32 steps per epoch (vs 391 on CIFAR-10): a larger lr lets the scores move as far within 30
        # epochs as the paper's do within 150; lambda follows the target density (auto). The score lr
        # and the ticket's recipe are the best of `gemminer tune` at density 0.02 on the validation
        # split (docs/results/tuning.md): 1.937, 0.2005 and 8.304e-5, rounded; the paper's lr 0.01 cost
        # 15-20 points here.
        "search:gemminer": {"epochs": 30, "freeze_period": 2, "reg_lambda": "auto", "lr": 1.94},
        "finetune:gemminer": {"lr": 0.2, "weight_decay": 8.3e-5},
        # IMP trains as long per round as Gem-Miner searches; the dense recipe (IMP's rounds, the tickets
        # of IMP, PaI and random methods) was swept on a validation split (docs/benchmarks.md)
        "search:imp": {"epochs": 30},
        "search:edge-popup": {"epochs": 30, "lr": 0.3, "weight_decay": 1e-4},
        "finetune:dense": {"lr": 0.1, "weight_decay": 5e-4},
    },
    # The official ResNet-18 / Tiny ImageNet config (the official repository's); its batch size is 256:
    # --data-batch-size 256.
    "tiny-imagenet": {
        "search:gemminer": {"epochs": 200, "freeze_period": 10, "reg_lambda": 1e-6},
        "finetune": {"lr": 0.1},
    },
}

SECTIONS = ("data", "model", "search", "finetune")

# Keys that change how a run is observed or saved, never what it computes (`compile` only its
# floating-point rounding, as a thread count does): a resume or a `compare` cell under other values of
# these is the same run (and old runs do not turn stale).
RESULT_NEUTRAL = frozenset({"eval_every", "checkpoint_every", "tensorboard", "data.eval_batch_size", "compile",
                            "threads"})


def result_tree(config: RunConfig) -> dict[str, Any]:
    """The nested config dict without the `RESULT_NEUTRAL` keys (for ticket headers)."""
    tree = to_dict(config)
    for key in RESULT_NEUTRAL:
        *sections, name = key.split(".")
        branch = tree
        for section in sections:
            branch = branch.get(section, {})
        branch.pop(name, None)
    return tree


def result_config(config: RunConfig) -> dict[str, Any]:
    """The flattened config without the `RESULT_NEUTRAL` keys: what decides a run's numbers."""
    return flatten(result_tree(config))


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (YAML-ready) of a config dataclass."""
    return dataclasses.asdict(config)


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise a clear error."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if type(None) in typing.get_args(annotation) and (
                value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        if str in options[1:] and isinstance(value, str):  # a number or a word (reg_lambda: 1e-4 or auto)
            try:
                return coerce(value, options[0], key)
            except GemminerError:
                return value.strip().lower()
        return coerce(value, options[0], key)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [part for part in value.replace(",", " ").split() if part]
        if not isinstance(value, (list, tuple)):
            raise GemminerError(f"{key} must be a list, got {value!r}")
        return [coerce(item, item_type, key) for item in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise GemminerError(f"{key} must be true or false, got {value!r}")
    if annotation in (int, float):
        try:
            number = annotation(value)
        except (TypeError, ValueError, OverflowError):
            kind = "an integer" if annotation is int else "a number"
            raise GemminerError(f"{key} must be {kind}, got {value!r}") from None
        if annotation is int and isinstance(value, float) and value != number:
            raise GemminerError(f"{key} must be an integer, got {value!r}")
        return number
    if annotation is str:
        return str(value)
    return value


def _apply(config: Any, overrides: dict[str, Any], prefix: str = "") -> None:
    """Set dataclass fields from a nested dict; unknown keys name the closest valid key."""
    valid = {f.name: f for f in dataclasses.fields(config)}
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid: {', '.join(valid)}"
            raise GemminerError(f"unknown config key {path!r}{hint}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise GemminerError(f"config key {path!r} must be a section (a mapping)")
            _apply(current, value, prefix=f"{path}.")
        else:
            if isinstance(value, str) and value.lower() == "auto" and valid[key].metadata.get("auto"):
                value = None  # a field that resolves "auto" itself (per device, say) holds it as None
            setattr(config, key, coerce(value, _field_type(type(config), key), path))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge, `extra` winning."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_yaml(path: str) -> dict[str, Any]:
    """A YAML mapping from `path`; an empty, binary, non-UTF-8 or non-mapping file is an error
    (an empty file would otherwise read as "all defaults")."""
    with reading(path, "config file", "it must be a UTF-8 YAML mapping of config keys"):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if "\x00" in text:
            raise ValueError("a binary file, not YAML")
        if not text.strip():
            raise GemminerError(f"config file {path} is empty; write the config keys there as a YAML mapping "
                                "(docs/concepts.md, Settings), or leave --config out")
        try:
            loaded = yamlkeys.load(text)  # a key given twice is refused, not silently the last one
        except yaml.YAMLError as err:
            raise GemminerError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(loaded, dict):
        raise GemminerError(f"config file {path} must hold a mapping at the top level")
    return loaded


# A run folder's config.yaml holds every key (dump_yaml writes them all), so a key it lacks was not
# written by gemminer and must not silently become a default, except the keys added after run folders
# existed, which older folders lack and which take their defaults (the values those runs had).
ADDED_LATER = frozenset({"eval_every", "search.freeze", "search.prune", "search.round_length", "compile", "threads",
                         "search.reg_lambda_schedule", "search.layer_floor"})
# Keys added later whose earlier runs had another value than today's default, filled in with that value:
# (method, key) -> value.
EARLIER_VALUES = {("snip", "search.bn_mode"): "train"}


def load_run_config(path: str | Path) -> RunConfig:
    """The resolved config of a run folder's config.yaml, refusing one that is not complete."""
    loaded = load_yaml(str(path))
    for (method, key), value in EARLIER_VALUES.items():  # what the run computed with, not today's default
        section, name = key.split(".")
        if isinstance(loaded, dict) and loaded.get("method") == method and isinstance(loaded.get(section), dict):
            loaded[section].setdefault(name, value)
    config = resolve(loaded)
    missing = sorted(set(flatten(to_dict(config))) - set(flatten(loaded)) - ADDED_LATER)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise GemminerError(f"{path} is not a complete run config (no {shown}); it was not written by gemminer "
                            "or was damaged: start the run over with --force")
    return config


# The method registry, handed over by `gemminer.methods` when it is imported (importing the
# `gemminer` package imports it first), so that config never imports the methods that import it.
_methods: dict[str, Any] = {}


def use_methods(registry: dict[str, Any]) -> None:
    """Let `resolve` look methods up in `registry` (name -> method class; the dict itself, so a
    method added to it later is seen too)."""
    global _methods
    _methods = registry


def method_class(name: str) -> Any:
    """The registered method class `name` (its `Config`, `recipe` and `weight_init` shape a run config)."""
    if name not in _methods:
        raise GemminerError(f"unknown method {name!r}; allowed: {', '.join(sorted(_methods))}")
    return _methods[name]


def resolve(overrides: dict[str, Any]) -> RunConfig:
    """Build the run config from defaults, the data set's preset and `overrides` (nested dict)."""
    for section in SECTIONS:
        if section in overrides and overrides[section] is not None and not isinstance(overrides[section], dict):
            raise GemminerError(f"config key {section!r} must be a section (a mapping), got {overrides[section]!r}")
    config = RunConfig()
    top = {key: value for key, value in overrides.items() if key not in SECTIONS}
    _apply(config, top)
    _apply(config.data, overrides.get("data") or {}, "data.")
    if config.preset not in ("auto", "paper"):
        raise GemminerError(f"unknown preset {config.preset!r}; allowed: auto, paper")
    method = method_class(config.method)
    if config.preset == "paper" or config.data.name not in PRESETS:  # then the user's data keys again on top
        _apply(config.data, merge(PUBLISHED_DATA.get(config.method, {}), overrides.get("data") or {}), "data.")
    config.search = method.Config()
    layers = [{"finetune": RECIPES[method.recipe]}, overrides]
    if config.preset == "auto":
        preset = PRESETS.get(config.data.name, {})
        layers.insert(1, {"search": preset.get(f"search:{config.method}", {}),
                          "finetune": merge(preset.get("finetune", {}), preset.get(f"finetune:{method.recipe}", {})),
                          **{k: v for k, v in preset.items() if ":" not in k and k != "finetune"}})
    for layer in layers:
        for section in ("model", "search", "finetune"):
            if layer.get(section):
                _apply(getattr(config, section), layer[section], f"{section}.")
    if config.model.weight_init is None:  # the method's published init, written out in config.yaml
        config.model.weight_init = method.weight_init
    if config.model.name is None:  # resolved here, so a saved config and a new one compare equal
        from gemminer.models import default_model

        config.model.name = default_model(config.data.name)
    if config.finetune.epochs is None:
        config.finetune.epochs = _default_finetune_epochs(config)
    validate(config)
    return config


def _default_finetune_epochs(config: RunConfig) -> int:
    """The search's epochs (the paper fine-tunes for as long as it searched); for methods
    that train nothing, Gem-Miner's epochs under the same preset, so comparisons are fair."""
    epochs = getattr(config.search, "epochs", None)
    if epochs:
        return epochs
    reference = resolve({"data": {"name": config.data.name}, "preset": config.preset, "method": "gemminer"})
    return reference.search.epochs


# Ranges of numeric options by field name, for every config dataclass (a method's included):
# (lowest, highest, lowest excluded, highest excluded). A field can declare its own in its metadata
# ("range": ...); any other number must be finite and >= 0. So an option added later is checked too.
NAMED_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "lr": (0, math.inf, True, False), "momentum": (0, 1, False, True), "density": (0, 1, True, False),
    "prune_fraction": (0, 1, True, True), "temperature": (0, math.inf, True, False),
    "epochs": (1, math.inf, False, False), "batch_size": (1, math.inf, False, False),
    "eval_batch_size": (1, math.inf, False, False), "eval_every": (1, math.inf, False, False),
    "num_samples": (10, math.inf, False, False), "limit": (1, math.inf, False, False),
    "width": (1, math.inf, False, False), "batches": (1, math.inf, False, False),
    "iterations": (1, math.inf, False, False), "samples_per_class": (1, math.inf, False, False),
}
NON_NEGATIVE = (0, math.inf, False, False)


def check_integer(name: str, value: Any, least: int | None = None) -> None:
    """An API argument that must be a whole number (numpy's too, not a bool), at least `least`."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or (least is not None and value < least):
        raise GemminerError(f"{name} must be an integer{f' >= {least}' if least is not None else ''}, got {value!r}")


def check_ranges(config: Any, prefix: str = "") -> None:
    """Every number (and every number in a list) of a config dataclass, nested sections included, is
    finite and inside its range: one line naming the key, the value and the range otherwise."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        key = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
            continue
        declared = _field_type(type(config), item.name)
        options = [t for t in typing.get_args(declared) if t is not type(None)] or [declared]
        whole = int in (options[0], *typing.get_args(options[0]))  # an int field, or a list of ints
        if value is not None and not isinstance(value, list) and not (isinstance(value, str) and str in options):
            # the API may hand any object: coerce it
            if options[0] in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                               or (options[0] is int and not isinstance(value, int))):
                kind = "an integer" if options[0] is int else "a number"
                raise GemminerError(f"{key} must be {kind}, got {value!r}")
        values = value if isinstance(value, list) else [value]
        for number in values:
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                continue
            low, high, open_low, open_high = item.metadata.get("range", NAMED_RANGES.get(item.name, NON_NEGATIVE))
            finite = isinstance(number, int) or math.isfinite(number)  # a huge int is finite (and no float)
            inside = finite and (number > low if open_low else number >= low) and (
                number < high if open_high else number <= high)
            if not inside:
                opening, closing = "(" if open_low else "[", ")" if open_high or high == math.inf else "]"
                interval = f"{opening}{low:g}, {high:g}{closing}"
                kind = "an integer" if whole else "a finite number"
                raise GemminerError(f"{key} must be {kind} in {interval}, got {number!r}")


def validate(config: RunConfig) -> None:
    """Reject values no run can use, with the allowed values in the message."""
    check_ranges(config)  # every number, by name or declared range: what follows checks the rest
    from gemminer.init import WEIGHT_INITS

    if config.model.weight_init not in WEIGHT_INITS:
        raise GemminerError(f"unknown model.weight_init {config.model.weight_init!r}; "
                            f"allowed: {', '.join(WEIGHT_INITS)}")
    if config.finetune.lr_schedule not in ("multistep", "cosine"):
        raise GemminerError(f"unknown finetune.lr_schedule {config.finetune.lr_schedule!r}; "
                            "allowed: multistep, cosine")
    if config.data.eval_split not in ("test", "val"):
        raise GemminerError(f"unknown data.eval_split {config.data.eval_split!r}; allowed: test, val")
    if config.data.eval_split == "val" and config.data.val_size < 1:
        raise GemminerError("data.eval_split val needs a validation split: give data.val_size N")
    if config.method == "imp":
        if config.density >= 1:
            raise GemminerError("imp prunes: its density must be below 1")
        if config.finetune.epochs != config.search.epochs:
            raise GemminerError(f"imp trains its ticket as its last round: finetune.epochs ({config.finetune.epochs}) "
                                f"must equal search.epochs ({config.search.epochs}), the epochs of every round: set "
                                "search.epochs alone (a saved IMP ticket fine-tunes for its rounds' epochs)")
    if config.compile and (getattr(config.search, "reg_lambda", None) == "auto"
                           or getattr(config.search, "reg_lambda_schedule", None)):
        raise GemminerError("search.reg_lambda auto (or a schedule) changes lambda every epoch, which would "
                            "recompile the compiled optimizer step each time: give a number with --compile")
    validate_search = getattr(config.search, "validate", None)
    if validate_search:
        validate_search()


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
