"""Config loading: every shipped config validates; bad input fails before work, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from pangu.cli import main
from pangu.config import Config, config_from_dict, load_config
from pangu.schema import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.model.vocab_size in (2000, 40000)
    assert config_from_dict(config.to_dict()) == config  # what checkpoints store reads back


def test_original_layouts():
    big = load_config(CONFIGS[0].parent / "200b.yaml")
    assert (big.parallel.tp, big.parallel.pp, big.parallel.recompute) == (8, 16, "full")
    assert (big.model.num_layers, big.model.hidden_size, big.model.num_heads) == (64, 16384, 128)
    mid = load_config(CONFIGS[0].parent / "13b.yaml")
    assert (mid.parallel.tp, mid.parallel.pp) == (8, 1)


def test_overrides_are_typed():
    config = load_config(
        None,
        [
            "train.steps=7",
            "optim.warmup_steps=2",
            "optim.lr=1e-3",
            "model.dropout=0",
            "optim.name=adamw",
            "optim.betas=[0.9, 0.99]",
            "data.sources=[{kind: jsonl, path: x.jsonl, text_field: content}]",
        ],
    )
    assert config.train.steps == 7 and config.optim.lr == 1e-3 and config.model.dropout == 0.0
    assert config.optim.options.betas == (0.9, 0.99)
    assert config.data.sources[0].text_field == "content"


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.stpes=3", "unknown key 'train.stpes'. Did you mean 'steps'?"),
        ("modle.hidden_size=3", "unknown key 'modle'"),
        ("model.hidden_size=130", "model.hidden_size = 130 is not allowed: expected a multiple of model.num_heads (4)"),
        ("train.steps=ten", "train.steps = 'ten' is not allowed: expected an integer"),
        ("model.dropout=true", "model.dropout = True is not allowed: expected a finite number"),
        ("optim.lr=.inf", "optim.lr = inf is not allowed: expected a finite number"),
        ("optim.lr=.nan", "optim.lr = nan is not allowed: expected a finite number"),
        ("optim.name=lamb", "optim.name = 'lamb' is not allowed: expected one of 's3', 'adamw', 'sgd_si'"),
        ("parallel.tp=3", "parallel.tp = 3 is not allowed: expected a divisor of model.num_heads (4)"),
        (
            "train.global_batch_size=10",
            "train.global_batch_size = 10 is not allowed: expected a multiple of train.micro_batch_size (4)",
        ),
        ("data.sources=[{kind: parquet}]", "data.sources[0].path = '' is not allowed"),
        ("train.steps", "expected section.key=value"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.micro_batch_size=4", override])
    assert message in str(err.value)


def test_cli_reports_config_errors_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--config",
                str(CONFIGS[0].parent / "tiny.yaml"),
                "--set",
                "train.stpes=3",
                "--set",
                f"train.output_dir={out}",
            ]
        )
        == 2
    )
    assert "unknown key 'train.stpes'" in capsys.readouterr().err
    assert not out.exists()
    missing = tmp_path / "nope.yaml"
    assert main(["prepare", "--config", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_defaults_are_valid():
    Config().validate()


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.global_batch_size=0", "train.global_batch_size"),
        ("train.global_batch_size=-8", "train.global_batch_size"),
        ("data.tokenizer.train_sentences=-5", "data.tokenizer.train_sentences"),
        ("train.initial_loss_scale_power=4000", "train.initial_loss_scale_power"),
        ("train.initial_loss_scale_power=63", "train.initial_loss_scale_power"),
        ("train.seed=-1", "train.seed"),
        ("optim.p=0.5", "optim.p"),
        ("parallel.timeout_minutes=0", "parallel.timeout_minutes"),
        ("optim.lr=1e999", "optim.lr"),
        ("train.sdc_check.tolerance=1e-7", "train.sdc_check.tolerance"),
        ("train.sdc_check.tolerance=0", "train.sdc_check.tolerance"),
        ("train.sdc_check.fingerprint_interval=-1", "train.sdc_check.fingerprint_interval"),
        ("train.sdc_check.max_rollbacks=-1", "train.sdc_check.max_rollbacks"),
    ],
)
def test_every_number_is_checked_against_its_domain(override, field):
    with pytest.raises(ConfigError, match=f"{field} = .* is not allowed"):
        load_config(None, [override])


def test_a_config_that_is_not_utf8_is_one_clear_error(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("model:\n  num_layers: 4  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not valid UTF-8 YAML"):
        load_config(bad)


def test_a_directory_given_as_the_config_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_config(tmp_path)


def test_sdc_check_settings():
    config = load_config(
        None, ["train.sdc_check.action=rollback", "train.save_interval=50", "train.sdc_check.tolerance=1e-3"]
    )
    assert config.train.sdc_check.action == "rollback" and config.train.sdc_check.tolerance == 1e-3
    assert Config().train.sdc_check.enabled  # on by default: docs/sdc.md measures its cost
    with pytest.raises(ConfigError, match="train.sdc_check.action = 'retry' is not allowed: expected one of"):
        load_config(None, ["train.sdc_check.action=retry"])
    with pytest.raises(ConfigError, match=r"train.save_interval = 0 is not allowed: expected > 0 with train.sdc_check"):
        load_config(None, ["train.sdc_check.action=rollback"])
    load_config(None, ["train.sdc_check.action=rollback", "train.sdc_check.enabled=false"])  # off: nothing to roll back
