"""Evaluating a trained run: load its export, draw samples, compare with reference shards.

This is the composition the ``pipeline evaluate`` command runs; the science lives in the
per-data functions (``evaluate_ising``, ``evaluate_digits``, ``evaluate_gmm``,
``vdm_bits_per_dim``), which take arrays and know nothing about runs.

Which evaluation applies is read from the data: +1/-1 spin lattices -> Ising physics;
the digits source -> Fréchet distance in a digits classifier's feature space; a Gaussian
mixture source (parameters in the manifest) -> exact likelihood and mode coverage. VDMs also
get their held-out ELBO from the exact evaluator, on the validation split when the shard
set has one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.meta import DataMeta
from pipeline.eval.common import EvalOptions, _held_out, _is_vdm, _vdm_likelihood, generate, run_data
from pipeline.eval.reference import ReferenceSet, load_reference
from pipeline.run_dir import RunDir


# ----------------------------------------------------------------------------------------
# Helpers


def _close(a: np.ndarray, t: float) -> np.ndarray:
    return np.isclose(a, t, rtol=1e-9, atol=1e-9)


def json_safe(x: Any) -> Any:
    """Plain JSON types; non-finite floats become null (JSON has no inf/NaN)."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return json_safe(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


# ----------------------------------------------------------------------------------------
# Ising


def _ising_temperatures(meta: DataMeta, reference: ReferenceSet, label_key: str, opts: EvalOptions,
                        conditional: bool) -> tuple[list[float], np.ndarray | None]:
    """The temperatures to evaluate at, and the reference's per-sample temperature column."""
    column = reference.json_column(label_key) if conditional else reference.json_column("temperature")
    if column is None and conditional:
        raise ValueError(f"the reference samples carry no numeric json field {label_key!r} (the run's "
                         f"data.label_key), so they cannot be split by temperature")
    available = sorted(set(column.tolist())) if column is not None else []
    if opts.temperatures:
        if column is None:
            if len(opts.temperatures) != 1:
                raise ValueError("the reference samples carry no temperature: give a single --temperature")
            return [float(opts.temperatures[0])], None
        missing = [t for t in opts.temperatures if not _close(np.asarray(available), t).any()]
        if missing:
            raise ValueError(f"--temperature {missing} not in the reference data; it has {available}")
        return [float(t) for t in opts.temperatures], column
    if column is None:
        raise ValueError("the reference samples carry no 'temperature' in their json metadata: give --temperature")
    if not conditional and len(available) > 1:
        raise ValueError(f"the reference data mixes temperatures {available} but the model is unconditional: "
                         f"choose one with --temperature")
    if conditional and meta.label_values:
        unknown = [t for t in available if not _close(np.asarray(meta.label_values), t).any()]
        if unknown:
            raise ValueError(f"reference temperatures {unknown} are not among the model's label values {list(meta.label_values)}")
    return available, column


# Keys summarised across temperatures (mean over the grid) for conditional models.
_SUMMARY_KEYS = (
    "energy_per_spin", "energy_reference", "energy_exact", "energy_exact_finite", "abs_magnetisation",
    "abs_magnetisation_reference", "magnetisation_exact", "specific_heat", "specific_heat_reference",
    "susceptibility", "susceptibility_reference", "correlation_length", "correlation_length_reference",
    "w1_energy", "w1_abs_magnetisation", "bits_per_spin", "entropy_bits_per_spin",
    "entropy_bits_per_spin_finite", "gap_bits_per_spin", "recon_bpd", "prior_bpd", "diffusion_bpd",
)


def evaluate_ising_run(module, meta: DataMeta, info: dict, urls: str, reference: ReferenceSet,
                       opts: EvalOptions) -> dict[str, Any]:
    conditional = meta.label_kind == "continuous"
    label_key = (info["config"].get("data") or {}).get("label_key") or "temperature"
    temps, column = _ising_temperatures(meta, reference, label_key, opts, conditional)
    held = held_col = None
    notes: list[str] = []
    flags: list[str] = []
    timings = {"sample_s": 0.0, "observables_s": 0.0, "elbo_s": 0.0}
    if _is_vdm(module) and opts.elbo_num_samples > 0:
        held = _held_out(urls, reference, notes)
        held_col = held.json_column(label_key if conditional else "temperature")
    per_t: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(temps):
        ref_x = reference.x if column is None else reference.x[_close(column, t)]
        d = _ising_at(module, ref_x, t, i, conditional, opts, timings)
        if held is not None:
            held_t = held if held_col is None else held.subset(_close(held_col, t))
            _add_ising_elbo(d, module, urls, reference, held_t, t, conditional, opts, notes, timings)
        flags.extend(d["flags"])
        per_t[f"{t:g}"] = d
    return _ising_result(per_t, temps, conditional, flags, notes, timings)


def _ising_at(module, ref_x: np.ndarray, t: float, index: int, conditional: bool, opts: EvalOptions,
              timings: dict[str, float]) -> dict[str, Any]:
    """Sample at temperature ``t`` (the ``index``-th evaluated) and compare with ``ref_x``."""
    from pipeline.eval.ising import evaluate_ising
    from pipeline.physics.observables import to_spins

    labels = torch.full((opts.num_samples,), t, dtype=torch.float32) if conditional else None
    t0 = time.perf_counter()
    x = generate(module, opts.num_samples, labels, seed=opts.seed + 7919 * index, num_steps=opts.num_steps,
                 sampler=opts.sampler, batch_size=opts.sample_batch_size)
    timings["sample_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = evaluate_ising(to_spins(x), ref_x, t, z_max=opts.z_max, alpha=opts.alpha)
    timings["observables_s"] += time.perf_counter() - t0
    return rep.to_dict()


def _add_ising_elbo(d: dict[str, Any], module, urls: str, reference: ReferenceSet, held_t: ReferenceSet,
                    t: float, conditional: bool, opts: EvalOptions, notes: list[str],
                    timings: dict[str, float]) -> None:
    """The VDM's held-out ELBO at temperature ``t`` in bits per spin, against the exact entropy,
    into ``d`` (the report at ``t``)."""
    from pipeline.eval.ising import compare_with_entropy

    if min(len(held_t), opts.elbo_num_samples) < 2:
        notes.append(f"T={t:g}: fewer than 2 held-out lattices; ELBO skipped")
        return
    t0 = time.perf_counter()
    lik = _vdm_likelihood(module, urls, reference, opts, notes, labels_from_cls=False, held=held_t,
                          label_value=t if conditional else None)
    timings["elbo_s"] += time.perf_counter() - t0
    ent = compare_with_entropy(lik["bits_per_dim"], lik["bits_per_dim_stderr"], t, d["size"], z_max=opts.z_max)
    d.update({k.replace("bits_per_dim", "bits_per_spin"): v for k, v in lik.items()})  # a lattice's dims are spins
    d.update(
        entropy_bits_per_spin=ent.entropy_bits_per_spin,
        entropy_bits_per_spin_finite=ent.entropy_bits_per_spin_finite,
        gap_bits_per_spin=ent.gap_bits_per_spin, z_gap=ent.z_gap,
    )
    d["flags"] = d["flags"] + ent.flags
    d["notes"] = d["notes"] + ent.notes


def _ising_result(per_t: dict[str, dict[str, Any]], temps: list[float], conditional: bool, flags: list[str],
                  notes: list[str], timings: dict[str, float]) -> dict[str, Any]:
    """One temperature of an unconditional model: its report at top level; otherwise the
    means of _SUMMARY_KEYS over the temperatures, with each report under per_temperature."""
    result: dict[str, Any] = {"evaluation": "ising", "temperatures": temps}
    if len(temps) == 1 and not conditional:
        only = dict(next(iter(per_t.values())))
        notes = only.pop("notes") + notes
        only.pop("flags")
        result.update(only)
    else:
        for k in _SUMMARY_KEYS:
            vals = [d[k] for d in per_t.values() if k in d and d[k] is not None]
            if vals:
                result[k] = float(np.mean(vals))
        result["pvalue_energy_min"] = min(d["pvalue_energy"] for d in per_t.values())
        result["per_temperature"] = per_t
        notes.insert(0, f"top-level values are means over the {len(temps)} temperatures {temps}; see "
                        f"per_temperature for each (T_c = 2.2692)")
    result["flags"] = flags
    result["notes"] = notes
    result["timings_s"] = timings
    return result


# ----------------------------------------------------------------------------------------
# Digits, GMM, other data


def evaluate_digits_run(module, meta, info, urls, reference, opts, run_dir: Path) -> dict[str, Any]:
    from pipeline.eval.frechet import evaluate_digits, load_or_train_digits_features
    from pipeline.train.sampling import default_labels

    notes: list[str] = []
    labels = default_labels(meta, opts.num_samples) if meta.label_kind == "class" else None
    t0 = time.perf_counter()
    x = generate(module, opts.num_samples, labels, seed=opts.seed, num_steps=opts.num_steps,
                 sampler=opts.sampler, batch_size=opts.sample_batch_size)
    t_sample = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = RunDir(run_dir).eval_cache
    net = load_or_train_digits_features(cache)
    rep = evaluate_digits(x, reference.x, net, labels=None if labels is None else labels.numpy(), seed=opts.seed)
    t_fd = time.perf_counter() - t0
    t0 = time.perf_counter()
    lik = _vdm_likelihood(module, urls, reference, opts, notes, labels_from_cls=meta.label_kind == "class")
    result = {"evaluation": "digits", **rep.to_dict(), **lik}
    result["notes"] = notes + [f"Fréchet distance in the hidden-layer features of an MLP trained on sklearn digits "
                               f"(cached in {cache}); compare with frechet_distance_baseline"]
    result["timings_s"] = {"sample_s": t_sample, "frechet_s": t_fd, "elbo_s": time.perf_counter() - t0}
    return result


def evaluate_gmm_run(module, meta, info, urls, reference, opts) -> dict[str, Any]:
    from pipeline.eval.gmm import differential_entropy_bits_per_dim, evaluate_gmm

    params = reference.manifest["info"]["gmm"]
    notes: list[str] = []
    t0 = time.perf_counter()
    x = generate(module, opts.num_samples, None, seed=opts.seed, num_steps=opts.num_steps,
                 sampler=opts.sampler, batch_size=opts.sample_batch_size)
    t_sample = time.perf_counter() - t0
    rep = evaluate_gmm(x.reshape(len(x), -1), params, reference=reference.x, z_max=opts.z_max)
    result = {"evaluation": "gmm", **rep.to_dict()}
    t0 = time.perf_counter()
    lik = _vdm_likelihood(module, urls, reference, opts, notes, labels_from_cls=False)
    if lik:
        held = _held_out(urls, reference, [])
        h, h_se = differential_entropy_bits_per_dim(held.x, params)
        lik.update(entropy_bits_per_dim=h, entropy_bits_per_dim_stderr=h_se, gap_bits_per_dim=lik["bits_per_dim"] - h)
        z = (lik["bits_per_dim"] - h) / math.hypot(lik["bits_per_dim_stderr"], h_se)
        if z < -opts.z_max:
            rep.flags.append(f"bits/dim {lik['bits_per_dim']:.4f} is {-z:.1f} sigma below the true differential "
                             f"entropy {h:.4f} bits/dim: the likelihood evaluation or the data are wrong")
        notes.append("bits/dim of continuous data is a density in data units; entropy_bits_per_dim is the true "
                     "mixture's differential entropy per dimension (estimated on the held-out samples)")
    result.update(lik)
    result["flags"] = rep.flags
    result["notes"] = notes
    result["timings_s"] = {"sample_s": t_sample, "elbo_s": time.perf_counter() - t0}
    return result


def evaluate_generic_run(module, meta, info, urls, reference, opts) -> dict[str, Any]:
    """Data without a known reference model: per-dimension Wasserstein-1 and, for VDMs, bits/dim."""
    from pipeline.physics.observables import wasserstein1
    from pipeline.train.sampling import default_labels

    notes = ["no physics or reference model is known for this data: per-dimension W1 only"]
    n = opts.num_samples
    labels = default_labels(meta, n) if meta.label_kind != "none" else None
    x = generate(module, n, labels, seed=opts.seed, num_steps=opts.num_steps, sampler=opts.sampler,
                 batch_size=opts.sample_batch_size)
    g, r = x.reshape(len(x), -1), reference.x.reshape(len(reference.x), -1)
    w1 = [wasserstein1(g[:, j], r[:, j]) for j in range(g.shape[1])]
    result = {"evaluation": "generic", "w1_per_dim_mean": float(np.mean(w1)), "w1_per_dim_max": float(np.max(w1))}
    result.update(_vdm_likelihood(module, urls, reference, opts, notes, labels_from_cls=meta.label_kind == "class"))
    result["flags"] = []
    result["notes"] = notes
    return result


# ----------------------------------------------------------------------------------------
# Entry point


def _is_ising(meta: DataMeta) -> bool:
    shape = tuple(meta.sample_shape)
    return meta.data_kind == "spins" and (len(shape) == 2 or (len(shape) == 3 and shape[0] == 1))


def evaluate_run(run_dir: str | Path, data_urls: str | None, opts: EvalOptions) -> dict[str, Any]:
    """Load ``run_dir``'s export, sample from it and evaluate against the shards at ``data_urls``
    (None: the run's own data, see :func:`pipeline.eval.common.run_data`)."""
    from pipeline.train.export import load_export

    opts.validate()
    t_start = time.perf_counter()
    module, meta, info = load_export(Path(run_dir))
    data_urls = run_data(run_dir, info, data_urls)
    torch.manual_seed(opts.seed)
    reference = load_reference(data_urls, split="all")
    if tuple(reference.meta.sample_shape) != tuple(meta.sample_shape):
        raise ValueError(f"the run was trained on samples of shape {tuple(meta.sample_shape)} but {data_urls} holds "
                         f"shape {tuple(reference.meta.sample_shape)}")
    if reference.meta.data_kind != meta.data_kind:
        raise ValueError(f"the run was trained on {meta.data_kind!r} data but {data_urls} holds "
                         f"{reference.meta.data_kind!r} data")
    source = (reference.manifest or {}).get("source")
    if _is_ising(meta):
        result = evaluate_ising_run(module, meta, info, data_urls, reference, opts)
    elif source == "digits":
        result = evaluate_digits_run(module, meta, info, data_urls, reference, opts, Path(run_dir))
    elif source == "gmm" and "gmm" in (reference.manifest.get("info") or {}):
        result = evaluate_gmm_run(module, meta, info, data_urls, reference, opts)
    elif source == "grf" and "grf" in (reference.manifest.get("info") or {}):
        from pipeline.eval.grf import evaluate_grf_run

        result = evaluate_grf_run(module, meta, info, data_urls, reference, opts)
    elif source == "phi4" and "phi4" in (reference.manifest.get("info") or {}):
        from pipeline.eval.phi4 import evaluate_phi4_run

        result = evaluate_phi4_run(module, meta, info, data_urls, reference, opts)
    elif "calo" in ((reference.manifest or {}).get("info") or {}).get("hdf5", {}).get("attrs", {}):
        from pipeline.eval.calo import evaluate_calo_run

        result = evaluate_calo_run(module, meta, info, data_urls, reference, opts)
    else:
        result = evaluate_generic_run(module, meta, info, data_urls, reference, opts)
    header = {
        "run": str(run_dir), "step": info.get("step"), "objective": info["config"].get("objective"),
        "data": str(data_urls), "reference_split": "all", "num_samples": opts.num_samples, "seed": opts.seed,
        "num_reference_total": len(reference),
    }
    sampling = module.sampling_settings(opts.num_steps, opts.sampler)
    if sampling:  # the resolved sampler: a model's default grid and steps come from its config
        header["sampling"] = sampling
    out = {**header, **result}
    _likelihood_aliases(out)
    out.setdefault("timings_s", {})["total_s"] = time.perf_counter() - t_start
    return json_safe(out)


def _likelihood_aliases(out: dict[str, Any]) -> None:
    """Every VDM evaluation carries the same likelihood keys, whatever the data: bits_per_dim
    (= bits per spin for lattices), its terms, and `stderr` (of bits_per_dim)."""
    if "bits_per_dim" not in out and "bits_per_spin" in out:
        out["bits_per_dim"] = out["bits_per_spin"]
    if "bits_per_dim" in out and "stderr" not in out:
        se = out.get("bits_per_dim_stderr", out.get("bits_per_spin_stderr"))
        if se is None and "per_temperature" in out:  # mean over temperatures: combine their errors
            ses = [d.get("bits_per_spin_stderr") for d in out["per_temperature"].values()]
            if ses and all(v is not None for v in ses):
                se = float(np.sqrt(np.sum(np.square(ses)))) / len(ses)
        out["stderr"] = se
