"""Hugging Face checkpoint import (streamed onto a mesh) and export (sharded safetensors).

Import builds the module abstractly (``nnx.eval_shape``: no random init) and fills each
parameter from the safetensors files one tensor at a time. With a mesh, each parameter
is created with ``jax.make_array_from_callback`` so every device receives only its own
shard and the host holds at most one stacked parameter shard at a time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..sharding import DEFAULT_RULES, logical_sharding
from .config import ModelConfig
from .transformer import CausalLM, layer_param_specs, top_param_specs


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or does not match the model configuration."""


# ---------------------------------------------------------------------------- name mapping

# our per-layer name -> (HF name suffix under model.layers.{i}., kind)
_LAYER_HF = {
    "attn_norm": ("input_layernorm.weight", "id"),
    "q_proj": ("self_attn.q_proj.weight", "in_heads"),
    "k_proj": ("self_attn.k_proj.weight", "in_heads"),
    "v_proj": ("self_attn.v_proj.weight", "in_heads"),
    "o_proj": ("self_attn.o_proj.weight", "heads_out"),
    "q_bias": ("self_attn.q_proj.bias", "bias_heads"),
    "k_bias": ("self_attn.k_proj.bias", "bias_heads"),
    "v_bias": ("self_attn.v_proj.bias", "bias_heads"),
    "o_bias": ("self_attn.o_proj.bias", "id"),
    "q_norm": ("self_attn.q_norm.weight", "id"),
    "k_norm": ("self_attn.k_norm.weight", "id"),
    "gate_proj": ("mlp.gate_proj.weight", "t"),
    "up_proj": ("mlp.up_proj.weight", "t"),
    "down_proj": ("mlp.down_proj.weight", "t"),
}
_TOP_HF = {
    "embed": ("model.embed_tokens.weight", "id"),
    "final_norm": ("model.norm.weight", "id"),
    "lm_head": ("lm_head.weight", "t"),
}
# HF tensors we may find in a checkpoint and ignore
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def _layer_hf_map(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    m = dict(_LAYER_HF)
    if cfg.sandwich_norms:  # Gemma-2: four norms per block
        m["post_attn_norm"] = ("post_attention_layernorm.weight", "id")
        m["mlp_norm"] = ("pre_feedforward_layernorm.weight", "id")
        m["post_mlp_norm"] = ("post_feedforward_layernorm.weight", "id")
    else:
        m["mlp_norm"] = ("post_attention_layernorm.weight", "id")
    return m


def _to_hf(kind: str, a: np.ndarray) -> np.ndarray:
    """Our layout -> HF tensor (no layers axis)."""
    if kind == "id":
        return a
    if kind == "t":
        return a.T
    if kind == "in_heads":
        return a.reshape(a.shape[0], -1).T
    if kind == "heads_out":
        return a.reshape(-1, a.shape[-1]).T
    if kind == "bias_heads":
        return a.reshape(-1)
    raise AssertionError(kind)


def hf_param_map(cfg: ModelConfig) -> dict[str, tuple[str, str, tuple[str, ...], tuple[int, ...], bool]]:
    """Our parameter path (``"embed"``, ``"layers.q_proj"``) -> (HF name or template with
    ``{i}``, kind, logical axes, full shape, is_stacked)."""
    out = {}
    for name, (axes, shape) in top_param_specs(cfg).items():
        hf, kind = _TOP_HF[name]
        out[name] = (hf, kind, axes, shape, False)
    lmap = _layer_hf_map(cfg)
    for name, (axes, shape) in layer_param_specs(cfg).items():
        hf, kind = lmap[name]
        out[f"layers.{name}"] = (
            "model.layers.{i}." + hf,
            kind,
            ("layers", *axes),
            (cfg.num_layers, *shape),
            True,
        )
    return out


def _model_params(model: CausalLM) -> dict[str, nnx.Param]:
    out = {}
    for name in ("embed", "final_norm", "lm_head"):
        if hasattr(model, name):
            out[name] = getattr(model, name)
    for name in model.layers.names:
        out[f"layers.{name}"] = getattr(model.layers, name)
    return out


# ---------------------------------------------------------------------------- reading


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _st_dtype(code: str) -> np.dtype:
    if code in _ST_DTYPES:
        return np.dtype(_ST_DTYPES[code])
    import ml_dtypes

    named = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    if code not in named:
        raise CheckpointError(f"unsupported safetensors dtype {code!r}")
    return np.dtype(named[code])


class _SafetensorsFile:
    """Reads single tensors of a ``.safetensors`` file with plain reads (no mmap), so the
    process memory holds only the tensors being converted, never the whole file."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = open(path, "rb")
        try:
            (n,) = np.frombuffer(self.fh.read(8), dtype="<u8")
            header = json.loads(self.fh.read(int(n)))
        except (ValueError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} is not a valid safetensors file ({err})") from err
        header.pop("__metadata__", None)
        self.base = 8 + int(n)
        self.header: dict[str, dict] = header

    def keys(self) -> list[str]:
        return list(self.header)

    def get_tensor(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or only rows ``[r0, r1)`` of its first axis (one contiguous read)."""
        info = self.header[name]
        start, end = info["data_offsets"]
        dtype = _st_dtype(info["dtype"]).newbyteorder("<")
        shape = tuple(info["shape"])
        if int(np.prod(shape)) * dtype.itemsize != end - start:
            raise CheckpointError(f"{self.path}: tensor {name} has a wrong byte size")
        offset = 0
        if rows is not None and shape:
            r0, r1 = rows
            row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            offset, shape = r0 * row_bytes, (r1 - r0, *shape[1:])
        out = np.empty(shape, dtype=dtype)
        self.fh.seek(self.base + start + offset)
        view = memoryview(out.reshape(-1).view(np.uint8))
        if self.fh.readinto(view) != view.nbytes:
            raise CheckpointError(f"{self.path}: tensor {name} is truncated")
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def close(self) -> None:
        self.fh.close()


class _TensorSource:
    """Name -> numpy tensor across one or several safetensors files (read on demand)."""

    def __init__(self, directory: Path, stack: contextlib.ExitStack):
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (KeyError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{index} is not a valid safetensors index ({err})") from err
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (directory / f).is_file()]
            if missing:
                raise CheckpointError(f"{index} refers to missing shard files: {missing}")
        elif single.is_file():
            files = ["model.safetensors"]
            weight_map = None
        else:
            raise CheckpointError(
                f"no model.safetensors or model.safetensors.index.json in {directory} "
                f"(found: {sorted(p.name for p in directory.iterdir())})"
            )
        self.handles = {}
        for f in files:
            self.handles[f] = _SafetensorsFile(directory / f)
            stack.callback(self.handles[f].close)
        if weight_map is None:
            weight_map = {k: files[0] for k in self.handles[files[0]].keys()}
        for name, f in weight_map.items():
            if name not in self.handles[f].header:
                raise CheckpointError(f"the index puts {name} in {f}, which does not contain it")
        self.weight_map: dict[str, str] = dict(weight_map)

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        return self.handles[self.weight_map[name]].get_tensor(name, rows)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.handles[self.weight_map[name]].shape(name)


def _np_dtype(dtype) -> np.dtype:
    return np.dtype(jnp.dtype(dtype))


def _check_names(cfg: ModelConfig, src: _TensorSource, pmap) -> None:
    expected: set[str] = set()
    for hf, _, _, _, stacked in pmap.values():
        if stacked:
            expected.update(hf.format(i=i) for i in range(cfg.num_layers))
        else:
            expected.add(hf)
    found = src.names()
    missing = sorted(expected - found)
    unexpected = sorted(
        n for n in found - expected
        if not _IGNORED.match(n) and not (n == "lm_head.weight" and cfg.tie_word_embeddings)
    )
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the {cfg.model_type} model needs: {missing[:20]}")
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} tensors the {cfg.model_type} model does not use: {unexpected[:20]}"
        )


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """HF tensor shape for our (per-layer) ``shape``."""
    if kind == "id":
        return shape
    if kind == "t":
        return shape[::-1]
    if kind == "in_heads":
        return (shape[1] * shape[2], shape[0])
    if kind == "heads_out":
        return (shape[2], shape[0] * shape[1])
    if kind == "bias_heads":
        return (shape[0] * shape[1],)
    raise AssertionError(kind)


def _read_block(src: _TensorSource, name: str, kind: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """Block ``ours[index]`` of one HF tensor converted to our layout ``shape``, reading only
    the rows of the HF tensor that the block needs."""
    want = _hf_shape(kind, shape)
    if src.shape(name) != want:
        raise CheckpointError(f"{name} has shape {src.shape(name)}, expected {want} for this config")
    rng = [range(n)[sl] for n, sl in zip(shape, index)]
    if any(r.step != 1 for r in rng):
        raise AssertionError(f"non-contiguous shard index {index}")
    lo = [r.start for r in rng]
    hi = [r.stop for r in rng]
    full = slice(None)
    if kind == "id":
        t = src.get(name, (lo[0], hi[0]))
        return t[(full, *index[1:])]
    if kind == "t":  # ours [a, b] = hf[b, a]
        t = src.get(name, (lo[1], hi[1]))
        return t.T[index[0], :]
    if kind == "in_heads":  # ours [D, N, Hd]; hf [N*Hd, D]
        hd = shape[2]
        t = src.get(name, (lo[1] * hd, hi[1] * hd))
        return t.T.reshape(shape[0], hi[1] - lo[1], hd)[index[0], :, index[2]]
    if kind == "heads_out":  # ours [H, Hd, D]; hf [D, H*Hd]
        t = src.get(name, (lo[2], hi[2]))
        return t.T.reshape(shape[0], shape[1], hi[2] - lo[2])[index[0], index[1], :]
    if kind == "bias_heads":  # ours [N, Hd]; hf [N*Hd]
        hd = shape[1]
        t = src.get(name, (lo[0] * hd, hi[0] * hd))
        return t.reshape(hi[0] - lo[0], hd)[:, index[1]]
    raise AssertionError(kind)


def _host_value(src, hf, kind, shape, stacked, index, dtype) -> np.ndarray:
    """Host array for ``index`` (a tuple of slices into the full ``shape``) of one parameter.

    Only the rows each block needs are read; stacked parameters are assembled layer by
    layer into one preallocated buffer."""
    index = _norm_index(index, len(shape))
    if not stacked:
        return np.ascontiguousarray(_read_block(src, hf, kind, shape, index), dtype=dtype)
    layers = range(shape[0])[index[0]]
    rest = index[1:]
    sub = tuple(len(range(n)[sl]) for n, sl in zip(shape[1:], rest))
    out = np.empty((len(layers), *sub), dtype=dtype)
    for j, i in enumerate(layers):
        out[j] = _read_block(src, hf.format(i=i), kind, shape[1:], rest)
    return out


def cached_gguf_dir(gguf_path: str | os.PathLike) -> Path:
    """HF directory converted from ``gguf_path`` (cached under ``$POET_JAX_CACHE/gguf``,
    default ``~/.cache/poet_jax/gguf``; keyed by path, size and mtime; converted once)."""
    from . import gguf

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")

    st = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("POET_JAX_CACHE", Path.home() / ".cache" / "poet_jax")) / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{gguf_path.stem}-{key}"
    with open(root / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            gguf.convert_gguf_to_hf(gguf_path, out)
    return out


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules: Mapping[str, Any] | None = None,
    gguf_file: str | None = None,
    attn_implementation: str | None = None,
    **config_overrides: Any,
) -> CausalLM:
    """Load a HF directory (or a ``.gguf`` file) into a :class:`CausalLM`.

    ``mesh``/``rules``: place every parameter with the ``NamedSharding`` its logical axes
    map to (:data:`poet_jax.sharding.DEFAULT_RULES` by default). ``config_overrides`` go to
    :class:`ModelConfig` (e.g. ``scan_layers=False``, ``remat="full"``).
    """
    path = Path(path)
    if gguf_file is not None:
        path = path / gguf_file if path.is_dir() else path
    if path.suffix == ".gguf":
        path = cached_gguf_dir(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    cfg = ModelConfig.from_hf(path, **config_overrides)
    gen = path / "generation_config.json"
    if gen.is_file():
        gen_cfg = json.loads(gen.read_text())
        eos = gen_cfg.get("eos_token_id")
        if eos is not None:
            eos = tuple(eos) if isinstance(eos, list) else (eos,)
            cfg = cfg.replace(eos_token_ids=tuple(dict.fromkeys(cfg.eos_token_ids + eos)))
    rules = DEFAULT_RULES if rules is None else rules

    model = nnx.eval_shape(
        lambda: CausalLM(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                         attn_implementation=attn_implementation)
    )
    pmap = hf_param_map(cfg)
    params = _model_params(model)
    npdt = _np_dtype(param_dtype)
    with contextlib.ExitStack() as stack:
        src = _TensorSource(path, stack)
        _check_names(cfg, src, pmap)
        for key, (hf, kind, axes, shape, stacked) in pmap.items():
            if mesh is None:
                host = _host_value(src, hf, kind, shape, stacked, (), npdt)
                arr = jax.device_put(host)
                arr.block_until_ready()
                del host
            else:
                sharding = logical_sharding(mesh, axes, rules, shape)
                arr = jax.make_array_from_callback(
                    shape, sharding,
                    lambda idx, hf=hf, kind=kind, shape=shape, stacked=stacked: _host_value(
                        src, hf, kind, shape, stacked, idx, npdt
                    ),
                )
            params[key].set_value(arr)
    return model


def _norm_index(idx, ndim: int) -> tuple[slice, ...]:
    idx = tuple(idx) + (slice(None),) * (ndim - len(tuple(idx)))
    return idx


# ---------------------------------------------------------------------------- writing

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """``"2GB"`` / ``"500MB"`` / ``"10KiB"`` / int bytes -> bytes."""
    if isinstance(size, int):
        return size
    m = _SIZE_RE.match(str(size))
    if not m:
        raise ValueError(f"cannot parse max_shard_size {size!r} (use e.g. '2GB', '500MB' or bytes)")
    unit = m.group(2).upper() if m.group(2) else None
    return int(float(m.group(1)) * _UNITS[unit])


def _hf_tensors(model: CausalLM) -> Iterator[tuple[str, Callable[[], np.ndarray], int]]:
    """(HF name, thunk producing the host tensor, nbytes) in HF order."""
    cfg = model.config
    pmap = hf_param_map(cfg)
    params = _model_params(model)
    order = ["embed"] + [k for k in pmap if k.startswith("layers.")] + ["final_norm"]
    if "lm_head" in pmap:
        order.append("lm_head")
    for i in range(cfg.num_layers):
        for key in order:
            hf, kind, _, shape, stacked = pmap[key]
            if not stacked:
                continue
            var = params[key]
            nbytes = int(np.prod(shape[1:])) * jnp.dtype(var.get_value().dtype).itemsize
            yield hf.format(i=i), (lambda v=var, i=i, kind=kind: _to_hf(kind, np.asarray(jax.device_get(v[...][i])))), nbytes
    for key in order:
        hf, kind, _, shape, stacked = pmap[key]
        if stacked:
            continue
        var = params[key]
        nbytes = int(np.prod(shape)) * jnp.dtype(var.get_value().dtype).itemsize
        yield hf, (lambda v=var, kind=kind: _to_hf(kind, np.asarray(jax.device_get(v[...])))), nbytes


def save_pretrained(
    model: CausalLM,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Write ``config.json``, ``generation_config.json``, safetensors (sharded with an index
    when larger than ``max_shard_size``) and the tokenizer files. Returns ``out_dir``."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    limit = parse_size(max_shard_size)
    items = list(_hf_tensors(model))
    shards: list[list[tuple[str, Callable[[], np.ndarray]]]] = [[]]
    size = 0
    for name, thunk, nbytes in items:
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, thunk))
        size += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, thunk in shard:
            tensors[name] = np.ascontiguousarray(thunk())
            total += tensors[name].nbytes
            weight_map[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    if n > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
        )
    elif (out / "model.safetensors.index.json").exists():
        (out / "model.safetensors.index.json").unlink()

    hf = cfg.to_hf()
    hf["dtype"] = str(jnp.dtype(model.embed.get_value().dtype))
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    gen = {"_from_model_config": True}
    if cfg.bos_token_id is not None:
        gen["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_ids:
        gen["eos_token_id"] = cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids)
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    if len(gen) > 1:
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
