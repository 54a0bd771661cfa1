"""``pipeline shards SOURCE ... --out DIR``: write WebDataset shards; ``pipeline shards verify DIR``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

import numpy as np

from pipeline.data import order
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
    g.add_argument("--out", required=True,
                   help="output directory or object-store prefix such as s3://bucket/prefix (shards + manifest.json)")
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


def _user_array_options(p: argparse.ArgumentParser, *,
                        label_kind_default: str = "non-negative integer labels -> class, else continuous") -> None:
    p.add_argument("--add-channel-dim", action="store_true", help="store [N, H, W] as [N, 1, H, W]")
    p.add_argument("--data-kind", choices=["spins", "levels", "continuous"],
                   help="default: inferred ({-1,+1} -> spins, non-negative ints -> levels, else continuous)")
    p.add_argument("--num-levels", type=_positive_int, help="for --data-kind levels (default max + 1)")
    p.add_argument("--label-kind", choices=["class", "continuous"],
                   help=f"default: {label_kind_default}")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "shards", help="write WebDataset shards from a source",
        description="Write train/validation WebDataset shards and manifest.json from a data source. "
        "Re-running with the same parameters is a no-op.",
    )
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    # One parser per source (in the order `--help` lists them), each with the shared options.
    for add_source_parser in (_ising_parser, _digits_parser, _gmm_parser, _grf_parser, _phi4_parser, _npy_parser,
                              _hf_parser, _hdf5_parser):
        s = add_source_parser(sub)
        _common(s)
        s.set_defaults(func=_run)
    _calo_parser(sub)
    _verify_parser(sub)
    order.register(sub)


def _ising_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("ising", help="2D Ising lattices at one or several temperatures")
    s.add_argument("--temperature", type=float, nargs="+", required=True,
                   help="one or several temperatures (J/k_B units)")
    s.add_argument("--size", type=_positive_int, required=True, help="lattice side L")
    s.add_argument("--num-samples", type=_positive_int, required=True, help="samples per temperature")
    return s


def _digits_parser(sub) -> argparse.ArgumentParser:
    return sub.add_parser("digits", help="scikit-learn's 8x8 digits (1797 images, 17 levels, 10 classes)")


def _gmm_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("gmm", help="Gaussian mixture with known density")
    s.add_argument("--dim", type=_positive_int, required=True)
    s.add_argument("--num-components", type=_positive_int, required=True)
    s.add_argument("--num-samples", type=_positive_int, required=True)
    return s


def _grf_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("grf", help="Gaussian random fields in 1-3 dims with an exact spectrum and density")
    s.add_argument("--ndim", type=int, choices=[1, 2, 3], required=True, help="grid dimensions d")
    s.add_argument("--size", type=_int_at_least(2), required=True, help="grid side L (periodic)")
    s.add_argument("--num-samples", type=_positive_int, required=True)
    s.add_argument("--channels", type=_positive_int, default=1, help="independent fields per sample (default 1)")
    spec = s.add_mutually_exclusive_group(required=True)
    spec.add_argument("--spectral-index", type=float, help="n of P(k) = A (k / k_0)^n (k in radians per cell)")
    spec.add_argument("--spectrum-table", help=".npy or text file with two columns k, P(k) (log-log interpolated; "
                      "--amplitude, --pivot and --cutoff then do not apply)")
    s.add_argument("--amplitude", type=float, default=1.0, help="A (default 1)")
    s.add_argument("--pivot", type=float, default=1.0, help="k_0 (default 1)")
    s.add_argument("--cutoff", type=float, help="k_c of the high-k cut-off (default none)")
    s.add_argument("--cutoff-kind", choices=["gaussian", "sharp"], default="gaussian",
                   help="exp(-(k/k_c)^2) or 0 above k_c (default gaussian)")
    s.add_argument("--zero-mode-power", type=float, help="P(0) of the mean mode (default P(2 pi / L))")
    return s


def _phi4_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("phi4", help="real scalar phi^4 on a periodic 2D lattice (Albergo et al. 2019), by HMC")
    s.add_argument("--size", type=_positive_int, required=True, help="lattice side L")
    s.add_argument("--kappa", type=float, required=True, help="hopping parameter (free field: < 1/4)")
    s.add_argument("--lam", type=float, required=True, help="quartic coupling lambda >= 0 (0: the free field)")
    s.add_argument("--num-samples", type=_positive_int, required=True, help="configurations")
    g = s.add_argument_group("HMC")
    g.add_argument("--step-size", type=float, default=0.1, help="leapfrog step (default 0.1)")
    g.add_argument("--num-leapfrog", type=_positive_int, default=10, help="leapfrog steps per trajectory (default 10)")
    g.add_argument("--num-chains", type=_positive_int, default=64, help="independent chains (default 64)")
    g.add_argument("--burn-in", type=_nonneg_int, default=200, help="trajectories discarded per chain (default 200)")
    g.add_argument("--pilot", type=_int_at_least(20), default=400,
                   help="trajectories per chain measuring tau_int of |M| (default 400)")
    g.add_argument("--thin-factor", type=float, default=2.0,
                   help="store every ceil(F * tau_int) trajectories (default 2)")
    # allowed values checked by phi4.HMCConfig (HMC_STARTS), like the other HMC settings: one list
    g.add_argument("--start", default="ordered",
                   help="ordered: chains start at phi = +-1 (the sign per chain); random: hot, N(0, 1) per site, "
                        "which in the broken phase can leave chains in metastable striped states (default ordered)")
    return s


def _npy_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("npy", help="arrays from .npy/.npz files")
    s.add_argument("--x", required=True, help=".npy or .npz file with samples [N, ...]")
    s.add_argument("--x-key", help="array name inside an .npz")
    s.add_argument("--labels", help=".npy or .npz file with labels [N]")
    s.add_argument("--labels-key", help="array name inside the labels .npz")
    _user_array_options(s)
    return s


def _hf_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("hf", help="a Hugging Face datasets dataset (save_to_disk dir, parquet/arrow files, hub name)")
    s.add_argument("--path", required=True, help="save_to_disk directory, .parquet/.arrow file or glob, or hub name")
    s.add_argument("--x-column", required=True, help="column holding the samples")
    s.add_argument("--label-column", help="column holding the labels")
    s.add_argument("--split", default="train", help="split to read (default train)")
    _user_array_options(s)
    return s


def _shape(s: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (e.g. 45,16,9), got {s!r}") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (e.g. 45,16,9), got {s!r}")
    return shape


def _hdf5_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("hdf5", help="a numeric HDF5 dataset or Zarr array (e.g. CaloChallenge showers), read in "
                                    "bounded memory")
    s.add_argument("--path", required=True, help="HDF5 file, or Zarr store (a directory named *.zarr)")
    s.add_argument("--x-key", required=True, help="dataset holding the samples [N, ...] (e.g. showers)")
    s.add_argument("--label-key", help="dataset holding one label per sample, [N] or [N, 1] (e.g. incident_energies)")
    s.add_argument("--x-shape", type=_shape, help="reshape each row to this shape, e.g. 45,16,9 (the element "
                   "counts must agree); with --add-channel-dim the sample is [1, *shape]")
    _user_array_options(s, label_kind_default="continuous (whole-number energies are not taken for classes)")
    return s


def _calo_parser(sub) -> None:
    s = sub.add_parser("calo", help="calorimeter-like showers with analytic mean profiles, as a CaloChallenge "
                                    "HDF5 file (then: pipeline shards hdf5)")
    s.add_argument("--num-samples", type=_positive_int, required=True, help="showers")
    s.add_argument("--out", required=True, help="output .h5 file (showers [N, voxels], incident_energies [N, 1], MeV)")
    s.add_argument("--seed", type=_nonneg_int, default=0, help="seed (default 0)")
    s.add_argument("--geometry", type=_shape, default=(45, 16, 9),
                   help="layers,angular bins,radial bins (default 45,16,9: CaloChallenge dataset 2)")
    s.add_argument("--energy-range", type=float, nargs=2, default=(1e3, 1e6), metavar=("MIN", "MAX"),
                   help="incident energies, log-uniform, MeV (default 1000 1000000: 1 GeV - 1 TeV)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.set_defaults(func=_run_calo)


def _run_calo(args) -> int:
    from pipeline.physics import calo

    try:
        if len(args.geometry) != 3:
            raise ValueError(f"calo: --geometry needs three numbers layers,angular,radial, got {args.geometry}")
        geometry = calo.CaloGeometry(*args.geometry)
        sources.calo_file(args.out, args.num_samples, seed=args.seed, geometry=geometry,
                          material=calo.CaloMaterial(), energy_range_mev=tuple(args.energy_range),
                          overwrite=args.overwrite)
    except ValueError as e:
        print(f"pipeline shards calo: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {args.num_samples} showers of {geometry.num_voxels} voxels ({','.join(map(str, geometry.shape))})")
    return 0


def _verify_parser(sub) -> None:
    s = sub.add_parser("verify", help="check shards against their manifest (sizes, the schema of a sample "
                                      "of members; sha256 with --sha256)")
    s.add_argument("dir", help="shard directory or object-store prefix (s3://bucket/prefix) holding manifest.json")
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
    if name == "grf":
        params = {"ndim": args.ndim, "size": args.size, "num_samples": args.num_samples,
                  "channels": args.channels, "spectral_index": args.spectral_index,
                  "spectrum_table": args.spectrum_table, "amplitude": args.amplitude,
                  "pivot": args.pivot, "cutoff": args.cutoff, "cutoff_kind": args.cutoff_kind,
                  "zero_mode_power": args.zero_mode_power}
        field = _grf_field(args)  # validated before anything is written
        params["field"] = field.info()  # a table's rows, not only its path, identify the data
        return params, lambda: sources.grf(field, args.num_samples, seed=args.seed)
    if name == "phi4":
        from dataclasses import asdict

        from pipeline.physics import phi4

        theory = phi4.Phi4(args.size, args.kappa, args.lam)  # validated before anything is written
        hmc = phi4.HMCConfig(step_size=args.step_size, num_leapfrog=args.num_leapfrog, num_chains=args.num_chains,
                             burn_in=args.burn_in, pilot=args.pilot, thin_factor=args.thin_factor, start=args.start)
        params = {"theory": asdict(theory), "num_samples": args.num_samples, "hmc": asdict(hmc)}
        return params, lambda: sources.phi4(theory, args.num_samples, hmc, seed=args.seed)
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
    if name == "hdf5":
        params = {"path": args.path, "x_key": args.x_key, "label_key": args.label_key,
                  "x_shape": list(args.x_shape) if args.x_shape else None, **user}
        return params, lambda: sources.hdf5(args.path, x_key=args.x_key, label_key=args.label_key,
                                            x_shape=args.x_shape, **user)
    raise AssertionError(name)


def _grf_field(args):
    from pipeline.physics import grf

    if args.spectrum_table is not None:
        try:
            table = np.load(args.spectrum_table) if args.spectrum_table.endswith(".npy") else np.loadtxt(args.spectrum_table)
        except (OSError, ValueError) as e:
            raise ValueError(f"grf: cannot read --spectrum-table {args.spectrum_table}: {e}") from None
        if table.ndim != 2 or table.shape[1] != 2:
            raise ValueError(f"grf: --spectrum-table needs two columns k, P(k), got shape {list(table.shape)}")
        spectrum = grf.Tabulated(k=tuple(map(float, table[:, 0])), power=tuple(map(float, table[:, 1])))
    else:
        spectrum = grf.PowerLaw(args.spectral_index, amplitude=args.amplitude, pivot=args.pivot,
                                cutoff=args.cutoff, cutoff_kind=args.cutoff_kind)
    return grf.GRF(args.ndim, args.size, spectrum, channels=args.channels, zero_mode_power=args.zero_mode_power)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``key: old -> new`` for each creation parameter that differs (issue 15 item 14)."""
    new = json.loads(json.dumps(new))  # as the manifest stores them (lists for tuples)
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


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
                f"{args.out} holds a shard set written with other parameters ({_differences(old, params)}); "
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
    if "hmc" in m["info"]:
        h = m["info"]["hmc"]
        print(f"HMC: acceptance {h['acceptance']:.3f}, integrated autocorrelation time of |M| "
              f"{h['tau_int_abs_m']:.2f} +- {h['tau_int_abs_m_stderr']:.2f} trajectories, thinned by {h['thin']}")
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
