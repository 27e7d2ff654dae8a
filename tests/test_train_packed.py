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


def _cfg(model_dir, data, out, reference="frozen", **data_over):
    d = {
        "model": {"path": str(model_dir)},
        "data": {"path": str(data), "max_length": 160, "max_prompt_length": 80, "max_records": 20,
                 "bucket_lengths": [160], "use_poet": True, "eval_fraction": 0.2, **data_over},
        "loss": {"name": "dpo", "beta": 0.1},
        "reference": {"mode": reference},
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


@pytest.mark.parametrize("layout,row_length,multiple", [("shared_prompt", 0, 128), ("packed_shared", 640, 128),
                                                         ("packed", 640, 128), ("packed_shared", 640, 0)])
def test_packed_layout_step_equals_two_row(two_row_trace, tiny_llama_dir, data, tmp_path, layout, row_length,
                                           multiple):
    run = setup(_cfg(tiny_llama_dir, data, tmp_path, layout=layout, max_pairs_per_row=4,
                     packed_row_length=row_length, packed_length_multiple=multiple), progress=False)
    assert run.step_cfg.packed
    batch = run.packed_batch(np.asarray(BATCH_INDICES[0]))
    # rows are cut to a multiple of packed_length_multiple, capped at packed_row_length (all of it with 0)
    length, full = batch["input_ids"].shape[-1], row_length or 2 * 160
    assert length == full if multiple == 0 else (length <= full and (length % multiple == 0 or length == full))
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
    if layout != "packed_shared" or multiple == 0:
        return
    # the loop path (once): sampler batch -> packed step -> flops; evaluation keeps the two-row path
    batch, ref_logps = run.next_global_batch()
    assert isinstance(batch, dict) and ref_logps is None
    m = run.step(batch)
    assert np.isfinite(float(m["loss"])) and run.flops(batch) > 0
    ev = run.evaluate(max_pairs=4)
    assert np.isfinite(ev["loss"]) and ev["pairs"] == 4


def test_packed_layout_with_precomputed_reference_equals_two_row_frozen(two_row_trace, tiny_llama_dir, data,
                                                                        tmp_path):
    """Precomputed reference log-probs (one two-row pass before training) travel with packed rows as
    ``ref_logps`` per pair slot; the steps equal the two-row run with a frozen reference."""
    run = setup(_cfg(tiny_llama_dir, data, tmp_path, reference="precomputed", layout="packed_shared",
                     max_pairs_per_row=4, packed_row_length=640), progress=False)
    assert run.ref_train is not None and run.ref_train.shape == (len(run.train_examples), 2)
    batch = run.packed_batch(np.asarray(BATCH_INDICES[0]))
    ex = batch["example_index"].reshape(2, -1)
    n = ex.shape[1]
    for a in range(2):
        for j, e in enumerate(ex[a]):
            want = run.ref_train[e] if e >= 0 else np.zeros(2, np.float32)
            assert (batch["ref_logps"][a, j], batch["ref_logps"][a, n + j]) == (want[0], want[1])
    got = _trace(run, lambda r, idx: r.packed_batch(np.asarray(idx)))
    for step, (m_ref, m_got) in enumerate(zip(two_row_trace["metrics"], got["metrics"])):
        assert m_got["loss"] == pytest.approx(m_ref["loss"], abs=1e-5)
        # step 0: policy == reference, so every margin is 0 up to fp32 summation order (two-row
        # precompute vs packed policy) and "margin > 0" accuracies are coin flips there
        keys = ("rewards/margins", "logps/chosen", "logps/rejected") + (("rewards/accuracies",) if step else ())
        for k in keys:
            assert m_got[k] == pytest.approx(m_ref[k], rel=1e-4, abs=1e-5), (step, k)
    for a, b in zip(two_row_trace["params"], got["params"]):
        du_ref, du_got = a - two_row_trace["p0"], b - two_row_trace["p0"]
        assert np.linalg.norm(du_got - du_ref) < 2e-3 * np.linalg.norm(du_ref)
    # a packed batch without its reference log-probs is refused, not silently trained on
    bad = {k: v for k, v in run.packed_batch(np.asarray(BATCH_INDICES[1])).items() if k != "ref_logps"}
    with pytest.raises(ValueError, match="lack ref_logps"):
        run.step(bad)


def test_packed_layout_config_errors(tiny_llama_dir, data, tmp_path):
    with pytest.raises(ConfigError, match="data.max_pairs_per_row"):
        _cfg(tiny_llama_dir, data, tmp_path, layout="packed", max_pairs_per_row=0)
    with pytest.raises(ConfigError, match="data.layout"):
        _cfg(tiny_llama_dir, data, tmp_path, layout="zigzag")
    with pytest.raises(ConfigError, match="data.packed_row_length=40"):
        setup(_cfg(tiny_llama_dir, data, tmp_path, layout="shared_prompt", packed_row_length=40), progress=False)
