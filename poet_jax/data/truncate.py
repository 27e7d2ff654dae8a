"""Length rules on token ids: ``max_length`` / ``max_prompt_length`` truncation, then POET.

``truncation_lengths`` is TRL 0.9.6's ``tokenize_row`` rule (the paper's configs):
with ``longer = max(n_chosen, n_rejected)``,

1. if ``prompt + longer > max_length``: the prompt keeps its last ``max_prompt_length``
   tokens;
2. if still ``prompt' + longer > max_length``: each response keeps its first
   ``max_length - prompt'`` tokens (``mode="fit"``, the default), or its first
   ``max_length - max_prompt_length`` tokens (``mode="trl096"``, TRL 0.9.6's literal
   code, which can leave the row shorter than max_length).

POET then cuts both responses by ``poet_jax.losses.poet_keep_lengths`` (rule "min":
both to ``k = min(n_chosen, n_rejected)``, counted from each response's own start).
"""

from __future__ import annotations

from poet_jax.data.tokenize import Example

TRUNCATION_MODES = ("fit", "trl096")


def truncation_lengths(
    n_prompt: int, n_chosen: int, n_rejected: int, max_length: int | None,
    max_prompt_length: int | None, mode: str = "fit",
) -> tuple[int, int, int]:
    """Lengths ``(prompt, chosen, rejected)`` kept by the max_length rules (pure, on ints).

    The prompt keeps its END (``prompt_ids[-p:]``), responses keep their START.
    A returned response length of 0 means the pair cannot fit.
    """
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation mode {mode!r}: expected one of {TRUNCATION_MODES}")
    if max_length is None:
        return n_prompt, n_chosen, n_rejected
    longer = max(n_chosen, n_rejected)
    p = n_prompt
    if p + longer > max_length and max_prompt_length is not None:
        p = min(p, max_prompt_length)
    c, r = n_chosen, n_rejected
    if p + longer > max_length:
        if mode == "fit" or max_prompt_length is None:
            room = max_length - p
        else:
            room = max_length - max_prompt_length
        room = max(room, 0)
        c, r = min(c, room), min(r, room)
    return p, c, r


def truncate_example(
    ex: Example, max_length: int | None, max_prompt_length: int | None, mode: str = "fit"
) -> tuple[Example, bool, bool]:
    """Apply ``truncation_lengths`` to an Example.

    Returns ``(example, prompt_was_cut, response_was_cut)``. Callers must check for an
    empty response (the pair does not fit) themselves.
    """
    np_, nc, nr = len(ex.prompt_ids), len(ex.chosen_ids), len(ex.rejected_ids)
    p, c, r = truncation_lengths(np_, nc, nr, max_length, max_prompt_length, mode)
    if (p, c, r) == (np_, nc, nr):
        return ex, False, False
    out = ex.replace(
        prompt_ids=ex.prompt_ids[np_ - p :],
        chosen_ids=ex.chosen_ids[:c],
        rejected_ids=ex.rejected_ids[:r],
    )
    return out, p < np_, (c < nc or r < nr)


def poet_lengths(n_chosen: int, n_rejected: int, rule: str = "min", ratio: float = 1.0) -> tuple[int, int]:
    """POET's kept response lengths (delegates to ``poet_jax.losses.poet_keep_lengths``)."""
    from poet_jax.losses import poet_keep_lengths

    kc, kr = poet_keep_lengths(n_chosen, n_rejected, rule=rule, ratio=ratio)
    return int(kc), int(kr)


def poet_truncate_example(ex: Example, rule: str = "min", ratio: float = 1.0) -> Example:
    """Physically cut both responses of ``ex`` to POET's kept lengths (prompt untouched)."""
    kc, kr = poet_lengths(len(ex.chosen_ids), len(ex.rejected_ids), rule, ratio)
    if kc == len(ex.chosen_ids) and kr == len(ex.rejected_ids):
        return ex
    return ex.replace(chosen_ids=ex.chosen_ids[:kc], rejected_ids=ex.rejected_ids[:kr])
