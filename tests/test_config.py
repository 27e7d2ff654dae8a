"""Config schema: every shipped config parses and validates; overrides; clear errors; introspection."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from poet_jax.train.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    resolved_reference_mode,
    schema_rows,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
PAPER = {  # setting -> (DPO beta, DPO lr, SimPO beta, gamma_beta_ratio, SimPO lr)  (DESIGN.md §1)
    "mistral-7b-base": (0.01, 5e-7, 2.0, 0.8, 3e-7),
    "llama3-8b-base": (0.01, 5e-7, 2.0, 0.5, 6e-7),
    "llama3-8b-instruct": (0.01, 3e-7, 10.0, 0.3, 1e-6),
    "gemma2-9b-it": (0.01, 5e-7, 10.0, 0.5, 8e-7),
}


def test_all_configs_present():
    names = {p.stem for p in (ROOT / "configs" / "paper").glob("*.yaml")}
    want = {f"{s}-{l}{p}" for s in PAPER for l in ("dpo", "simpo") for p in ("", "-poet")}
    assert names == want
    assert {p.stem for p in (ROOT / "configs" / "tiny").glob("*.yaml")} >= {"dpo", "dpo-poet", "simpo", "simpo-poet"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_parses_and_validates(path):
    cfg = load_config(path)  # validates; Hub ids are accepted without loading weights
    assert cfg.train.global_batch % (cfg.train.micro_batch or cfg.train.global_batch) == 0
    if path.parent.name == "paper":
        setting = path.stem.rsplit("-dpo", 1)[0].rsplit("-simpo", 1)[0]
        dpo_beta, dpo_lr, simpo_beta, gbr, simpo_lr = PAPER[setting]
        assert cfg.data.use_poet == path.stem.endswith("-poet")
        assert (cfg.train.global_batch, cfg.train.seed, cfg.train.epochs) == (128, 42, 1.0)
        assert (cfg.data.max_length, cfg.data.max_prompt_length) == (2048, 1800)
        assert (cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.train.dtype) == ("cosine", 0.1, "bfloat16")
        assert cfg.loss.label_smoothing == 0.0
        if cfg.loss.name == "dpo":
            assert (cfg.loss.beta, cfg.optim.lr) == (dpo_beta, dpo_lr)
            assert resolved_reference_mode(cfg) == "frozen"
        else:
            assert cfg.loss.name == "simpo"
            assert (cfg.loss.beta, cfg.loss.gamma_beta_ratio, cfg.optim.lr) == (simpo_beta, gbr, simpo_lr)
            assert resolved_reference_mode(cfg) == "none"
        # POET configs differ from their baseline only by the switch
        if path.stem.endswith("-poet"):
            base = load_config(path.with_name(path.stem[: -len("-poet")] + ".yaml"))
            a, b = dataclasses.asdict(cfg), dataclasses.asdict(base)
            a["data"].pop("use_poet"), b["data"].pop("use_poet")
            a["train"].pop("output_dir"), b["train"].pop("output_dir")
            assert a == b


def test_overrides_and_types(tmp_path):
    path = ROOT / "configs" / "tiny" / "dpo.yaml"
    cfg = load_config(path, ["optim.lr=1e-6", "data.use_poet=true", "train.global_batch=16", "loss.beta=0.5",
                             "data.bucket_lengths=[64,256]"])
    assert cfg.optim.lr == 1e-6 and cfg.data.use_poet is True and cfg.train.global_batch == 16
    assert cfg.loss.beta == 0.5 and cfg.data.bucket_lengths == [64, 256]
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    "override, culprit",
    [
        (["optim.lrr=1"], "optim.lrr"),
        (["nosection.x=1"], "nosection"),
        (["loss.beta=0"], "loss.beta"),
        (["loss.beta=-1"], "loss.beta"),
        (["optim.lr=abc"], "optim.lr"),
        (["train.global_batch=10", "train.micro_batch=4"], "train.global_batch"),
        (["train.global_batch=2.5"], "train.global_batch"),
        (["model.path="], "model.path"),
        (["model.create_tiny=false", "model.path=/nonexistent/dir"], "model.path"),
        (["data.path="], "data.path"),
        (["loss.name=nope"], "loss.name"),
        (["reference.mode=sometimes"], "reference.mode"),
        (["loss.name=dpo", "reference.mode=none"], "reference.mode"),
        (["loss.name=simpo", "reference.mode=frozen"], "reference.mode"),
        (["data.max_prompt_length=300"], "data.max_prompt_length"),
        (["train.dtype=float16"], "train.dtype"),
        (["optim.warmup_ratio=1.5"], "optim.warmup_ratio"),
        (["data.use_poet=maybe"], "data.use_poet"),
        (["optim.lr"], "optim.lr"),
    ],
)
def test_bad_values_name_the_key(override, culprit):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "tiny" / "dpo.yaml", override)
    msg = str(err.value)
    assert culprit in msg and "\n" not in msg


def test_schema_is_introspectable():
    rows = schema_rows()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) > 50
    for must in ("model.path", "data.use_poet", "loss.beta", "loss.gamma_beta_ratio", "reference.mode",
                 "optim.warmup_ratio", "optim.max_grad_norm", "train.global_batch", "train.micro_batch",
                 "train.eval_every", "train.save_every", "train.output_dir", "train.dtype"):
        assert must in keys
    for r in rows:
        assert r["help"] and r["type"] in ("str", "int", "float", "bool", "list", "dict"), r
    # defaults are the dataclass defaults and validate once required paths are given
    cfg = config_from_dict({"model": {"path": "org/model"}, "data": {"path": "x.json"},
                            "train": {"output_dir": "out"}})
    assert isinstance(cfg, Config)
    validate(cfg, check_paths=False)
    assert yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg)))["loss"]["name"] == "dpo"
