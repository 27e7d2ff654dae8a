"""Format adapters: one raw record -> :class:`Conversation`.

Supported formats (``detect_format`` picks one per source; ``format=`` overrides):

- ``trl_standard``: ``prompt``/``chosen``/``rejected`` strings; without ``prompt`` the
  prompt is the longest common prefix of chosen and rejected (TRL's ``extract_prompt``).
- ``trl_conversational``: ``chosen``/``rejected`` message lists (``{"role", "content"}``),
  with an explicit ``prompt`` message list or an implicit one (the messages before
  the final run of assistant messages, which must be equal on both sides).
- ``ultrafeedback``: string ``prompt`` plus message-list ``chosen``/``rejected`` that
  repeat the user turn (HuggingFaceH4/ultrafeedback_binarized, princeton-nlp/*-armorm).
- ``sharegpt``: LLaMA-Factory's ``conversations`` (``{"from", "value"}`` turns,
  human/gpt/system) with ``chosen``/``rejected`` single turns (and optional ``system``).
- ``hh_rlhf``: Anthropic HH-RLHF ``chosen``/``rejected`` transcripts
  (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``); the prompt is everything up to the last
  ``"\\n\\nAssistant:"``.

Every adapter validates its record and raises :class:`DataError` naming the source,
the record number and one reason of ``errors.REASONS``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from poet_jax.data.errors import DataError

Message = dict[str, str]
ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("trl_standard", "trl_conversational", "ultrafeedback", "sharegpt", "hh_rlhf")


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One preference pair as chat messages.

    ``prompt``: messages before the responses (ends with a user or tool message).
    ``chosen`` / ``rejected``: the responses, lists of assistant messages (usually one).
    ``text``: for string formats (TRL standard, HH-RLHF) the original
    ``(prompt, chosen, rejected)`` strings, used by the plain-text (no template) mode.
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    text: tuple[str, str, str] | None = None

    def plain_text(self) -> tuple[str, str, str]:
        """``(prompt, chosen, rejected)`` strings for the plain-text (base model) mode.

        String formats give their original text; message formats join message contents
        with blank lines (system and user turns for the prompt, assistant turns for each
        response).
        """
        if self.text is not None:
            return self.text
        join = lambda ms: "\n\n".join(m["content"] for m in ms)  # noqa: E731
        return join(self.prompt), join(self.chosen), join(self.rejected)


class _Ctx:
    """Where a record came from, to build error messages."""

    def __init__(self, source: str, record: int, line: int | None = None):
        self.source, self.record, self.line = source, record, line

    def error(self, reason: str, detail: str) -> DataError:
        return DataError(self.source, self.record, reason, detail, self.line)


# -- validation helpers ---------------------------------------------------------------

def _field(rec: dict, key: str, ctx: _Ctx) -> Any:
    if key not in rec:
        raise ctx.error("missing_field", f"field {key!r} is missing (fields present: {sorted(rec)})")
    return rec[key]


def _string(value: Any, key: str, ctx: _Ctx) -> str:
    if not isinstance(value, str):
        raise ctx.error("wrong_type", f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(value: Any, key: str, ctx: _Ctx) -> list[Message]:
    if not isinstance(value, list):
        raise ctx.error("wrong_type", f"field {key!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise ctx.error("bad_message", f"{key}[{j}] must be an object with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m or "content" not in m:
            raise ctx.error("bad_message", f"{key}[{j}] needs 'role' and 'content' (has {sorted(m)})")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ctx.error("bad_message", f"{key}[{j}] has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ctx.error("bad_message", f"{key}[{j}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _split_implicit(msgs: list[Message], key: str, ctx: _Ctx) -> tuple[list[Message], list[Message]]:
    """Split a full conversation into (prompt, final run of assistant messages)."""
    i = len(msgs)
    while i > 0 and msgs[i - 1]["role"] == "assistant":
        i -= 1
    if i == len(msgs):
        raise ctx.error("bad_role_order", f"{key!r} must end with an assistant message (the response)")
    return msgs[:i], msgs[i:]


def _check(conv: Conversation, ctx: _Ctx) -> Conversation:
    """Checks shared by every format: roles, emptiness, identical responses."""
    if not conv.prompt or all(not m["content"].strip() for m in conv.prompt if m["role"] != "system"):
        raise ctx.error("empty_prompt", "the prompt has no non-empty user message")
    if conv.prompt[-1]["role"] not in ("user", "tool"):
        raise ctx.error("bad_role_order", f"the prompt must end with a user message, ends with {conv.prompt[-1]['role']!r}")
    for name, resp in (("chosen", conv.chosen), ("rejected", conv.rejected)):
        if not resp:
            raise ctx.error("empty_response", f"{name} has no messages")
        if resp[0]["role"] != "assistant" or resp[-1]["role"] != "assistant":
            raise ctx.error("bad_role_order", f"{name} must start and end with an assistant message")
        if all(not m["content"].strip() for m in resp if m["role"] == "assistant"):
            raise ctx.error("empty_response", f"{name} is empty")
    if conv.chosen == conv.rejected:
        raise ctx.error("identical_responses", "chosen and rejected are identical")
    return conv


# -- adapters -------------------------------------------------------------------------

def common_prefix_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two strings into (shared prefix, chosen rest, rejected rest) like TRL's
    ``extract_prompt``: the longest common prefix, minus a trailing space that then
    starts the responses."""
    n = min(len(chosen), len(rejected))
    idx = n
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def from_trl_standard(rec: dict, ctx: _Ctx) -> Conversation:
    chosen = _string(_field(rec, "chosen", ctx), "chosen", ctx)
    rejected = _string(_field(rec, "rejected", ctx), "rejected", ctx)
    if "prompt" in rec and rec["prompt"] is not None:
        prompt = _string(rec["prompt"], "prompt", ctx)
    else:
        prompt, chosen, rejected = common_prefix_prompt(chosen, rejected)
    if not chosen.strip() or not rejected.strip():
        which = "chosen" if not chosen.strip() else "rejected"
        raise ctx.error("empty_response", f"{which} is empty")
    conv = Conversation(
        [{"role": "user", "content": prompt}],
        [{"role": "assistant", "content": chosen}],
        [{"role": "assistant", "content": rejected}],
        text=(prompt, chosen, rejected),
    )
    return _check(conv, ctx)


def from_trl_conversational(rec: dict, ctx: _Ctx) -> Conversation:
    chosen = _messages(_field(rec, "chosen", ctx), "chosen", ctx)
    rejected = _messages(_field(rec, "rejected", ctx), "rejected", ctx)
    prompt_field = rec.get("prompt")
    if prompt_field is not None and not isinstance(prompt_field, str):
        prompt = _messages(prompt_field, "prompt", ctx)
        return _check(Conversation(prompt, chosen, rejected), ctx)
    pc, rc_ = _split_implicit(chosen, "chosen", ctx)
    pr, rr = _split_implicit(rejected, "rejected", ctx)
    if pc != pr:
        raise ctx.error("prompt_mismatch", "chosen and rejected start with different prompt messages")
    if not pc and isinstance(prompt_field, str):  # responses only, prompt given as a string
        pc = [{"role": "user", "content": prompt_field}]
    return _check(Conversation(pc, rc_, rr), ctx)


def from_ultrafeedback(rec: dict, ctx: _Ctx) -> Conversation:
    if "prompt" in rec and not isinstance(rec["prompt"], str):
        raise ctx.error("wrong_type", f"field 'prompt' must be a string, got {type(rec['prompt']).__name__}")
    return from_trl_conversational(rec, ctx)


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _sharegpt_turn(turn: Any, key: str, ctx: _Ctx) -> Message:
    if not isinstance(turn, dict):
        raise ctx.error("bad_message", f"{key} must be an object with 'from' and 'value', got {type(turn).__name__}")
    role_key, content_key = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
    if role_key not in turn or content_key not in turn:
        raise ctx.error("bad_message", f"{key} needs 'from' and 'value' (has {sorted(turn)})")
    who, value = turn[role_key], turn[content_key]
    if who not in _SHAREGPT_ROLES:
        raise ctx.error("bad_message", f"{key} has 'from': {who!r}; expected one of {sorted(_SHAREGPT_ROLES)}")
    if not isinstance(value, str):
        raise ctx.error("bad_message", f"{key}.value must be a string, got {type(value).__name__}")
    return {"role": _SHAREGPT_ROLES[who], "content": value}


def from_sharegpt(rec: dict, ctx: _Ctx) -> Conversation:
    turns = _field(rec, "conversations", ctx)
    if not isinstance(turns, list):
        raise ctx.error("wrong_type", f"field 'conversations' must be a list of turns, got {type(turns).__name__}")
    prompt = [_sharegpt_turn(t, f"conversations[{j}]", ctx) for j, t in enumerate(turns)]
    system = rec.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise ctx.error("wrong_type", f"field 'system' must be a string, got {type(system).__name__}")
        if system.strip():
            prompt = [{"role": "system", "content": system}] + prompt
    if any(m["role"] == "system" for m in prompt[1:]):
        raise ctx.error("bad_role_order", "a system turn may only come first")
    responses = []
    for key in ("chosen", "rejected"):
        turn = _field(rec, key, ctx)
        if isinstance(turn, list):  # some exports wrap the single turn in a list
            if len(turn) != 1:
                raise ctx.error("wrong_type", f"field {key!r} must be one turn, got a list of {len(turn)}")
            turn = turn[0]
        msg = _sharegpt_turn(turn, key, ctx)
        if msg["role"] != "assistant":
            raise ctx.error("bad_role_order", f"{key} must come from 'gpt', got {turn.get('from', turn.get('role'))!r}")
        responses.append([msg])
    return _check(Conversation(prompt, responses[0], responses[1]), ctx)


_HH_MARK = re.compile(r"\n\n(Human|Assistant):")
_ASSISTANT = "\n\nAssistant:"


def _hh_cut(text: str, key: str, ctx: _Ctx) -> tuple[str, str]:
    """(prompt text up to and including the last '\\n\\nAssistant:', response text)."""
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip()
    cut = text.rfind(_ASSISTANT)
    if cut < 0:
        raise ctx.error("bad_transcript", f"{key} has no '\\n\\nAssistant:' turn")
    return text[: cut + len(_ASSISTANT)], text[cut + len(_ASSISTANT):]


def _hh_turns(prompt_text: str, key: str, ctx: _Ctx) -> list[Message]:
    parts = _HH_MARK.split(prompt_text)
    if parts[0].strip():
        raise ctx.error("bad_transcript", f"{key} has text before the first '\\n\\nHuman:' turn")
    msgs = [
        {"role": "user" if who == "Human" else "assistant", "content": body.strip()}
        for who, body in zip(parts[1::2], parts[2::2])
    ]
    # the last marker is the response's "Assistant:" header, not a message
    if not msgs or msgs[-1]["role"] != "assistant" or msgs[-1]["content"]:
        raise ctx.error("bad_transcript", f"{key} could not be split into turns")
    msgs.pop()
    if not msgs or msgs[-1]["role"] != "user":
        raise ctx.error("bad_role_order", f"{key}: the last turn before the response must be 'Human:'")
    return msgs


def from_hh_rlhf(rec: dict, ctx: _Ctx) -> Conversation:
    chosen = _string(_field(rec, "chosen", ctx), "chosen", ctx)
    rejected = _string(_field(rec, "rejected", ctx), "rejected", ctx)
    pt_c, resp_c = _hh_cut(chosen, "chosen", ctx)
    pt_r, resp_r = _hh_cut(rejected, "rejected", ctx)
    if pt_c != pt_r:
        raise ctx.error("prompt_mismatch", "chosen and rejected transcripts differ before the last 'Assistant:' turn")
    msgs_c = _hh_turns(pt_c, "chosen", ctx)
    if not resp_c.strip() or not resp_r.strip():
        raise ctx.error("empty_response", f"{'chosen' if not resp_c.strip() else 'rejected'} is empty")
    conv = Conversation(
        msgs_c,
        [{"role": "assistant", "content": resp_c.strip()}],
        [{"role": "assistant", "content": resp_r.strip()}],
        text=(pt_c, resp_c, resp_r),
    )
    return _check(conv, ctx)


ADAPTERS: dict[str, Callable[[dict, _Ctx], Conversation]] = {
    "trl_standard": from_trl_standard,
    "trl_conversational": from_trl_conversational,
    "ultrafeedback": from_ultrafeedback,
    "sharegpt": from_sharegpt,
    "hh_rlhf": from_hh_rlhf,
}


def detect_record_format(rec: Any) -> str | None:
    """The format a single record looks like, or None if it does not look like any."""
    if not isinstance(rec, dict):
        return None
    if "conversations" in rec:
        return "sharegpt"
    chosen = rec.get("chosen")
    if isinstance(chosen, str):
        if rec.get("prompt") is None and chosen.lstrip().startswith("Human:"):
            return "hh_rlhf"
        return "trl_standard"
    if isinstance(chosen, list):
        if isinstance(rec.get("prompt"), str):
            return "ultrafeedback"
        return "trl_conversational"
    return None


def to_conversation(rec: Any, fmt: str, source: str, record: int, line: int | None = None) -> Conversation:
    """Convert one raw record of format ``fmt`` (a key of ``ADAPTERS``) to a Conversation.

    Raises DataError (naming ``source`` and ``record``) if the record is invalid.
    """
    ctx = _Ctx(source, record, line)
    if fmt not in ADAPTERS:
        raise ValueError(f"unknown data format {fmt!r}; expected 'auto' or one of {FORMATS}")
    if not isinstance(rec, dict):
        raise ctx.error("not_an_object", f"expected a JSON object, got {type(rec).__name__}")
    return ADAPTERS[fmt](rec, ctx)
