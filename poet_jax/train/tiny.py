"""Create a tiny random Llama model directory locally (no download), for CPU runs and tests.

The directory has the Hugging Face layout (``config.json``, ``model.safetensors``,
tokenizer files) so that both ``poet_jax.models.from_pretrained`` and
``transformers.AutoModelForCausalLM`` load it unchanged. Weights are drawn with numpy
(normal, ``init_std``; RMSNorm weights = 1) from a fixed seed, so the same spec gives the
same model on every machine.

The tokenizer is either a copy of an existing Hugging Face tokenizer directory or a small
byte-level BPE trained here on the text of the training file, with SmolLM2's special-token
layout (``<|endoftext|>`` = 0, ``<|im_start|>`` = 1 = bos, ``<|im_end|>`` = 2 = eos = pad)
and a ChatML chat template.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _iter_strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _iter_strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _iter_strings(v)


def texts_of_file(path: str | os.PathLike, max_records: int = 100_000) -> list[str]:
    """Every string value in a .json / .jsonl / .jsonl.gz preference file (any record format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training file {path} does not exist (needed to train the tiny tokenizer)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return list(_iter_strings(records[:max_records]))


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def random_llama_state(spec, vocab_size: int) -> dict[str, np.ndarray]:
    """HF-named float32 weights of a Llama with the shape of ``spec`` (a TinyModelSpec)."""
    rng = np.random.default_rng(spec.seed)
    d, f, h, kv = spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.num_kv_heads
    hd = d // h

    def normal(*shape):
        return (rng.standard_normal(shape) * spec.init_std).astype(np.float32)

    sd = {"model.embed_tokens.weight": normal(vocab_size, d)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = normal(h * hd, d)
        sd[p + "self_attn.k_proj.weight"] = normal(kv * hd, d)
        sd[p + "self_attn.v_proj.weight"] = normal(kv * hd, d)
        sd[p + "self_attn.o_proj.weight"] = normal(d, h * hd)
        sd[p + "mlp.gate_proj.weight"] = normal(f, d)
        sd[p + "mlp.up_proj.weight"] = normal(f, d)
        sd[p + "mlp.down_proj.weight"] = normal(d, f)
        sd[p + "input_layernorm.weight"] = np.ones(d, np.float32)
        sd[p + "post_attention_layernorm.weight"] = np.ones(d, np.float32)
    sd["model.norm.weight"] = np.ones(d, np.float32)
    if not spec.tie_word_embeddings:
        sd["lm_head.weight"] = normal(vocab_size, d)
    return sd


def llama_config_dict(spec, vocab_size: int, bos_id: int, eos_id: int, pad_id: int | None) -> dict:
    """A transformers ``LlamaConfig``-compatible config.json dict for ``spec``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.hidden_size // spec.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "initializer_range": spec.init_std,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def create_tiny_model_dir(out_dir: str | os.PathLike, spec, train_file: str | os.PathLike | None = None) -> Path:
    """Write a tiny random Llama (weights, config, tokenizer) to ``out_dir``; returns it.

    ``spec`` is a :class:`poet_jax.train.config.TinyModelSpec`. With
    ``spec.tokenizer == "local-bpe"`` a BPE of ``spec.vocab_size`` tokens is trained on
    the strings of ``train_file``; otherwise ``spec.tokenizer`` is a tokenizer directory
    to copy. Written atomically (temporary sibling directory, then rename).
    """
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    if spec.tokenizer == "local-bpe":
        if train_file is None:
            raise ValueError("model.tiny.tokenizer=local-bpe needs a training file to learn the vocabulary from")
        tokenizer = train_bpe_tokenizer(texts_of_file(train_file), spec.vocab_size)
    else:
        tok_dir = Path(spec.tokenizer)
        if not tok_dir.is_dir():
            raise ValueError(f"model.tiny.tokenizer: {tok_dir} is not a tokenizer directory")
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab_size = len(tokenizer)
    # pad_token_id stays null in config.json: transformers builds nn.Embedding(padding_idx=pad_token_id),
    # which zeroes the gradient of that embedding row in PyTorch training. With pad = <|im_end|> (as
    # SmolLM2) TRL would then never train the end-of-turn embedding while poet_jax does. Padding itself
    # uses the tokenizer's pad token (<|im_end|>) on both sides.
    cfg = llama_config_dict(spec, vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id, None)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        save_file(random_llama_state(spec, vocab_size), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2)
        )
        tokenizer.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def ensure_model_dir(cfg) -> Path:
    """Return ``cfg.model.path``, creating the tiny random model there first when asked to."""
    path = Path(cfg.model.path)
    if (path / "config.json").is_file():
        return path
    if not cfg.model.create_tiny:
        from .config import ConfigError

        raise ConfigError(f"model.path: {path} is not a Hugging Face model directory (no config.json)")
    return create_tiny_model_dir(path, cfg.model.tiny, cfg.data.path)
