"""FLOP count of a preference step and model-FLOPs utilisation (MFU).

Counts multiply-adds as 2 FLOPs. For a Llama-style decoder with hidden size d, h query
heads and kv key/value heads of size hd, MLP width f, L layers and vocabulary V, one
forward pass over a sequence of n real tokens costs

    n * 2 * [L * (d*h*hd + 2*d*kv*hd + h*hd*d + 3*d*f) + d*V]      (weight matmuls + LM head)
  + L * 4 * h * hd * n(n+1)/2                                        (causal QK^T and AV)

(attention counted causally: token i attends to i+1 positions). A backward pass costs
twice the forward. A preference step on B pairs costs ``3 * forward`` of the policy on
all 2B rows plus ``1 * forward`` of the frozen reference when there is one (the
precomputed reference is paid once, before training). Padding tokens are not counted.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

# Dense bf16 peak TFLOP/s per device (vendor datasheets), keyed by a substring of jax's device_kind.
PEAK_TFLOPS = {
    "h200": 989.0,
    "h100": 989.0,
    "a100": 312.0,
    "l4": 121.0,
    "a10g": 125.0,
    "tpu v6": 918.0,
    "tpu v5p": 459.0,
    "tpu v5 lite": 197.0,
    "tpu v5e": 197.0,
    "tpu v4": 275.0,
    "tpu v3": 123.0,
}


def _get(cfg, *names, default=None):
    for n in names:
        if isinstance(cfg, Mapping) and n in cfg and cfg[n] is not None:
            return cfg[n]
        if not isinstance(cfg, Mapping) and getattr(cfg, n, None) is not None:
            return getattr(cfg, n)
    if default is None:
        raise ValueError(f"model config has none of {names}")
    return default


def model_dims(cfg) -> dict:
    """Sizes used for FLOP counting from an HF config.json dict (or an object with the same names)."""
    d = int(_get(cfg, "hidden_size"))
    h = int(_get(cfg, "num_attention_heads", "num_heads"))
    kv = int(_get(cfg, "num_key_value_heads", "num_kv_heads", default=h))
    hd = int(_get(cfg, "head_dim", default=d // h))
    return {
        "d": d,
        "h": h,
        "kv": kv,
        "hd": hd,
        "f": int(_get(cfg, "intermediate_size")),
        "layers": int(_get(cfg, "num_hidden_layers", "num_layers")),
        "vocab": int(_get(cfg, "vocab_size")),
    }


def matmul_flops_per_token(cfg) -> float:
    """Forward FLOPs per token of the weight matmuls and LM head (no attention scores)."""
    m = model_dims(cfg)
    d, h, kv, hd, f = m["d"], m["h"], m["kv"], m["hd"], m["f"]
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
    return 2.0 * (m["layers"] * per_layer + d * m["vocab"])


def forward_flops(cfg, lengths, attended=None) -> float:
    """Forward FLOPs of sequences with the given real lengths (array of token counts).

    ``attended``: the (query, key) pairs each sequence's attention really scores; default the
    causal ``n(n+1)/2``. A shared-prompt sequence ``[prompt | chosen | rejected]`` scores
    fewer (its responses do not see each other): see :func:`shared_prompt_attended`.
    """
    m = model_dims(cfg)
    n = np.asarray(lengths, dtype=np.float64)
    pairs = n * (n + 1) / 2.0 if attended is None else np.asarray(attended, dtype=np.float64)
    attn = m["layers"] * 4.0 * m["h"] * m["hd"] * pairs
    return float(np.sum(n * matmul_flops_per_token(cfg) + attn))


def shared_prompt_attended(prompt, chosen, rejected):
    """(query, key) pairs of ``[prompt | chosen | rejected]`` sequences (token counts, arrays):
    causal within the prompt, each response sees the prompt and its own earlier tokens."""
    p, c, r = (np.asarray(x, dtype=np.float64) for x in (prompt, chosen, rejected))
    return p * (p + 1) / 2 + c * p + c * (c + 1) / 2 + r * p + r * (r + 1) / 2


def preference_step_flops(cfg, lengths, with_reference: bool, attended=None) -> float:
    """FLOPs of one training step on rows of the given real lengths (both responses of every pair).

    Policy forward + backward (3x forward) plus the reference forward when ``with_reference``;
    ``attended`` as in :func:`forward_flops`.
    """
    fwd = forward_flops(cfg, lengths, attended)
    return fwd * (3.0 + (1.0 if with_reference else 0.0))


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: ``override_tflops`` if > 0, else the table, else None (unknown, e.g. CPU)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = device_kind.lower()
    for key, tf in PEAK_TFLOPS.items():
        if key in kind:
            return tf * 1e12
    return None


def mfu(flops: float, seconds: float, n_devices: int, peak_per_device: float | None) -> float | None:
    """Model-FLOPs utilisation in [0, 1], or None when the peak is unknown."""
    if peak_per_device is None or seconds <= 0:
        return None
    return flops / seconds / (n_devices * peak_per_device)
