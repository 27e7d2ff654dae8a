"""Export round trip: poet_jax -> HF directory (sharded safetensors + index) -> transformers."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from poet_jax.models import CausalLM, ModelConfig, from_pretrained, save_pretrained
from poet_jax.models.hf_io import parse_size

V, T = 128, 10
CFGS = {
    "llama": ModelConfig(model_type="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_heads=4,
                         num_kv_heads=2, head_dim=8, rope_type="llama3", rope_factor=8.0,
                         rope_original_max_position=8, rope_theta=5e5, bos_token_id=1, eos_token_ids=(2, 3)),
    "qwen2": ModelConfig(model_type="qwen2", vocab_size=V, hidden_size=32, intermediate_size=64, num_heads=4,
                         num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=True),
    "gemma2": ModelConfig(model_type="gemma2", vocab_size=V, hidden_size=32, intermediate_size=64, num_heads=4,
                          num_kv_heads=2, head_dim=8, tie_word_embeddings=True, sliding_window=3,
                          layer_types=("sliding_attention", "full_attention"), attn_logit_softcapping=4.0,
                          final_logit_softcapping=6.0, query_pre_attn_scalar=10, embed_scale=True,
                          norm_offset=1.0, sandwich_norms=True, hidden_act="gelu_pytorch_tanh"),
}


def _random_model(cfg, seed=0):
    model = CausalLM(cfg, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed)
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        v = var.get_value()
        var.set_value(jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype) * (0.3 if v.ndim > 2 else 0.5))
    return model


@pytest.mark.parametrize("family", list(CFGS))
def test_export_loads_in_transformers(family, tmp_path):
    model = _random_model(CFGS[family])
    out = save_pretrained(model, tmp_path / family, max_shard_size="12KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()

    rs = np.random.RandomState(1)
    ids = rs.randint(0, V, (2, T)).astype(np.int32)
    mask = np.ones((2, T), np.int32)
    mask[1, :3] = 0
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, **({"attn_implementation": "eager"} if family == "gemma2" else {})).eval()
    assert hf.config.model_type == family
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    ours = np.asarray(model(ids, mask))
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4
    back = from_pretrained(out)
    assert back.config.replace(hf_extra="{}") == model.config.replace(hf_extra="{}")
    np.testing.assert_array_equal(np.asarray(back(ids, mask)), ours)


def test_export_single_file_with_tokenizer(tmp_path, smollm2_tokenizer):
    model = _random_model(CFGS["llama"])
    out = save_pretrained(model, tmp_path / "m", tokenizer=smollm2_tokenizer)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 3] and gen["bos_token_id"] == 1
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("hello world")["input_ids"] == smollm2_tokenizer("hello world")["input_ids"]
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [2, 3]


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("10KiB") == 10240 and parse_size(5) == 5
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


def test_export_bf16_params(tmp_path):
    import jax.numpy as jnp

    cfg = CFGS["qwen2"]
    model = CausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    out = save_pretrained(model, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    w = hf.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [H*Hd, D]
    ours = np.asarray(model.layers.q_proj[...][1].astype(jnp.float32))  # [D, H, Hd]
    np.testing.assert_array_equal(w, ours.reshape(ours.shape[0], -1).T)
    back = from_pretrained(out, param_dtype=jnp.bfloat16)
    assert back.embed[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(back.embed[...]), np.asarray(model.embed[...]))
