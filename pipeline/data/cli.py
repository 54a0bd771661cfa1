"""``pipeline shards SOURCE ... --out DIR``: write WebDataset shards; ``pipeline shards verify DIR``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from pipeline.data import shards as shards_mod
from pipeline.data import sources


def _int_at_least(minimum: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {v}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    g.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the source and of the split (default 0)")
    g.add_argument("--samples-per-shard", type=_positive_int, default=1000,
                   help="maximum samples per shard (ShardWriter maxcount; default 1000)")
    g.add_argument("--max-shard-bytes", type=_positive_int, default=256 * 2**20,
                   help="a shard is closed once it reaches this many bytes (ShardWriter maxsize; default 256 MiB)")
    g.add_argument("--val-fraction", type=_fraction, default=0.1,
                   help="fraction of samples in the validation split (default 0.1)")
    g.add_argument("--workers", type=_positive_int, default=1,
                   help="parallel processes generating and writing shards; the output does not depend on it")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a shard set written with different parameters")


def _user_array_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--add-channel-dim", action="store_true", help="store [N, H, W] as [N, 1, H, W]")
    p.add_argument("--data-kind", choices=["spins", "levels", "continuous"],
                   help="default: inferred ({-1,+1} -> spins, non-negative ints -> levels, else continuous)")
    p.add_argument("--num-levels", type=_positive_int, help="for --data-kind levels (default max + 1)")
    p.add_argument("--label-kind", choices=["class", "continuous"],
                   help="default: non-negative integer labels -> class, else continuous")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "shards", help="write WebDataset shards from a source",
        description="Write train/validation WebDataset shards and manifest.json from a data source. "
        "Re-running with the same parameters is a no-op.",
    )
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")

    s = sub.add_parser("ising", help="2D Ising lattices at one or several temperatures")
    s.add_argument("--temperature", type=float, nargs="+", required=True,
                   help="one or several temperatures (J/k_B units)")
    s.add_argument("--size", type=_positive_int, required=True, help="lattice side L")
    s.add_argument("--num-samples", type=_positive_int, required=True, help="samples per temperature")
    _common(s)
    s.set_defaults(func=_run)

    s = sub.add_parser("digits", help="scikit-learn's 8x8 digits (1797 images, 17 levels, 10 classes)")
    _common(s)
    s.set_defaults(func=_run)

    s = sub.add_parser("gmm", help="Gaussian mixture with known density")
    s.add_argument("--dim", type=_positive_int, required=True)
    s.add_argument("--num-components", type=_positive_int, required=True)
    s.add_argument("--num-samples", type=_positive_int, required=True)
    _common(s)
    s.set_defaults(func=_run)

    s = sub.add_parser("npy", help="arrays from .npy/.npz files")
    s.add_argument("--x", required=True, help=".npy or .npz file with samples [N, ...]")
    s.add_argument("--x-key", help="array name inside an .npz")
    s.add_argument("--labels", help=".npy or .npz file with labels [N]")
    s.add_argument("--labels-key", help="array name inside the labels .npz")
    _user_array_options(s)
    _common(s)
    s.set_defaults(func=_run)

    s = sub.add_parser("hf", help="a Hugging Face datasets dataset (save_to_disk dir, parquet/arrow files, hub name)")
    s.add_argument("--path", required=True, help="save_to_disk directory, .parquet/.arrow file or glob, or hub name")
    s.add_argument("--x-column", required=True, help="column holding the samples")
    s.add_argument("--label-column", help="column holding the labels")
    s.add_argument("--split", default="train", help="split to read (default train)")
    _user_array_options(s)
    _common(s)
    s.set_defaults(func=_run)

    s = sub.add_parser("verify", help="check shards against their manifest (sizes, the schema of a sample "
                                      "of members; sha256 with --sha256)")
    s.add_argument("dir", help="shard directory holding manifest.json")
    s.add_argument("--sha256", action="store_true", help="also compare sha256 checksums")
    s.add_argument("--schema-members", type=int, default=8, metavar="K",
                   help="members per shard whose shape, dtype and keys are checked against the schema "
                        "(default 8; 0: none)")
    s.set_defaults(func=_run_verify)


def _source(args) -> tuple[dict[str, Any], Callable[[], sources.SourceData]]:
    """Creation parameters that identify the data, and a thunk producing it."""
    name = args.source
    if name == "ising":
        params = {"temperature": args.temperature, "size": args.size, "num_samples": args.num_samples}
        return params, lambda: sources.ising(
            args.temperature, args.size, args.num_samples, seed=args.seed, workers=args.workers)
    if name == "digits":
        return {}, sources.digits
    if name == "gmm":
        params = {"dim": args.dim, "num_components": args.num_components, "num_samples": args.num_samples}
        return params, lambda: sources.gmm(args.dim, args.num_components, args.num_samples, seed=args.seed)
    user = {"add_channel_dim": args.add_channel_dim, "data_kind": args.data_kind,
            "num_levels": args.num_levels, "label_kind": args.label_kind}
    if name == "npy":
        params = {"x": args.x, "x_key": args.x_key, "labels": args.labels, "labels_key": args.labels_key, **user}
        return params, lambda: sources.npy(args.x, x_key=args.x_key, labels_path=args.labels,
                                           labels_key=args.labels_key, **user)
    if name == "hf":
        params = {"path": args.path, "x_column": args.x_column, "label_column": args.label_column,
                  "split": args.split, **user}
        return params, lambda: sources.hf(args.path, x_column=args.x_column, label_column=args.label_column,
                                          split=args.split, **user)
    raise AssertionError(name)


def _run(args) -> int:
    try:
        source_params, make = _source(args)
        params = {
            "source": args.source, **source_params, "seed": args.seed,
            "samples_per_shard": args.samples_per_shard, "max_shard_bytes": args.max_shard_bytes,
            "val_fraction": args.val_fraction,
        }
        if shards_mod.params_match(args.out, params):
            print(f"{args.out}: up to date ({shards_mod.MANIFEST_NAME} matches), nothing written")
            return 0
        old = shards_mod.existing_params(args.out)
        if old is not None and old != json.loads(json.dumps(params)) and not args.overwrite:
            raise ValueError(
                f"{args.out} holds a shard set written with other parameters ({old}); "
                "pass --overwrite to replace it or choose another --out"
            )
        data = make()
        m = shards_mod.write_shards(
            data, args.out, source=args.source, params=params,
            samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
            val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
        )
    except ValueError as e:
        print(f"pipeline shards {args.source}: error: {e}", file=sys.stderr)
        return 2
    sp = m["splits"]
    print(
        f"{args.out}: {m['total_samples']} samples, train {sp['train']['num_samples']} in "
        f"{sp['train']['num_shards']} shards, validation {sp['validation']['num_samples']} in "
        f"{sp['validation']['num_shards']} shards"
    )
    return 0


def _run_verify(args) -> int:
    try:
        if args.schema_members < 0:
            raise ValueError(f"--schema-members must be >= 0, got {args.schema_members}")
        problems = shards_mod.verify(args.dir, checksum=args.sha256, schema_members=args.schema_members)
    except ValueError as e:
        print(f"pipeline shards verify: error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(p)
    if problems:
        return 1
    print(f"{args.dir}: all shards match {shards_mod.MANIFEST_NAME}")
    return 0
