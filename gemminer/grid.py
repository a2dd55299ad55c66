"""Comparison grids: named variants x densities x seeds, as cells to run and rows to tabulate.

A grid file (YAML) holds::

    base: {data: {name: mnist1d}}            # settings of every cell (a run config, as --config)
    densities: [0.1, 0.02]
    seeds: [0, 1, 2]
    dense: true                               # one dense reference per seed
    same_training: false                      # true: every variant trains with the dense recipe
    variants:
      gemminer: {method: gemminer, sanity: [shuffle, reinit],
                 by_density: {0.0372: {search: {reg_lambda: 3.0e-5}}}}   # settings of one density
      imp-warmup: {method: imp, search: {rewind: "epoch:0.52"}}
      random-erk: {method: random, search: {ratio: erk}}
      gemminer-w16: {method: gemminer, model: {width: 16}, densities: [0.2, 0.1]}   # its own densities

A variant is a method plus its options; it may override any run setting (data, model, search,
finetune, top-level keys) and names its folders, rows and plot lines. It runs at the grid's
densities unless it lists its own (`densities`: a narrower model learns at higher densities only).
An IMP variant trains once per seed, at its lowest density, stopping at every other density of it
on the way (`search.keep_densities`); each density's cell trains that run's ticket of that density.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemminer.config import load_yaml, merge, resolve, to_dict
from gemminer.errors import GemminerError
from gemminer.methods import method_class
from gemminer.sanity import CHECKS, invertible

VARIANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
GRID_KEYS = ("base", "variants", "densities", "seeds", "dense", "same_training")


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]  # method, search, and any run setting it changes
    sanity: list[str] = field(default_factory=list)
    by_density: dict[float, dict[str, Any]] = field(default_factory=dict)  # settings for one density only
    densities: list[float] | None = None  # its own densities (None: the grid's)

    @property
    def method(self) -> str:
        return str(self.overrides.get("method", "gemminer"))


@dataclass
class Grid:
    base: dict[str, Any]
    variants: list[Variant]
    densities: list[float]
    seeds: list[int]
    dense: bool = True
    same_training: bool = False

    def validate(self) -> None:
        if not self.variants:
            raise GemminerError("a grid needs at least one variant")
        names = [variant.name for variant in self.variants]
        for name in names:
            if not VARIANT_NAME.match(name) or name == "dense":
                raise GemminerError(f"bad variant name {name!r}: letters, digits, '_.+-' only, and not 'dense'")
        if len(set(names)) != len(names):
            raise GemminerError("variant names must be unique")
        if not self.densities or not self.seeds:
            raise GemminerError("a grid needs densities and seeds")
        _check_densities(self.densities, "grid densities")
        if len(set(self.seeds)) != len(self.seeds):
            raise GemminerError("grid densities and seeds must not repeat")
        for variant in self.variants:
            if variant.densities is not None:
                _check_densities(variant.densities, f"variant {variant.name}: densities")
            densities = self.densities_of(variant)
            method_class(variant.method)
            for check in variant.sanity:
                if check not in CHECKS:
                    raise GemminerError(f"variant {variant.name}: unknown sanity check {check!r}; "
                                        f"allowed: {', '.join(CHECKS)}")
            if "invert" in variant.sanity and not invertible(variant.method):
                raise GemminerError(f"variant {variant.name}: method {variant.method} keeps no ranking of weights, "
                                    "so its ticket cannot be inverted")
            for key in ("density", "seed"):
                if key in variant.overrides:
                    raise GemminerError(f"variant {variant.name} sets {key}: the grid's {key}s apply to every variant")
            stray = sorted(set(variant.by_density) - set(densities))
            if stray:
                raise GemminerError(f"variant {variant.name}: by_density names {stray[0]:g}, not one of its densities")
            if variant.method == "imp" and set(variant.by_density) - {min(densities)}:
                raise GemminerError(f"variant {variant.name}: IMP runs once, at the lowest density; by_density can "
                                    f"only set {min(densities):g}")
            for density in densities:  # every cell's config resolves before anything runs
                resolve(self.cell_overrides(variant, density, self.seeds[0]))

    def densities_of(self, variant: Variant) -> list[float]:
        """The densities a variant runs at: its own, or the grid's."""
        return variant.densities if variant.densities is not None else self.densities

    def cell_overrides(self, variant: Variant, density: float, seed: int) -> dict[str, Any]:
        """The run config of one cell: base < variant < density and seed (< the shared recipe)."""
        overrides = merge(merge(self.base, variant.overrides), variant.by_density.get(density, {}))
        overrides.update(density=density, seed=seed)
        densities = self.densities_of(variant)
        if variant.method == "imp" and len(densities) > 1:
            search = _mapping(overrides.get("search"), f"variant {variant.name}: search")
            keep = sorted(set(densities) - {min(densities)} | set(search.get("keep_densities") or []), reverse=True)
            overrides = merge(overrides, {"search": {"keep_densities": keep}})
        return merge(overrides, {"finetune": self.training(variant)})

    def training(self, variant: Variant) -> dict[str, Any]:
        """Fine-tuning settings forced on a variant: Gem-Miner's epochs for every method (all tickets
        train equally long); with `same_training`, the whole recipe of the base config's dense training
        (with those epochs): a recipe made for no pruning method (on MNIST-1D chosen on a validation split,
        elsewhere the published one), where Gem-Miner's own would favour one method."""
        reference = resolve(merge(merge(self.base, {"method": "gemminer"}),
                                  {"search": self._gemminer_search()}))
        forced: dict[str, Any] = {"epochs": reference.finetune.epochs}
        if self.same_training:  # for IMP this recipe trains its rounds too: one recipe for every training
            # the base's search settings belong to the base's method, which dense training does not have
            dense = resolve(merge({k: v for k, v in self.base.items() if k != "search"}, {"method": "dense"}))
            forced = {**to_dict(dense.finetune), "epochs": reference.finetune.epochs}
        variant_epochs = _mapping(variant.overrides.get("finetune"), f"variant {variant.name}: finetune").get("epochs")
        if variant.method == "imp":  # its ticket trains as its last round: as long as each round
            variant_epochs = resolve(merge(merge(self.base, variant.overrides),
                                           {"density": min(self.densities_of(variant)), "finetune": {"epochs": None}})
                                     ).search.epochs
        return {**forced, **({"epochs": variant_epochs} if variant_epochs is not None else {})}

    def _gemminer_search(self) -> dict[str, Any]:
        for variant in self.variants:
            if variant.method == "gemminer":
                return dict(merge(self.base.get("search") or {}, variant.overrides.get("search") or {}))
        return dict(self.base.get("search") or {}) if self.base.get("method", "gemminer") == "gemminer" else {}


def _mapping(value: Any, what: str) -> dict[str, Any]:
    """`value` as a mapping (None: empty), or one clear error."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GemminerError(f"{what} must be a mapping of settings, got {value!r}")
    return value


def _check_densities(densities: list[float], what: str) -> None:
    if not densities:
        raise GemminerError(f"{what} must not be empty")
    for density in densities:
        if not (isinstance(density, float) and math.isfinite(density) and 0 < density <= 1):
            raise GemminerError(f"{what} must lie in (0, 1], got {density!r}")
    if len(set(densities)) != len(densities):
        raise GemminerError(f"{what} must not repeat")


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise GemminerError(f"grid {what} must be true or false, got {value!r}")
    return value


def _floats(values: Any, what: str) -> list[float]:
    if isinstance(values, (int, float, str)):
        values = [values]
    if not isinstance(values, list):
        raise GemminerError(f"grid {what} must be a list")
    try:
        return [float(value) for value in values]
    except (TypeError, ValueError):
        raise GemminerError(f"grid {what} must be numbers, got {values!r}") from None


def _ints(values: Any, what: str) -> list[int]:
    numbers = _floats(values, what)
    if any(number != int(number) for number in numbers):
        raise GemminerError(f"grid {what} must be integers, got {values!r}")
    return [int(number) for number in numbers]


def load_grid(path: str | Path) -> Grid:
    """A grid from its YAML file, checked before anything runs."""
    document = load_yaml(str(path))
    unknown = sorted(set(document) - set(GRID_KEYS) - {"sanity"})
    if unknown:
        raise GemminerError(f"grid file {path}: unknown key {unknown[0]!r}; allowed: {', '.join(GRID_KEYS)}")
    variants_doc = document.get("variants")
    if not isinstance(variants_doc, dict) or not variants_doc:
        raise GemminerError(f"grid file {path} needs a 'variants' mapping of name -> settings")
    variants = []
    for name, settings in variants_doc.items():
        settings = dict(_mapping(settings, f"grid variant {name!r}"))
        for section in ("data", "model", "search", "finetune"):
            _mapping(settings.get(section), f"grid variant {name!r}: {section}")
        checks = settings.pop("sanity", []) or []
        if isinstance(checks, str):
            checks = [part.strip() for part in checks.split(",") if part.strip()]
        if not isinstance(checks, list):
            raise GemminerError(f"grid variant {name!r}: sanity must be a list of checks")
        by_density = settings.pop("by_density", {}) or {}
        if not isinstance(by_density, dict) or not all(isinstance(v, dict) for v in by_density.values()):
            raise GemminerError(f"grid variant {name!r}: by_density must map densities to settings")
        by_density = {float(_floats(d, "by_density keys")[0]): v for d, v in by_density.items()}
        own = settings.pop("densities", None)
        own = _floats(own, f"variant {name!r}: densities") if own is not None else None
        variants.append(Variant(str(name), settings, [str(c) for c in checks], by_density, own))
    base = document.get("base") or {}
    if not isinstance(base, dict):
        raise GemminerError(f"grid file {path}: 'base' must be a mapping of run settings")
    grid = Grid(base, variants, _floats(document.get("densities", []), "densities"),
                _ints(document.get("seeds", [0]), "seeds"), _bool(document.get("dense", True), "dense"),
                _bool(document.get("same_training", False), "same_training"))
    grid.validate()
    return grid


def grid_from_flags(overrides: dict[str, Any], methods: list[str], densities: list[float], seeds: list[int],
                    dense: bool = True, same_training: bool = False, sanity: list[str] | None = None,
                    sanity_variants: list[str] | None = None) -> Grid:
    """The simple case: one variant per method, named after it; `overrides` (flags and --config)
    are the base; search options given on the command line go to the gemminer variant."""
    search = overrides.get("search") or {}
    base = {key: value for key, value in overrides.items() if key not in ("search", "method", "density", "seed")}
    checks = sanity or []
    targets = set(sanity_variants if sanity_variants is not None else ["gemminer"])
    unknown = sorted(targets - set(methods) - ({"gemminer"} if targets == {"gemminer"} else set()))
    if unknown and checks:  # a misspelt name would run the grid without that check (the default may be absent)
        raise GemminerError(f"--sanity-variants names {', '.join(map(repr, unknown))}, not a variant of this grid; "
                            f"its variants: {', '.join(name for name in methods if name != 'dense')}")
    variants = [Variant(name, {"method": name, **({"search": search} if name == "gemminer" and search else {})},
                        [c for c in checks if name in targets and name != "dense"]) for name in methods]
    grid = Grid(base, variants, densities, seeds, dense, same_training)
    grid.validate()
    return grid
