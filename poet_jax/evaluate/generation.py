"""Generation-based evaluation: sample responses to held-out prompts and score them.

Sampling follows the paper's evaluation setting by default (temperature 0.7, top-p 1.0)
and goes through ``poet_jax.models.generate`` (batched, KV cache). Everything is
deterministic for a given ``seed``: prompts are padded to one width and batches to one
size (so one compilation serves all of them), and batch ``i`` samples with
``jax.random.fold_in(jax.random.key(seed), i)``.

A reward is pluggable:

* any Python function ``reward(prompt_text, response_text) -> float``; it receives the
  prompt as given (a string, or the last message's content for a message list) and
  exactly the decoded response (generated tokens up to, not including, the end token,
  decoded with ``skip_special_tokens=True``);
* or an object with ``score_batch(prompts, responses) -> array`` such as
  :class:`CausalLMReward`, which scores a response with a causal LM loaded like any
  other model (mean or summed log-probability of the response tokens).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import jax
import numpy as np

from poet_jax.data.tokenize import common_prefix_length
from poet_jax.models import generate

Prompt = Union[str, Sequence[dict]]
RewardFn = Callable[[str, str], float]

PAPER_TEMPERATURE = 0.7
PAPER_TOP_P = 1.0


def prompt_text(prompt: Prompt) -> str:
    """The text a reward function sees for ``prompt``: the string, or the last message's content."""
    if isinstance(prompt, str):
        return prompt
    msgs = list(prompt)
    if not msgs or not isinstance(msgs[-1], dict) or "content" not in msgs[-1]:
        raise ValueError(f"a prompt must be a string or a non-empty list of chat messages, got {prompt!r}")
    return str(msgs[-1]["content"])


def _messages(prompt: Prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def encode_prompts(tokenizer, prompts: Sequence[Prompt], *, chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt: the chat template with the generation prompt (or plain text)."""
    out = []
    for p in prompts:
        if chat_template:
            text = tokenizer.apply_chat_template(_messages(p), add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt_text(p))["input_ids"]
        if not ids:
            raise ValueError(f"prompt {prompt_text(p)!r} encodes to no tokens")
        out.append(list(ids))
    return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int32 ``[N, width]``, left-padded (generation layout)."""
    width = max(len(s) for s in seqs) if width is None else width
    ids = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        if len(s) > width:
            raise ValueError(f"prompt {i} has {len(s)} tokens, more than width {width}")
        if len(s):
            ids[i, width - len(s):] = s
            mask[i, width - len(s):] = 1
    return ids, mask


@dataclasses.dataclass
class Samples:
    """Sampled responses: ``responses[i]`` (decoded text), ``token_ids[i]`` (generated ids
    before the end token), ``lengths [N]`` (that many tokens), ``finished [N]`` (an end token
    was produced within ``max_new_tokens``)."""

    prompts: list[Prompt]
    responses: list[str]
    token_ids: list[list[int]]
    lengths: np.ndarray
    finished: np.ndarray


def _end_ids(model, tokenizer, eos_token_ids) -> tuple[int, ...]:
    if eos_token_ids is not None:
        return (int(eos_token_ids),) if isinstance(eos_token_ids, int) else tuple(int(e) for e in eos_token_ids)
    ids = tuple(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids = ids + (int(tokenizer.eos_token_id),)
    if not ids:
        raise ValueError("no end token: the model config and the tokenizer have no eos_token_id; pass eos_token_ids")
    return ids


def sample_responses(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    temperature: float = PAPER_TEMPERATURE,
    top_p: float = PAPER_TOP_P,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    chat_template: bool = True,
    eos_token_ids: int | Sequence[int] | None = None,
) -> Samples:
    """Sample one response per prompt with ``poet_jax.models.generate`` (deterministic per ``seed``)."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to sample from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ends = _end_ids(model, tokenizer, eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    encoded = encode_prompts(tokenizer, prompts, chat_template=chat_template)
    width = max(len(e) for e in encoded)
    bsz = min(batch_size, len(encoded))
    base = jax.random.key(seed)
    responses, token_ids, lengths, finished = [], [], [], []
    for b, start in enumerate(range(0, len(encoded), bsz)):
        chunk = encoded[start: start + bsz]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (bsz - n)  # fixed batch shape: one compilation
        ids, mask = left_pad(chunk, pad, width)
        out = generate(
            model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_token_ids=ends, pad_token_id=pad, rng=jax.random.fold_in(base, b),
        )
        seqs = np.asarray(jax.device_get(out.sequences))[:n]
        lens = np.asarray(jax.device_get(out.lengths))[:n]
        for row, n_gen in zip(seqs, lens):
            gen = [int(t) for t in row[: int(n_gen)]]
            done = bool(gen) and gen[-1] in ends
            if done:
                gen = gen[:-1]
            token_ids.append(gen)
            responses.append(tokenizer.decode(gen, skip_special_tokens=True))
            lengths.append(len(gen))
            finished.append(done)
    return Samples(prompts, responses, token_ids, np.asarray(lengths, np.int64), np.asarray(finished, bool))


class CausalLMReward:
    """Reward from a causal LM: the (mean or summed) log-probability of the response.

    ``model`` is a ``poet_jax.models.CausalLM`` (e.g. ``from_pretrained(path)``); the
    prompt is rendered with ``tokenizer``'s chat template as one user message, the
    response appended as the assistant turn (with its end-of-turn token), and the
    response tokens scored. ``reduction``: ``"mean"`` (per-token average) or ``"sum"``.
    """

    def __init__(self, model, tokenizer, *, reduction: str = "mean", batch_size: int = 32):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"CausalLMReward reduction must be 'mean' or 'sum', got {reduction!r}")
        self.model, self.tokenizer, self.reduction, self.batch_size = model, tokenizer, reduction, batch_size

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "CausalLMReward":
        from transformers import AutoTokenizer

        from poet_jax.models import from_pretrained

        return cls(from_pretrained(path), AutoTokenizer.from_pretrained(str(path)), **kwargs)

    def _rows(self, prompt: str, response: str) -> tuple[list[int], int]:
        tok = self.tokenizer
        p_msgs = [{"role": "user", "content": prompt}]
        p = tok(tok.apply_chat_template(p_msgs, add_generation_prompt=True, tokenize=False),
                add_special_tokens=False)["input_ids"]
        f = tok(tok.apply_chat_template(p_msgs + [{"role": "assistant", "content": response}], tokenize=False),
                add_special_tokens=False)["input_ids"]
        return list(f), common_prefix_length(p, f)

    def score_batch(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """``[N]`` float64 rewards."""
        from poet_jax.evaluate.margins import row_token_logps

        rows = [self._rows(p, r) for p, r in zip(prompts, responses)]
        width = max(len(f) for f, _ in rows)
        width = -(-width // 16) * 16
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = np.zeros(len(rows))
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s: s + self.batch_size]
            chunk = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
            ids = np.full((len(chunk), width), pad, np.int32)
            att = np.zeros_like(ids)
            resp = np.zeros_like(ids)
            for i, (f, n) in enumerate(chunk):
                ids[i, : len(f)] = f
                att[i, : len(f)] = 1
                resp[i, n: len(f)] = 1
            tlp = row_token_logps(self.model, ids, att)
            m = resp[:, 1:]
            tot = (tlp * m).sum(1)
            val = tot / np.maximum(m.sum(1), 1) if self.reduction == "mean" else tot
            k = min(self.batch_size, len(rows) - s)
            out[s: s + k] = val[:k]
        return out

    def __call__(self, prompt: str, response: str) -> float:
        return float(self.score_batch([prompt], [response])[0])


def score(reward, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
    """Rewards ``[N]`` (float64) of ``responses`` with a function or a ``score_batch`` object."""
    texts = [prompt_text(p) for p in prompts]
    if hasattr(reward, "score_batch"):
        vals = np.asarray(reward.score_batch(texts, list(responses)), np.float64)
    elif callable(reward):
        vals = np.asarray([float(reward(p, r)) for p, r in zip(texts, responses)], np.float64)
    else:
        raise TypeError(f"reward must be a function (prompt, response) -> float or have score_batch; got {type(reward)}")
    if vals.shape != (len(texts),):
        raise ValueError(f"reward returned shape {vals.shape}, expected ({len(texts)},)")
    return vals


@dataclasses.dataclass
class GenerationReport:
    """Generation metrics over ``n_prompts`` prompts, one sample each.

    mean_reward, mean_length (generated tokens before the end token), finished_rate;
    with a reference policy: ref_mean_reward, ref_mean_length, win_rate (policy reward >
    reference reward on the same prompt; a tie counts one half), tie_rate.
    ``records``: per prompt ``{prompt, response, reward, length, [ref_response, ref_reward]}``.
    """

    n_prompts: int
    seed: int
    temperature: float
    top_p: float
    mean_reward: float
    mean_length: float
    finished_rate: float
    ref_mean_reward: float | None = None
    ref_mean_length: float | None = None
    win_rate: float | None = None
    tie_rate: float | None = None
    records: list[dict] = dataclasses.field(default_factory=list, repr=False)

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not with_records:
            d.pop("records")
        return d

    def save_json(self, path: str | Path, with_records: bool = True) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(with_records), indent=1))
        return path


def evaluate_generation(
    policy,
    tokenizer,
    prompts: Sequence[Prompt],
    reward,
    *,
    reference=None,
    reference_samples: Samples | None = None,
    reference_rewards: np.ndarray | None = None,
    seed: int = 0,
    temperature: float = PAPER_TEMPERATURE,
    top_p: float = PAPER_TOP_P,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    chat_template: bool = True,
) -> GenerationReport:
    """Sample from ``policy`` (and ``reference``, unless its ``reference_samples`` are given)
    on ``prompts`` with the same seed, score both with ``reward`` (the reference's scores may be
    passed as ``reference_rewards`` when several policies are compared with the same samples),
    and compare."""
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
              batch_size=batch_size, chat_template=chat_template)
    pol = sample_responses(policy, tokenizer, prompts, **kw)
    r_pol = score(reward, pol.prompts, pol.responses)
    rep = GenerationReport(
        n_prompts=len(pol.prompts), seed=seed, temperature=temperature, top_p=top_p,
        mean_reward=float(r_pol.mean()), mean_length=float(pol.lengths.mean()),
        finished_rate=float(pol.finished.mean()),
    )
    records = [
        {"prompt": prompt_text(p), "response": r, "reward": float(v), "length": int(n)}
        for p, r, v, n in zip(pol.prompts, pol.responses, r_pol, pol.lengths)
    ]
    if reference is not None and reference_samples is None:
        reference_samples = sample_responses(reference, tokenizer, prompts, **kw)
    if reference_samples is not None:
        ref = reference_samples
        if len(ref.responses) != len(pol.responses):
            raise ValueError(f"reference_samples has {len(ref.responses)} responses for {len(pol.responses)} prompts")
        r_ref = score(reward, ref.prompts, ref.responses) if reference_rewards is None else reference_rewards
        wins, ties = (r_pol > r_ref), (r_pol == r_ref)
        rep.ref_mean_reward = float(r_ref.mean())
        rep.ref_mean_length = float(ref.lengths.mean())
        rep.win_rate = float((wins + 0.5 * ties).mean())
        rep.tie_rate = float(ties.mean())
        for rec, rr, vv in zip(records, ref.responses, r_ref):
            rec["ref_response"], rec["ref_reward"] = rr, float(vv)
    rep.records = records
    return rep
