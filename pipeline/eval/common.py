"""What every evaluator shares: the options, drawing samples from a model, the held-out
split, and a VDM's held-out ELBO. A leaf of ``pipeline.eval``: the per-data evaluators
(``eval/run.py``, ``eval/grf.py``) import it, it imports none of them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.eval.ising import DEFAULT_ALPHA, DEFAULT_Z_MAX
from pipeline.eval.reference import ReferenceSet, has_split, load_reference


def run_data(run_dir: Any, info: dict[str, Any], data: str | None) -> str:
    """The data a command that reads a run measures on: ``data`` when the user names it
    (``--data``), else the run's own ``data.train_urls`` from its export. A ``pipe:`` URL runs
    a shell command once per shard per pass; one stored in a run directory (which may come
    from anyone) is never run without the user naming it (issue 15 item 8), nor is a URL whose
    credential was redacted when the run was saved."""
    from pipeline.errors import ConfigError
    from pipeline.track.secrets import REDACTED

    if data:
        return data
    urls = (info.get("config", {}).get("data") or {}).get("train_urls")
    if not urls:
        raise ConfigError(f"{run_dir}: the run's config names no data.train_urls; pass --data SHARDS")
    if "pipe:" in urls:
        raise ConfigError(
            f"{run_dir}: the run's data.train_urls is a pipe: command ({urls!r}), which would run in a shell; "
            "a command that reads a run never runs it on its own: pass --data (the same command, if you trust it, "
            "or the shards' directory)"
        )
    if REDACTED in urls:
        raise ConfigError(f"{run_dir}: the run's data.train_urls held a credential and was saved redacted "
                          f"({urls!r}); pass --data")
    return urls


@dataclass
class EvalOptions:
    num_samples: int = 1000  # generated samples (per temperature for conditional Ising models)
    seed: int = 0
    num_steps: int | None = None  # sampling steps (diffusion models)
    sampler: Any = None  # a VDM's SamplerConfig (None: its default, ancestral)
    temperatures: list[float] | None = None  # Ising: evaluate at these (default: the data's)
    elbo_num_samples: int = 256  # held-out samples (per temperature) for the VDM's exact ELBO; 0 = skip
    elbo_noise_samples: int = 8
    sample_batch_size: int = 512
    z_max: float = DEFAULT_Z_MAX
    alpha: float = DEFAULT_ALPHA

    def validate(self) -> None:
        if self.num_samples < 2:
            raise ValueError(f"--num-samples must be >= 2 (fluctuations need several samples), got {self.num_samples}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"--num-steps must be >= 1, got {self.num_steps}")
        if self.elbo_num_samples < 0 or self.elbo_num_samples == 1:
            raise ValueError(f"--elbo-num-samples must be 0 (skip) or >= 2, got {self.elbo_num_samples}")
        if self.elbo_noise_samples < 2:
            raise ValueError(f"--elbo-noise-samples must be >= 2, got {self.elbo_noise_samples}")
        if self.sample_batch_size < 1:
            raise ValueError(f"sample_batch_size must be >= 1, got {self.sample_batch_size}")
        if not self.z_max > 0 or not 0 < self.alpha < 1:
            raise ValueError(f"need --z-max > 0 and 0 < --alpha < 1, got {self.z_max} and {self.alpha}")
        for t in self.temperatures or []:
            if not (math.isfinite(t) and t > 0):
                raise ValueError(f"--temperature must be finite and > 0, got {t}")


def generate(module, num_samples: int, labels: torch.Tensor | None, *, seed: int, num_steps: int | None,
             batch_size: int, sampler: Any) -> np.ndarray:
    """Samples in data space, drawn in batches; batch i uses the seed SeedSequence([seed, i]).
    ``sampler`` has no default: an evaluation that dropped the user's ``--sampler`` would draw
    with the model's default and report the figures under the option's name."""
    from pipeline.train.export import sample_from

    module.check_sample_options(num_steps, sampler)  # a bad option is named before the first batch
    out = []
    for i, start in enumerate(range(0, num_samples, batch_size)):
        n = min(batch_size, num_samples - start)
        s = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        lb = labels[start:start + n] if labels is not None else None
        out.append(sample_from(module, n, lb, seed=s, num_steps=num_steps, sampler=sampler).detach().cpu().numpy())
    x = np.concatenate(out)
    if not np.all(np.isfinite(x)):
        raise ValueError("the model produced non-finite samples (NaN/Inf); its weights have probably diverged")
    return x


def _is_vdm(module) -> bool:
    from pipeline.objectives.vdm import VDM

    return isinstance(module, VDM)


def _held_out(urls: str, reference: ReferenceSet, notes: list[str]) -> ReferenceSet:
    if has_split(urls, "validation"):
        return load_reference(urls, split="validation")
    notes.append("the data has no validation split: the ELBO is evaluated on all reference samples, which may "
                 "include training data (not held out)")
    return reference


def _vdm_likelihood(module, urls, reference, opts, notes, labels_from_cls: bool, *,
                    held: ReferenceSet | None = None, label_value: float | None = None) -> dict[str, Any]:
    """A VDM's held-out bits/dim on the first ``opts.elbo_num_samples`` held-out samples ({} for
    other models or with the ELBO off). ``held``: the held-out samples, when the caller has
    them already (one temperature's, for the Ising evaluation); ``label_value``: condition
    every sample on this label (a temperature) instead of its class."""
    from pipeline.eval.likelihood import vdm_bits_per_dim

    if not (_is_vdm(module) and opts.elbo_num_samples > 0):
        return {}
    if held is None:
        held = _held_out(urls, reference, notes)
    n = min(len(held), opts.elbo_num_samples)
    labels = None
    if label_value is not None:
        labels = torch.full((n,), label_value, dtype=torch.float32)
    elif labels_from_cls and held.cls is not None:
        labels = torch.from_numpy(held.cls[:n])
    lik = vdm_bits_per_dim(module, torch.from_numpy(held.x[:n]), labels, num_noise_samples=opts.elbo_noise_samples,
                           seed=opts.seed)
    return {"bits_per_dim": lik.bits_per_dim, "bits_per_dim_stderr": lik.bits_per_dim_stderr,
            "bits_per_dim_noise_stderr": lik.bits_per_dim_noise_stderr, "recon_bpd": lik.recon_bpd,
            "prior_bpd": lik.prior_bpd, "diffusion_bpd": lik.diffusion_bpd, "elbo_num_samples": lik.num_samples}
