"""Sources, format detection, tokenization rules (BOS/EOS/prefix), eval split and cache."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from poet_jax.data import (
    DataConfig, DataError, TokenizerInfo, build_preference_data, detect_record_format, load_pairs,
    to_conversation, tokenize_conversation,
)

SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

RECORDS = [
    {"prompt": f"Question {i}: what is {i}+{i}?", "chosen": f"It is {2 * i}.", "rejected": f"It is {2 * i + 1}, or so."}
    for i in range(20)
]


def _tok(hf_dir, **kw):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir), **kw)


def _ids(examples):
    return [(e.record, e.prompt_ids.tolist(), e.chosen_ids.tolist(), e.rejected_ids.tolist()) for e in examples]


def test_every_source_kind_gives_the_same_examples(smollm2_tokenizer, tmp_path):
    import datasets

    info = TokenizerInfo(smollm2_tokenizer)
    (tmp_path / "a.json").write_text(json.dumps(RECORDS, indent=2))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in RECORDS))
    ds = datasets.Dataset.from_list(RECORDS)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.to_json(str(tmp_path / "lines.json"))  # `datasets` writes JSON Lines into .json
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(str(tmp_path / "dd"))
    ds.save_to_disk(str(tmp_path / "single"))
    cfg = DataConfig(path="unused", max_length=None, max_prompt_length=None)
    ref, rep = load_pairs(str(tmp_path / "a.json"), "train", cfg, info)
    assert len(ref) == 20 and rep.records_read == 20
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS).encode())
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r) for r in RECORDS).encode())
    for name in ("a.jsonl", "a.jsonl.gz", "a.parquet", "lines.json", "dd", "single", "bom.json", "bom.jsonl"):
        got, _ = load_pairs(str(tmp_path / name), "train", cfg, info)
        assert _ids(got) == _ids(ref), name
    test_split, _ = load_pairs(str(tmp_path / "dd"), "test", cfg, info)
    assert _ids(test_split) == _ids(ref[:5])
    with pytest.raises(DataError, match="split 'validation' not found"):
        load_pairs(str(tmp_path / "dd"), "validation", cfg, info)
    with pytest.raises(DataError, match="no such file"):
        load_pairs(str(tmp_path / "missing.jsonl"), "train", cfg, info)


def test_format_detection_and_override():
    u = lambda c: {"role": "user", "content": c}  # noqa: E731
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    assert detect_record_format({"prompt": "p", "chosen": "c", "rejected": "r"}) == "trl_standard"
    assert detect_record_format({"chosen": "c", "rejected": "r"}) == "trl_standard"
    assert detect_record_format({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "x"}) == "hh_rlhf"
    assert detect_record_format({"chosen": [u("p"), a("c")], "rejected": [u("p"), a("r")]}) == "trl_conversational"
    assert detect_record_format({"prompt": [u("p")], "chosen": [a("c")], "rejected": [a("r")]}) == "trl_conversational"
    assert detect_record_format({"prompt": "p", "chosen": [u("p"), a("c")], "rejected": [u("p"), a("r")]}) == "ultrafeedback"
    assert detect_record_format({"conversations": [], "chosen": {}, "rejected": {}}) == "sharegpt"
    assert detect_record_format({"text": "x"}) is None and detect_record_format([1]) is None
    # multi-turn responses: the final run of assistant messages
    conv = to_conversation(
        {"chosen": [u("p"), a("c1"), a("c2")], "rejected": [u("p"), a("r")]}, "trl_conversational", "f", 0
    )
    assert conv.prompt == [u("p")] and conv.chosen == [a("c1"), a("c2")]
    # ultrafeedback records whose message lists hold only the response take the string prompt
    conv = to_conversation({"prompt": "p?", "chosen": [a("c")], "rejected": [a("r")]}, "ultrafeedback", "f", 0)
    assert conv.prompt == [u("p?")]
    # sharegpt with a separate `system` field
    conv = to_conversation(
        {"system": "Be brief.", "conversations": [{"from": "human", "value": "hi"}],
         "chosen": {"from": "gpt", "value": "yo"}, "rejected": {"from": "gpt", "value": "hello there"}},
        "sharegpt", "f", 0,
    )
    assert conv.prompt == [{"role": "system", "content": "Be brief."}, u("hi")]
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        to_conversation({}, "csv", "f", 0)
    with pytest.raises(ValueError, match="DataConfig.format='csv'"):
        DataConfig(path="x", format="csv")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="DataConfig.max_prompt_length=2048"):
        DataConfig(path="x", max_length=2048, max_prompt_length=2048)
    with pytest.raises(ValueError, match="DataConfig.on_bad_record='ignore'"):
        DataConfig(path="x", on_bad_record="ignore")
    with pytest.raises(ValueError, match="DataConfig.bucket_lengths"):
        DataConfig(path="x", max_length=512, max_prompt_length=256, bucket_lengths=[64, 128])
    assert DataConfig(path="x", poet_rule="fraction_of_own").poet_rule == "own"
    assert DataConfig(path="x", bucket_lengths=[512, 2048, 64]).bucket_lengths == (64, 512, 2048)


def test_plain_text_mode_puts_bos_once_and_eos_last(smollm2_hf_dir):
    tok = _tok(smollm2_hf_dir, add_bos_token=True)  # a tokenizer that adds BOS by itself
    info = TokenizerInfo(tok)
    assert info.adds_bos and tok.bos_token_id == 1
    conv = to_conversation({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}, "trl_standard", "f", 0)
    ex = tokenize_conversation(conv, info, chat_template=False)
    assert ex.prompt_ids.tolist() == [1] + tok("The sky is", add_special_tokens=False)["input_ids"]
    assert ex.chosen_ids.tolist() == tok(" blue.", add_special_tokens=False)["input_ids"] + [2]
    # chat mode, a tokenizer adding BOS (here <|endoftext|>, id 0) and a template writing it:
    # the rendered text is tokenized without special tokens, so BOS appears once
    tok = _tok(smollm2_hf_dir, add_bos_token=True, bos_token="<|endoftext|>")
    assert tok("a")["input_ids"][0] == 0
    body = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok.chat_template = "{{ bos_token }}" + body
    ex = tokenize_conversation(conv, TokenizerInfo(tok), chat_template=True)
    assert ex.prompt_ids.tolist()[:3] == [0, 1, tok.convert_tokens_to_ids("user")]
    assert ex.chosen_ids.tolist()[-2:] == [2, 198]
    tok.chat_template = "{{ bos_token }}{{ bos_token }}" + body  # a template that doubles it
    ex2 = tokenize_conversation(conv, TokenizerInfo(tok), chat_template=True)
    assert ex2.prompt_ids.tolist() == ex.prompt_ids.tolist()


def test_eos_appended_when_the_template_ends_turns_without_a_special_token(smollm2_hf_dir, tmp_path):
    tok = _tok(smollm2_hf_dir)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:\n{% endif %}"
    )
    conv = to_conversation(RECORDS[0], "trl_standard", "f", 0)
    ex = tokenize_conversation(conv, tok)
    expected = tok(f"{RECORDS[0]['chosen']}\n\n", add_special_tokens=False)["input_ids"] + [2]
    assert ex.chosen_ids.tolist() == expected
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS[:3]))
    _, rep = load_pairs(str(path), "train", DataConfig(path=str(path)), TokenizerInfo(tok))
    assert rep.eos_appended == 6 and rep.prefix_mismatch == 0


def test_prompt_prefix_mismatch_is_detected_and_the_common_prefix_used(smollm2_hf_dir, tmp_path):
    tok = _tok(smollm2_hf_dir)
    # the generation prompt carries an empty think block that the full conversation drops
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think></think>{% endif %}"
    )
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS[:4]))
    exs, rep = load_pairs(str(path), "train", DataConfig(path=str(path)), TokenizerInfo(tok))
    assert rep.prefix_mismatch == 4
    full = tok.apply_chat_template(
        [{"role": "user", "content": RECORDS[0]["prompt"]}, {"role": "assistant", "content": RECORDS[0]["chosen"]}],
        tokenize=False,
    )
    full_ids = tok(full, add_special_tokens=False)["input_ids"]
    n = len(exs[0].prompt_ids)
    assert exs[0].prompt_ids.tolist() + exs[0].chosen_ids.tolist() == full_ids
    assert tok.decode(full_ids[:n]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_template_errors_are_reported_per_record(smollm2_hf_dir, tmp_path):
    tok = _tok(smollm2_hf_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    recs = [
        {"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
         "rejected": [{"role": "assistant", "content": "c"}]},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}],
         "chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]},
    ]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    with pytest.raises(DataError, match=r"r.jsonl, record 1 \(0-based\): template_error: .*no system role"):
        load_pairs(str(path), "train", DataConfig(path=str(path)), TokenizerInfo(tok))
    exs, rep = load_pairs(str(path), "train", DataConfig(path=str(path), on_bad_record="skip"), TokenizerInfo(tok))
    assert [e.record for e in exs] == [0] and rep.skipped == {"template_error": 1}


def test_smollm2_default_system_prompt_and_chat_rendering(smollm2_tokenizer):
    conv = to_conversation(RECORDS[1], "trl_standard", "f", 1)
    ex = tokenize_conversation(conv, smollm2_tokenizer)
    text = smollm2_tokenizer.decode(ex.prompt_ids)
    assert text == (
        f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{RECORDS[1]['prompt']}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert smollm2_tokenizer.decode(ex.chosen_ids) == f"{RECORDS[1]['chosen']}<|im_end|>\n"


def test_eval_split_by_fraction_and_seed(smollm2_tokenizer, tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS))

    def split(seed):
        d = build_preference_data(DataConfig(path=str(path), eval_fraction=0.25, seed=seed), smollm2_tokenizer)
        return [e.record for e in d.train_examples], [e.record for e in d.eval_examples]

    tr, ev = split(1)
    assert len(ev) == 5 and sorted(tr + ev) == list(range(20)) and not set(tr) & set(ev)
    assert split(1) == (tr, ev) and split(2)[1] != ev
    held = sorted(np.random.default_rng(1).permutation(20)[:5].tolist())
    assert sorted(ev) == held
    d = build_preference_data(DataConfig(path=str(path), eval_path=str(path)), smollm2_tokenizer)
    assert len(d.train_examples) == len(d.eval_examples) == 20


def test_tokenization_cache_hits_and_misses(smollm2_hf_dir, smollm2_tokenizer, tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS))
    cache = tmp_path / "cache"
    cfg = DataConfig(path=str(path), max_length=None, max_prompt_length=None)
    first = build_preference_data(cfg, smollm2_tokenizer, cache_dir=cache)
    assert not first.report.from_cache and len(list(cache.glob("*.npz"))) == 1
    second = build_preference_data(cfg, smollm2_tokenizer, cache_dir=cache)
    assert second.report.from_cache and _ids(second.train_examples) == _ids(first.train_examples)
    assert second.train_examples[0].source == str(path)
    other = _tok(smollm2_hf_dir)
    other.chat_template = other.chat_template.replace("You are a helpful", "You are a")
    third = build_preference_data(cfg, other, cache_dir=cache)  # different tokenizer identity
    assert not third.report.from_cache and _ids(third.train_examples) != _ids(first.train_examples)
    build_preference_data(DataConfig(path=str(path), chat_template=False), smollm2_tokenizer, cache_dir=cache)
    path.write_text("\n".join(json.dumps(r) for r in RECORDS[:10]))  # new content
    fourth = build_preference_data(cfg, smollm2_tokenizer, cache_dir=cache)
    assert not fourth.report.from_cache and len(fourth.train_examples) == 10
    assert len(list(cache.glob("*.npz"))) == 4
