"""Sharded loading on 8 simulated CPU devices == unsharded; mesh helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

from poet_jax.sharding import DEFAULT_RULES, MeshError, logical_to_spec, make_mesh

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from poet_jax.models import from_pretrained, generate
    from poet_jax.sharding import make_mesh
    assert jax.device_count() == 8
    path = sys.argv[1]
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    ref = from_pretrained(path)
    sharded = from_pretrained(path, mesh=mesh)
    rs = np.random.RandomState(0)
    ids = rs.randint(0, 128, (4, 12)).astype(np.int32)
    mask = np.ones_like(ids); mask[1, :4] = 0; mask[2, 7:] = 0
    fwd = nnx.jit(lambda m, x, a: m(x, a))
    a = np.asarray(fwd(ref, ids, mask)); b = np.asarray(fwd(sharded, ids, mask))
    def spec(x):  # padded to the array's rank
        s = list(x.sharding.spec)
        return s + [None] * (x.ndim - len(s))
    specs = {name: spec(getattr(sharded.layers, name)[...]) for name in sharded.layers.names}
    specs["embed"] = spec(sharded.embed[...])
    specs["lm_head"] = spec(sharded.lm_head[...])
    q = sharded.layers.q_proj[...]
    g_ref = generate(ref, ids, mask, max_new_tokens=4, eos_token_ids=())
    g_sh = generate(sharded, ids, mask, max_new_tokens=4, eos_token_ids=())
    print("RESULT" + json.dumps(dict(
        diff=float(np.abs(a - b)[mask.astype(bool)].max()),
        specs=specs,
        q_shard_shape=list(q.addressable_shards[0].data.shape), q_shape=list(q.shape),
        n_devices=len(q.sharding.device_set),
        same_generation=bool((np.asarray(g_ref.sequences) == np.asarray(g_sh.sequences)).all()),
    )))
    """
)


def test_sharded_load_matches_unsharded(tmp_path):
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    res = json.loads(line[len("RESULT"):])
    assert res["diff"] <= 1e-5
    assert res["same_generation"]
    specs = res["specs"]
    assert specs["q_proj"] == [None, "fsdp", "tensor", None]
    assert specs["k_bias"] == [None, "tensor", None]
    assert specs["down_proj"] == [None, "tensor", "fsdp"]
    assert specs["attn_norm"] == [None, "fsdp"]
    assert specs["embed"] == ["tensor", "fsdp"]
    assert specs["lm_head"] == ["fsdp", "tensor"]
    assert res["n_devices"] == 8
    assert res["q_shard_shape"] == [2, 16, 2, 8] and res["q_shape"] == [2, 32, 4, 8]


def test_logical_to_spec_rules():
    assert logical_to_spec(("batch", "seq")) == P(("data", "fsdp"), None)
    assert logical_to_spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    mesh = make_mesh({"data": 1})
    # axes the mesh lacks or of size 1 are dropped
    assert logical_to_spec(("vocab", "embed"), mesh=mesh) == P(None, None)
    assert DEFAULT_RULES["kv_heads"] == "tensor"


def test_make_mesh_errors():
    n = jax.device_count()
    with pytest.raises(MeshError, match=f"{n + 1} devices in total but {n}"):
        make_mesh({"data": n + 1})
    with pytest.raises(MeshError, match="at most one"):
        make_mesh({"data": -1, "fsdp": -1})
    mesh = make_mesh({"data": -1, "tensor": 1})
    assert mesh.shape == {"data": n, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
