"""Registry of pruning methods: adding one is a new file plus a line here."""

from __future__ import annotations

from gemminer.errors import GemminerError
from gemminer.methods.base import PruningMethod, SearchResult
from gemminer.methods.dense import Dense
from gemminer.methods.gemminer import GemMiner
from gemminer.methods.random import RandomTicket

METHODS: dict[str, type[PruningMethod]] = {
    "gemminer": GemMiner,
    "random": RandomTicket,
    "dense": Dense,
}


def method_class(name: str) -> type[PruningMethod]:
    if name not in METHODS:
        raise GemminerError(f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["METHODS", "PruningMethod", "SearchResult", "method_class"]
