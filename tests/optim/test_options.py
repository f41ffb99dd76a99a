"""Each optimizer's options live with its registry entry: the strict loader reads them from the
optim section (where users write them), refuses those of other optimizers, and a stored config
of any version reads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pangu.config import config_from_dict, load_config
from pangu.optim.registry import AdamWOptions, S3Options, ScaleInvariantOptions, build_optimizer
from pangu.schema import ConfigError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SCALE_INVARIANT_MODEL = ["model.scale_invariant=true", "model.final_layernorm=after"]
SGD_SI = [*SCALE_INVARIANT_MODEL, "optim.name=sgd_si"]
SHARED = "name, lr, weight_decay, fused, warmup_steps, decay, min_lr_ratio, grad_clip"


def test_options_are_read_where_users_write_them(tmp_path):
    assert load_config(None, ["optim.p=2", "optim.nesterov=false"]).optim.options == S3Options(p=2.0, nesterov=False)
    config = tmp_path / "adamw.yaml"
    config.write_text("optim:\n  name: adamw\n  lr: 1e-4\n  betas: [0.8, 0.99]\n  eps: 1e-6\n")
    optim = load_config(config).optim
    assert (optim.lr, optim.options) == (1e-4, AdamWOptions(betas=(0.8, 0.99), eps=1e-6))
    optim = load_config(None, [*SGD_SI, "optim.si_other=adamw", "optim.betas=[0.5, 0.6]", "optim.si_clip_c=2"]).optim
    assert optim.options == ScaleInvariantOptions(si_clip_c=2.0, other=AdamWOptions(betas=(0.5, 0.6)))
    assert optim.options.si_other == "adamw"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["optim.betas=[0.9, 0.99]"],
            "unknown key 'optim.betas' for optim.name = 's3' (an option of 'adamw'; each optimizer reads only its "
            f"own). Did you mean 'beta'? Allowed keys of optim for s3: {SHARED}, beta, p, nesterov, eps",
        ),
        (
            ["optim.name=adamw", "optim.nesterov=false"],
            "unknown key 'optim.nesterov' for optim.name = 'adamw' (an option of 's3', 'sgd_si'; ",
        ),
        (["optim.si_lr=0.1"], "unknown key 'optim.si_lr' for optim.name = 's3' (an option of 'sgd_si'; "),
        (
            [*SGD_SI, "optim.si_other=adamw", "optim.p=2"],
            f"unknown key 'optim.p' for optim.name = 'sgd_si' (an option of 's3'; each optimizer reads only its own). "
            f"Allowed keys of optim for sgd_si: {SHARED}, si_lr, si_weight_decay, si_clip_c, si_other, betas, eps",
        ),
        (["optim.nestrov=false"], "unknown key 'optim.nestrov' for optim.name = 's3'. Did you mean 'nesterov'?"),
        (["optim.options={p: 2}"], "unknown key 'optim.options' for optim.name = 's3'."),
    ],
)
def test_a_key_that_is_not_an_option_of_the_chosen_optimizer_is_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.nesterov=maybe"], "optim.nesterov = 'maybe' is not allowed: expected true or false"),
        (["optim.p=0.5"], "optim.p = 0.5 is not allowed: expected >= 1"),
        (["optim.beta=1"], "optim.beta = 1.0 is not allowed: expected in [0, 1)"),
        (["optim.name=adamw", "optim.betas=[0.9]"], "optim.betas = [0.9] is not allowed: expected a list of 2"),
        (["optim.name=adamw", "optim.betas=[0.9, 1]"], "optim.betas = (0.9, 1.0) is not allowed: expected two numbers"),
        (["optim.name=adamw", "optim.eps=-1"], "optim.eps = -1.0 is not allowed: expected >= 0"),
        ([*SGD_SI, "optim.si_other=sgd"], "optim.si_other = 'sgd' is not allowed: expected one of 's3', 'adamw'"),
        ([*SGD_SI, "optim.si_clip_c=-1"], "optim.si_clip_c = -1.0 is not allowed: expected >= 0 (0 disables)"),
        ([*SGD_SI, "optim.si_lr=0"], "optim.si_lr = 0.0 is not allowed: expected > 0"),
        ([*SGD_SI, "optim.beta=2"], "optim.beta = 2.0 is not allowed: expected in [0, 1)"),
        (["optim.name=[s3]"], "optim.name = ['s3'] is not allowed: expected one of 's3', 'adamw', 'sgd_si'"),
    ],
)
def test_wrong_types_and_values_of_options_are_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["optim.p=2"],
        ["optim.name=adamw", "optim.betas=[0.8, 0.9]"],
        [*SGD_SI, "optim.si_lr=0.5"],
        [*SGD_SI, "optim.si_other=adamw", "optim.eps=1e-6"],
    ],
)
def test_to_dict_writes_the_options_beside_the_shared_keys_and_reads_back(overrides, tmp_path):
    config = load_config(None, overrides)
    section = config.to_dict()["optim"]
    assert list(section)[: len(SHARED.split(", "))] == SHARED.split(", ")
    assert set(section) - set(SHARED.split(", ")) == set(type(config.optim.options).keys(section))
    assert config_from_dict(config.to_dict()) == config
    (tmp_path / "config.yaml").write_text(config.dump())
    assert load_config(tmp_path / "config.yaml") == config


def test_the_options_reach_the_optimizer():
    import torch

    weights = [
        ("blocks.0.attention.dense.weight", torch.nn.Parameter(torch.ones(2, 2))),
        ("word_embeddings.weight", torch.nn.Parameter(torch.ones(3, 2))),
    ]
    s3 = build_optimizer(load_config(None, ["optim.p=2", "optim.beta=0.5"]).optim, weights, no_decay=[])
    assert (s3.defaults["p"], s3.defaults["beta"]) == (2.0, 0.5)
    optim = load_config(None, [*SGD_SI, "optim.si_other=adamw", "optim.betas=[0.8, 0.9]", "optim.si_lr=0.25"]).optim
    sgd_si = build_optimizer(optim, weights, no_decay=[], scale_invariant=["blocks.0.attention.dense.weight"])
    assert sgd_si.other == "adamw" and sgd_si.defaults["betas"] == (0.8, 0.9)
    assert [(g["name"], g.get("lr")) for g in sgd_si.param_groups] == [("decay", 1e-3), ("scale_invariant", 0.25)]


def test_a_stored_config_with_every_optimizers_keys_reads_back():
    """Configs stored before options moved to their optimizers hold every optimizer's keys in
    their optim section (tests/fixtures/README.md): they read back with the chosen optimizer's
    options, the others left out; a key that is no optimizer's option is still refused, and a
    user's config with those keys is refused."""
    stored = json.loads((FIXTURES / "checkpoint_v2_flat_optim" / "manifest.json").read_text())["config"]
    assert stored["optim"]["beta"] == 0.5 and stored["optim"]["name"] == "sgd_si"  # S3's, set and never used
    optim = config_from_dict(stored).optim
    assert optim.options == ScaleInvariantOptions(si_lr=0.05, other=AdamWOptions(betas=(0.8, 0.9), eps=1e-7))
    assert (optim.lr, optim.warmup_steps, optim.fused) == (0.003, 1, False)
    v1 = json.loads((FIXTURES / "checkpoint_v1" / "manifest.json").read_text())["config"]
    assert config_from_dict(v1).optim.options == S3Options()
    with pytest.raises(ConfigError, match="unknown key 'optim.bta' for optim.name = 'sgd_si'"):
        config_from_dict({**stored, "optim": {**stored["optim"], "bta": 0.5}})
    overrides = [f"optim.{key}={json.dumps(value)}" for key, value in stored["optim"].items()]
    with pytest.raises(ConfigError, match=r"unknown key 'optim.beta' for optim.name = 'sgd_si' \(an option of 's3'"):
        load_config(None, [*SCALE_INVARIANT_MODEL, *overrides])


def test_checkpoint_info_names_the_optimizer_of_a_stored_flat_config(capsys):
    from pangu.cli import main

    assert main(["checkpoint", "info", str(FIXTURES / "checkpoint_v2_flat_optim"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["optimizer"] == "sgd_si" and info["state"] == ["exp_avg", "exp_avg_sq", "weight"]
