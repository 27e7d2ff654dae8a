"""Trainer with shared-prompt / packed rows (``data.layout``) == the two-row trainer.

Same fixed global batches (with a filler pair), POET on, frozen reference, 2 micro-batches of 4
pairs: loss, TRL metrics and the updated parameters after two steps must equal the two_row run's.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from poet_jax.data.batch import make_batch
from poet_jax.train.config import ConfigError, config_from_dict
from poet_jax.train.loop import setup

BATCH_INDICES = ([0, 1, 2, -1, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14])
# the row-count / token metrics describe the layout, not the objective
LAYOUT_METRICS = ("tokens", "learning_rate")


def _cfg(model_dir, data, out, **data_over):
    d = {
        "model": {"path": str(model_dir)},
        "data": {"path": str(data), "max_length": 160, "max_prompt_length": 80, "max_records": 20,
                 "bucket_lengths": [160], "use_poet": True, "eval_fraction": 0.2, **data_over},
        "loss": {"name": "dpo", "beta": 0.1},
        "reference": {"mode": "frozen"},
        "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0, "max_grad_norm": 1.0},
        "train": {"output_dir": str(out), "global_batch": 8, "micro_batch": 4, "max_steps": 2,
                  "progress": False, "tensorboard": False, "export": False},
    }
    return config_from_dict(d)


def _flat(run):
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(jax.device_get(run.state.params))])


def _trace(run, make):
    p0 = _flat(run)
    metrics, params = [], []
    for idx in BATCH_INDICES:
        metrics.append({k: float(v) for k, v in run.step(make(run, idx)).items()})
        params.append(_flat(run))
    return {"p0": p0, "metrics": metrics, "params": params}


@pytest.fixture(scope="module")
def data(shared_data):
    return shared_data / "dpo_en_demo.json"


@pytest.fixture(scope="module")
def two_row_trace(tiny_llama_dir, data, tmp_path_factory):
    run = setup(_cfg(tiny_llama_dir, data, tmp_path_factory.mktemp("two_row")), progress=False)
    return _trace(run, lambda r, idx: make_batch(r.train_examples, idx, None, r.pad_id, length=160))


@pytest.mark.parametrize("layout,row_length", [("shared_prompt", 0), ("packed_shared", 640), ("packed", 640)])
def test_packed_layout_step_equals_two_row(two_row_trace, tiny_llama_dir, data, tmp_path, layout, row_length):
    run = setup(_cfg(tiny_llama_dir, data, tmp_path, layout=layout, max_pairs_per_row=4,
                     packed_row_length=row_length), progress=False)
    assert run.step_cfg.packed
    batch = run.packed_batch(np.asarray(BATCH_INDICES[0]))
    assert batch["input_ids"].shape[0] == 2  # two micro-batches
    assert int(batch["pair_valid"].sum()) == 7  # the filler pair is dropped
    if layout != "shared_prompt":
        assert batch["pair_valid"].sum(-1).max() > 1  # really packed: several pairs in a row
    got = _trace(run, lambda r, idx: r.packed_batch(np.asarray(idx)))
    ref = two_row_trace
    for step, (m_ref, m_got) in enumerate(zip(ref["metrics"], got["metrics"])):
        assert m_got["pairs"] == m_ref["pairs"] == (7 if step == 0 else 8)
        assert m_got["loss"] == pytest.approx(m_ref["loss"], abs=1e-5)
        assert m_got["nonfinite"] == 0.0
        for k, v in m_ref.items():
            if k in LAYOUT_METRICS:
                continue
            assert m_got[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (step, k)
        # real tokens processed: the same without a shared prompt, fewer with one (prompt computed once)
        if layout == "packed":
            assert m_got["tokens"] == m_ref["tokens"]
        else:
            assert m_got["tokens"] < m_ref["tokens"]
    # updates: AdamW's first steps are ~lr*sign(g) -> compare the update vectors
    for a, b in zip(ref["params"], got["params"]):
        du_ref, du_got = a - ref["p0"], b - ref["p0"]
        assert np.linalg.norm(du_got - du_ref) < 2e-3 * np.linalg.norm(du_ref)
    if layout != "packed_shared":
        return
    # the loop path (once): sampler batch -> packed step -> flops; evaluation keeps the two-row path
    batch, ref_logps = run.next_global_batch()
    assert isinstance(batch, dict) and ref_logps is None
    m = run.step(batch)
    assert np.isfinite(float(m["loss"])) and run.flops(batch) > 0
    ev = run.evaluate(max_pairs=4)
    assert np.isfinite(ev["loss"]) and ev["pairs"] == 4


def test_packed_layout_config_errors(tiny_llama_dir, data, tmp_path):
    with pytest.raises(ConfigError, match="data.layout='packed'.*precomputed"):
        config_from_dict({"model": {"path": str(tiny_llama_dir)}, "data": {"path": str(data), "layout": "packed"},
                          "reference": {"mode": "precomputed"}, "train": {"output_dir": str(tmp_path)}})
    with pytest.raises(ConfigError, match="data.max_pairs_per_row"):
        _cfg(tiny_llama_dir, data, tmp_path, layout="packed", max_pairs_per_row=0)
    with pytest.raises(ConfigError, match="data.layout"):
        _cfg(tiny_llama_dir, data, tmp_path, layout="zigzag")
    with pytest.raises(ConfigError, match="data.packed_row_length=40"):
        setup(_cfg(tiny_llama_dir, data, tmp_path, layout="shared_prompt", packed_row_length=40), progress=False)
