"""The `pipeline` command. Thin: parse, hand over to the component that owns the work.

Each area registers its own subcommands (``register(subparsers)``) so that this file stays
a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from pipeline.errors import ConfigError
from pipeline.train.engines.process_exit import exit_process  # torch-free

# (module, description): each module has ``register(subparsers)``.
_COMMANDS = [
    ("pipeline.data.cli", "write WebDataset shards from a source"),
    ("pipeline.train.cli", "train, sample"),
    ("pipeline.eval.cli", "evaluate a run"),
    ("pipeline.track.cli", "render plots of a run"),
    ("pipeline.bench.cli", "benchmarks"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Distributed training of generative models (VDMs, GANs) for the physical sciences.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name, _ in _COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # area not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        _report_config_error(args.command, e)
        return 2


# How long a rank other than 0 waits for rank 0 to report a config error (see below).
_RANK0_REPORT_WAIT_S = 10.0


def _report_config_error(command: str, error: ConfigError) -> None:
    """Print ``error`` once per launch. Under `accelerate launch` every rank runs this CLI and
    finds the same error before any process group starts: rank 0 says it and exits 2. The
    others stay silent and wait (at most ``_RANK0_REPORT_WAIT_S``) before exiting 2 too: a
    rank that exited first would make the elastic agent SIGTERM rank 0 before it printed.
    The agent's SIGTERM, once rank 0 has exited, ends the wait with exit code 2. A rank still
    waiting after that (rank 0 did not fail: e.g. a path missing on this node only, or rank 0
    on another node) says it itself, naming its rank: never lost, at worst once per node."""
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        print(f"pipeline {command}: error: {error}", file=sys.stderr, flush=True)
        return
    import signal
    import time

    previous = signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
    time.sleep(_RANK0_REPORT_WAIT_S)
    signal.signal(signal.SIGTERM, previous)  # main() may run in-process: leave the handler as it was
    print(f"pipeline {command}: error (rank {rank}): {error}", file=sys.stderr, flush=True)


def run() -> None:
    """Entry point of the `pipeline` command and of `python -m pipeline` (also under
    `accelerate launch`): :func:`main`, then exit with its code, skipping interpreter
    finalisation after a distributed run (see
    :func:`pipeline.train.engines.process_exit.exit_process`; a plain ``sys.exit`` when no
    engine tore down a process group). ``main`` itself never exits, so it can be called
    in-process."""
    exit_process(main())


if __name__ == "__main__":
    run()
