"""Training config: YAML, dotted overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepwhale.train.config import TrainConfig, TrainConfigError, load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "train"


def test_defaults_and_round_trip():
    cfg = TrainConfig()
    assert cfg.optim.lr == 3e-4 and cfg.schedule.stage_lrs == [1e-5, 5e-6, 1e-6]
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", ["debug.yaml", "demo-v3.yaml", "lora-gsm8k.yaml"])
def test_examples_load(name):
    cfg = load_config(EXAMPLES / name)
    assert cfg.model.name


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1.0e-3\ntrain:\n  steps: 5\n")
    cfg = load_config(
        p,
        [
            "optim.lr=3e-4",  # YAML reads this as a string; the field type makes it a float
            "--train.micro_batch_size=2",
            "schedule.name=staged",
            "schedule.stage_steps=[10, 20]",
            "lora.target_modules=q_proj,v_proj",
            "model.vocab_size=null",
            "log.quiet=yes",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 5 and cfg.train.micro_batch_size == 2
    assert cfg.schedule.stage_steps == [10, 20]
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.vocab_size is None and cfg.log.quiet is True


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optim.learning_rate=1"], "unknown config key 'optim.learning_rate'"),
        (["optim.learning_rate=1"], "lr, weight_decay"),
        (["trainer.steps=1"], "unknown config key 'trainer'"),
        (["train.steps=abc"], "train.steps: expected an integer"),
        (["train.steps=0"], "train.steps: must be > 0"),
        (["optim.lr=fast"], "optim.lr: expected a number"),
        (["log.quiet=maybe"], "log.quiet: expected true or false"),
        (["schedule.name=linear"], "schedule.name: 'linear' is not one of"),
        (["schedule.name=staged"], "schedule.stage_steps: needs 2 boundaries"),
        (["schedule.name=staged", "schedule.stage_steps=[5, 3]"], "increasing"),
        (["optim=3"], "optim: expected a mapping"),
        (["train.steps"], "must look like section.key=value"),
        (["schedule.stage_lrs=3"], "expected a list"),
        (["model.name=[1]"], "model.name: expected a string"),
    ],
)
def test_bad_keys_and_values(overrides, needle):
    with pytest.raises(TrainConfigError, match=None) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(TrainConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [\n")
    with pytest.raises(TrainConfigError, match="malformed YAML"):
        load_config(bad)
    bad.write_text("model:\n  name: [debug\ntrain: {steps: 3}\n")
    with pytest.raises(TrainConfigError, match=r"bad.yaml:3: malformed YAML \(expected") as e:
        load_config(bad)
    assert "\n" not in str(e.value)  # one line
    bad.write_bytes(b"out_dir: caf\xe9\n")
    with pytest.raises(TrainConfigError, match=r"bad.yaml: not UTF-8 text \(byte offset 12\)"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(TrainConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_package_exports_trainer_lazily():
    import deepwhale.train as train

    assert train.Trainer.__name__ == "Trainer"
    with pytest.raises(AttributeError):
        train.NoSuchThing  # noqa: B018
