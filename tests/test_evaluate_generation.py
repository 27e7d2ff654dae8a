"""Generation evaluation: determinism for a seed, the reward sees exactly the decoded
response, win rates, and the causal-LM reward against transformers (PyTorch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from flax import nnx

    from poet_jax.demo.task import TaskConfig, all_questions, prompt_text, words
    from poet_jax.demo.tokenizer import build_tokenizer
    from poet_jax.models import CausalLM, ModelConfig, save_pretrained

    task = TaskConfig(max_operand=2)
    tok = build_tokenizer(words(task))
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    policy = CausalLM(cfg, rngs=nnx.Rngs(0))
    reference = CausalLM(cfg, rngs=nnx.Rngs(1))
    d = save_pretrained(policy, tmp_path_factory.mktemp("policy"), tokenizer=tok)
    prompts = [prompt_text(a, b) for a, b in all_questions(task)][:7]  # 7 prompts, batches of 4: a padded batch
    return {"tok": tok, "policy": policy, "reference": reference, "prompts": prompts, "dir": d}


def test_deterministic_and_reward_sees_decoded_response(setup):
    from poet_jax.evaluate.generation import evaluate_generation, sample_responses
    from poet_jax.models import generate

    tok, policy, prompts = setup["tok"], setup["policy"], setup["prompts"]
    seen = []

    def reward(prompt, response):
        seen.append((prompt, response))
        return float(len(response.split()))

    kw = dict(seed=3, max_new_tokens=8, batch_size=4)
    rep1 = evaluate_generation(policy, tok, prompts, reward, **kw)
    calls1 = list(seen)
    seen.clear()
    rep2 = evaluate_generation(policy, tok, prompts, reward, **kw)
    assert rep1.records == rep2.records and seen == calls1  # same seed: identical samples and rewards
    rep3 = evaluate_generation(policy, tok, prompts, reward, **dict(kw, seed=4))
    assert [r["response"] for r in rep3.records] != [r["response"] for r in rep1.records]

    # the reward got the prompt text and exactly tokenizer.decode(generated tokens before the end token)
    samples = sample_responses(policy, tok, prompts, **kw)
    assert [p for p, _ in calls1] == prompts
    assert [r for _, r in calls1] == samples.responses
    eos = tok.eos_token_id
    import jax

    # independent decode of the first batch straight from models.generate with the documented rng
    enc = [tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False),
               add_special_tokens=False)["input_ids"] for p in prompts[:4]]
    width = max(len(e) for e in [tok(tok.apply_chat_template([{"role": "user", "content": p}],
                                                             add_generation_prompt=True, tokenize=False),
                                     add_special_tokens=False)["input_ids"] for p in prompts])
    ids = np.array([[tok.pad_token_id] * (width - len(e)) + e for e in enc], np.int32)
    mask = (np.arange(width)[None] >= (width - np.array([len(e) for e in enc]))[:, None]).astype(np.int32)
    out = generate(policy, ids, mask, max_new_tokens=8, temperature=0.7, top_p=1.0, eos_token_ids=(eos,),
                   pad_token_id=tok.pad_token_id, rng=jax.random.fold_in(jax.random.key(3), 0))
    for i in range(4):
        gen = [int(t) for t in np.asarray(out.sequences[i])[: int(out.lengths[i])]]
        if gen and gen[-1] == eos:
            gen = gen[:-1]
        assert samples.token_ids[i] == gen
        assert calls1[i][1] == tok.decode(gen, skip_special_tokens=True)
    assert rep1.mean_reward == pytest.approx(np.mean([len(r.split()) for r in samples.responses]))
    assert rep1.mean_length == pytest.approx(np.mean([len(t) for t in samples.token_ids]))


def test_win_rate_against_reference(setup):
    from poet_jax.evaluate.generation import evaluate_generation, sample_responses

    tok, policy, reference, prompts = setup["tok"], setup["policy"], setup["reference"], setup["prompts"]
    kw = dict(seed=0, max_new_tokens=6, batch_size=8)
    ref = sample_responses(reference, tok, prompts, **kw)
    reward = lambda p, r: float(len(r))  # noqa: E731
    rep = evaluate_generation(policy, tok, prompts, reward, reference_samples=ref, **kw)
    pol_r = np.array([len(r["response"]) for r in rep.records], float)
    ref_r = np.array([len(r) for r in ref.responses], float)
    expected = np.mean((pol_r > ref_r) + 0.5 * (pol_r == ref_r))
    assert rep.win_rate == pytest.approx(expected)
    assert rep.ref_mean_reward == pytest.approx(ref_r.mean())
    # the reference against its own samples: every prompt is a tie
    same = evaluate_generation(reference, tok, prompts, reward, reference_samples=ref, **kw)
    assert same.win_rate == 0.5 and same.tie_rate == 1.0


def test_causal_lm_reward_matches_transformers(setup):
    from transformers import AutoModelForCausalLM

    from poet_jax.evaluate.generation import CausalLMReward, score

    tok = setup["tok"]
    rm = CausalLMReward.from_pretrained(setup["dir"], batch_size=2)
    hf = AutoModelForCausalLM.from_pretrained(str(setup["dir"]), dtype=torch.float32).eval()
    prompts = ["what is 1 + 1 ?", "what is 2 + 0 ?", "what is 0 + 0 ?"]
    responses = ["2 . ok", "3 . um um um", "0 ."]
    got = score(rm, prompts, responses)
    for p, r, g in zip(prompts, responses, got):
        msgs = [{"role": "user", "content": p}]
        pi = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
        fi = tok(tok.apply_chat_template(msgs + [{"role": "assistant", "content": r}], tokenize=False),
                 add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([fi])).logits[0].double(), -1)
        tl = [lp[t - 1, fi[t]].item() for t in range(len(pi), len(fi))]
        assert g == pytest.approx(np.mean(tl), rel=1e-4, abs=1e-5)
    assert rm(prompts[0], responses[0]) == pytest.approx(got[0], rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        CausalLMReward(None, tok, reduction="max")
