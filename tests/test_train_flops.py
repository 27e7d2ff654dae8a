"""FLOP count of a preference step (for MFU) against independent counts."""

from __future__ import annotations

import json

import pytest
from safetensors.numpy import load_file

from poet_jax.train import flops


def test_matmul_flops_equal_two_per_weight(tiny_llama_dir):
    """Weight matmuls: 2 FLOPs per weight-matrix entry per token (every matrix but the embedding lookup)."""
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    weights = load_file(str(tiny_llama_dir / "model.safetensors"))
    n_matmul = sum(w.size for k, w in weights.items() if w.ndim == 2 and "embed_tokens" not in k)
    assert flops.matmul_flops_per_token(cfg) == 2 * n_matmul


def test_attention_and_step_flops(tiny_llama_dir):
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    d = flops.model_dims(cfg)
    lengths = [5, 17]
    # causal attention, counted token by token: query i scores i+1 keys (QK^T) and mixes i+1 values (AV)
    attn = sum(d["layers"] * 2 * 2 * d["h"] * d["hd"] * (i + 1) for n in lengths for i in range(n))
    fwd = sum(lengths) * flops.matmul_flops_per_token(cfg) + attn
    assert flops.forward_flops(cfg, lengths) == pytest.approx(fwd, rel=1e-12)
    # policy forward + backward (3x) plus the frozen reference's forward (1x)
    assert flops.preference_step_flops(cfg, lengths, with_reference=True) == pytest.approx(4 * fwd)
    assert flops.preference_step_flops(cfg, lengths, with_reference=False) == pytest.approx(3 * fwd)


def test_mfu_and_peaks():
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_per_device("TPU v5 lite") == 197e12
    assert flops.peak_flops_per_device("cpu") is None
    assert flops.peak_flops_per_device("cpu", override_tflops=2.0) == 2e12
    assert flops.mfu(1e12, 2.0, 4, 1e12) == pytest.approx(0.125)
    assert flops.mfu(1e12, 2.0, 4, None) is None
