"""Deterministic random streams derived from one run seed."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for a named stream, so that streams never share draws."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, stream: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for `stream`, seeded from the run seed."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, stream))
    return generator
