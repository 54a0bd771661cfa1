"""Small stateful pieces of a run: counters and random number generators."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0  # completed loop steps
    samples_seen: int = 0  # over all ranks
    bad_steps: int = 0  # skipped for NaN/Inf, in total
    consecutive_bad_steps: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))


class RNGState:
    """Python, NumPy and torch generators of this rank, so a resumed run draws the same noise."""

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        return {
            "python": repr(random.getstate()),
            "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        import ast

        random.setstate(_tuple(ast.literal_eval(state["python"])))
        n = state["numpy"]
        np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
        torch.set_rng_state(state["torch"])

    def load_resharded(self, state: dict, *, old_world_size: int, world_size: int, rank: int, step: int,
                       seed: int) -> str:
        """Another world size: generator states belong to ranks that no longer exist (or are
        new), so reseed every generator from (seed, step, rank): deterministic, and not the
        noise of step 0 again."""
        del state, old_world_size
        seed_everything(reseed(seed, step, rank))
        return (f"the per-rank RNGs cannot be mapped onto {world_size} rank(s) and are reseeded "
                f"from (seed={seed}, step={step}, rank)")


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reseed(*key: int) -> int:
    """A 64-bit seed that is a pure function of ``key`` (e.g. seed, step, rank)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0])
