"""GANs trained for real through the shared loop: presets, 1 vs 2 processes, DeepSpeed ZeRO-2,
W&B balance metrics, EMA export and `pipeline sample` for every kind of conditioning.

What "2 processes give the same result as 1" means here (test_two_ranks_train_like_one_rank):
DDP averages the ranks' gradients, so 2 ranks x B equal 1 rank x 2B when both see the same
global batch of data and the same latent noise. The data stream's order depends on the world
size, so the data set is made exactly one global batch (16 lattices, no validation split):
every batch of every phase is then the whole set, whatever the split; D's and G's losses are
means over it, so the order does not matter. The noise is made independent of the split by
``gan.latent_seed`` (the global batch's latents drawn once, each rank using its slice). The
model is unconditional, since a conditional G pairs each latent with the label at the same
position, which the order would change; the R1 penalty is on, so its double backward runs
under DDP too. Under these conditions the whole trajectory - every
logged loss and the D, G and EMA weights after 3 steps - must agree up to float summation order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import accelerate_launch, run_pipeline
from tests.integration.test_exact_resume import phase_state

# One xdist worker runs the whole module, so its module-scoped fixture runs once, not once per
# worker (Makefile, TEST_WORKERS).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("gan_training")]

TINY = ["gan.channels=[8,16]", "gan.latent_dim=8", "train.log_every_steps=1", "data.num_workers=0",
        "track.progress_bar=false", "train.num_sample_images=16"]
BALANCE = ("d/d_real", "d/d_fake", "d/loss_d", "g/loss_g", "g/d_fake", "d/js_estimate", "d/grad_norm",
           "g/grad_norm", "d/d_dominates", "d/diversity_ratio", "d/g_collapsed", "d/fake_detected_fraction")


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "event" not in r]


def _shards(out: Path, *args: str) -> Path:
    from pipeline.cli import main  # in-process: the same CLI, without an interpreter start-up each

    assert main(["shards", *args, "--out", str(out)]) == 0
    return out


def _refused(capsys, *args: str) -> str:
    """`pipeline ARGS` in-process must fail with a user error (exit 2); returns its message."""
    from pipeline.cli import main

    capsys.readouterr()
    assert main(list(args)) == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gan-data")
    return {
        # exactly one global batch (16) of training lattices: see the module docstring
        "one_batch": _shards(d / "ising-16", "ising", "--temperature", "2.5", "--size", "8", "--num-samples", "16",
                             "--val-fraction", "0", "--samples-per-shard", "8"),
        "multi_t": _shards(d / "ising-multiT", "ising", "--temperature", "2.0", "2.5", "3.0", "--size", "8",
                           "--num-samples", "64", "--samples-per-shard", "64"),
        "digits": _shards(d / "digits", "digits"),
        "gmm": _shards(d / "gmm", "gmm", "--dim", "2", "--num-components", "4", "--num-samples", "512"),
    }


def _params(ckpt: Path, phase: str) -> dict[str, torch.Tensor]:
    return phase_state(ckpt, phase)["model"]


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_two_ranks_train_like_one_rank_with_the_doubled_batch(tmp_path, data, capsys):
    from pipeline.track.wandb_reader import read_history

    common = ["train", "--config", "configs/gan_ising.yaml", f"data.train_urls={data['one_batch']}",
              "data.label_key=null", "gan.conditional=false", "gan.latent_seed=7", "gan.r1_weight=1.0",
              # FiLM needs labels; feature matching is per rank (not split-invariant). The
              # Bernoulli draws, noise inputs and D's lattice observables stay on: split-invariant.
              "gan.g_film=false", "gan.g_observable_matching=0",
              "train.num_steps=3",
              "train.checkpoint_every_steps=1", *TINY]
    one, two = tmp_path / "one", tmp_path / "two"
    run_pipeline(*common, f"run.dir={one}", "data.batch_per_rank=16", "track.wandb=off")
    accelerate_launch(2, *common, f"run.dir={two}", "data.batch_per_rank=8", "track.wandb=offline")

    # Every logged loss and balance figure, step by step (each is a mean over the global batch).
    r1, r2 = _rows(one), _rows(two)
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == [1, 2, 3]
    for a, b in zip(r1, r2):
        for key in ("d/loss_d", "g/loss_g", "d/d_real", "d/d_fake", "d/js_estimate", "d/gradient_penalty",
                    "g/d_fake", "d/grad_norm", "g/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
        assert a["train/samples_seen"] == b["train/samples_seen"]

    # D, G and G's EMA after 3 steps. The tolerance is set against how far training moves the
    # weights between step 1 and step 3 (the test would pass trivially if they did not move).
    ckpt = "checkpoints/step-{:08d}"
    for phase in ("d", "g"):
        moved = _max_abs_diff(_params(one / ckpt.format(1), phase), _params(one / ckpt.format(3), phase))
        diff = _max_abs_diff(_params(one / ckpt.format(3), phase), _params(two / ckpt.format(3), phase))
        assert moved > 1e-4, (phase, moved)
        assert diff < 1e-6, (phase, diff, moved)
    ema1, ema2 = (load_file(str(r / "export" / "weights.safetensors")) for r in (one, two))
    assert _max_abs_diff(ema1, ema2) < 1e-6

    # The balance metrics reach W&B (offline run read back from its .wandb file).
    history = [h for h in read_history(two) if "d/loss_d" in h]
    assert [h["_step"] for h in history] == [1, 2, 3]
    for key in (*BALANCE, "d/gradient_penalty"):
        assert all(np.isfinite(h[key]) for h in history), key
    assert history[-1]["d/loss_d"] == pytest.approx(r2[-1]["d/loss_d"], rel=1e-6)
    # js_estimate = (log 4 - game loss) / 2 (Goodfellow et al. 2014, Thm. 1); loss_d also holds
    # the preset's R1 term gamma/2 * gradient_penalty (both averaged the same way over ranks).
    gamma = yaml.safe_load((two / "config.yaml").read_text())["gan"]["r1_weight"]
    for h in history:
        game = h["d/loss_d"] - 0.5 * gamma * h.get("d/gradient_penalty", 0.0)
        assert h["d/js_estimate"] == pytest.approx((np.log(4.0) - game) / 2, abs=1e-5)

    # Unconditional sampling from the EMA export: +-1 lattices; a label is refused.
    out = tmp_path / "uncond.npy"
    run_pipeline("sample", "--run", str(two), "--num-samples", "6", "--out", str(out))
    x = np.load(out)
    assert x.shape == (6, 1, 8, 8) and set(np.unique(x)) <= {-1.0, 1.0}
    assert "unconditional" in _refused(capsys, "sample", "--run", str(two), "--num-samples", "6", "--out",
                                       str(tmp_path / "no.npy"), "--label", "2.5")


def test_conditional_ising_preset_under_deepspeed_zero2_trains_resumes_and_samples(tmp_path, data):
    from pipeline.track.wandb_reader import read_history

    run = tmp_path / "ds"
    common = ["train", "--config", "configs/gan_ising.yaml", f"run.dir={run}", f"data.train_urls={data['multi_t']}",
              "engine.backend=deepspeed", "engine.zero_stage=2", "data.batch_per_rank=8", "track.wandb=offline",
              "train.checkpoint_every_steps=2", *TINY]
    accelerate_launch(2, *common, "train.num_steps=2")
    manifest = json.loads((run / "checkpoints" / "step-00000002" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    second = accelerate_launch(2, *common, "train.num_steps=4")
    assert "resumed from step 2" in second.stdout
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # continuous: no step trained twice
    assert rows[-1]["train/samples_seen"] == 4 * 2 * 8

    history = [h for h in read_history(run) if "d/loss_d" in h]
    assert sorted(h["_step"] for h in history) == [1, 2, 3, 4]
    for key in BALANCE:
        assert all(np.isfinite(h[key]) for h in history), key
    assert all(0.0 < h["d/d_real"] < 1.0 and 0.0 < h["d/d_fake"] < 1.0 for h in history)

    # The EMA export is what `pipeline sample` loads: G only, conditional on the temperature.
    exported = load_file(str(run / "export" / "weights.safetensors"))
    assert exported and all(k.startswith("G.") for k in exported)
    x = {}
    for t in ("2.0", "3.0"):
        out = tmp_path / f"T{t}.npy"
        run_pipeline("sample", "--run", str(run), "--num-samples", "32", "--label", t, "--seed", "1", "--out", str(out))
        x[t] = np.load(out)
        assert x[t].shape == (32, 1, 8, 8) and set(np.unique(x[t])) <= {-1.0, 1.0}
    # The CLI samples are the exported G's seeded draws; for the same latents the temperature
    # moves G's mean spins (after 4 steps too little to flip many of the drawn spins reliably).
    from pipeline.train.export import load_export, sample_from

    module, _, _ = load_export(run)
    for t in ("2.0", "3.0"):
        want = sample_from(module, 32, torch.full((32,), float(t)), seed=1).numpy()
        np.testing.assert_array_equal(x[t], want)
    h = torch.randn(32, module.G.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        means = {t: module.G(h, torch.full((32,), t)) for t in (2.0, 3.0)}
    assert (means[2.0] - means[3.0]).abs().max() > 1e-4

    # `pipeline evaluate` runs on the GAN export (figures are meaningless after 4 steps).
    r = run_pipeline("evaluate", "--run", str(run), "--data", str(data["multi_t"]), "--num-samples", "32")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["evaluation"] == "ising" and result["objective"] == "gan"
    assert sorted(result["temperatures"]) == [2.0, 2.5, 3.0]


def test_class_conditional_digits_preset_trains_and_samples_a_chosen_class(tmp_path, data, capsys):
    run = tmp_path / "digits"
    run_pipeline("train", "--config", "configs/gan_digits.yaml", f"run.dir={run}",
                 f"data.train_urls={data['digits']}", "data.batch_per_rank=16", "train.num_steps=4",
                 "track.wandb=off", *TINY)
    rows = _rows(run)
    assert all(np.isfinite(r["d/loss_d"]) and np.isfinite(r["g/loss_g"]) for r in rows)
    out = tmp_path / "threes.npy"
    run_pipeline("sample", "--run", str(run), "--num-samples", "10", "--label", "3", "--out", str(out))
    x = np.load(out)
    # digits are 17 grey levels: integers 0..16
    assert x.shape == (10, 1, 8, 8) and np.array_equal(x, np.round(x)) and x.min() >= 0 and x.max() <= 16
    assert "0..9" in _refused(capsys, "sample", "--run", str(run), "--num-samples", "2", "--label", "10", "--out",
                              str(tmp_path / "no.npy"))


def test_unconditional_gmm_preset_trains_wgan_gp_and_samples_points(tmp_path, data):
    run = tmp_path / "gmm"
    run_pipeline("train", "--config", "configs/gan_gmm.yaml", f"run.dir={run}", f"data.train_urls={data['gmm']}",
                 "data.batch_per_rank=32", "train.num_steps=3", "gan.channels=[16,16]", "gan.latent_dim=2",
                 "track.wandb=off", *TINY[2:])
    rows = _rows(run)
    for r in rows:
        for key in ("d/loss_d", "g/loss_g", "d/wasserstein_estimate", "d/gradient_penalty"):
            assert np.isfinite(r[key]), key
    out = tmp_path / "points.npy"
    run_pipeline("sample", "--run", str(run), "--num-samples", "50", "--out", str(out))
    x = np.load(out)
    assert x.shape == (50, 2) and np.isfinite(x).all() and x.std(axis=0).min() > 0


# ---------------------------------------------------------------------------------------
# In-process checks of the two pieces the runs above rely on (no launch, < 1 s).


def test_r1_penalty_of_a_linear_discriminator_is_its_squared_weight_norm():
    from pipeline.objectives.gan.losses import r1_penalty

    # D(x) = <w, x> + b has grad_x D = w everywhere, so E ||grad_x D||^2 = ||w||^2 exactly.
    w = torch.tensor([0.5, -2.0, 1.5, 3.0])
    x = torch.randn(7, 1, 2, 2, requires_grad=True)
    logits = x.flatten(1) @ w + 0.3
    assert float(r1_penalty(logits, x)) == pytest.approx(float(w.pow(2).sum()), rel=1e-6)
    # and it is differentiable w.r.t. D's parameters (create_graph): d||w||^2/dw = 2w
    wp = w.clone().requires_grad_(True)
    r1_penalty(x.flatten(1) @ wp, x).backward()
    assert torch.allclose(wp.grad, 2 * w)


def test_latent_seed_noise_does_not_depend_on_how_the_global_batch_is_split():
    from pipeline.data.meta import DataMeta
    from pipeline.objectives.base import StepContext
    from pipeline.objectives.gan import DStep, GANConfig, GStep, build_nets

    meta = DataMeta(sample_shape=(1, 8, 8), data_kind="spins")

    def latents(cfg: GANConfig, rank: int, world: int, n: int, step: int, calls: int) -> list[torch.Tensor]:
        G, D = build_nets(cfg, meta)
        out = []
        for phase in (DStep(D, G, cfg, meta), GStep(G, D, cfg, meta)):
            for _ in range(calls):  # e.g. n_critic repeats within one loop step
                noise = phase._noise(StepContext(step, 0, 1, rank, world))
                out.append(phase._latent(n, torch.device("cpu"), G, noise))
        return out

    cfg = GANConfig(latent_dim=3, channels=[4], latent_seed=11)
    whole = latents(cfg, 0, 1, 8, step=5, calls=2)
    halves = [latents(cfg, r, 2, 4, step=5, calls=2) for r in (0, 1)]
    for i, h in enumerate(whole):
        assert torch.equal(h, torch.cat([halves[0][i], halves[1][i]]))
    # distinct for each phase, repeat and step; without latent_seed the ranks' own RNGs decide
    assert all(not torch.equal(whole[i], whole[j]) for i in range(4) for j in range(i))
    assert not torch.equal(whole[0], latents(cfg, 0, 1, 8, step=6, calls=1)[0])
    torch.manual_seed(0)
    unseeded = latents(GANConfig(latent_dim=3, channels=[4]), 0, 1, 8, step=5, calls=1)[0]
    assert not torch.equal(unseeded, whole[0])
