"""`pipeline bench variance`: its output, its variance figures against exact references, and
a bias check that does fail for a biased estimator.

References: for a fixed batch and fixed noise, the per-term losses L[i, k] of every sample i
and diffusion term k are computed by brute force (every k evaluated). Under the uniform
sampler the estimate (1/B) sum_i L[i, k_i] with independent uniform k_i has variance
(1/B^2) sum_i Var_k L[i, k]; under the stratified sampler with B = K strata (one per term)
it is (1/B) sum_i L[i, pi(i)] over a uniformly random permutation pi, whose variance is
(1/(B^2 (B-1))) sum_ik d_ik^2 with d the doubly centred L (Hoeffding 1951, combinatorial
CLT). Neither formula shares code with the bench.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.bench.variance import exact_batches, fixed_noise_generator, measure, run, with_sampler
from pipeline.bench.variance_batches import noise_floor, uniform_variance
from pipeline.config import ConfigError, load_config
from pipeline.data.meta import DataMeta
from pipeline.data.stream import read_meta
from pipeline.objectives.registry import build_phases
from pipeline.objectives.vdm.timesteps import ImportanceSampler
from pipeline.objectives.vdm import VDM, VDMConfig
from pipeline.objectives.vdm.denoiser import DiscreteSkip
from pipeline.train.export import load_export, write_export
from tests.conftest import run_pipeline

D = 4  # dimensions of the tiny vector data
K = 8  # diffusion terms (T = K + 1)


def tiny_vdm(sampler: str = "uniform") -> VDM:
    torch.manual_seed(0)
    cfg = VDMConfig(num_timesteps=K + 1, architecture="mlp", mlp_hidden=16, mlp_layers=1, emb_dim=8,
                    timestep_sampler=sampler, gamma_min=-6.0, gamma_max=4.0,
                    schedule="cosine")  # unequal gamma steps: terms differ, so stratifying matters
    m = VDM(cfg, DataMeta(sample_shape=(D,), data_kind="spins"))
    with torch.no_grad():  # the output layer starts at zero: give the denoiser a non-trivial answer
        m.denoiser.net.out.weight.normal_(0, 0.5)
        m.denoiser.net.out.bias.normal_(0, 0.3)
    return m.eval()


def pool(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, D, generator=g) < 0.5).float() * 2 - 1


def export_untrained(tmp_path, shards, *overrides: str):
    cfg = load_config("configs/quickstart.yaml", [
        f"run.dir={tmp_path}", f"data.train_urls={shards}", "vdm.num_timesteps=6", "vdm.channels=4",
        "vdm.emb_dim=8", "data.batch_per_rank=16", "track.wandb=off", *overrides,
    ])
    meta = read_meta(str(shards))
    (phase,) = [p for p in build_phases(cfg, meta) if p.ema]
    with torch.no_grad():
        phase.module.denoiser.net.out.weight.normal_(0, 0.05)
    write_export(tmp_path, phase.module, cfg.to_dict(), meta, step=0)
    return tmp_path


def test_cli_smoke_json_on_an_untrained_export(tmp_path, ising_shards):
    run_dir = export_untrained(tmp_path, ising_shards)
    png = tmp_path / "decomposition.png"
    r = run_pipeline("bench", "variance", "--run", str(run_dir), "--num-batches", "2", "--num-repeats", "3",
                     "--exact-noise-samples", "2", "--plot", str(png), timeout=120)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parts = out["variance_decomposition"]
    assert set(parts) == {"uniform", "stratified", "importance", "importance-cv"} and out["noise_floor"] > 0
    for s, p in parts.items():  # the denoising-matching form is the preset's: its totals are the headline ones
        assert p["total"] == pytest.approx(out["variance"][s])
        assert p["total"] == pytest.approx(p["data"] + p["noise_floor"] + p["removable"])
    assert out["ratio_ceiling_any_t_sampler"] == pytest.approx(
        out["variance"]["uniform"] / (out["data_variance"] + out["noise_floor"]))
    for key in ("variance", "best_sampler", "ratio_vs_uniform", "bias_sigma", "variance_by_form", "variance_t_only",
                "variance_given_x", "data_variance", "exact_bpd", "grad_variance", "bias_sigma_by_form"):
        assert key in out, key
    assert set(out["variance"]) == {"uniform", "stratified", "importance", "importance-cv"}
    assert set(out["variance_by_form"]) == {"denoising_matching", "consistency"}
    assert out["batch_size"] == 16 == out["network_evals_per_estimate"] and out["split"] == "validation"
    for s, v in out["variance"].items():
        assert math.isfinite(v) and v > 0 and math.isfinite(out["bias_sigma_by_sampler"][s])
        # The total is the data part plus the sampler's part, and the bias is against the exact value.
        assert v == pytest.approx(out["data_variance"] + out["variance_given_x"][s])
        assert out["bias_bpd"][s] == pytest.approx(out["mean_bpd"][s] - out["exact_bpd"])
    best = out["best_sampler"]
    assert out["variance"][best] == min(out["variance"].values())
    assert out["ratio_vs_uniform"] == pytest.approx(out["variance"]["uniform"] / out["variance"][best])
    assert out["bias_sigma"] == out["bias_sigma_by_sampler"][best]


def test_continuous_time_includes_the_learned_time_map_only_when_there_is_one(tmp_path, ising_shards):
    learned = export_untrained(tmp_path / "a", ising_shards, "vdm.num_timesteps=0",
                               "vdm.timestep_sampler=learned-schedule")
    out = run(learned, num_batches=1, num_repeats=2, num_noise_samples=2, num_quadrature_points=8, grads=False)
    assert set(out["variance"]) == {"uniform", "stratified", "importance", "importance-cv", "learned-schedule"}
    assert set(out["variance_by_form"]) == {"denoising_matching"} and set(out["skipped"]) == {"uniform-linear"}
    # each sampler that keeps a loss history is warmed up on its own (one did not hide the other)
    warm = out["importance_warmup_batches"]["denoising_matching"]
    assert set(warm) == {"importance", "importance-cv"} and min(warm.values()) > 0
    plain = export_untrained(tmp_path / "b", ising_shards, "vdm.num_timesteps=0")
    out = run(plain, num_batches=1, num_repeats=2, num_noise_samples=2, num_quadrature_points=8, grads=False)
    assert "learned-schedule" not in out["variance"] and "learned-schedule" in out["skipped"]
    assert "uniform-linear" in out["skipped"]  # the quickstart schedule is linear: uniform is that baseline
    with pytest.raises(ConfigError, match="must include uniform"):
        run(plain, samplers=("stratified",))
    with pytest.raises(ConfigError, match="num-repeats"):
        run(plain, num_repeats=1)
    with pytest.raises(ConfigError, match="batch-size"):
        run(plain, batch_size=10_000)


def brute_force_terms(module: VDM, x: torch.Tensor, generator_for) -> torch.Tensor:
    """L[i, k]: K-scaled diffusion term k of sample i in bits/dim, with the noise the bench holds
    fixed (the training forward pass draws the decoder's noise first, then the diffusion's)."""
    to_bpd = 1.0 / (D * math.log(2))
    cols = []
    for k in range(K):
        g = generator_for()
        torch.randn(x.shape, generator=g)  # the decoder's noise
        loss, *_ = module.diffusion_nats(x, torch.full((x.shape[0],), (k + 0.5) / K), None, g)
        cols.append(loss * to_bpd)
    return torch.stack(cols, 1).double()


def hoeffding_permutation_variance(a: torch.Tensor) -> float:
    n = a.shape[0]
    d = a - a.mean(1, keepdim=True) - a.mean(0, keepdim=True) + a.mean()
    return float((d**2).sum() / (n - 1))


@torch.no_grad()
def test_t_only_variance_matches_brute_force_for_uniform_and_stratified():
    base = tiny_vdm()
    batches = exact_batches(base, pool(), None, num_batches=12, batch_size=K, seed=0, num_noise_samples=2)
    seed = 3
    ref = {"uniform": 0.0, "stratified": 0.0}
    for m, b in enumerate(batches):
        L = brute_force_terms(base, b.x, lambda: fixed_noise_generator(seed, m))
        ref["uniform"] += float(L.var(1, unbiased=False).sum()) / K**2 / len(batches)
        ref["stratified"] += hoeffding_permutation_variance(L) / K**2 / len(batches)
    assert ref["stratified"] < ref["uniform"] / 2  # a case where stratifying matters
    for s in ("uniform", "stratified"):
        st = measure(with_sampler(base, s), batches, num_repeats=40, seed=seed, grads=False)
        # 12 batches x 40 draws of t: a sample variance of skewed sums runs ~10 % low at this
        # size (it is 1.01 x the reference with 2000 draws); mixing up the samplers is a factor 3.
        assert st.variance_t_only == pytest.approx(ref[s], rel=0.25), s


class FrozenSkewed(ImportanceSampler):
    """An importance sampler with a fixed, skewed p_t; ``weighted=False`` drops the 1/(K p_k)
    weights, which makes the estimate biased towards the terms it over-samples."""

    def __init__(self, weighted: bool):
        super().__init__(K, history=2, uniform_mix=0.05)
        self.weighted = weighted
        self.loss_sq[:] = (torch.arange(K, dtype=torch.float64)[:, None] + 1) ** 6
        self.count[:] = 2

    def forward(self, batch_size, ctx, device="cpu", generator=None):
        u, w = super().forward(batch_size, ctx, device, generator)
        return u, w if self.weighted else torch.ones_like(w)

    def update(self, u, losses, all_gather):
        pass


def test_bias_check_flags_an_estimator_without_importance_weights():
    base = tiny_vdm()
    batches = exact_batches(base, pool(), None, num_batches=4, batch_size=16, seed=0, num_noise_samples=8)
    sigma = {}
    for weighted in (True, False):
        m = with_sampler(base, "importance")
        m.sampler = FrozenSkewed(weighted)
        sigma[weighted] = measure(m, batches, num_repeats=24, seed=1, grads=False).bias_sigma
    assert abs(sigma[True]) < 3, sigma
    assert abs(sigma[False]) > 6, sigma  # about -14 sigma at these settings
    # An honest sampler on the same batches agrees with the exact value too.
    assert abs(measure(with_sampler(base, "stratified"), batches, num_repeats=24, seed=1, grads=False).bias_sigma) < 3


def brute_force_draws(module: VDM, batches, g: torch.Generator, n: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noise draws of every term for every sample of ``batches``, in bits/dim: the
    K-scaled diffusion terms (uniform t's value when it picks term k) [K, samples, n] and the
    reconstruction term [samples, n]."""
    to_bpd = 1.0 / (D * math.log(2))
    rows = torch.cat([b.x for b in batches]).repeat_interleave(n, 0)
    est = []
    for k in range(K):  # diffusion_nats returns K x term k under uniform u in bin k
        loss, *_ = module.diffusion_nats(rows, torch.full((rows.shape[0],), (k + 0.5) / K), None, g)
        est.append((loss * to_bpd).double().reshape(-1, n))
    g0, _ = module.endpoints("cpu")
    recon = module.recon_nats(rows, rows, g0, torch.randn(rows.shape, generator=g)) * to_bpd
    return torch.stack(est), recon.double().reshape(-1, n)


@torch.no_grad()
def test_noise_floor_matches_brute_force_and_no_sampler_goes_below_it():
    """The floor (1/B) (sum_t sqrt(v_t))^2 + recon noise, from the exact evaluator's noise draws,
    against v_t computed here by brute force (4000 noise draws of every term of every sample);
    then every sampler's measured variance given x lies above it."""
    base = tiny_vdm()
    batches = exact_batches(base, pool(), None, num_batches=4, batch_size=16, seed=0, num_noise_samples=64)
    g = torch.Generator().manual_seed(11)
    est, recon = brute_force_draws(base, batches, g)  # then g draws the random proposal below
    v_recon = recon.var(1).mean()
    v_t = (est / K).var(2).mean(1)
    ref = (float(v_t.sqrt().sum()) ** 2 + float(v_recon)) / 16
    assert noise_floor(batches) == pytest.approx(ref, rel=0.1)
    # Any fixed proposal does worse than the optimum p ~ sqrt(v) (the bound's own claim).
    for p in (torch.full((K,), 1.0 / K), torch.softmax(torch.randn(K, generator=g), 0)):
        assert float((v_t / p.double()).sum() + v_recon) / 16 >= ref * (1 - 1e-9)
    for s in ("uniform", "stratified", "importance", "importance-cv"):
        st = measure(with_sampler(base, s), batches, num_repeats=24, seed=2, grads=False)
        assert st.variance_given_x > 0.8 * ref, (s, st.variance_given_x, ref)
        assert abs(st.bias_sigma) < 3, (s, st.bias_sigma)  # the control variate's baseline included


@torch.no_grad()
def test_computed_uniform_variance_matches_brute_force_and_the_measured_one():
    """The uniform sampler's E_x Var(. | batch) computed from the exact evaluator's per-term means
    and noise variances (8 draws per term: its small-sample corrections matter) against the same
    formula with every term's mean and variance from 4000 draws here, and against the variance
    the bench measures by drawing t and eps (400 draws per batch)."""
    base = tiny_vdm()
    batches = exact_batches(base, pool(), None, num_batches=4, batch_size=16, seed=0, num_noise_samples=8)
    est, recon = brute_force_draws(base, batches, torch.Generator().manual_seed(12))
    second = (est**2).mean(2).mean(0)  # E_t E_eps (K L_t)^2
    first = est.mean(2).mean(0)
    var_i = recon.var(1) + second - first**2
    ref = float(var_i.reshape(len(batches), 16).sum(1).mean()) / 16**2
    assert uniform_variance(batches) == pytest.approx(ref, rel=0.1)
    measured = measure(with_sampler(base, "uniform"), batches, num_repeats=400, seed=2, grads=False)
    assert measured.variance_given_x == pytest.approx(ref, rel=0.15)
    # From 2 draws per term the corrections for the draws behind each mean matter: without
    # them the formula is far off
    two = exact_batches(base, pool(), None, num_batches=4, batch_size=16, seed=0, num_noise_samples=2)
    assert uniform_variance(two) == pytest.approx(ref, rel=0.15)
    for b in two:
        b.num_noise_samples = 10**9
    assert uniform_variance(two) > 1.15 * ref  # 1.20 x (corrected: 1.06 x; 1.01 x from 64 draws)


@torch.no_grad()
def test_computed_uniform_variance_in_continuous_time_is_the_measured_uniform_gamma():
    """Continuous time, linear schedule: uniform t is uniform gamma, and the quadrature nodes'
    weights are its probabilities: the computed variance against the measured one."""
    torch.manual_seed(0)
    cfg = VDMConfig(num_timesteps=0, architecture="mlp", mlp_hidden=16, mlp_layers=1, emb_dim=8,
                    timestep_sampler="uniform", gamma_min=-6.0, gamma_max=4.0)
    m = VDM(cfg, DataMeta(sample_shape=(D,), data_kind="spins"))
    with torch.no_grad():
        m.denoiser.net.out.weight.normal_(0, 0.5)
    m.eval()
    batches = exact_batches(m, pool(), None, num_batches=4, batch_size=16, seed=0, num_noise_samples=16,
                            num_quadrature_points=48)
    measured = measure(m, batches, num_repeats=400, seed=1, grads=False)
    assert uniform_variance(batches) == pytest.approx(measured.variance_given_x, rel=0.15)


def test_uniform_linear_baseline_of_a_learned_schedule_is_unbiased_at_the_learned_endpoints():
    """A continuous-time VDM with a learned schedule whose endpoints moved (-5.5, 3.2 instead of
    the configured -6, 4): the uniform-linear copy uses the linear schedule between the learned
    endpoints, so it estimates the same ELBO (the exact evaluator's, schedule-free given the
    endpoints) without bias; a copy at the configured endpoints would estimate another ELBO."""
    torch.manual_seed(0)
    cfg = VDMConfig(num_timesteps=0, architecture="mlp", mlp_hidden=16, mlp_layers=1, emb_dim=8, schedule="learned",
                    learn_endpoints=True, timestep_sampler="stratified", gamma_min=-6.0, gamma_max=4.0)
    m = VDM(cfg, DataMeta(sample_shape=(D,), data_kind="spins"))
    with torch.no_grad():
        m.denoiser.net.out.weight.normal_(0, 0.5)
        m.schedule.gamma_0.fill_(-5.5)
        m.schedule.gap_raw.fill_(math.log(math.expm1(8.7 - 0.01)))  # gap = softplus(gap_raw) + 0.01
    m.eval()
    g0, g1 = (float(g.detach()) for g in m.endpoints("cpu"))
    assert g0 == pytest.approx(-5.5) and g1 == pytest.approx(3.2, abs=1e-4)
    lin = with_sampler(m, "uniform-linear")
    assert lin.cfg.schedule == "linear" and (lin.cfg.gamma_min, lin.cfg.gamma_max) == (g0, g1)
    assert with_sampler(lin, "uniform-linear") is None  # linear already: nothing to add
    batches = exact_batches(m, pool(), None, num_batches=4, batch_size=16, seed=0, num_noise_samples=16,
                            num_quadrature_points=32)
    st = measure(lin, batches, num_repeats=48, seed=1, grads=False)
    assert abs(st.bias_sigma) < 3, st


@pytest.mark.parametrize("preset, num_timesteps, baseline", [("vdm_ising_t1000", 1000, "uniform"),
                                                             ("vdm_ising_learned", 0, "uniform-linear")])
def test_the_bench_presets_with_their_discrete_skip_train_and_bench_through_the_cli(
        tmp_path, ising_shards, preset, num_timesteps, baseline):
    """configs/vdm_ising_t1000.yaml (T = 1000) and configs/vdm_ising_learned.yaml (continuous time,
    a learned schedule), both with the discrete skip, through `pipeline train` (3 steps, a small
    UNet) and `pipeline bench variance` on the export: the skip's counts travel in the export,
    so the bench's model denoises the low-noise terms exactly, as the trained one does; the
    computed baseline is uniform t, or for the learned schedule uniform t on the linear one."""
    run_dir = tmp_path / "run"
    run_pipeline("train", "--config", f"configs/{preset}.yaml", f"run.dir={run_dir}",
                 f"data.train_urls={ising_shards}", "vdm.channels=4", "vdm.emb_dim=8", "data.batch_per_rank=16",
                 "data.num_workers=0", "train.num_steps=3", "train.checkpoint_every_steps=3", "train.warmup_steps=0",
                 "track.wandb=off", "track.progress_bar=false", timeout=300)
    skip = load_export(run_dir)[0].denoiser.skip
    assert isinstance(skip, DiscreteSkip) and float(skip.count) == 3 * 16  # 3 steps x 16 lattices
    assert skip.sums.shape == (2, 1, 8, 8) and float(skip.sums.sum()) == 3 * 16 * 64  # a level for every spin
    r = run_pipeline("bench", "variance", "--run", str(run_dir), "--num-batches", "1", "--num-repeats", "2",
                     "--exact-noise-samples", "2", "--batch-size", "8", "--no-grads", "--samplers", "uniform,stratified",
                     timeout=300)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["num_timesteps"] == num_timesteps and math.isfinite(out["exact_bpd"]) and out["exact_bpd"] > 0
    assert out["exact_baseline"] == baseline and out["exact_baseline_variance"] > 0
    assert math.isfinite(out["ratio_vs_exact_baseline"]) and out["ratio_vs_exact_baseline"] > 0
