import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, parse_overrides

BASE = ["run.dir=/tmp/r", "data.train_urls=/tmp/d", "train.num_steps=10"]


def test_overrides_are_typed_yaml_scalars():
    tree = parse_overrides(["train.num_steps=200", "run.dir=/tmp/r", "train.grad_clip_norm=null", "track.tags=[a, b]"])
    assert tree == {"train": {"num_steps": 200, "grad_clip_norm": None}, "run": {"dir": "/tmp/r"}, "track": {"tags": ["a", "b"]}}


def test_preset_and_overrides_resolve():
    cfg = load_config("configs/quickstart.yaml", ["train.num_steps=70", "run.dir=/tmp/x", "train.lr=1"])
    assert cfg.train.num_steps == 70 and cfg.run.dir == "/tmp/x"
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0  # int widened to float


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.bogus=1", "unknown config key 'train.bogus'"),
        ("bogus.key=1", "unknown config key 'bogus'"),
        ("train.num_steps=abc", "train.num_steps='abc' has the wrong type; expected an integer"),
        ("train.num_steps=1.5", "train.num_steps=1.5 has the wrong type; expected an integer"),
        ("train.num_steps=true", "expected an integer"),
        ("engine.backend=horovod", "allowed: 'accelerate', 'deepspeed'"),
        ("train.num_steps=0", "train.num_steps must be a positive integer"),
        ("train.warmup_steps=11", "train.warmup_steps must be in [0, train.num_steps=10]"),
        ("train.ema_decay=1.0", "train.ema_decay must be in [0, 1)"),
        ("engine.offload_optimizer=true", "needs engine.backend=deepspeed"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + [override])
    assert needle in str(e.value)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="required config key\\(s\\) missing in section 'train': num_steps"):
        load_config(None, ["run.dir=/tmp/r", "data.train_urls=/tmp/d", "train.lr=0.1"])


def test_hash_ignores_run_dir_but_not_hyperparameters():
    a = load_config(None, BASE)
    b = load_config(None, BASE + ["run.dir=/elsewhere"])
    c = load_config(None, BASE + ["train.lr=0.1"])
    assert a.hash() == b.hash() != c.hash()


def test_cli_exits_nonzero_with_message_before_any_process_group(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", "configs/quickstart.yaml", "train.nope=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert "unknown config key 'train.nope'" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--config", "configs/quickstart.yaml", "train.num_steps=ten"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2 and "train.num_steps='ten'" in r.stderr


def test_on_off_yes_no_stay_strings(tmp_path):
    """YAML 1.1 would turn `off` into False and reject track.wandb=off; we use 1.2 booleans."""
    assert parse_overrides(["track.wandb=off", "a=yes", "b=true", "c=False"]) == {
        "track": {"wandb": "off"}, "a": "yes", "b": True, "c": False}
    cfg = load_config(None, BASE + ["track.wandb=off"])
    assert cfg.track.wandb == "off"
    preset = tmp_path / "p.yaml"
    preset.write_text("run: {dir: /tmp/r}\ndata: {train_urls: /tmp/d}\ntrain: {num_steps: 3}\ntrack: {wandb: off}\n")
    assert load_config(preset).track.wandb == "off"
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(None, BASE + ["track.progress_bar=yes"])


def test_fsdp_needs_the_accelerate_backend_and_fp32():
    assert load_config(None, BASE + ["engine.fsdp=full_shard"]).engine.fsdp == "full_shard"
    assert load_config(None, BASE + ["engine.fsdp=shard_grad_op"]).engine.fsdp == "shard_grad_op"
    with pytest.raises(ConfigError, match=r"engine.fsdp='full_shard' needs engine.backend=accelerate; with DeepSpeed"):
        load_config(None, BASE + ["engine.fsdp=full_shard", "engine.backend=deepspeed"])
    with pytest.raises(ConfigError, match=r"supports engine.mixed_precision 'no' or 'bf16', got 'fp16'"):
        load_config(None, BASE + ["engine.fsdp=shard_grad_op", "engine.mixed_precision=fp16"])
    assert load_config(None, BASE + ["engine.fsdp=full_shard", "engine.mixed_precision=bf16"]).engine.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="allowed: 'off', 'full_shard', 'shard_grad_op'"):
        load_config(None, BASE + ["engine.fsdp=hybrid"])


def test_fsdp_from_the_launcher_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="ACCELERATE_USE_FSDP"):
        load_config(None, BASE)
    load_config(None, BASE + ["engine.backend=deepspeed"])  # DeepSpeed ignores Accelerate's FSDP switch


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("2E5", 2e5), ("+1.5e+3", 1.5e3), (".5e-2", 5e-3)])
def test_exponent_floats_without_a_dot_are_numbers_in_overrides_and_yaml(tmp_path, text, value):
    # YAML 1.2 reads these as floats; YAML 1.1 (PyYAML's default) as strings.
    cfg = load_config(None, BASE + [f"train.lr={text}"])
    assert cfg.train.lr == value
    preset = tmp_path / "p.yaml"
    preset.write_text(f"train:\n  lr: {text}\n  num_steps: 10\nrun:\n  dir: /tmp/r\ndata:\n  train_urls: /tmp/d\n")
    assert load_config(preset).train.lr == value


def test_integers_and_words_stay_what_they_were():
    assert parse_overrides(["a.b=12", "a.c=1e", "a.d=e5", "a.e=off"]) == {"a": {"b": 12, "c": "1e", "d": "e5", "e": "off"}}


# ---------------------------------------------------------------- issue 15 item 5: keys an objective does not read


@pytest.mark.parametrize("objective, overrides, needles", [
    ("gan", ["train.lr=0.5"], ["train.lr (a GAN's learning rates are gan.lr_d and gan.lr_g)"]),
    ("gan", ["vdm.channels=8", "vdm.num_timesteps=3"], ["vdm.channels (the vdm section", "vdm.num_timesteps"]),
    ("vdm", ["gan.lr_d=0.1"], ["gan.lr_d (the gan section is read only with objective=gan; objective=vdm reads"]),
])
def test_a_key_the_objective_does_not_read_is_refused_naming_what_it_reads(objective, overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(None, BASE + [f"objective={objective}", *overrides])
    msg = str(e.value)
    assert f"objective={objective} does not read these keys" in msg
    for needle in needles:
        assert needle in msg


def test_only_keys_the_user_set_are_refused_not_defaults(tmp_path):
    # Defaults of both sections and of train.lr are always there; only set keys count.
    cfg = load_config(None, BASE + ["objective=gan", "gan.lr_d=0.1", "train.betas=[0.5, 0.9]"])
    assert cfg.gan.lr_d == 0.1 and cfg.train.lr == 2e-4
    assert load_config(None, BASE + ["train.lr=0.1", "vdm.channels=8"]).train.lr == 0.1
    # ... in the YAML as on the command line: quickstart.yaml sets train.lr and vdm.*.
    with pytest.raises(ConfigError, match=r"train\.lr \(a GAN's.*vdm\.num_timesteps"):
        load_config("configs/quickstart.yaml", ["objective=gan"])
    yml = tmp_path / "gan.yaml"
    yml.write_text("run: {dir: /tmp/r}\ndata: {train_urls: /tmp/d}\ntrain: {num_steps: 3, lr: 0.5}\nobjective: gan\n")
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(yml)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).parents[2] / "configs").glob("*.yaml")))
def test_every_preset_sets_only_keys_its_objective_reads(preset):
    load_config(Path(__file__).parents[2] / "configs" / f"{preset}.yaml")


# ---------------------------------------------------------------- issue 15 item 8: credentials in config values


def test_credentials_in_values_are_redacted_from_what_a_run_writes(tmp_path, monkeypatch):
    from pipeline.config import flat_config, read_saved_config, redacted_keys, save_config

    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # the shape of an AWS secret access key
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    urls = f"pipe:aws s3 cp s3://b/shard-000.tar - --secret {secret}"
    inline = "pipe:env AWS_SECRET_ACCESS_KEY=abcdef123456 aws s3 cp s3://b/x.tar -"
    cfg = load_config(None, BASE[1:] + [f"run.dir={tmp_path}", f"data.train_urls={urls}", f"data.val_urls={inline}"])
    assert redacted_keys(cfg) == ["data.train_urls", "data.val_urls"]
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert secret not in text and "abcdef123456" not in text
    assert "--secret <redacted>" in text and "AWS_SECRET_ACCESS_KEY=<redacted>" in text
    # The run itself keeps the real value; a resume compares redacted with redacted.
    assert cfg.data.train_urls == urls
    assert read_saved_config(tmp_path / "config.yaml") == flat_config(cfg)
    # Paths and ordinary values are not secrets.
    assert redacted_keys(load_config(None, BASE)) == []


def test_a_config_error_on_a_rank_other_than_0_is_said_by_that_rank_when_rank_0_does_not(monkeypatch, capsys):
    """Rank 0 reports a ConfigError; another rank waits for the launcher to end it (rank 0
    failed too) and, when that does not come, says it itself (issue 15 item 10)."""
    import signal

    import pipeline.cli as cli

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "_RANK0_REPORT_WAIT_S", 0.01)
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", "--config", "configs/quickstart.yaml", "train.nope=1"]) == 2
    assert capsys.readouterr().err.startswith("pipeline train: error (rank 1): unknown config key 'train.nope'")
    assert signal.getsignal(signal.SIGTERM) == handler
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", "--config", "configs/quickstart.yaml", "train.nope=1"]) == 2
    assert capsys.readouterr().err.startswith("pipeline train: error: unknown config key 'train.nope'")


def test_a_vdm_mlp_narrower_than_its_samples_without_a_skip_is_named():
    """The calorimeter MLP (512 wide, 6480 values, no skip) trained and then sampled NaNs; such a
    config now gets a named warning with its fix, and only such a config."""
    from pipeline.data.meta import DataMeta
    from pipeline.objectives.registry import data_warnings

    vectors = DataMeta(sample_shape=(300,), data_kind="continuous")
    (w,) = data_warnings(load_config(None, BASE), vectors)  # default vdm.mlp_hidden 128 < 300
    assert "vdm.mlp_hidden=128 is narrower than the samples' 300 values" in w and "vdm.skip=gaussian" in w
    assert data_warnings(load_config(None, BASE + ["vdm.skip=gaussian"]), vectors) == []
    assert data_warnings(load_config(None, BASE + ["vdm.mlp_hidden=300"]), vectors) == []
    assert data_warnings(load_config(None, BASE), DataMeta(sample_shape=(2,), data_kind="continuous")) == []
    fields = DataMeta(sample_shape=(1, 16, 16), data_kind="continuous")  # auto: the UNet
    assert data_warnings(load_config(None, BASE), fields) == []
    (w,) = data_warnings(load_config(None, BASE + ["vdm.architecture=mlp"]), fields)
    assert "256 values (shape (1, 16, 16))" in w
    assert data_warnings(load_config(None, BASE + ["objective=gan"]), vectors) == []
