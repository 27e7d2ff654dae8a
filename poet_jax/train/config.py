"""Training configuration: nested dataclasses, YAML loading, dotted overrides, validation.

Every field carries a one-line ``help`` string in its dataclass metadata, so the schema
is introspectable (:func:`schema_rows` lists every key, type, default and meaning; the
README's config reference is generated from it).

Errors a user can cause (unknown key, wrong type, impossible value) raise
:class:`ConfigError` with one message naming the key; ``poet-jax`` prints it and exits
with status 2.
"""

from __future__ import annotations

import dataclasses
import os
import re

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from poet_jax import losses


class ConfigError(ValueError):
    """A configuration the user wrote is invalid (unknown key, bad type, impossible value)."""


def _f(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, choices=None):  # noqa: A002
    """A dataclass field with a help string (and optional allowed values) in its metadata."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


DTYPES = ("float32", "bfloat16")


@dataclass
class TinyModelSpec:
    """Shape of a tiny random Llama created locally (no download) when ``model.create_tiny`` is set."""

    hidden_size: int = _f(64, "width of the tiny random Llama")
    num_layers: int = _f(2, "number of decoder layers")
    num_heads: int = _f(4, "attention heads")
    num_kv_heads: int = _f(2, "key/value heads (grouped-query attention)")
    intermediate_size: int = _f(128, "MLP inner width")
    rope_theta: float = _f(10000.0, "RoPE base frequency")
    tie_word_embeddings: bool = _f(False, "share the input embedding with the LM head")
    init_std: float = _f(0.02, "standard deviation of the random normal weights")
    seed: int = _f(0, "seed of the random weights")
    tokenizer: str = _f(
        "local-bpe",
        "'local-bpe' trains a small byte-level BPE on the training file (no download); otherwise a path to "
        "an existing Hugging Face tokenizer directory",
    )
    vocab_size: int = _f(1024, "vocabulary size of the locally trained BPE tokenizer")


@dataclass
class ModelSection:
    path: str = _f("", "Hugging Face model directory (config.json + safetensors) of the initial policy")
    tokenizer: str = _f("", "tokenizer directory; empty means the model directory")
    remat: str = _f(
        "none",
        "activation recomputation in the backward pass: none, full, dots, dots_no_batch (saveable matmuls)",
        choices=("none", "full", "dots", "dots_no_batch"),
    )
    scan_layers: bool = _f(True, "run the decoder layers with jax.lax.scan (one compiled layer)")
    create_tiny: bool = _f(
        False, "if model.path has no config.json, create a tiny random Llama there from model.tiny (CPU tests)"
    )
    tiny: TinyModelSpec = _f(help="shape of the tiny random model (used only with model.create_tiny)", factory=TinyModelSpec)


@dataclass
class DataSection:
    """:class:`poet_jax.data.DataConfig`'s settings under the same names (0 / "" / [] stand for its None;
    ``train/data_bridge.py`` passes every shared name across) plus the trainer-side batch layout."""

    path: str = _f("", "training preference data: .json/.jsonl[.gz]/.parquet file, a save_to_disk folder or a Hub name")
    format: str = _f(
        "auto",
        "record format: auto, trl_standard, trl_conversational, ultrafeedback, sharegpt, hh_rlhf",
        choices=("auto", "trl_standard", "trl_conversational", "ultrafeedback", "sharegpt", "hh_rlhf"),
    )
    split: str = _f("train", "split of a folder / Hub data set")
    eval_path: str = _f("", "held-out data source; empty = data.eval_split of data.path, or data.eval_fraction")
    eval_split: str = _f("", "held-out split (of data.eval_path, or of data.path when eval_path is empty)")
    eval_fraction: float = _f(0.0, "hold out this fraction of the records of data.path when no eval source is given")
    max_length: int = _f(2048, "maximum prompt+response tokens per row")
    max_prompt_length: int = _f(1800, "maximum prompt tokens (the prompt keeps its end); 0 = no separate limit")
    truncation: str = _f(
        "fit", "fit: responses get max_length - prompt; trl096: responses get max_length - max_prompt_length",
        choices=("fit", "trl096"),
    )
    use_poet: bool = _f(False, "POET: cut both responses of each pair to k = min(len_chosen, len_rejected) tokens")
    poet_rule: str = _f(
        "min", "min (POET), fraction_of_k or fraction_of_own (the paper's ablations, with data.poet_ratio)",
        choices=("min", "fraction_of_k", "fraction_of_own"),
    )
    poet_ratio: float = _f(1.0, "kept fraction for the POET ablation rules, in (0, 1]")
    poet_on_eval: bool = _f(False, "also cut the held-out pairs (default: evaluate on full responses)")
    chat_template: bool = _f(True, "render with the tokenizer's chat template (false: plain text + EOS)")
    bucket_lengths: list = _f(help="allowed padded row lengths; [] = powers of two from 64 up to max_length",
                              factory=list)
    group_by_length: bool = _f(False, "sample batches of similar lengths (less padding)")
    shuffle: bool = _f(True, "shuffle the training pairs every epoch")
    on_bad_record: str = _f("error", "error: stop at the first bad record; skip: count and skip it",
                            choices=("error", "skip"))
    cache_dir: str = _f("", "cache of tokenized pairs; empty = <output_dir>/data_cache")
    max_records: int = _f(0, "read at most this many records per source (0 = all)")
    layout: str = _f(
        "two_row",
        "training rows: two_row ([prompt+chosen], [prompt+rejected]); shared_prompt (one [prompt|chosen|rejected] "
        "row per pair, prompt computed once); packed (several pairs' two sequences per row); packed_shared "
        "(several shared-prompt pairs per row). Single process only; evaluation keeps two_row",
        choices=("two_row", "shared_prompt", "packed", "packed_shared"),
    )
    packed_row_length: int = _f(0, "slots per row of the non-two_row layouts; 0 = 2 * data.max_length")
    packed_length_multiple: int = _f(
        128, "non-two_row layouts: balance each batch's pairs over its rows and cut the rows to the smallest "
        "multiple of this that holds them (at most data.packed_row_length); 0 = always full-length rows")
    max_pairs_per_row: int = _f(4, "pairs per row at most (packed / packed_shared layouts)")


@dataclass
class LossSection:
    name: str = _f("dpo", "preference loss: dpo, simpo, cpo, orpo, ipo, hinge, ...")
    beta: float = _f(0.1, "inverse temperature of the implicit reward (> 0)")
    gamma_beta_ratio: float = _f(0.5, "SimPO target margin gamma divided by beta")
    label_smoothing: float = _f(0.0, "conservative-DPO label smoothing in [0, 0.5)")
    extra: dict = _f(help="extra keyword arguments passed to the loss function", factory=dict)


@dataclass
class ReferenceSection:
    mode: str = _f(
        "auto",
        "reference model: frozen (a second copy of the initial weights), precomputed (one pass before training, "
        "cached on disk), none (reference-free losses); auto = frozen if the loss needs one, else none",
        choices=("auto", "frozen", "precomputed", "none"),
    )
    dtype: str = _f("float32", "dtype of the frozen reference weights", choices=DTYPES)
    cache_dir: str = _f("", "where precomputed reference log-probs are cached; empty = <output_dir>/ref_cache")
    batch_pairs: int = _f(0, "pairs per batch for the precompute pass; 0 = train.micro_batch")


@dataclass
class OptimSection:
    lr: float = _f(5e-7, "peak learning rate")
    schedule: str = _f("cosine", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = _f(0.1, "fraction of the optimizer steps spent in linear warmup from 0")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (applied to matrices, not norms or biases)")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this value (0 = no clipping)")
    b1: float = _f(0.9, "AdamW beta1")
    b2: float = _f(0.999, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")


@dataclass
class TrainSection:
    output_dir: str = _f("", "directory for checkpoints, logs, the reference cache and the final HF export")
    epochs: float = _f(1.0, "number of passes over the training pairs (ignored when max_steps > 0)")
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = run train.epochs)")
    global_batch: int = _f(128, "pairs per optimizer step, over all devices and accumulation micro-batches")
    micro_batch: int = _f(0, "pairs per forward/backward pass (0 = global_batch); global_batch must be a multiple")
    seed: int = _f(42, "seed of data order and any randomness")
    dtype: str = _f("float32", "compute dtype; bfloat16 keeps float32 master weights", choices=DTYPES)
    logps_chunk: int = _f(0, "sequence chunk for token log-probs (0 = whole sequence); bounds [2B, T, V] memory")
    log_every: int = _f(10, "log metrics every N optimizer steps")
    eval_every: int = _f(0, "evaluate on the held-out split every N steps (0 = only at the end)")
    eval_pairs: int = _f(0, "evaluate on at most this many held-out pairs (0 = all)")
    eval_batch: int = _f(0, "pairs per evaluation batch (0 = micro_batch)")
    eval_prefix_margins: bool = _f(
        True, "log the prefix margins M_k (at k = 1, 2, 4, 8, 16 and 10/25/50/100% of the shorter response) "
        "in every evaluation (`poet-jax train` with a frozen reference, single process)"
    )
    save_every: int = _f(0, "save an Orbax checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _f(2, "keep the last K checkpoints")
    async_checkpoint: bool = _f(
        True, "write checkpoints in the background (training continues after the device-to-host copy)"
    )
    on_nonfinite: str = _f(
        "stop", "a NaN/Inf loss or gradient: stop (error naming the step) or skip (drop that update, continue); "
        "the update is never applied either way", choices=("stop", "skip"),
    )
    export: bool = _f(True, "write a Hugging Face export of the final policy to <output_dir>/hf")
    progress: bool = _f(True, "show a tqdm progress bar")
    tensorboard: bool = _f(True, "write TensorBoard event files to <output_dir>/tb")
    peak_tflops: float = _f(0.0, "peak TFLOP/s per device for MFU (0 = look up the device kind; unknown -> no MFU)")
    data_parallel: int = _f(0, "devices on the 'data' mesh axis (0 = all devices not used by fsdp/tensor)")
    fsdp: int = _f(1, "devices on the 'fsdp' mesh axis (parameters and optimizer state sharded, batch too)")
    tensor: int = _f(1, "devices on the 'tensor' mesh axis (heads / MLP / vocab sharded)")


@dataclass
class Config:
    model: ModelSection = _f(help="initial policy", factory=ModelSection)
    data: DataSection = _f(help="preference data pipeline", factory=DataSection)
    loss: LossSection = _f(help="preference loss", factory=LossSection)
    reference: ReferenceSection = _f(help="reference model handling", factory=ReferenceSection)
    optim: OptimSection = _f(help="optimizer and schedule", factory=OptimSection)
    train: TrainSection = _f(help="training loop", factory=TrainSection)


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _resolved_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, key: str, choices=None) -> Any:
    """Check/convert one leaf value to the field type ``tp``; ConfigError naming ``key`` otherwise."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is list or origin is list:
        if value is None:
            return []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        out_list = []
        for i, v in enumerate(value):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{key}[{i}]: expected an integer, got {v!r}")
            out_list.append(v)
        return out_list
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            out = value.lower() in ("true", "yes", "1")
        else:
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            fv = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not fv.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        out = int(fv)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    elif tp is str:
        if value is None:
            out = ""
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            out = str(value)
        else:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    else:  # pragma: no cover - schema only uses the types above
        raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")
    if choices is not None and out not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}; got {out!r}")
    return out


def _build(cls, values: dict, prefix: str = ""):
    hints = _resolved_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        import difflib

        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(names), n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ConfigError(f"unknown config key {prefix}{k}{hint}; valid keys here: {', '.join(names)}")
    kwargs = {}
    for name, f in names.items():
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], prefix + name, f.metadata.get("choices"))
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if any(p == "" for p in parts):
        raise ConfigError(f"bad override key {dotted!r}")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """``["optim.lr=1e-6", "data.use_poet=true"]`` -> ``[("optim.lr", 1e-6), ("data.use_poet", True)]``.

    Values are parsed as YAML scalars (numbers, booleans, strings, lists, null).
    """
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-6)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def config_from_dict(values: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build and validate a :class:`Config` from a nested dict plus ``key=value`` overrides."""
    import copy

    tree = copy.deepcopy(values or {})
    if not isinstance(tree, dict):
        raise ConfigError(f"the configuration must be a mapping of sections, got {type(tree).__name__}")
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config file, apply dotted ``key=value`` overrides, validate. Raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    cfg = config_from_dict(values or {}, overrides)
    # Relative paths in a config are relative to the working directory (like every CLI); nothing to rewrite.
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict (YAML/JSON serialisable) of a Config."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- validation

def loss_needs_reference(name: str) -> bool:
    """Whether loss ``name`` compares against a reference model (``poet_jax.losses.needs_reference``)."""
    return losses.needs_reference(name)


def known_losses() -> tuple[str, ...]:
    """Names of the losses registered in ``poet_jax.losses``."""
    return tuple(sorted(losses.LOSSES))


def resolved_reference_mode(cfg: Config) -> str:
    """``reference.mode`` with ``auto`` resolved from the loss."""
    if cfg.reference.mode != "auto":
        return cfg.reference.mode
    return "frozen" if loss_needs_reference(cfg.loss.name) else "none"


def micro_batch(cfg: Config) -> int:
    return cfg.train.micro_batch or cfg.train.global_batch


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    """``org/name`` that is not a local path: resolved through the Hugging Face Hub cache at load time."""
    return bool(_HUB_ID.match(path)) and not Path(path).exists()


def check_model_path(path: str, key: str = "model.path") -> None:
    """A local HF directory with config.json, or a Hub id ``org/name``; ConfigError otherwise."""
    if is_hub_id(path):
        return
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    if not (p / "config.json").is_file():
        raise ConfigError(f"{key}: {path} is not a Hugging Face model directory (no config.json)")


def validate(cfg: Config, *, check_paths: bool = True) -> None:
    """Raise ConfigError (naming the key) for impossible values. Reads no weights."""
    m, d, lo, r, o, t = cfg.model, cfg.data, cfg.loss, cfg.reference, cfg.optim, cfg.train
    if not m.path:
        raise ConfigError("model.path is missing: give the initial policy's Hugging Face directory")
    if check_paths and not m.create_tiny:
        check_model_path(m.path)
    if not d.path:
        raise ConfigError("data.path is missing: give the training preference data")
    if d.max_length <= 1:
        raise ConfigError(f"data.max_length must be > 1, got {d.max_length}")
    if not 0 <= d.max_prompt_length < d.max_length:
        raise ConfigError(
            f"data.max_prompt_length must be in [0, data.max_length={d.max_length}), got {d.max_prompt_length}"
        )
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    if d.eval_fraction and (d.eval_path or d.eval_split):
        raise ConfigError("data.eval_fraction: give either data.eval_path/data.eval_split or eval_fraction, not both")
    if not 0.0 < d.poet_ratio <= 1.0:
        raise ConfigError(f"data.poet_ratio must be in (0, 1], got {d.poet_ratio}")
    if d.max_records < 0:
        raise ConfigError(f"data.max_records must be >= 0, got {d.max_records}")
    if any(b < 1 for b in d.bucket_lengths):
        raise ConfigError(f"data.bucket_lengths must be positive, got {d.bucket_lengths}")
    if d.packed_length_multiple < 0:
        raise ConfigError(f"data.packed_length_multiple must be >= 0, got {d.packed_length_multiple}")
    if d.packed_row_length < 0:
        raise ConfigError(f"data.packed_row_length must be >= 0, got {d.packed_row_length}")
    if d.max_pairs_per_row < 1:
        raise ConfigError(f"data.max_pairs_per_row must be >= 1, got {d.max_pairs_per_row}")
    if d.bucket_lengths and max(d.bucket_lengths) < d.max_length:
        raise ConfigError(
            f"data.bucket_lengths: the largest bucket {max(d.bucket_lengths)} must be >= data.max_length={d.max_length}"
        )
    names = known_losses()
    if lo.name not in names:
        raise ConfigError(f"loss.name: unknown loss {lo.name!r}; available: {', '.join(names)}")
    if not lo.beta > 0:
        raise ConfigError(f"loss.beta must be > 0, got {lo.beta}")
    if lo.gamma_beta_ratio < 0:
        raise ConfigError(f"loss.gamma_beta_ratio must be >= 0, got {lo.gamma_beta_ratio}")
    if not 0.0 <= lo.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {lo.label_smoothing}")
    mode = resolved_reference_mode(cfg)
    if mode == "none" and loss_needs_reference(lo.name):
        raise ConfigError(f"reference.mode: loss {lo.name!r} needs a reference model; use frozen or precomputed")
    if mode in ("frozen", "precomputed") and not loss_needs_reference(lo.name):
        raise ConfigError(
            f"reference.mode: loss {lo.name!r} is reference-free; set reference.mode to none or auto"
        )
    if r.batch_pairs < 0:
        raise ConfigError(f"reference.batch_pairs must be >= 0, got {r.batch_pairs}")
    if not o.lr > 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if not 0.0 <= o.warmup_ratio < 1.0:
        raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    if o.max_grad_norm < 0:
        raise ConfigError(f"optim.max_grad_norm must be >= 0, got {o.max_grad_norm}")
    for k in ("b1", "b2"):
        if not 0.0 <= getattr(o, k) < 1.0:
            raise ConfigError(f"optim.{k} must be in [0, 1), got {getattr(o, k)}")
    if not o.eps > 0:
        raise ConfigError(f"optim.eps must be > 0, got {o.eps}")
    if not t.output_dir:
        raise ConfigError("train.output_dir is missing: give a directory for checkpoints and logs")
    if t.global_batch < 1:
        raise ConfigError(f"train.global_batch must be >= 1, got {t.global_batch}")
    if t.micro_batch < 0:
        raise ConfigError(f"train.micro_batch must be >= 0, got {t.micro_batch}")
    mb = micro_batch(cfg)
    if t.global_batch % mb:
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={mb}"
        )
    if t.max_steps < 0:
        raise ConfigError(f"train.max_steps must be >= 0, got {t.max_steps}")
    if t.max_steps == 0 and not t.epochs > 0:
        raise ConfigError(f"train.epochs must be > 0 when train.max_steps is 0, got {t.epochs}")
    for k in ("log_every", "eval_every", "save_every", "eval_pairs", "eval_batch", "logps_chunk", "data_parallel"):
        if getattr(t, k) < 0:
            raise ConfigError(f"train.{k} must be >= 0, got {getattr(t, k)}")
    if t.log_every == 0:
        raise ConfigError("train.log_every must be >= 1")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    if t.peak_tflops < 0:
        raise ConfigError(f"train.peak_tflops must be >= 0, got {t.peak_tflops}")
    for k in ("fsdp", "tensor"):
        if getattr(t, k) < 1:
            raise ConfigError(f"train.{k} must be >= 1, got {getattr(t, k)}")
    if t.data_parallel and mb % (t.data_parallel * t.fsdp):
        raise ConfigError(
            f"train.micro_batch={mb} is not divisible by the {t.data_parallel * t.fsdp} batch-sharded devices "
            f"(train.data_parallel x train.fsdp)"
        )
    tiny = m.tiny
    if m.create_tiny:
        for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
            if getattr(tiny, k) < 1:
                raise ConfigError(f"model.tiny.{k} must be >= 1, got {getattr(tiny, k)}")
        if tiny.hidden_size % tiny.num_heads:
            raise ConfigError("model.tiny.hidden_size must be divisible by model.tiny.num_heads")
        if tiny.num_heads % tiny.num_kv_heads:
            raise ConfigError("model.tiny.num_heads must be divisible by model.tiny.num_kv_heads")


# --------------------------------------------------------------------------- introspection


def schema_rows(cls=Config, prefix: str = "") -> list[dict]:
    """Every leaf key of the schema: ``{"key", "type", "default", "help", "choices"}`` in declaration order."""
    rows = []
    hints = _resolved_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            rows.extend(schema_rows(tp, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:  # pragma: no cover - every field has a default
            default = None
        rows.append(
            {
                "key": key,
                "type": _type_name(tp),
                "default": default,
                "help": f.metadata.get("help", ""),
                "choices": f.metadata.get("choices"),
            }
        )
    return rows


def sections() -> dict[str, str]:
    """Top-level section name -> one-line meaning."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(Config)}


__all__ = [
    "Config",
    "ConfigError",
    "DataSection",
    "LossSection",
    "ModelSection",
    "OptimSection",
    "ReferenceSection",
    "TinyModelSpec",
    "TrainSection",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_overrides",
    "resolved_reference_mode",
    "schema_rows",
    "validate",
]


