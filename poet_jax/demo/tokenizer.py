"""A word-level tokenizer for the demo task, built locally (no downloads).

It is a ``tokenizers`` WordLevel model (split on whitespace) wrapped in transformers'
``PreTrainedTokenizerFast``, with a ChatML-like chat template without newlines::

    <|im_start|>user what is 3 + 4 ?<|im_end|><|im_start|>assistant 7 . ok<|im_end|>

Special tokens follow SmolLM2's layout: ``<|endoftext|>`` = 0, ``<|im_start|>`` = 1
(bos), ``<|im_end|>`` = 2 (eos, and pad as in SmolLM2-Instruct), ``<unk>`` = 3. The
template renders the prompt with ``add_generation_prompt=True`` as an exact token prefix
of the full conversation, so responses start right after ``<|im_start|>assistant``.
Saved with ``save_pretrained`` it loads back with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
ROLE_WORDS = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def build_tokenizer(vocab_words: Iterable[str]):
    """A ``PreTrainedTokenizerFast`` over ``SPECIAL_TOKENS + ROLE_WORDS + vocab_words``.

    Words are whitespace-separated; unknown words map to ``<unk>``. Decoding joins
    words with single spaces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, *ROLE_WORDS, *vocab_words):
        if any(c.isspace() for c in w) or not w:
            raise ValueError(f"demo tokenizer words must be non-empty and contain no whitespace: {w!r}")
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with " "
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
