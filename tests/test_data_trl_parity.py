"""Every input format -> the same Conversation and token ids as TRL 1.16's preprocessing.

Reference: TRL's own code, run on the equivalent TRL-format record —
``trl.data_utils.maybe_extract_prompt`` (implicit prompts) and ``DPOTrainer._prepare_dataset``
(prompt extraction, EOS for plain text, chat-template tokenization, prompt/completion
split), with the real SmolLM2-135M-Instruct tokenizer (ChatML template).

The equivalent TRL records of ShareGPT and HH-RLHF are built here by small independent
converters (different code from poet_jax.data.formats).
"""

from __future__ import annotations

import gzip
import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from poet_jax.data import DataConfig, TokenizerInfo, load_pairs, to_conversation


SYSTEM = {"role": "system", "content": "You answer in one sentence."}


def _trl_tokenize(records: list[dict], tokenizer) -> list[dict]:
    """TRL 1.16 DPOTrainer preprocessing of ``records`` (no truncation)."""
    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = DPOConfig(output_dir="/tmp/poet_jax_trl_unused", max_length=None, report_to=[], bf16=False, use_cpu=True)
    fake_trainer = SimpleNamespace(_tokenizer=tokenizer)  # _prepare_dataset only reads this
    ds = DPOTrainer._prepare_dataset(fake_trainer, Dataset.from_list(records), tokenizer, args, "test")
    return [ds[i] for i in range(len(ds))]


def _ours(records: list[dict], tokenizer, tmp_path, name: str, fmt: str = "auto", chat: bool = True):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = DataConfig(path=str(path), format=fmt, chat_template=chat, max_length=None, max_prompt_length=None)
    examples, report = load_pairs(str(path), "train", cfg, TokenizerInfo(tokenizer))
    assert report.total_skipped == 0, report.summary()
    return examples


def _assert_same_ids(ours, theirs):
    assert len(ours) == len(theirs)
    for i, (e, t) in enumerate(zip(ours, theirs)):
        assert e.prompt_ids.dtype == np.int32
        np.testing.assert_array_equal(e.prompt_ids, t["prompt_ids"], err_msg=f"pair {i} prompt")
        np.testing.assert_array_equal(e.chosen_ids, t["chosen_ids"], err_msg=f"pair {i} chosen")
        np.testing.assert_array_equal(e.rejected_ids, t["rejected_ids"], err_msg=f"pair {i} rejected")


def _user(c):
    return {"role": "user", "content": c}


def _asst(c):
    return {"role": "assistant", "content": c}


STANDARD = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "It is 5, I think, but I am not sure."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Purple\nwith\nnewlines."},
    {"prompt": "Say hi", "chosen": "hi!", "rejected": "Hello there, how are you doing today?"},
]


def test_trl_standard_chat_equals_trl_conversational(smollm2_tokenizer, tmp_path):
    ours = _ours(STANDARD, smollm2_tokenizer, tmp_path, "std")
    conv_records = [
        {"prompt": [_user(r["prompt"])], "chosen": [_asst(r["chosen"])], "rejected": [_asst(r["rejected"])]}
        for r in STANDARD
    ]
    _assert_same_ids(ours, _trl_tokenize(conv_records, smollm2_tokenizer))
    # every response ends with <|im_end|> (eos, id 2) then "\n", as the template writes it
    for e in ours:
        assert e.chosen_ids[-2] == smollm2_tokenizer.eos_token_id == 2
        assert e.rejected_ids[-2] == 2


def test_trl_standard_plain_text_equals_trl_string_path(smollm2_tokenizer, tmp_path):
    records = [{**r, "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]} for r in STANDARD]
    ours = _ours(records, smollm2_tokenizer, tmp_path, "std_plain", chat=False)
    _assert_same_ids(ours, _trl_tokenize(records, smollm2_tokenizer))
    for e in ours:  # plain mode: EOS appended once, no BOS (SmolLM2's tokenizer adds none)
        assert e.chosen_ids[-1] == 2 and e.chosen_ids[-2] != 2
        assert e.prompt_ids[0] != smollm2_tokenizer.bos_token_id


def test_trl_standard_implicit_prompt_equals_trl_extract_prompt(smollm2_tokenizer, tmp_path):
    records = [
        {"chosen": "Question: what is 2+2? Answer: 4", "rejected": "Question: what is 2+2? Answer: 5 or so"},
        {"chosen": "The sky is blue today.", "rejected": "The sky is grey."},
    ]
    ours = _ours(records, smollm2_tokenizer, tmp_path, "std_implicit", chat=False)
    _assert_same_ids(ours, _trl_tokenize(records, smollm2_tokenizer))


CONVERSATIONAL = [
    {
        "prompt": [SYSTEM, _user("What is the capital of France?")],
        "chosen": [_asst("Paris.")],
        "rejected": [_asst("Lyon, the famous capital of France since forever.")],
    },
    {
        "prompt": [_user("Hi"), _asst("Hello! How can I help?"), _user("Tell me a joke.")],
        "chosen": [_asst("Why did the chicken cross the road? To get to the other side.")],
        "rejected": [_asst("No.")],
    },
]


def test_trl_conversational_explicit(smollm2_tokenizer, tmp_path):
    ours = _ours(CONVERSATIONAL, smollm2_tokenizer, tmp_path, "conv")
    _assert_same_ids(ours, _trl_tokenize(CONVERSATIONAL, smollm2_tokenizer))
    conv = to_conversation(CONVERSATIONAL[0], "trl_conversational", "x", 0)
    assert conv.prompt == CONVERSATIONAL[0]["prompt"] and conv.chosen == CONVERSATIONAL[0]["chosen"]


def test_trl_conversational_implicit_and_ultrafeedback(smollm2_tokenizer, tmp_path):
    from trl.data_utils import maybe_extract_prompt

    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CONVERSATIONAL]
    ultra = [
        {"prompt": r["prompt"][-1]["content"], "prompt_id": "abc", "score_chosen": 8.0, "score_rejected": 3.0,
         "messages": r["prompt"] + r["chosen"], **i}
        for r, i in zip(CONVERSATIONAL, implicit)
    ]
    expected = _trl_tokenize(implicit, smollm2_tokenizer)
    for records, fmt in ((implicit, "trl_conversational"), (ultra, "ultrafeedback")):
        ours = _ours(records, smollm2_tokenizer, tmp_path, fmt)
        _assert_same_ids(ours, expected)
        for r in records:  # same Conversation structure as TRL's prompt extraction
            ref = maybe_extract_prompt(r)
            conv = to_conversation(r, fmt, "x", 0)
            assert (conv.prompt, conv.chosen, conv.rejected) == (ref["prompt"], ref["chosen"], ref["rejected"])


def _sharegpt_to_trl(rec: dict) -> dict:
    """Independent ShareGPT (LLaMA-Factory) -> TRL conversational conversion."""
    role = {"system": "system", "human": "user", "gpt": "assistant"}
    prompt = [{"role": role[t["from"]], "content": t["value"]} for t in rec["conversations"]]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": rec["chosen"]["value"]}],
        "rejected": [{"role": "assistant", "content": rec["rejected"]["value"]}],
    }


def test_sharegpt_real_file_equals_trl(smollm2_tokenizer, shared_data):
    path = shared_data / "dpo_en_demo.json"
    raw = json.loads(path.read_text())
    cfg = DataConfig(path=str(path), max_length=None, max_prompt_length=None)
    ours, report = load_pairs(str(path), "train", cfg, TokenizerInfo(smollm2_tokenizer))
    assert report.records_read == 300 and len(ours) == 300 and report.total_skipped == 0
    assert [e.record for e in ours] == list(range(300))
    trl_records = [_sharegpt_to_trl(r) for r in raw]
    _assert_same_ids(ours, _trl_tokenize(trl_records, smollm2_tokenizer))
    for r, t in zip(raw, trl_records):
        conv = to_conversation(r, "sharegpt", str(path), 0)
        assert (conv.prompt, conv.chosen, conv.rejected) == (t["prompt"], t["chosen"], t["rejected"])
    # the 80 records with a system turn start with it (the template's default is not added)
    with_system = [e for e, r in zip(ours, raw) if r["conversations"][0]["from"] == "system"]
    assert len(with_system) == 80
    default = smollm2_tokenizer("You are a helpful AI assistant named SmolLM", add_special_tokens=False)["input_ids"]
    assert all(list(e.prompt_ids[3 : 3 + len(default)]) != default for e in with_system)


def _hh_to_messages(transcript: str) -> list[dict]:
    """Independent HH-RLHF transcript parser (split on the literal turn headers)."""
    msgs = []
    for chunk in transcript.split("\n\nHuman:")[1:]:
        human, *assistants = chunk.split("\n\nAssistant:")
        msgs.append({"role": "user", "content": human.strip()})
        msgs.extend({"role": "assistant", "content": a.strip()} for a in assistants)
    return msgs


@pytest.fixture(scope="module")
def hh_records(shared_data):
    with gzip.open(shared_data / "hh_rlhf_harmless_base_test.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_hh_rlhf_real_file_equals_trl(smollm2_tokenizer, shared_data, hh_records):
    from trl.data_utils import extract_prompt

    path = shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"
    n = 400  # the first 400 records (the whole file is exercised by the bucket test)
    cfg = DataConfig(path=str(path), max_length=None, max_prompt_length=None, on_bad_record="skip", max_records=n)
    ours, report = load_pairs(str(path), "train", cfg, TokenizerInfo(smollm2_tokenizer))
    kept = [e.record for e in ours]
    assert report.records_read == n and len(ours) + report.total_skipped == n
    # skipped ones are exactly those with an empty response or differing prompts
    for i in set(range(n)) - set(kept):
        c, r = hh_records[i]["chosen"], hh_records[i]["rejected"]
        cut = lambda t: t[: t.rfind("\n\nAssistant:")]  # noqa: E731
        assert cut(c) != cut(r) or not c[c.rfind("\n\nAssistant:") + 12 :].strip() or not r[r.rfind("\n\nAssistant:") + 12 :].strip()
    trl_records = [
        {"chosen": _hh_to_messages(hh_records[i]["chosen"]), "rejected": _hh_to_messages(hh_records[i]["rejected"])}
        for i in kept
    ]
    _assert_same_ids(ours, _trl_tokenize(trl_records, smollm2_tokenizer))
    for i, t in zip(kept[:50], trl_records[:50]):
        conv = to_conversation(hh_records[i], "hh_rlhf", str(path), i)
        ref = extract_prompt(t)
        assert (conv.prompt, conv.chosen, conv.rejected) == (ref["prompt"], ref["chosen"], ref["rejected"])


def test_hh_rlhf_plain_text_equals_trl_string_path(smollm2_tokenizer, shared_data, hh_records):
    path = shared_data / "hh_rlhf_harmless_base_test.jsonl.gz"
    n = 100
    cfg = DataConfig(path=str(path), chat_template=False, on_bad_record="skip", max_records=n,
                     max_length=None, max_prompt_length=None)
    ours, _ = load_pairs(str(path), "train", cfg, TokenizerInfo(smollm2_tokenizer))
    trl_records = []
    for e in ours:
        c, r = hh_records[e.record]["chosen"], hh_records[e.record]["rejected"]
        k = c.rfind("\n\nAssistant:") + len("\n\nAssistant:")
        trl_records.append({"prompt": c[:k], "chosen": c[k:], "rejected": r[k:]})
    _assert_same_ids(ours, _trl_tokenize(trl_records, smollm2_tokenizer))
