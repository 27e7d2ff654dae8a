"""Conversation -> Example: chat-template rendering and tokenization.

Chat mode (``chat_template=True``), for each pair:

1. render the prompt with the generation prompt (text ``P``), and prompt+response for
   each response (texts ``F_c``, ``F_r``) with ``tokenizer.apply_chat_template``;
2. tokenize the three texts with ``add_special_tokens=False`` (the template already
   writes BOS where the model wants it, so BOS is never doubled);
3. the prompt ids must be a prefix of both prompt+response ids; the response ids are
   the rest. If they are not (a template rendering the prompt alone differently, or
   tokens merging across the boundary) the common prefix is used, exactly as TRL 1.16
   does, and the pair is counted in ``DataReport.prefix_mismatch`` and logged;
4. every response must end with an end-of-turn / EOS special token (trailing
   whitespace tokens such as ChatML's ``"\\n"`` after ``<|im_end|>`` are allowed, as
   the template writes them); otherwise ``eos_token_id`` is appended.

Plain-text mode (``chat_template=False``, base models): ``P`` is the prompt text and
``F = P + response``; the same prefix rule applies; BOS is put once in front of the
prompt if the tokenizer adds one on its own, and EOS is appended to every response
that does not already end with it.

Steps 1-3 give exactly TRL 1.16's ``DPOTrainer`` token ids for the equivalent
TRL-format record (tested in tests/test_data_trl_parity.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from poet_jax.data.errors import DataError
from poet_jax.data.formats import Conversation

logger = logging.getLogger("poet_jax.data")

# Bump when the tokenization semantics change, to invalidate caches.
TOKENIZATION_VERSION = 1


@dataclasses.dataclass(eq=False)
class Example:
    """One tokenized preference pair.

    ``prompt_ids`` int32 [P], ``chosen_ids`` int32 [Nc], ``rejected_ids`` int32 [Nr]:
    a training row is ``prompt_ids ++ chosen_ids`` (resp. ``rejected_ids``).
    ``source`` / ``record``: where the pair came from (file and 0-based record number).
    """

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    source: str = ""
    record: int = -1

    @property
    def row_length(self) -> int:
        """Length of the longer of the two rows (prompt + response)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    def replace(self, **kw: Any) -> "Example":
        return dataclasses.replace(self, **kw)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class TokenizerInfo:
    """What the pipeline needs to know about a Hugging Face tokenizer, computed once."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no eos_token_id; every response must end with EOS")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        for tid, tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
            if getattr(tok, "special", False):
                special.add(int(tid))
        special.add(int(self.eos_id))
        self.special_ids = frozenset(int(t) for t in special)
        with_sp = tokenizer("a")["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.adds_bos = self.bos_id is not None and len(with_sp) > len(without) and with_sp[0] == self.bos_id
        self._ws_cache: dict[int, bool] = {}

    def is_whitespace(self, tid: int) -> bool:
        r = self._ws_cache.get(tid)
        if r is None:
            r = tid not in self.special_ids and self.tokenizer.decode([tid]).strip() == ""
            self._ws_cache[tid] = r
        return r

    def ends_turn(self, ids: Sequence[int]) -> bool:
        """True if ``ids`` end with a special token, ignoring trailing whitespace tokens."""
        i = len(ids)
        while i > 0 and self.is_whitespace(int(ids[i - 1])):
            i -= 1
        return i > 0 and int(ids[i - 1]) in self.special_ids

    def fingerprint(self) -> str:
        """Hash of the tokenizer's vocabulary, merges, template and special tokens."""
        tok = self.tokenizer
        h = hashlib.sha256()
        h.update(type(tok).__name__.encode())
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            h.update(backend.to_str().encode())
        else:
            h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
        h.update(str(getattr(tok, "chat_template", None)).encode())
        h.update(json.dumps([self.bos_id, self.eos_id, self.pad_id, sorted(self.special_ids), self.adds_bos]).encode())
        return h.hexdigest()


def _render(tok: Any, messages: list[dict], add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_texts(conv: Conversation, info: TokenizerInfo, chat_template: bool) -> tuple[str, str, str]:
    """``(P, F_chosen, F_rejected)`` texts for one conversation (see module docstring)."""
    if chat_template:
        tok = info.tokenizer
        if getattr(tok, "chat_template", None) is None:
            raise ValueError(
                "the tokenizer has no chat template; set chat_template=False for plain-text (base model) data"
            )
        return (
            _render(tok, conv.prompt, True),
            _render(tok, conv.prompt + conv.chosen, False),
            _render(tok, conv.prompt + conv.rejected, False),
        )
    p, c, r = conv.plain_text()
    return p, p + c, p + r


@dataclasses.dataclass
class TokenizeStats:
    prefix_mismatch: int = 0
    eos_appended: int = 0


def split_ids(
    p_ids: Sequence[int], fc_ids: Sequence[int], fr_ids: Sequence[int], info: TokenizerInfo,
    chat_template: bool, stats: TokenizeStats,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids of P, F_c, F_r -> (prompt_ids, chosen_ids, rejected_ids) int32 arrays."""
    plen = min(common_prefix_length(p_ids, fc_ids), common_prefix_length(p_ids, fr_ids))
    if plen < len(p_ids):
        stats.prefix_mismatch += 1
    prompt = list(p_ids[:plen])
    chosen, rejected = list(fc_ids[plen:]), list(fr_ids[plen:])
    bos = info.bos_id
    if chat_template:
        if bos is not None and len(prompt) >= 2 and prompt[0] == bos and prompt[1] == bos:
            prompt = prompt[1:]  # a template that writes BOS twice: keep one
        for resp in (chosen, rejected):
            if not info.ends_turn(resp):
                resp.append(info.eos_id)
                stats.eos_appended += 1
    else:
        if info.adds_bos and (not prompt or prompt[0] != bos):
            prompt.insert(0, bos)
        for resp in (chosen, rejected):
            if not resp or resp[-1] != info.eos_id:
                resp.append(info.eos_id)
                stats.eos_appended += 1
    return (np.asarray(prompt, np.int32), np.asarray(chosen, np.int32), np.asarray(rejected, np.int32))


def tokenize_conversation(conv: Conversation, tokenizer: Any, chat_template: bool = True) -> Example:
    """Tokenize one conversation (convenience wrapper; the pipeline batches this)."""
    info = tokenizer if isinstance(tokenizer, TokenizerInfo) else TokenizerInfo(tokenizer)
    texts = render_texts(conv, info, chat_template)
    ids = info.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    p, c, r = split_ids(ids[0], ids[1], ids[2], info, chat_template, TokenizeStats())
    return Example(p, c, r)


def tokenize_conversations(
    convs: Sequence[tuple[str, int, Conversation]],
    info: TokenizerInfo,
    chat_template: bool,
    *,
    on_error: Any,
    progress: bool = True,
    chunk: int = 512,
) -> tuple[list[Example], TokenizeStats]:
    """Tokenize ``(source, record, Conversation)`` triples in chunks (batched fast tokenizer).

    A conversation whose template rendering fails is passed as a DataError
    (reason ``template_error``) to ``on_error`` (which raises or counts it).
    """
    from tqdm.auto import tqdm

    if chat_template and getattr(info.tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the tokenizer has no chat template; set chat_template=False for plain-text (base model) data"
        )
    stats = TokenizeStats()
    out: list[Example] = []
    bar = tqdm(total=len(convs), desc="tokenizing pairs", unit="pair", disable=not progress or len(convs) < 2000)
    for start in range(0, len(convs), chunk):
        part = convs[start : start + chunk]
        texts: list[str] = []
        keep = []
        for src, rec, conv in part:
            try:
                t = render_texts(conv, info, chat_template)
            except Exception as err:  # jinja2 TemplateError and friends
                on_error(DataError(src, rec, "template_error", f"{type(err).__name__}: {err}"))
                continue
            texts.extend(t)
            keep.append((src, rec))
        ids = info.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        for j, (src, rec) in enumerate(keep):
            p, c, r = split_ids(ids[3 * j], ids[3 * j + 1], ids[3 * j + 2], info, chat_template, stats)
            out.append(Example(p, c, r, src, rec))
        bar.update(len(part))
    bar.close()
    if stats.prefix_mismatch:
        logger.warning(
            "%d pairs: the tokenized prompt is not a prefix of the tokenized prompt+response "
            "(template renders the prompt differently, or tokens merge across the boundary); "
            "the common prefix was used as the prompt", stats.prefix_mismatch,
        )
    return out, stats


# -- cache ------------------------------------------------------------------------------

def _pack(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return flat, offsets


def _unpack(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def save_examples(path: str, examples: list[Example], meta: dict) -> None:
    """Write examples + a JSON ``meta`` dict to ``path`` (.npz) atomically."""
    import os
    import tempfile

    pf, po = _pack([e.prompt_ids for e in examples])
    cf, co = _pack([e.chosen_ids for e in examples])
    rf, ro = _pack([e.rejected_ids for e in examples])
    rec = np.asarray([e.record for e in examples], np.int64)
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, pf=pf, po=po, cf=cf, co=co, rf=rf, ro=ro, rec=rec,
                     meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_examples(path: str, source: str) -> tuple[list[Example], dict]:
    with np.load(path) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        ps, cs, rs = _unpack(z["pf"], z["po"]), _unpack(z["cf"], z["co"]), _unpack(z["rf"], z["ro"])
        recs = z["rec"].tolist()
    return [Example(p, c, r, source, i) for p, c, r, i in zip(ps, cs, rs, recs)], meta
