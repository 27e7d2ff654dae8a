"""The embedded synthetic preference task: small additions, answer first, filler after.

A prompt asks ``what is A + B ?``. A response starts with a number (the answer), then a
full stop, then some filler words. Whether a response is good is decided by its first
token alone (the verifiable reward :func:`answer_reward`), while the responses' lengths
vary through the filler:

* chosen responses carry the right answer and a short tail of neutral filler
  (``ok``, ``sure``, ...);
* rejected responses carry a wrong answer (off by 1..``wrong_offset_max``) and, with
  probability ``p_long``, a long tail: ``long_lead`` neutral words, then a distinctive
  filler (``um``, ``hmm``, ...). Otherwise a short neutral tail like the chosen one.

That is the shape of DESIGN.md §9: a sequence-level margin can grow by making the
rejected tail improbable (many easy tokens) while the answer token, which decides what
is generated, barely moves. POET cuts every pair to the shorter response and leaves the
answer token to carry the margin. ``longer_side`` and ``label_noise`` vary the design.

Everything here is plain Python (``random.Random``), so the data is the same on every
platform for a given seed.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Literal

SHORT_FILLER = ("ok", "sure", "right", "yes")  # neutral words: short tails, and the lead of a long tail
LONG_FILLER = ("um", "hmm", "well", "uh", "so")  # the distinctive words of a long tail
PROMPT_WORDS = ("what", "is", "+", "?", ".")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Knobs of the synthetic task (all lengths are in words = tokens of the demo tokenizer).

    max_operand: operands are drawn from ``0..max_operand``; answers span ``0..2*max_operand``.
    short_tail: (min, max) neutral filler words after a short response's answer.
    long_tail: (min, max) distinctive filler words of a long tail.
    long_lead: neutral words before the distinctive part of a long tail (with the default
        short tails, POET's cut then never reaches the distinctive words).
    p_long: probability that the longer side of a pair gets a long tail.
    longer_side: which response gets the (possibly) long tail: ``"rejected"`` (DESIGN §9),
        ``"chosen"`` (the good answer rambles), or ``"random"`` (either, 50/50).
    label_noise: probability that a pair's chosen and rejected are swapped.
    wrong_offset_max: a wrong answer is the right one plus or minus 1..wrong_offset_max.
    sft_p_right: fraction of right-answer responses in the SFT mix.
    """

    max_operand: int = 9
    short_tail: tuple[int, int] = (0, 2)
    long_tail: tuple[int, int] = (8, 16)
    long_lead: int = 3
    p_long: float = 0.8
    longer_side: Literal["rejected", "chosen", "random"] = "rejected"
    label_noise: float = 0.0
    wrong_offset_max: int = 3
    sft_p_right: float = 0.5

    def __post_init__(self):
        if self.max_operand < 1:
            raise ValueError(f"TaskConfig.max_operand must be >= 1, got {self.max_operand}")
        for name in ("short_tail", "long_tail"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"TaskConfig.{name} must be (min, max) with 0 <= min <= max, got {(lo, hi)}")
        for name in ("p_long", "label_noise", "sft_p_right"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"TaskConfig.{name} must be in [0, 1], got {v}")
        if self.longer_side not in ("rejected", "chosen", "random"):
            raise ValueError(
                f"TaskConfig.longer_side must be 'rejected', 'chosen' or 'random', got {self.longer_side!r}"
            )
        if self.long_lead < 0:
            raise ValueError(f"TaskConfig.long_lead must be >= 0, got {self.long_lead}")
        if self.wrong_offset_max < 1:
            raise ValueError(f"TaskConfig.wrong_offset_max must be >= 1, got {self.wrong_offset_max}")

    @property
    def max_answer(self) -> int:
        return 2 * self.max_operand


def words(config: TaskConfig) -> list[str]:
    """Every word the task can produce (the demo tokenizer's regular vocabulary)."""
    numbers = [str(i) for i in range(config.max_answer + config.wrong_offset_max + 1)]
    return list(PROMPT_WORDS) + numbers + list(SHORT_FILLER) + list(LONG_FILLER)


def all_questions(config: TaskConfig) -> list[tuple[int, int]]:
    """All (a, b) operand pairs, in a fixed order."""
    n = config.max_operand + 1
    return [(a, b) for a in range(n) for b in range(n)]


def prompt_text(a: int, b: int) -> str:
    return f"what is {a} + {b} ?"


def parse_prompt(prompt: str) -> tuple[int, int]:
    """Inverse of :func:`prompt_text`; raises ValueError on any other text."""
    parts = prompt.split()  # [what, is, A, +, B, ?]
    if (
        len(parts) != 6
        or parts[:2] != ["what", "is"]
        or parts[3] != "+"
        or parts[5] != "?"
        or not (parts[2].isdigit() and parts[4].isdigit())
    ):
        raise ValueError(f"not a demo prompt (expected 'what is A + B ?'): {prompt!r}")
    return int(parts[2]), int(parts[4])


def response_text(answer: int, tail: list[str]) -> str:
    return " ".join([str(answer), "."] + tail)


def answer_reward(prompt: str, response: str) -> float:
    """Verifiable reward: 1.0 if the response's first word is the right sum, else 0.0.

    ``prompt`` is the user question (``what is A + B ?``), ``response`` the decoded
    assistant text. Leading whitespace is ignored; anything else (empty, not a number,
    a wrong number) scores 0.
    """
    a, b = parse_prompt(prompt)
    first = response.split()[:1]
    return 1.0 if first == [str(a + b)] else 0.0


def _wrong_answer(rng: random.Random, right: int, config: TaskConfig) -> int:
    while True:
        off = rng.randint(1, config.wrong_offset_max) * rng.choice((-1, 1))
        if right + off >= 0:
            return right + off


def _tail(rng: random.Random, config: TaskConfig, long: bool) -> list[str]:
    if not long:
        return [rng.choice(SHORT_FILLER) for _ in range(rng.randint(*config.short_tail))]
    lead = [rng.choice(SHORT_FILLER) for _ in range(config.long_lead)]
    return lead + [rng.choice(LONG_FILLER) for _ in range(rng.randint(*config.long_tail))]


def make_pair(rng: random.Random, a: int, b: int, config: TaskConfig) -> dict:
    """One preference record in TRL's conversational format (plus ``a``/``b`` metadata)."""
    right = a + b
    wrong = _wrong_answer(rng, right, config)
    long_side = config.longer_side
    if long_side == "random":
        long_side = rng.choice(("chosen", "rejected"))
    is_long = rng.random() < config.p_long
    chosen = response_text(right, _tail(rng, config, long_side == "chosen" and is_long))
    rejected = response_text(wrong, _tail(rng, config, long_side == "rejected" and is_long))
    if rng.random() < config.label_noise:
        chosen, rejected = rejected, chosen
    return {
        "prompt": [{"role": "user", "content": prompt_text(a, b)}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def make_sft_example(rng: random.Random, a: int, b: int, config: TaskConfig) -> dict:
    """One SFT record (conversational ``messages``): the chosen style with prob ``sft_p_right``,
    else the rejected style (as ``longer_side`` places the long tails)."""
    right = rng.random() < config.sft_p_right
    side = config.longer_side if config.longer_side != "random" else rng.choice(("chosen", "rejected"))
    long = rng.random() < config.p_long and side == ("chosen" if right else "rejected")
    answer = a + b if right else _wrong_answer(rng, a + b, config)
    text = response_text(answer, _tail(rng, config, long))
    return {
        "messages": [
            {"role": "user", "content": prompt_text(a, b)},
            {"role": "assistant", "content": text},
        ]
    }


@dataclasses.dataclass
class TaskData:
    """The demo's data: SFT examples, train / held-out preference pairs, eval prompts."""

    sft: list[dict]
    train_pairs: list[dict]
    eval_pairs: list[dict]
    eval_prompts: list[str]


def make_task_data(
    config: TaskConfig,
    *,
    seed: int,
    n_sft: int = 4000,
    n_train_pairs: int = 2000,
    n_eval_pairs: int = 200,
    n_eval_prompts: int | None = None,
    heldout_fraction: float = 0.0,
) -> TaskData:
    """Generate the whole task for one seed.

    With ``heldout_fraction > 0`` the question set is split: that fraction of the (a, b)
    pairs is held out of the preference training data (the SFT stage sees every
    question, as a pretrained model would know arithmetic), and held-out pairs and
    evaluation prompts come from the held-out questions only. With ``heldout_fraction=0``
    held-out pairs are freshly drawn pairs (new wrong answers and tails) on the same
    questions, and every question is an evaluation prompt.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    rng = random.Random(seed)
    questions = all_questions(config)
    rng.shuffle(questions)
    if heldout_fraction == 0.0:  # held-out pairs are fresh pairs on the same questions
        held, train_q = list(questions), list(questions)
    else:
        n_held = max(1, int(round(heldout_fraction * len(questions))))
        held, train_q = questions[:n_held], questions[n_held:]
    sft = [make_sft_example(rng, *rng.choice(questions), config) for _ in range(n_sft)]
    train_pairs = [make_pair(rng, *rng.choice(train_q), config) for _ in range(n_train_pairs)]
    eval_pairs = [make_pair(rng, *rng.choice(held), config) for _ in range(n_eval_pairs)]
    if n_eval_prompts is None:
        eval_prompts = [prompt_text(a, b) for a, b in sorted(held)]
    else:
        eval_prompts = [prompt_text(*held[i % len(held)]) for i in range(n_eval_prompts)]
    return TaskData(sft=sft, train_pairs=train_pairs, eval_pairs=eval_pairs, eval_prompts=eval_prompts)


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    """Write records one JSON object per line (the format the data pipeline reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path
