"""poet_jax.models vs transformers (PyTorch, CPU, fp32) on tiny random checkpoints.

Every supported family is built with transformers, saved with ``save_pretrained`` and
loaded by ``poet_jax.models.from_pretrained``; logits on a batch with left- and
right-padded rows must match to 1e-4 on the real (non-padding) positions.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from poet_jax.models import (
    CausalLM,
    CheckpointError,
    ModelConfig,
    UnsupportedModelError,
    from_pretrained,
)

V, T = 128, 12
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}

CASES = {
    # Llama-3.1 style: llama3 rope scaling, untied head
    "llama3_untied": (transformers.LlamaConfig, dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    # SmolLM2 style: tied embeddings, plus attention biases (Llama's attention_bias)
    "llama_tied_bias": (transformers.LlamaConfig, dict(tie_word_embeddings=True, attention_bias=True,
                                                      rope_parameters={"rope_type": "default", "rope_theta": 1e5})),
    "mistral_window_short": (transformers.MistralConfig, dict(sliding_window=4, tie_word_embeddings=False)),
    "mistral_window_long": (transformers.MistralConfig, dict(sliding_window=64, tie_word_embeddings=False)),
    "qwen2_bias_tied": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen2_sliding": (transformers.Qwen2Config, dict(tie_word_embeddings=False, use_sliding_window=True,
                                                     sliding_window=3, max_window_layers=1)),
    "qwen3_qknorm": (transformers.Qwen3Config, dict(head_dim=16, tie_word_embeddings=True)),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=12,
                                               attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                                               attn_implementation="eager")),
}


def _batch(seed=0):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, V, size=(3, T)).astype(np.int32)
    mask = np.ones((3, T), np.int32)
    mask[1, :5] = 0  # left padding
    mask[2, 8:] = 0  # right padding
    ids[mask == 0] = 0
    return ids, mask


def _hf_logits(model, ids, mask):
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.float().numpy()


def _make_hf(name, tmp_path_factory):
    cls, kw = CASES[name]
    kw = dict(kw)
    impl = kw.pop("attn_implementation", None)
    cfg = cls(**COMMON, **kw)
    if impl:
        cfg._attn_implementation = impl
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    # random norms/biases so that every parameter matters
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if "gemma" in cfg.model_type else 1.0) * ("norm" in n))
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(d)
    return model, d


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return {name: _make_hf(name, tmp_path_factory) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, hf_models):
    hf, d = hf_models[name]
    ids, mask = _batch()
    ref = _hf_logits(hf, ids, mask)
    model = from_pretrained(d)
    assert model.config.model_type == hf.config.model_type
    out = np.asarray(model(ids, mask))
    assert out.dtype == np.float32 and out.shape == (3, T, V)
    diff = np.abs(out - ref)[mask.astype(bool)].max()
    assert diff <= 1e-4, f"{name}: max|diff| {diff}"
    # padding slots (not compared above) still produce finite logits
    assert np.isfinite(out).all()


def test_tied_and_untied_structure(hf_models):
    assert hasattr(from_pretrained(hf_models["llama3_untied"][1]), "lm_head")
    assert not hasattr(from_pretrained(hf_models["qwen2_bias_tied"][1]), "lm_head")


def test_old_style_rope_keys(hf_models, tmp_path):
    """A config.json with top-level rope_theta / rope_scaling (pre-transformers-5 files)."""
    hf, d = hf_models["llama3_untied"]
    old = tmp_path / "old"
    old.mkdir()
    cfg = json.loads((d / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}
    (old / "config.json").write_text(json.dumps(cfg))
    (old / "model.safetensors").symlink_to(d / "model.safetensors")
    mc = ModelConfig.from_hf(old)
    assert (mc.rope_type, mc.rope_factor, mc.rope_original_max_position) == ("llama3", 8.0, 8)
    ids, mask = _batch(1)
    ref = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(old).eval(), ids, mask)
    out = np.asarray(from_pretrained(old)(ids, mask))
    assert np.abs(out - ref)[mask.astype(bool)].max() <= 1e-4


def test_unrolled_remat_and_split_api_agree(hf_models):
    """scan_layers=False gives the same logits; hidden_states + logits_from_hidden == call;
    gradients flow through a rematerialised scan."""
    from flax import nnx

    _, d = hf_models["gemma2"]
    ids, mask = _batch(2)
    base = from_pretrained(d)
    ref = np.asarray(base(ids, mask))
    unrolled = from_pretrained(d, scan_layers=False)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m: m(ids, mask))(unrolled)), ref, atol=1e-5)
    split = np.asarray(base.logits_from_hidden(base.hidden_states(ids, mask)))
    np.testing.assert_allclose(split, ref, atol=1e-6)

    remat = from_pretrained(d, remat="dots")
    loss, g = nnx.jit(nnx.value_and_grad(lambda m: jnp.mean(m(ids, mask)[:, :, 5] ** 2)))(remat)
    np.testing.assert_allclose(float(loss), float(np.mean(ref[:, :, 5] ** 2)), rtol=1e-5)
    q = np.asarray(g.layers.q_proj[...])  # token 0 is the (zero) padding embedding: use token 5
    assert np.isfinite(q).all() and np.abs(q).sum() > 0


def test_bf16_compute_returns_fp32_logits(hf_models):
    _, d = hf_models["llama3_untied"]
    ids, mask = _batch(3)
    ref = np.asarray(from_pretrained(d)(ids, mask))
    m16 = from_pretrained(d, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert m16.layers.q_proj[...].dtype == jnp.bfloat16
    out = m16(ids, mask)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - ref)[mask.astype(bool)].max() < 0.05


def test_logical_axes_on_every_param():
    cfg = ModelConfig(model_type="gemma2", qkv_bias=True, qk_norm=True, sandwich_norms=True, norm_offset=1.0)
    from flax import nnx

    model = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    names = {"layers", "embed", "vocab", "heads", "kv_heads", "head_dim", "mlp"}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == len(var.get_value().shape) and set(axes) <= names, (path, axes)


def test_unsupported_model_type(tmp_path):
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2", "n_embd": 8})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(UnsupportedModelError, match="'falcon'"):
        from_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf({**json.loads(transformers.LlamaConfig(**COMMON).to_json_string()),
                             "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})


def test_checkpoint_errors(hf_models, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, d = hf_models["llama3_untied"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        from_pretrained(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(tmp_path)
    save_file({**tensors, "model.extra.weight": np.zeros(2, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.extra\.weight"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["llama3_untied", "mistral_window_short"])
def test_seqlen_attention_path_matches_mask_path(name, hf_models):
    """attn_implementation="xla_seqlen" (the cuDNN flash-attention formulation on XLA:
    is_causal + row lengths + local window) == the mask path on right-padded rows."""
    _, d = hf_models[name]
    ids, mask = _batch(4)
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # full row and right-padded row
    ref = np.asarray(from_pretrained(d)(ids, mask))
    out = np.asarray(from_pretrained(d, attn_implementation="xla_seqlen")(ids, mask))
    assert np.abs(out - ref)[mask.astype(bool)].max() <= 1e-5
    with pytest.raises(ValueError, match="attn_implementation"):
        from_pretrained(d, attn_implementation="flash")
