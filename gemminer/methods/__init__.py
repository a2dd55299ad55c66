"""Registry of pruning methods: adding one is a new file plus a line here."""

from __future__ import annotations

from gemminer.config import method_class as config_method_class
from gemminer.config import use_methods
from gemminer.methods.base import PruningMethod, SearchResult
from gemminer.methods.dense import Dense
from gemminer.methods.edgepopup import EdgePopup
from gemminer.methods.gemminer import GemMiner
from gemminer.methods.grasp import Grasp
from gemminer.methods.imp import IMP
from gemminer.methods.magnitude import Magnitude
from gemminer.methods.random import RandomTicket
from gemminer.methods.snip import Snip
from gemminer.methods.synflow import SynFlow

METHODS: dict[str, type[PruningMethod]] = {
    "gemminer": GemMiner,
    "random": RandomTicket,
    "dense": Dense,
    "edge-popup": EdgePopup,
    "imp": IMP,
    "snip": Snip,
    "grasp": Grasp,
    "synflow": SynFlow,
    "magnitude": Magnitude,
}


use_methods(METHODS)  # config resolves a run's method through this registry, without importing it


def method_class(name: str) -> type[PruningMethod]:
    """The registered method `name`; an unknown name is one error line listing the allowed ones."""
    return config_method_class(name)


__all__ = ["METHODS", "PruningMethod", "SearchResult", "method_class"]
