"""Argument types the benches share (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
from typing import Callable, Iterable


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def backend_list(allowed: Iterable[str]) -> Callable[[str], list[str]]:
    """``--backends a,b``: a non-empty comma-separated list of names from ``allowed``."""
    allowed = list(allowed)

    def parse(s: str) -> list[str]:
        names = [x for x in s.split(",") if x]
        bad = [x for x in names if x not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"--backends: unknown {bad or s!r}; allowed: {', '.join(allowed)}")
        return names

    return parse
