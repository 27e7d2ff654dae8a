"""A corpus of broken records (tests/data_corpus): each gives its clear error or counted skip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from poet_jax.data import REASONS, DataConfig, DataError, build_preference_data

CORPUS = Path(__file__).parent / "data_corpus"
EXPECTED = json.loads((CORPUS / "EXPECTED.json").read_text())


def _cfg(name: str, mode: str) -> DataConfig:
    kw = {"max_length": 256, "max_prompt_length": 128, **EXPECTED[name]["config"]}
    return DataConfig(path=str(CORPUS / name), on_bad_record=mode, show_progress=False, **kw)


def test_corpus_is_large_and_covers_every_reason():
    assert len(EXPECTED) >= 20
    reasons = {e["reason"] for e in EXPECTED.values()}
    assert reasons >= set(REASONS) - {"template_error"}  # template errors: tests/test_data_formats.py


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_record_error_and_skip(name, smollm2_tokenizer):
    exp = EXPECTED[name]
    with pytest.raises(DataError) as info:
        build_preference_data(_cfg(name, "error"), smollm2_tokenizer)
    err = info.value
    msg = str(err)
    assert isinstance(err, ValueError) and name in msg and err.reason == exp["reason"]
    assert f": {exp['reason']}: " in msg
    if exp["record"] is None:
        assert err.record is None
    else:
        assert err.record == exp["record"] and f"record {exp['record']} (0-based)" in msg
    if exp["fatal"]:  # cannot be skipped past: same error in skip mode
        with pytest.raises(DataError) as info2:
            build_preference_data(_cfg(name, "skip"), smollm2_tokenizer)
        assert str(info2.value) == msg
        return
    data = build_preference_data(_cfg(name, "skip"), smollm2_tokenizer)
    rep = data.report
    assert rep.skipped == {exp["reason"]: 1}
    assert rep.records_read == exp["kept"] + 1 == rep.pairs_kept + rep.total_skipped
    assert len(data.train_examples) == exp["kept"]
    assert exp["record"] not in {e.record for e in data.train_examples}
    assert rep.examples[exp["reason"]] == [msg]  # the log shows the same message
    assert f"skipped      1  {exp['reason']}" in rep.summary()
