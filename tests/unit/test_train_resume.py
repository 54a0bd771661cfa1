"""Which config changes a resume refuses, names, or accepts silently (issue 15 item 3)."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, flat_config, load_config, save_config
from pipeline.data.meta import DataMeta
from pipeline.run_dir import RunDir
from pipeline.train.resume import check_resume, classify, classify_meta

BASE = ["run.dir=/tmp/r", "data.train_urls=/tmp/d", "train.num_steps=10"]
META = DataMeta(sample_shape=(1, 8, 8), data_kind="spins")


def _diff(*overrides: str, objective: str = "vdm"):
    old = flat_config(load_config(None, BASE + [f"objective={objective}"]))
    new = flat_config(load_config(None, BASE + [f"objective={objective}", *overrides]))
    errors, warnings = classify(old, new, objective)
    return [c.key for c in errors], [c.key for c in warnings]


@pytest.mark.parametrize("override, errors, warnings", [
    ("vdm.channels=32", ["vdm.channels"], []),
    ("vdm.schedule=cosine", ["vdm.schedule"], []),
    ("objective=gan", ["objective"], []),
    ("train.lr=0.1", [], ["train.lr"]),
    ("data.batch_per_rank=7", [], ["data.batch_per_rank"]),
    ("run.seed=3", [], ["run.seed"]),
    ("vdm.importance_uniform_mix=0.5", [], ["vdm.importance_uniform_mix"]),
    ("train.num_steps=1000", [], []),
    ("train.checkpoint_every_steps=7", [], []),
    ("track.wandb=off", [], []),
    ("run.dir=/elsewhere", [], []),
])
def test_classify(override, errors, warnings):
    assert _diff(override) == (errors, warnings)


def test_extending_a_run_with_a_cosine_decay_is_named():
    # the decay spans train.num_steps: a longer run changes the lr of the steps already planned
    decaying = BASE + ["objective=vdm", "train.min_lr_ratio=0.1"]
    old = flat_config(load_config(None, decaying))
    new = flat_config(load_config(None, decaying + ["train.num_steps=1000"]))
    errors, warnings = classify(old, new, "vdm")
    assert (errors, [str(c) for c in warnings]) == ([], ["train.num_steps: 10 -> 1000"])
    assert _diff("train.num_steps=1000") == ([], [])  # constant lr after warm-up: silent


def test_classify_ignores_the_section_of_the_objective_the_run_does_not_use():
    # load_config refuses such a key when the user sets it; a saved config.yaml holds them all.
    old = flat_config(load_config(None, BASE))
    assert classify(old, {**old, "gan.latent_dim": 3}, "vdm") == ([], [])


def test_classify_gan_section():
    assert _diff("gan.channels=[8, 16]", "gan.lr_d=0.1", objective="gan") == (["gan.channels"], ["gan.lr_d"])


def test_classify_meta_shapes_are_errors_label_values_a_warning():
    old = {"sample_shape": [1, 8, 8], "data_kind": "spins", "num_levels": None, "label_kind": "continuous",
           "num_classes": None, "label_values": [2.0, 3.0]}
    new = DataMeta(sample_shape=(1, 16, 16), data_kind="spins", label_kind="continuous", label_values=(2.0,))
    errors, warnings = classify_meta(old, new)
    assert [str(c) for c in errors] == ["data meta sample_shape: [1, 8, 8] -> [1, 16, 16]"]
    assert [c.key for c in warnings] == ["data meta label_values"]


def test_hash_ignores_what_a_resume_may_change_silently():
    a = load_config(None, BASE)
    assert a.hash() == load_config(None, BASE + ["train.num_steps=99", "train.log_every_steps=3"]).hash()
    assert a.hash() != load_config(None, BASE + ["run.seed=1"]).hash()


def test_check_resume_reads_only_and_names_keys(tmp_path):
    rd = RunDir(tmp_path / "run")
    cfg = load_config(None, BASE + [f"run.dir={rd.root}"])
    assert check_resume(cfg, META) == []  # no checkpoints: a fresh run, nothing to compare
    (rd.checkpoints / "step-00000005").mkdir(parents=True)
    (rd.checkpoints / "step-00000005" / "manifest.json").write_text("{}")
    save_config(cfg, rd.config)
    rd.export.mkdir()
    (rd.export / "export.json").write_text(json.dumps({"meta": {"sample_shape": [1, 8, 8], "data_kind": "spins"}}))
    saved = rd.config.read_bytes()
    assert check_resume(load_config(None, BASE + [f"run.dir={rd.root}", "train.num_steps=50"]), META) == []
    (warning,) = check_resume(load_config(None, BASE + [f"run.dir={rd.root}", "train.lr=0.1"]), META)
    assert "train.lr: 0.0002 -> 0.1" in warning
    with pytest.raises(ConfigError, match=r"vdm\.emb_dim: 64 -> 32.*data meta data_kind: 'spins' -> 'levels'"):
        check_resume(load_config(None, BASE + [f"run.dir={rd.root}", "vdm.emb_dim=32"]),
                     DataMeta(sample_shape=(1, 8, 8), data_kind="levels", num_levels=2))
    assert rd.config.read_bytes() == saved


def test_elastic_resume_keeping_the_global_batch_is_no_data_order_change(tmp_path, monkeypatch):
    """2 ranks x 8 -> 1 x 16 (or 1 x 8 x 2 micro steps) continues the same global batches: no
    warning about data.batch_per_rank / train.grad_accum_steps; another global batch still warns."""
    rd = RunDir(tmp_path / "run")
    cfg = load_config(None, BASE + [f"run.dir={rd.root}", "data.batch_per_rank=8"])
    (rd.checkpoints / "step-00000005").mkdir(parents=True)
    (rd.checkpoints / "step-00000005" / "manifest.json").write_text(json.dumps({"world_size": 2}))
    (rd.checkpoints / "latest").write_text("step-00000005\n")
    save_config(cfg, rd.config)

    def warnings(world_size: int, *overrides: str) -> list[str]:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        return check_resume(load_config(None, BASE + [f"run.dir={rd.root}", *overrides]), META)

    assert warnings(1, "data.batch_per_rank=16") == []
    assert warnings(1, "data.batch_per_rank=8", "train.grad_accum_steps=2") == []
    assert warnings(4, "data.batch_per_rank=4") == []
    (w,) = warnings(2, "data.batch_per_rank=16")  # global 32 != 16
    assert "data.batch_per_rank: 8 -> 16" in w
    (w,) = warnings(1, "data.batch_per_rank=16", "train.lr=0.1")  # the lr still warns, the split does not
    assert "train.lr" in w and "batch_per_rank" not in w
    monkeypatch.delenv("WORLD_SIZE")
    (rd.checkpoints / "latest").unlink()  # no readable newest checkpoint: the change is named
    (w,) = check_resume(load_config(None, BASE + [f"run.dir={rd.root}", "data.batch_per_rank=16"]), META)
    assert "data.batch_per_rank: 8 -> 16" in w


def test_keys_the_network_does_not_read_are_not_compared_but_named(tmp_path):
    """A UNet run whose config set the MLP's width (vdm.mlp_hidden, unread) resumes under a
    config that leaves it at the default; the UNet's own width still refuses. `pipeline
    train` names an inert key set to other than its default."""
    from pipeline.objectives.registry import inert_settings, set_inert_settings

    rd = RunDir(tmp_path / "run")
    unet = BASE + [f"run.dir={rd.root}", "vdm.architecture=unet"]
    (rd.checkpoints / "step-00000005").mkdir(parents=True)
    (rd.checkpoints / "step-00000005" / "manifest.json").write_text("{}")
    save_config(load_config(None, unet + ["vdm.mlp_hidden=512"]), rd.config)
    assert check_resume(load_config(None, unet), META) == []
    with pytest.raises(ConfigError, match=r"vdm\.channels: 16 -> 8"):
        check_resume(load_config(None, unet + ["vdm.channels=8"]), META)
    # the MLP (vectors) does not read the UNet's keys, and the UNet not the MLP's
    vectors = DataMeta(sample_shape=(5,), data_kind="continuous")
    importance = {"vdm.importance_history", "vdm.importance_uniform_mix", "vdm.importance_num_bins"}
    assert set(inert_settings(load_config(None, BASE), vectors)) == {
        "vdm.channels", "vdm.unet_levels", "vdm.periodic", "vdm.activation_checkpointing"} | importance
    assert set(inert_settings(load_config(None, BASE), META)) == {"vdm.mlp_hidden", "vdm.mlp_layers"} | importance
    # the importance samplers read their settings, but in discrete time not the number of bins
    imp = BASE + ["vdm.timestep_sampler=importance-cv"]
    assert set(inert_settings(load_config(None, imp), META)) == {"vdm.mlp_hidden", "vdm.mlp_layers",
                                                                 "vdm.importance_num_bins"}
    assert set(inert_settings(load_config(None, imp + ["vdm.num_timesteps=0"]), META)) == {
        "vdm.mlp_hidden", "vdm.mlp_layers"}
    (w,) = set_inert_settings(load_config(None, BASE + ["vdm.importance_history=20"]), META)
    assert w.startswith("vdm.importance_history=20 does not apply") and "keeps no loss history" in w
    (w,) = set_inert_settings(load_config(None, unet + ["vdm.mlp_hidden=512"]), META)
    assert w.startswith("vdm.mlp_hidden=512 does not apply") and "get the unet" in w
    assert set_inert_settings(load_config(None, unet), META) == []
    assert set_inert_settings(load_config(None, BASE + ["objective=gan"]), META) == []
