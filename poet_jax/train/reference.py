"""The reference model: ``frozen`` copy, ``precomputed`` log-probs (cached on disk), or ``none``.

``precomputed``: before training, one forward pass of the initial policy over every pair
(of the training and of the held-out split) stores the summed reference log-probs of
exactly the response tokens training scores (POET included, since the examples are
already cut). They are cached in ``<cache_dir>/<key>.npz``, the key hashing the model
(config + weight-file fingerprints), the token ids of every pair and the settings
that change the numbers (compute/reference dtype). Training then holds only the policy.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from poet_jax.data.batch import PreferenceBatch


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """Hash of a HF model directory: config.json plus name, size and the first/last MiB of each weight file."""
    d = Path(model_dir)
    h = hashlib.sha256()
    cfg = d / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    files = sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")) if d.is_dir() else []
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > (1 << 20):
                fh.seek(max(size - (1 << 20), 0))
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def examples_fingerprint(examples: Sequence[Any]) -> str:
    """Hash of the token ids (prompt, chosen, rejected) of every pair, in order."""
    h = hashlib.sha256()
    h.update(str(len(examples)).encode())
    for e in examples:
        for arr in (e.prompt_ids, e.chosen_ids, e.rejected_ids):
            a = np.asarray(arr, np.int32)
            h.update(np.int64(a.size).tobytes())
            h.update(a.tobytes())
    return h.hexdigest()


def cache_key(model_fp: str, splits: dict[str, str], settings: dict) -> str:
    payload = json.dumps({"model": model_fp, "data": splits, "settings": settings, "version": 1}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def precompute_logps(
    logps_fn: Callable[[dict], jax.Array],
    examples: Sequence[Any],
    batches: Sequence[tuple[np.ndarray, np.ndarray, PreferenceBatch]],
    progress: bool = True,
    desc: str = "reference log-probs",
) -> np.ndarray:
    """Summed reference log-probs ``[N, 2]`` (chosen, rejected) of every example.

    ``batches``: ``(indices [b], valid [b], PreferenceBatch)`` covering every example
    once; ``logps_fn(batch_dict) -> [2b]``.
    """
    out = np.full((len(examples), 2), np.nan, np.float32)
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, unit="batch", dynamic_ncols=True)
    for indices, valid, batch in it:
        vals = np.asarray(jax.device_get(logps_fn(batch.as_dict())), np.float32)
        b = len(indices)
        for j in range(b):
            if valid[j]:
                out[int(indices[j])] = (vals[j], vals[b + j])
    if np.isnan(out).any():
        missing = int(np.isnan(out[:, 0]).sum())
        raise RuntimeError(f"reference precompute left {missing} pairs without log-probs")
    return out


def load_or_compute(
    cache_file: Path, compute: Callable[[], dict[str, np.ndarray]]
) -> tuple[dict[str, np.ndarray], bool]:
    """``(arrays, from_cache)``: read ``cache_file`` (npz) or compute and write it atomically."""
    if cache_file.is_file():
        with np.load(cache_file) as z:
            return {k: z[k] for k in z.files}, True
    arrays = compute()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, cache_file)
    return arrays, False
