"""gemminer: lottery tickets at initialization (Gem-Miner and the methods it is measured against)."""

__version__ = "0.1.0"
