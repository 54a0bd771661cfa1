"""``pipeline shards order DIR --global-batch G --num-steps N``: audit the global sample order.

Prints, one line per optimizer step, the ``__key__``s of that step's global batch in order
(with ``--json`` one JSON object per step: ``step``, ``epoch``, ``first_position``, ``keys``).
It runs the real :class:`pipeline.data.stream.Stream`: one per simulated rank, their micro
batches interleaved the way training lays out a step (micro step-major, rank-minor, see
:class:`pipeline.data.plan.Layout`). ``--resume-at STEP --resume-world-size W2`` saves every
rank's ``state_dict`` before step STEP and continues on W2 ranks through the path the
checkpointer takes (``load_state_dict`` on the same world size, ``load_elastic`` on another):
its output must equal the run without a resume.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Iterator

from pipeline.errors import ConfigError


def split_global_batch(global_batch: int, world_size: int, batch_per_rank: int | None) -> tuple[int, int]:
    """(batch_per_rank B, micro steps A) with ``global_batch = world_size * A * B``; without
    ``batch_per_rank``, A = 1."""
    b = batch_per_rank if batch_per_rank is not None else global_batch // world_size
    if b < 1 or global_batch % (world_size * b):
        raise ConfigError(
            f"--global-batch {global_batch} is not world size {world_size} x micro steps x batch_per_rank "
            f"{b if batch_per_rank is not None else '(G / world size)'}; choose G = W x A x B"
        )
    return b, global_batch // (world_size * b)


class _Ranks:
    """One real Stream per simulated rank; :meth:`step` yields one optimizer step's keys."""

    def __init__(self, urls: str, *, world_size: int, global_batch: int, batch_per_rank: int | None,
                 num_workers: int, seed: int, shuffle_buffer: int):
        from pipeline.data.config import DataConfig
        from pipeline.data.stream import build_stream

        self.batch_per_rank, self.micro_steps = split_global_batch(global_batch, world_size, batch_per_rank)
        cfg = DataConfig(train_urls=urls, batch_per_rank=self.batch_per_rank, num_workers=num_workers,
                         shuffle_buffer=shuffle_buffer)
        self.streams = [build_stream(cfg, rank=r, world_size=world_size, seed=seed, with_keys=True)
                        for r in range(world_size)]

    def step(self) -> tuple[int, int, list[str]]:
        """(first global position, its epoch, keys) of the next optimizer step."""
        s0 = self.streams[0]
        first = s0.global_samples_consumed
        keys: list[str] = []
        for a in range(self.micro_steps):
            for r, s in enumerate(self.streams):
                batch = next(s)
                expected = first + (a * len(self.streams) + r) * self.batch_per_rank
                assert int(batch["index"][0]) == expected, (int(batch["index"][0]), expected)
                keys += batch["key"]
        return first, first // s0.samples_per_epoch, keys

    def state_dicts(self) -> list[dict[str, Any]]:
        return [json.loads(json.dumps(s.state_dict())) for s in self.streams]  # as a checkpoint keeps them

    def load(self, states: list[dict[str, Any]]) -> None:
        for r, s in enumerate(self.streams):
            if len(states) == len(self.streams):
                s.load_state_dict(states[r])
            else:
                s.load_elastic(states)

    def close(self) -> None:
        for s in self.streams:
            s.close()


def global_steps(urls: str, *, global_batch: int, num_steps: int, world_size: int = 1, num_workers: int = 0,
                 seed: int = 0, batch_per_rank: int | None = None, shuffle_buffer: int = 1000,
                 resume_at: int | None = None, resume_world_size: int | None = None) -> Iterator[dict[str, Any]]:
    """``{"step", "epoch", "first_position", "keys"}`` of optimizer steps 0 .. num_steps-1."""
    if resume_at is not None and not 0 <= resume_at <= num_steps:
        raise ConfigError(f"--resume-at must be in [0, --num-steps={num_steps}], got {resume_at}")
    split_global_batch(global_batch, world_size, batch_per_rank)  # both splits checked before any output
    split_global_batch(global_batch, resume_world_size or world_size, batch_per_rank)
    kw = dict(global_batch=global_batch, batch_per_rank=batch_per_rank, num_workers=num_workers, seed=seed,
              shuffle_buffer=shuffle_buffer)
    ranks = _Ranks(urls, world_size=world_size, **kw)
    try:
        for step in range(num_steps):
            if step == resume_at:
                states = ranks.state_dicts()
                ranks.close()
                ranks = _Ranks(urls, world_size=resume_world_size or world_size, **kw)
                ranks.load(states)
            first, epoch, keys = ranks.step()
            yield {"step": step, "epoch": epoch, "first_position": first, "keys": keys}
    finally:
        ranks.close()


def register(sub) -> None:
    s = sub.add_parser("order", help="print the keys of each optimizer step's global batch (audit the order)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("dir", help="shards: a directory holding manifest.json, a path, brace notation or pipe:")
    s.add_argument("--global-batch", type=int, required=True, help="G = world size x micro steps x batch_per_rank")
    s.add_argument("--num-steps", type=int, required=True, help="optimizer steps to print")
    s.add_argument("--world-size", type=int, default=1, help="simulated ranks (default 1)")
    s.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank (default 0)")
    s.add_argument("--seed", type=int, default=0, help="the run's seed (run.seed; default 0)")
    s.add_argument("--batch-per-rank", type=int, help="B (default G / world size: one micro step)")
    s.add_argument("--shuffle-buffer", type=int, default=1000, help="data.shuffle_buffer (default 1000)")
    s.add_argument("--resume-at", type=int, metavar="STEP", help="save the streams' state before this step...")
    s.add_argument("--resume-world-size", type=int, metavar="W2", help="...and continue on W2 ranks")
    s.add_argument("--json", action="store_true", help="one JSON object per step")
    s.set_defaults(func=_main)


def _main(args) -> int:
    for name in ("global_batch", "num_steps", "world_size", "resume_world_size", "batch_per_rank", "shuffle_buffer"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.resume_world_size is not None and args.resume_at is None:
        raise ConfigError("--resume-world-size needs --resume-at STEP")
    steps = global_steps(args.dir, global_batch=args.global_batch, num_steps=args.num_steps,
                         world_size=args.world_size, num_workers=args.num_workers, seed=args.seed,
                         batch_per_rank=args.batch_per_rank, shuffle_buffer=args.shuffle_buffer,
                         resume_at=args.resume_at, resume_world_size=args.resume_world_size)
    try:
        for rec in steps:
            print(json.dumps(rec) if args.json else " ".join(rec["keys"]), flush=True)
    except ValueError as e:  # unreadable shards, no manifest: the data named, one line
        raise ConfigError(str(e)) from None
    return 0
