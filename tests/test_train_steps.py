"""Train-step semantics: exact gradient accumulation, reference modes (frozen / precomputed / none)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from poet_jax.data.batch import make_batch
from poet_jax.train.config import config_from_dict
from poet_jax.train.loop import setup


def _cfg(model_dir, data, out, **sections):
    d = {
        "model": {"path": str(model_dir)},
        "data": {"path": str(data), "max_length": 192, "max_prompt_length": 96, "max_records": 24,
                 "bucket_lengths": [192]},
        "loss": {"name": "dpo", "beta": 0.1},
        "optim": {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0, "max_grad_norm": 1.0},
        "train": {"output_dir": str(out), "global_batch": 8, "micro_batch": 8, "max_steps": 2,
                  "progress": False, "tensorboard": False, "export": False},
    }
    for sec, vals in sections.items():
        d.setdefault(sec, {}).update(vals)
    return config_from_dict(d)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope="module")
def data(shared_data):
    return shared_data / "dpo_en_demo.json"


# Two fixed global batches of 8 pairs: the first has 6 real pairs + 2 fillers (pair_valid=0) placed so
# that 4 micro-batches of 2 hold 2, 1, 2, 1 real pairs (a per-micro-batch mean would weight pairs
# unequally; the global normalisation must not).
BATCH_INDICES = ([0, 1, 2, -1, 3, 4, 5, -1], [6, 7, 8, 9, 10, 11, 12, 13])


def _fixed_batches(run):
    return [make_batch(run.train_examples, idx, None, run.pad_id, length=192) for idx in BATCH_INDICES]


def _ref_rows(run, idx):
    real = [i for i in idx if i >= 0]
    return run.ref_train[[i if i >= 0 else real[0] for i in idx]]


def _flat(run):
    return np.concatenate([x.ravel() for x in _leaves(run.state.params)])


@pytest.fixture(scope="module")
def frozen_trace(tiny_llama_dir, data, tmp_path_factory):
    """The reference trajectory: frozen reference, one micro-batch of 8, two steps on the fixed batches."""
    run = setup(_cfg(tiny_llama_dir, data, tmp_path_factory.mktemp("frozen")), progress=False)
    p0 = _flat(run)
    metrics, params = [], []
    for batch in _fixed_batches(run):
        metrics.append({k: float(v) for k, v in run.step(batch).items()})
        params.append(_flat(run))
    return {"p0": p0, "metrics": metrics, "params": params, "n_state": sum(x.size for x in _leaves(run.state))}


def _close_updates(p0, a, b, tol=2e-3):
    # AdamW's first steps are ~lr*sign(g): float noise in near-zero gradient entries flips a few
    # signs, so compare the parameter updates as vectors.
    return np.linalg.norm((a - p0) - (b - p0)) < tol * np.linalg.norm(a - p0)


def test_grad_accumulation_4x2_equals_8x1(frozen_trace, tiny_llama_dir, data, tmp_path):
    """4 micro-batches of 2 pairs give the same update as 1 batch of 8, fillers normalised globally."""
    small = setup(_cfg(tiny_llama_dir, data, tmp_path, train={"micro_batch": 2}), progress=False)
    assert small.n_micro == 4
    batches = _fixed_batches(small)
    assert batches[0].pair_valid.tolist() == [1, 1, 1, 0, 1, 1, 1, 0]
    for step, batch in enumerate(batches):
        got = {k: float(v) for k, v in small.step(batch).items()}
        want = frozen_trace["metrics"][step]
        assert got["pairs"] == want["pairs"] == (6 if step == 0 else 8)
        # step 0: same weights -> same numbers; step 1 follows one AdamW update (sign noise, see above)
        rel, abs_ = (1e-5, 1e-6) if step == 0 else (1e-3, 1e-5)
        for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "logits/chosen"):
            assert got[k] == pytest.approx(want[k], rel=rel, abs=abs_), (step, k)
    assert frozen_trace["metrics"][0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert _close_updates(frozen_trace["p0"], frozen_trace["params"][-1], _flat(small))


def test_precomputed_reference_equals_frozen(frozen_trace, tiny_llama_dir, data, tmp_path):
    """Also runs token log-probs in sequence chunks of 48 (train.logps_chunk; T=191 is not a multiple),
    which must not change values or gradients."""
    pre_cfg = _cfg(tiny_llama_dir, data, tmp_path, reference={"mode": "precomputed"}, train={"logps_chunk": 48})
    pre = setup(pre_cfg, progress=False)
    assert pre.state.ref_params is None  # training holds only the policy
    assert pre.ref_train.shape == (len(pre.train_examples), 2)
    cache = list((tmp_path / "ref_cache").glob("*.npz"))
    assert len(cache) == 1
    for step, (idx, batch) in enumerate(zip(BATCH_INDICES, _fixed_batches(pre))):
        got = {k: float(v) for k, v in pre.step(batch, _ref_rows(pre, idx)).items()}
        want = frozen_trace["metrics"][step]
        rel, abs_ = (1e-4, 2e-5) if step == 0 else (1e-3, 1e-4)
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "grad_norm", "logits/chosen"):
            assert got[k] == pytest.approx(want[k], rel=rel, abs=abs_), (step, k)
    assert _close_updates(frozen_trace["p0"], frozen_trace["params"][-1], _flat(pre))
    # a second setup reads the cache instead of recomputing
    mtime = cache[0].stat().st_mtime_ns
    again = setup(pre_cfg, progress=False)
    np.testing.assert_array_equal(again.ref_train, pre.ref_train)
    assert cache[0].stat().st_mtime_ns == mtime


def test_reference_free_loads_no_reference(frozen_trace, tiny_llama_dir, data, tmp_path, monkeypatch):
    import poet_jax.models as models

    calls = []
    real = models.from_pretrained

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(models, "from_pretrained", counting)
    # (also the bf16-compute / fp32-master-weights path)
    run = setup(_cfg(tiny_llama_dir, data, tmp_path / "s", loss={"name": "simpo", "beta": 2.0},
                     train={"dtype": "bfloat16"}), progress=False)
    assert run.ref_mode == "none" and len(calls) == 1
    assert run.state.ref_params is None and run.ref_train is None
    n_params = sum(x.size for x in _leaves(run.state.params))
    n_state = sum(x.size for x in _leaves(run.state))
    # policy + Adam's two moments + a few scalars: no second copy of the weights anywhere
    assert 3 * n_params <= n_state < 3 * n_params + 16
    assert frozen_trace["n_state"] >= 4 * n_params  # the frozen mode does hold a second copy
    before = _flat(run)
    m = {k: float(v) for k, v in run.step(*run.next_global_batch()).items()}
    assert np.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert {x.dtype for x in _leaves(run.state.params)} == {np.dtype("float32")}  # fp32 master weights
    # updates smaller than a bf16 ulp of the weights still land in the fp32 masters
    assert np.count_nonzero(_flat(run) != before) > 0.5 * before.size


_SHARDED_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[3])
import jax
from test_train_steps import _cfg, _fixed_batches
from poet_jax.train.config import config_from_dict
from poet_jax.train.loop import setup
run = setup(_cfg(sys.argv[1], sys.argv[2], sys.argv[4], train={"micro_batch": 4, "fsdp": 2, "tensor": 2}),
            progress=False)
assert len(jax.devices()) == 8 and dict(run.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
specs = {str(x.sharding.spec) for x in jax.tree.leaves(run.state.params)}
out = [{k: float(v) for k, v in run.step(b).items()} for b in _fixed_batches(run)]
print(json.dumps({"metrics": out, "specs": sorted(specs)}))
"""


def test_sharded_8_devices_equals_one_device(frozen_trace, tiny_llama_dir, data, tmp_path):
    """data=2 x fsdp=2 x tensor=2 virtual CPU devices (and 2 accumulation micro-batches) == 1 device."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT, str(tiny_llama_dir), str(data), tests_dir, str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any("tensor" in s for s in res["specs"]) and any("fsdp" in s for s in res["specs"])
    for step, got in enumerate(res["metrics"]):
        want = frozen_trace["metrics"][step]
        rel, abs_ = (1e-5, 2e-6) if step == 0 else (1e-3, 1e-5)
        for k in ("loss", "rewards/margins", "grad_norm", "logps/chosen"):
            assert got[k] == pytest.approx(want[k], rel=rel, abs=abs_), (step, k)
