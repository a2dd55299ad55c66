"""Registry of pruning methods: adding one is a new file plus a line here."""

from __future__ import annotations

from gemminer.errors import GemminerError
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


def method_class(name: str) -> type[PruningMethod]:
    if name not in METHODS:
        raise GemminerError(f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["METHODS", "PruningMethod", "SearchResult", "method_class"]
