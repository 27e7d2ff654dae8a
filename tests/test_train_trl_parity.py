"""Golden parity of the trainer with TRL 1.16's DPOTrainer (PyTorch, CPU, fp32) on a tiny random Llama.

Both sides read the same TRL-conversational records (the 8 shortest real pairs of
dpo_en_demo.json) with the same locally trained tokenizer; we assert that TRL's token
ids equal ours, then compare step-by-step logged metrics over 3 optimizer steps (one
global batch of 8 pairs per step, constant lr, AdamW, clipping at 1.0) and the loss of
the policy after the 3 updates.

DPO+POET is compared against TRL's LD-DPO with ``ld_alpha=0.0`` (trl 1.16 DPOConfig):
TRL then sums policy and reference log-probs over the first ``min(len_c, len_r)``
completion tokens of each pair and drops the tail, i.e. exactly POET's k-token prefix.

SimPO (reference-free) is compared with an independent PyTorch implementation of the
SimPO repository's loss (princeton-nlp/SimPO ``simpo_loss`` on average log-probs from
the HF model's logits), including its gradient norm.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from poet_jax.train.config import config_from_dict
from poet_jax.train.loop import setup

N_PAIRS = 8
LR = 1e-3
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@pytest.fixture(scope="module")
def pairs_file(shared_data, tmp_path_factory):
    recs = json.loads((shared_data / "dpo_en_demo.json").read_text())
    conv = [
        {
            "prompt": [{"role": ROLES[m["from"]], "content": m["value"]} for m in r["conversations"]],
            "chosen": [{"role": "assistant", "content": r["chosen"]["value"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]["value"]}],
        }
        for r in recs
    ]
    conv.sort(key=lambda d: len(json.dumps(d)))
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(conv[:N_PAIRS]))
    return path


def _our_config(model_dir, data_path, out_dir, loss="dpo", poet=False, beta=0.1, **extra):
    d = {
        "model": {"path": str(model_dir)},
        "data": {"path": str(data_path), "max_length": 1024, "max_prompt_length": 1000, "use_poet": poet,
                 "shuffle": False},
        "loss": {"name": loss, "beta": beta, **extra},
        "optim": {"lr": LR, "schedule": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"output_dir": str(out_dir), "global_batch": N_PAIRS, "micro_batch": N_PAIRS, "max_steps": 3,
                  "progress": False, "tensorboard": False, "export": False},
    }
    return config_from_dict(d)


def _run_ours(cfg, steps=3):
    """Metrics of each step and the eval metrics of the policy after ``steps`` updates."""
    run = setup(cfg, progress=False)
    logs = []
    for _ in range(steps):
        batch, ref = run.next_global_batch()
        assert int(batch.pair_valid.sum()) == N_PAIRS
        logs.append({k: float(v) for k, v in run.step(batch, ref).items()})
    run.eval_examples = run.train_examples
    run.ref_eval = run.ref_train
    return run, logs, run.evaluate()


def _run_trl(model_dir, data_path, out_dir, ld_alpha):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ds = Dataset.from_list(json.loads(data_path.read_text()))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=N_PAIRS, max_steps=3, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, max_length=None, beta=0.1, loss_type=["sigmoid"],
        ld_alpha=ld_alpha, gradient_checkpointing=False, dataloader_num_workers=0, seed=0,
        per_device_eval_batch_size=N_PAIRS, disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    ids = [(list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])) for r in trainer.train_dataset]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    final = trainer.evaluate(eval_dataset=ds)
    return ids, logs, final


KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.mark.slow
@pytest.mark.parametrize("poet", [False, True], ids=["dpo", "dpo_poet"])
def test_dpo_matches_trl(poet, tiny_llama_dir, pairs_file, tmp_path):
    ids, trl_logs, trl_final = _run_trl(tiny_llama_dir, pairs_file, tmp_path / "trl", 0.0 if poet else None)
    run, ours, our_final = _run_ours(_our_config(tiny_llama_dir, pairs_file, tmp_path / "ours", poet=poet))

    # identical token ids (TRL tokenizes itself; the pipeline must agree)
    by_record = {e.record: e for e in run.train_examples}
    assert len(by_record) == N_PAIRS
    for rec, (p, c, r) in enumerate(ids):
        e = by_record[rec]
        assert e.prompt_ids.tolist() == p
        if poet:  # we cut physically; TRL keeps the ids and masks the tail (ld_alpha=0)
            k = min(len(c), len(r))
            assert e.chosen_ids.tolist() == c[:k] and e.rejected_ids.tolist() == r[:k]
        else:
            assert e.chosen_ids.tolist() == c and e.rejected_ids.tolist() == r
    if poet:
        assert any(len(c) != len(r) for _, c, r in ids)  # POET actually cuts something here

    assert len(trl_logs) == 3
    assert ours[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert trl_logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in KEYS:  # step 1: same weights, same numbers
        tol = 1e-5 * max(1.0, abs(trl_logs[0][key])) if key.startswith("logps") else 1e-5
        assert ours[0][key] == pytest.approx(trl_logs[0][key], abs=tol), key
    assert ours[0]["grad_norm"] == pytest.approx(trl_logs[0]["grad_norm"], rel=1e-4)
    if not poet:  # TRL averages logits over all completion tokens, tail included, even with ld_alpha
        for key in ("logits/chosen", "logits/rejected"):
            assert ours[0][key] == pytest.approx(trl_logs[0][key], abs=1e-6), key
    # (step-1 accuracy compares rewards that are 0 up to rounding on both sides: not meaningful)
    for step in (1, 2):  # after 1 and 2 AdamW updates
        assert ours[step]["rewards/accuracies"] == trl_logs[step]["rewards/accuracies"], step
        assert ours[step]["loss"] == pytest.approx(trl_logs[step]["loss"], abs=1e-4), step
        # AdamW's first steps are ~lr * sign(g): float noise in near-zero gradients moves the
        # weights by ~1e-5 relative, so margins agree to ~2e-4 relative (losses to < 1e-4).
        assert ours[step]["rewards/margins"] == pytest.approx(trl_logs[step]["rewards/margins"], rel=1e-3), step
    # the policy after 3 optimizer steps, evaluated on the same pairs
    assert our_final["loss"] == pytest.approx(trl_final["eval_loss"], abs=1e-4)
    assert our_final["rewards/margins"] == pytest.approx(trl_final["eval_rewards/margins"], rel=1e-3)
    assert our_final["loss"] < 0.6  # it did learn something


def _simpo_repo_loss(model_dir, batch, beta, gamma_beta_ratio):
    """The SimPO repository's loss, written independently in PyTorch on HF logits.

    ``get_batch_logps(..., average_log_prob=True)`` then
    ``-logsigmoid(beta * (pi_c - pi_r - gamma_beta_ratio))``, mean over pairs; rewards = beta * avg logp.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = torch.tensor(batch.input_ids, dtype=torch.long)
    att = torch.tensor(batch.attention_mask, dtype=torch.long)
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
    labels = ids[:, 1:]
    mask = torch.tensor(batch.response_mask[:, 1:], dtype=torch.bool)
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    avg = (per_token * mask).sum(-1) / mask.sum(-1)
    b = ids.shape[0] // 2
    pc, pr = avg[:b], avg[b:]
    losses = -torch.nn.functional.logsigmoid(beta * (pc - pr - gamma_beta_ratio))
    loss = losses.mean()
    loss.backward()
    gnorm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return {
        "loss": float(loss.detach()), "rewards/chosen": float(beta * pc.mean().detach()), "rewards/rejected": float(beta * pr.mean().detach()),
        "grad_norm": float(gnorm),
    }


@pytest.mark.parametrize("poet", [False, True], ids=["simpo", "simpo_poet"])
def test_simpo_matches_simpo_repo_loss(poet, tiny_llama_dir, pairs_file, tmp_path):
    cfg = _our_config(tiny_llama_dir, pairs_file, tmp_path / "ours", loss="simpo", poet=poet, beta=2.0,
                      gamma_beta_ratio=0.5)
    run = setup(cfg, progress=False)
    assert run.state.ref_params is None and run.ref_train is None
    batch, ref = run.next_global_batch()
    ours = {k: float(v) for k, v in run.step(batch, ref).items()}
    want = _simpo_repo_loss(tiny_llama_dir, batch, 2.0, 0.5)
    for key in ("loss", "rewards/chosen", "rewards/rejected"):
        assert ours[key] == pytest.approx(want[key], abs=1e-5), key
    assert ours["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    if poet:  # every pair scored on k = min(n_c, n_r) tokens on both sides
        n = batch.response_mask.sum(1)
        assert np.array_equal(n[:N_PAIRS], n[N_PAIRS:])
