"""Flax NNX causal LMs (Llama, Mistral, Qwen2/2.5, Qwen3, Gemma-2), HF/GGUF import/export,
and KV-cache generation.

    from poet_jax.models import from_pretrained, generate, save_pretrained
    model = from_pretrained("path/to/hf_dir")          # or a .gguf file
    logits = model(input_ids, attention_mask)           # [B, T, V] fp32
"""

from .config import SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedModelError
from .generate import GenerationOutput, generate, sample_logits
from .hf_io import CheckpointError, cached_gguf_dir, from_pretrained, save_pretrained
from .transformer import CausalLM, positions_from_mask

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CausalLM",
    "CheckpointError",
    "GenerationOutput",
    "ModelConfig",
    "UnsupportedModelError",
    "cached_gguf_dir",
    "from_pretrained",
    "generate",
    "positions_from_mask",
    "sample_logits",
    "save_pretrained",
]
