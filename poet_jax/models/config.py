"""``ModelConfig``: one decoder-only transformer configuration covering the supported families.

Families (HF ``model_type``): ``llama`` (Llama-2/3/3.1, SmolLM2), ``mistral``, ``qwen2``,
``qwen3``, ``gemma2``. :meth:`ModelConfig.from_hf` reads a Hugging Face ``config.json``
(transformers 5 ``rope_parameters`` or the older ``rope_theta``/``rope_scaling`` keys);
:meth:`ModelConfig.to_hf` writes one that transformers loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu", "gelu_new")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture (``model_type``) or one of its options is not supported."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only LM (hashable: usable as a static jit argument).

    ``layer_types[i]`` is ``"full_attention"`` or ``"sliding_attention"`` (the latter uses
    ``sliding_window``: key ``j`` is visible from query ``i`` iff ``i - window < j <= i``).
    ``scan_layers`` and ``remat`` are runtime options, not part of the HF config.
    """

    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    embed_scale: bool = False
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    scan_layers: bool = True
    remat: str = "none"
    hf_extra: str = dataclasses.field(default="{}", repr=False)  # original config.json (JSON)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(
                f"activation {self.hidden_act!r} is not supported; supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        lt = self.layer_types
        if lt is None:
            lt = ("full_attention",) * self.num_layers
        lt = tuple(lt)
        if len(lt) != self.num_layers:
            raise ValueError(f"layer_types has {len(lt)} entries but num_layers is {self.num_layers}")
        bad = sorted(set(lt) - {"full_attention", "sliding_attention"})
        if bad:
            raise UnsupportedModelError(f"unsupported layer types {bad}")
        object.__setattr__(self, "layer_types", lt)
        object.__setattr__(self, "eos_token_ids", tuple(int(e) for e in self.eos_token_ids))

    # ------------------------------------------------------------------ derived
    @property
    def attn_scale(self) -> float:
        """Multiplier of q.k (``query_pre_attn_scalar ** -0.5`` for Gemma-2, else ``head_dim ** -0.5``)."""
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return float(base) ** -0.5

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it use a sliding window (and is a window set)?"""
        return tuple(t == "sliding_attention" and self.sliding_window is not None for t in self.layer_types)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> ModelConfig:
        """Build from a HF config dict, a ``config.json`` path or a directory holding one."""
        if not isinstance(config, Mapping):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            config = json.loads(path.read_text())
        d = dict(config)
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {mt!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key):
            if key not in d or d[key] is None:
                raise ValueError(f"{mt} config is missing the required key {key!r}")
            return d[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        n_layers = int(need("num_hidden_layers"))
        kv = int(d.get("num_key_value_heads") or heads)
        head_dim = int(d.get("head_dim") or hidden // heads)

        # rope: transformers 5 `rope_parameters`, older `rope_theta` + `rope_scaling`
        rp = d.get("rope_parameters") or {}
        if isinstance(rp, Mapping) and "rope_theta" not in rp and any(isinstance(v, Mapping) for v in rp.values()):
            raise UnsupportedModelError(f"per-layer-type rope_parameters are not supported: {rp}")
        theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        rope_kw: dict[str, Any] = {}
        rope_type = "default"
        if scaling:
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
            if rope_type in ("linear", "llama3"):
                rope_kw["rope_factor"] = float(scaling["factor"])
            if rope_type == "llama3":
                rope_kw["rope_low_freq_factor"] = float(scaling["low_freq_factor"])
                rope_kw["rope_high_freq_factor"] = float(scaling["high_freq_factor"])
                rope_kw["rope_original_max_position"] = int(scaling["original_max_position_embeddings"])

        sliding = d.get("sliding_window")
        layer_types = d.get("layer_types")
        if mt == "mistral":  # one window for every layer
            layer_types = None
            if sliding is not None:
                layer_types = ("sliding_attention",) * n_layers
        elif mt in ("qwen2", "qwen3"):
            if not d.get("use_sliding_window", False):
                sliding = None
            if layer_types is None and sliding is not None:
                mwl = int(d.get("max_window_layers", n_layers))
                layer_types = tuple(
                    "sliding_attention" if i >= mwl else "full_attention" for i in range(n_layers)
                )
        elif mt == "gemma2":
            if layer_types is None:
                layer_types = tuple(
                    "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)
                )
        else:  # llama: no sliding window
            sliding, layer_types = None, None

        if d.get("mlp_bias"):
            raise UnsupportedModelError(f"{mt} with mlp_bias=True is not supported")
        attn_bias = bool(d.get("attention_bias", False))
        qkv_bias = True if mt == "qwen2" else attn_bias
        o_bias = False if mt == "qwen2" else attn_bias

        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        gemma = mt == "gemma2"
        act = d.get("hidden_activation") if gemma else None
        act = act or d.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
        default_tie = gemma
        kwargs = dict(
            model_type=mt,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=n_layers,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_type=rope_type,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", default_tie)),
            hidden_act=act,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=mt == "qwen3",
            sliding_window=None if sliding is None else int(sliding),
            layer_types=None if layer_types is None else tuple(layer_types),
            attn_logit_softcapping=d.get("attn_logit_softcapping") if gemma else None,
            final_logit_softcapping=d.get("final_logit_softcapping") if gemma else None,
            query_pre_attn_scalar=d.get("query_pre_attn_scalar") if gemma else None,
            embed_scale=gemma,
            norm_offset=1.0 if gemma else 0.0,
            sandwich_norms=gemma,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            hf_extra=json.dumps(d, sort_keys=True, default=str),
            **rope_kw,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """HF ``config.json`` dict (transformers 5 style ``rope_parameters``)."""
        d = json.loads(self.hf_extra)
        for old in ("rope_theta", "rope_scaling", "torch_dtype", "_name_or_path", "transformers_version"):
            d.pop(old, None)
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
        if self.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position,
            )
        eos = list(self.eos_token_ids)
        d.update(
            model_type=self.model_type,
            architectures=[_ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=None if not eos else eos[0] if len(eos) == 1 else eos,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type == "gemma2":
            d["hidden_activation"] = self.hidden_act
            d.pop("hidden_act", None)
            d.update(
                attn_logit_softcapping=self.attn_logit_softcapping,
                final_logit_softcapping=self.final_logit_softcapping,
                query_pre_attn_scalar=self.query_pre_attn_scalar,
            )
        else:
            d["hidden_act"] = self.hidden_act
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
        if self.model_type in ("mistral", "gemma2", "qwen2", "qwen3"):
            d["sliding_window"] = self.sliding_window
        if self.model_type in ("gemma2", "qwen2", "qwen3"):
            d["layer_types"] = list(self.layer_types)
        if self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = self.sliding_window is not None
        return d
