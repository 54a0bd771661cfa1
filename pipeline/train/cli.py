"""`pipeline train` and `pipeline sample`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from pipeline.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (also under `accelerate launch ... -m pipeline train`)",
        description="Train with a YAML preset and dotted overrides, e.g. "
        "`pipeline train --config configs/quickstart.yaml train.num_steps=200 run.dir=/tmp/r`. "
        "Starting again with the same run.dir resumes from its latest complete checkpoint.",
    )
    p.add_argument("--config", required=True, help="YAML preset (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.num_steps=200")
    p.set_defaults(func=_train)

    s = sub.add_parser(
        "sample", help="draw samples from a run's exported EMA weights (also under `accelerate launch`)",
        description="Draw samples from a run's export. --out X.npy writes one array; --out DIR writes "
        "WebDataset shards with a manifest (usable as data.train_urls), each rank of an `accelerate launch` "
        "its share; each sample's noise depends only on --seed and its index, and a job started again "
        "finishes the shards an interrupted one left.",
    )
    s.add_argument("--run", required=True, help="run directory (holds export/)")
    s.add_argument("--num-samples", type=int, required=True)
    s.add_argument("--out", required=True, help="output .npy file, or a directory for WebDataset shards")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-steps", type=int, default=None, help="sampling steps (diffusion models; <= T - 1 in "
                   "discrete time)")
    s.add_argument("--sampler", default=None, help="VDMs: ancestral (default), ddim or dpm-solver")
    s.add_argument("--eta", type=float, default=None, help="--sampler ddim: noise scale in [0, 1] (default 0: "
                   "deterministic)")
    s.add_argument("--grid", default=None, help="VDMs: noise levels uniform in time, in logsnr, or "
                   "spin-variance (+-1 spins); the last two in continuous time (default: the model's vdm.sample_grid)")
    s.add_argument("--label", type=float, action="append", default=None,
                   help="condition on this label (class index or temperature); repeat to cycle over several")
    s.add_argument("--png", default=None, help="also write a PNG grid of the samples here (.npy output; "
                   "single-channel 3D fields by their middle slices)")
    s.add_argument("--samples-per-shard", type=int, default=None, help="--out DIR: samples per shard (default 1000)")
    s.add_argument("--batch-size", type=int, default=None,
                   help="samples per forward pass and per noise chunk (default 256; --out DIR; part of what "
                   "makes a sample set, so a resumed job needs the same)")
    s.set_defaults(func=_sample)


def _train(args) -> int:
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)  # every config error surfaces here, before any process group
    from pipeline.data.stream import read_meta

    # Read once, here: a missing data set is reported before the process group starts, and
    # the loop and the stream use this copy (without a manifest, each read scans the shards).
    meta = read_meta(cfg.data.train_urls)
    _check_data(cfg, meta)
    from pipeline.train.resume import check_resume

    # Before anything is written: an incompatible config leaves the run directory as it is.
    warnings = check_resume(cfg, meta)
    from pipeline.objectives.registry import data_warnings, set_inert_settings

    warnings += set_inert_settings(cfg, meta) + data_warnings(cfg, meta)
    from pipeline.config import redacted_keys

    if redacted_keys(cfg):
        warnings.append(
            f"{', '.join(redacted_keys(cfg))} hold(s) a credential; it is redacted in config.yaml, export.json, "
            "W&B and metrics.jsonl. Pass it through the environment instead (e.g. a pipe: command with "
            "'$HF_TOKEN' in single quotes: its shell expands it when the command runs)"
        )
    for warning in warnings:
        if os.environ.get("RANK", "0") == "0":  # every rank checks; one says so
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    from pipeline.train.loop import train

    return train(cfg, meta)


_FILE_SUFFIXES = (".npz", ".tar", ".png", ".json", ".pt", ".h5", ".txt")


def sampler_config(args):
    from pipeline.objectives.vdm.config import sampler_from_options

    return sampler_from_options(args.sampler, args.eta, args.grid)


def _check_data(cfg, meta) -> None:
    """What needs the data's manifest, checked before any process group starts or anything is
    written to run.dir (issue 15 items 10, 11): the model fits the data (labels, shapes), and
    data.label_key is a field of the samples (the stream checks it again, but only once the
    run directory exists). A pipe: URL is not run for this: it has no manifest to check."""
    from pipeline.objectives.registry import check_data, reads_labels

    check_data(cfg, meta)
    if "pipe:" in cfg.data.train_urls:
        return
    from pipeline.data.resolve import resolve_shards
    from pipeline.data.schema import check_label_key, label_keys

    urls = cfg.data.train_urls
    schema = resolve_shards(urls, verify_mode="off").schema
    if cfg.data.label_key is None and reads_labels(cfg, meta):
        # Otherwise the stream yields no labels and the first forward fails, after the process
        # group started and the run directory was written.
        fields = ", ".join(map(repr, label_keys(schema or {}))) or "none listed in the manifest's schema"
        raise ConfigError(
            f"{cfg.objective} trains on the data's labels here (the manifest says label_kind={meta.label_kind!r}) "
            f"but data.label_key is not set; set it to the samples' label field ({fields})"
            + ("; or set gan.conditional=false and gan.semi_supervised=off" if cfg.objective == "gan" else ""))
    check_label_key(cfg.data.label_key, schema, urls)


def _sample(args) -> int:
    from pipeline.track.images import is_image_shape
    from pipeline.train.export import load_export
    from pipeline.train.sampling import default_labels, label_warnings

    if args.num_samples <= 0:
        raise ConfigError(f"--num-samples must be positive, got {args.num_samples}")
    if args.num_steps is not None and args.num_steps < 1:
        raise ConfigError(f"--num-steps must be >= 1 (or left out for the model's default), got {args.num_steps}")
    out = Path(args.out)
    if out.suffix in _FILE_SUFFIXES:
        raise ConfigError(f"--out must be a .npy file or a directory (for WebDataset shards), got {str(out)!r}")
    module, meta, info = load_export(Path(args.run))
    sampler = sampler_config(args)
    if args.png and not is_image_shape(tuple(meta.sample_shape)):
        # Checked before the .npy is written: a failed command leaves nothing half-done.
        raise ConfigError(f"--png draws samples of shape [H, W], [1, H, W] or [1, D, H, W] (middle slices); this "
                          f"model's samples have shape "
                          f"{tuple(meta.sample_shape)}; leave out --png")
    try:
        module.check_sample_options(args.num_steps, sampler)
        labels = default_labels(meta, args.num_samples, args.label)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for warning in label_warnings(meta, args.label):
        print(f"warning: {warning}", file=sys.stderr)
    if out.suffix == ".npy":
        if args.samples_per_shard is not None or args.batch_size is not None:
            raise ConfigError("--samples-per-shard and --batch-size go with a directory --out (shards), not .npy")
        return _sample_npy(args, module, labels, sampler, info)
    if args.png:
        raise ConfigError("--png goes with an .npy --out; a shard directory is for many samples")
    return _sample_dir(args, module, meta, labels, sampler, info)


def _sample_npy(args, module, labels, sampler, info) -> int:
    import numpy as np

    from pipeline.train.export import sample_from

    try:
        # The objective's own argument checks (a discrete VDM takes at most T - 1 steps) raise
        # ValueError before anything is drawn.
        x = sample_from(module, args.num_samples, labels, seed=args.seed, num_steps=args.num_steps, sampler=sampler)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, x.cpu().numpy())
    print(f"wrote {x.shape[0]} samples of shape {tuple(x.shape[1:])} from step {info['step']} to {out}")
    if args.png:
        from pipeline.track.images import drawable, save_grid_png

        samples = x.cpu().numpy()
        where = "middle slices" if samples.ndim == 5 else "grid"
        print(f"{where}: {save_grid_png(drawable(samples), Path(args.png))}")
    return 0


def _sample_dir(args, module, meta, labels, sampler, info) -> int:
    from pipeline.config import EngineConfig
    from pipeline.data.hashing import sha256_file
    from pipeline.run_dir import RunDir
    from pipeline.train import sample_shards as ss
    from pipeline.train.engines import build_engine
    from pipeline.train.export import EXPORT_WEIGHTS

    plan = ss.ShardPlan(args.num_samples, 1000 if args.samples_per_shard is None else args.samples_per_shard,
                        256 if args.batch_size is None else args.batch_size)
    plan.validate()
    out = Path(args.out)
    weights = RunDir(Path(args.run)).export / EXPORT_WEIGHTS
    how = module.sampling_settings(args.num_steps, sampler) or None  # the model's default grid and steps resolved
    params = {"source": ss.SOURCE, "weights_sha256": sha256_file(weights), "export_step": info["step"],
              "num_samples": plan.num_samples, "seed": args.seed, "num_steps": args.num_steps, "sampler": how,
              "labels": args.label, "samples_per_shard": plan.samples_per_shard, "batch_size": plan.batch_size}
    if ss.check_out_dir(out, params) == "done":  # every rank checks, before any process group
        if os.environ.get("RANK", "0") == "0":
            print(f"{out} already holds these {plan.num_samples} samples (manifest complete); nothing to do")
        return 0
    label_key = (info["config"].get("data") or {}).get("label_key") or "temperature"
    # Ranks finish their shards at different times (the last shards, a slower node): the collective
    # timeout that stops a training run whose rank died would stop a healthy sampling job here.
    engine = build_engine(EngineConfig(timeout_s=7 * 24 * 3600))
    try:
        module.to(engine.device)
        job = ss.SampleJob(module, meta, plan, args.seed, args.num_steps, sampler, labels, label_key, engine.device)
        src = {"run": str(Path(args.run).resolve()), "export_step": info["step"]}
        return ss.sample_to_shards(job, out, params, src, engine)
    finally:
        engine.close()
