"""``poet-jax demo``: the reward-generation gap on a task poet_jax generates itself.

For each seed: generate the task (:mod:`poet_jax.demo.task`), build the word-level
tokenizer, fit a tiny Llama by SFT on a mix of right and wrong answers, then train DPO,
DPO+POET, SimPO and SimPO+POET from that same start with the real trainer
(``poet_jax.train.loop.train``). Each final policy is evaluated on held-out pairs
(reward accuracy of its own loss; prefix margins ``M_k`` against the SFT model) and by
sampling answers to held-out questions (temperature 0.7, top-p 1; answer accuracy =
the verifiable reward; win rate against the SFT model's samples). The demo prints a
table (mean +- std over seeds), and writes ``results.json``, ``table.md`` and
``prefix_margins.png`` to the output directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from poet_jax.demo.task import TaskConfig, answer_reward, make_task_data, write_jsonl, words

VARIANTS: dict[str, tuple[str, bool]] = {
    "DPO": ("dpo", False),
    "DPO+POET": ("dpo", True),
    "SimPO": ("simpo", False),
    "SimPO+POET": ("simpo", True),
}
TABLE_KS = (1, 2, 3, 4)
LEGEND = (
    "reward acc.: held-out pairs, reward of the run's own loss (DPO: implicit reward; SimPO: mean log-prob). "
    "M_k: DPO implicit-reward margin over the first k response tokens (beta={beta}, reference = the SFT start; "
    "k=1 is the answer token). answer acc.: sampled answers (T=0.7, top-p 1, {repeats} per evaluation question) that "
    "are right; p(right): the exact probability of the right answer at T=0.7 on the same questions. "
    "win vs SFT: same prompts, same seed. resp. length: generated tokens."
)


@dataclasses.dataclass
class DemoSettings:
    """Everything the demo does, in one place (``--quick`` shrinks the step counts and data).

    task: the synthetic task. seeds: one full pipeline (data, SFT, four runs) per seed.
    sft_*: the supervised stage. steps / batch / lr: every preference run.
    beta: DPO beta (also the beta of the reported ``M_k``); simpo_beta /
    simpo_gamma_beta_ratio / simpo_lr: SimPO. length: padded row length (one bucket).
    """

    task: TaskConfig = dataclasses.field(default_factory=lambda: TaskConfig())
    seeds: tuple[int, ...] = (0,)
    variants: tuple[str, ...] = tuple(VARIANTS)
    n_sft: int = 4000
    n_train_pairs: int = 2000
    n_eval_pairs: int = 200
    model_hidden: int = 64
    model_layers: int = 2
    sft_steps: int = 600
    sft_batch: int = 64
    sft_lr: float = 3e-3
    steps: int = 150
    batch: int = 32
    lr: float = 3e-4
    beta: float = 0.1
    simpo_beta: float = 2.0
    simpo_gamma_beta_ratio: float = 0.5
    simpo_lr: float = 3e-4
    length: int = 32
    max_new_tokens: int = 24
    gen_repeats: int = 8
    heldout_questions: float = 0.0
    out_dir: str = "demo_out"
    progress: bool = True

    def __post_init__(self):
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown demo variant(s) {bad}; valid: {', '.join(VARIANTS)}")
        if not self.seeds:
            raise ValueError("the demo needs at least one seed")
        # prompt (11 tokens) + answer and full stop + lead + tail + end-of-turn
        longest = 11 + 2 + self.task.long_lead + max(self.task.long_tail[1], self.task.short_tail[1]) + 1
        if self.length < longest:
            raise ValueError(f"length={self.length} is too short for tails of {self.task.long_tail[1]} words; "
                             f"use at least {longest}")


def quick_settings(**overrides) -> DemoSettings:
    """The reduced setting the test suite runs (< 60 s on 2 cores): small data, few steps, 2 variants."""
    base = dict(
        task=TaskConfig(max_operand=3, long_tail=(6, 10)), seeds=(0,), variants=("DPO", "DPO+POET"),
        n_sft=400, n_train_pairs=128, n_eval_pairs=32, model_hidden=32, sft_steps=60, sft_batch=32,
        steps=6, batch=16, max_new_tokens=16, length=32, gen_repeats=2,
    )
    base.update(overrides)
    return DemoSettings(**base)


def full_settings(**overrides) -> DemoSettings:
    base = dict(task=TaskConfig(max_operand=5, long_tail=(6, 12)))
    base.update(overrides)
    return DemoSettings(**base)


# ----------------------------------------------------------------------------- one seed


def answer_probability(model, tokenizer, questions: list[str], temperature: float = 0.7) -> float:
    """Exact expected answer accuracy of sampling at ``temperature`` (top-p 1): the mean over
    ``questions`` of p(first response token = the right sum). The answer is one token, so
    this is the sampled accuracy without sampling noise."""
    from poet_jax.demo.task import parse_prompt
    from poet_jax.evaluate.generation import encode_prompts, left_pad
    from poet_jax.evaluate.margins import last_token_logits

    enc = encode_prompts(tokenizer, questions)
    ids, mask = left_pad(enc, tokenizer.pad_token_id)
    logits = last_token_logits(model, ids, mask).astype(np.float64) / temperature
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    right = [tokenizer.convert_tokens_to_ids(str(sum(parse_prompt(q)))) for q in questions]
    return float(np.mean(probs[np.arange(len(questions)), right]))


def _trainer_config(s: DemoSettings, variant: str, sft_dir: Path, data_dir: Path, out: Path, seed: int) -> Any:
    from poet_jax.train.config import config_from_dict

    loss, poet = VARIANTS[variant]
    is_simpo = loss == "simpo"
    values = {
        "model": {"path": str(sft_dir)},
        "data": {
            "path": str(data_dir / "train_pairs.jsonl"),
            "max_length": s.length,
            "max_prompt_length": s.length // 2,
            "use_poet": poet,
            "bucket_lengths": [s.length],
            "cache_dir": str(data_dir / "cache"),
        },
        "loss": {"name": loss, "beta": s.simpo_beta if is_simpo else s.beta,
                 "gamma_beta_ratio": s.simpo_gamma_beta_ratio},
        "optim": {"lr": s.simpo_lr if is_simpo else s.lr, "warmup_ratio": 0.1, "schedule": "cosine",
                  "weight_decay": 0.0},
        "train": {"output_dir": str(out), "max_steps": s.steps, "global_batch": s.batch, "seed": seed,
                  "log_every": max(1, s.steps), "eval_every": 0, "save_every": 0, "keep_checkpoints": 1,
                  "export": True, "progress": False, "tensorboard": False},
    }
    return config_from_dict(values)


def _enable_compilation_cache(path: Path) -> None:
    """Persist compiled programs under ``path`` (unless a cache is already configured), so
    runs that differ only in their data (X and X+POET) compile once."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run_seed(s: DemoSettings, seed: int, bar=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole pipeline for one seed.

    Returns ``(metrics, margins)``: ``{"sft": {...}, variant: {...}}`` and, per variant, its
    :class:`~poet_jax.evaluate.margins.PrefixMarginReport`.
    """
    from poet_jax.data import DataConfig, build_preference_data
    from poet_jax.demo.sft import create_model, save_model, sft_train
    from poet_jax.demo.tokenizer import build_tokenizer
    from poet_jax.evaluate.generation import evaluate_generation, sample_responses, score
    from poet_jax.evaluate.margins import prefix_margin_report
    from poet_jax.models import from_pretrained
    from poet_jax.train.loop import train

    _enable_compilation_cache(Path(s.out_dir) / ".jax_cache")
    root = Path(s.out_dir) / f"seed{seed}"
    data_dir = root / "data"
    data = make_task_data(s.task, seed=seed, n_sft=s.n_sft, n_train_pairs=s.n_train_pairs,
                          n_eval_pairs=s.n_eval_pairs, heldout_fraction=s.heldout_questions)
    write_jsonl(data.train_pairs, data_dir / "train_pairs.jsonl")
    write_jsonl(data.eval_pairs, data_dir / "eval_pairs.jsonl")
    tokenizer = build_tokenizer(words(s.task))

    def tick(n: int = 1, desc: str | None = None):
        if bar is not None:
            if desc:
                bar.set_description(desc)
            bar.update(n)

    tick(0, f"seed {seed}: SFT")
    model = create_model(tokenizer, root / "init", hidden_size=s.model_hidden, num_layers=s.model_layers,
                         intermediate_size=2 * s.model_hidden, seed=seed)
    model, hist = sft_train(model, tokenizer, data.sft, steps=s.sft_steps, batch_size=s.sft_batch, lr=s.sft_lr,
                            seed=seed, length=s.length, on_step=lambda i, l: tick())
    sft_dir = save_model(model, tokenizer, root / "sft")
    reference = from_pretrained(sft_dir)

    ev = build_preference_data(
        DataConfig(path=str(data_dir / "eval_pairs.jsonl"), max_length=s.length, max_prompt_length=s.length // 2,
                   bucket_lengths=(s.length,), show_progress=False),
        tokenizer,
    ).train_examples
    pad = tokenizer.pad_token_id
    gen_kw = dict(seed=seed, max_new_tokens=s.max_new_tokens, batch_size=64)
    prompts = [q for q in data.eval_prompts for _ in range(s.gen_repeats)]
    train_questions = sorted({r["prompt"][0]["content"] for r in data.train_pairs})
    ref_samples = sample_responses(reference, tokenizer, prompts, **gen_kw)
    ref_rewards = score(answer_reward, ref_samples.prompts, ref_samples.responses)
    results: dict[str, Any] = {
        "sft": {"sft_loss": float(np.mean(hist[-20:])), "answer_accuracy": float(ref_rewards.mean()),
                "response_length": float(ref_samples.lengths.mean()), "win_rate": 0.5,
                "p_right": answer_probability(reference, tokenizer, data.eval_prompts),
                "p_right_train_q": answer_probability(reference, tokenizer, train_questions)}
    }
    margins = {}
    for variant in s.variants:
        tick(0, f"seed {seed}: {variant}")
        run_dir = root / variant.replace("+", "_")
        shutil.rmtree(run_dir, ignore_errors=True)  # the trainer would resume from an old run's checkpoint
        cfg = _trainer_config(s, variant, sft_dir, data_dir, run_dir, seed)
        out = train(cfg, progress=False)
        policy = from_pretrained(out["export_dir"])
        rep = prefix_margin_report(policy, reference, ev, pad, beta=s.beta, batch_size=64)
        gen = evaluate_generation(policy, tokenizer, prompts, answer_reward, reference_samples=ref_samples,
                                  reference_rewards=ref_rewards, **gen_kw)
        gen.save_json(root / f"generations_{variant.replace('+', '_')}.json")
        row = {
            "reward_accuracy": rep.simpo_accuracy() if VARIANTS[variant][0] == "simpo" else rep.accuracy,
            "p_right": answer_probability(policy, tokenizer, data.eval_prompts),
            "p_right_train_q": answer_probability(policy, tokenizer, train_questions),
            "dpo_margin": rep.margin,
            "dpo_accuracy": rep.accuracy,
            "answer_accuracy": gen.mean_reward,
            "response_length": gen.mean_length,
            "win_rate": gen.win_rate,
            "mean_min_length": rep.mean_min_length,
            "M_k": rep.to_dict(),
        }
        for k in TABLE_KS:
            row[f"M_{k}"], row[f"M_{k}_pos"] = rep.at(k)
        results[variant] = row
        margins[variant] = rep
        tick(s.steps)
    return results, margins


# ----------------------------------------------------------------------------- reporting


def _agg(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}"


TABLE_COLUMNS = (  # (header, key in a variant's row, value for the SFT start)
    ("reward acc.", "reward_accuracy", None),
    ("M_1", "M_1", 0.0),
    ("M_1 > 0", "M_1_pos", None),
    ("M_4", "M_4", 0.0),
    ("full margin", "dpo_margin", 0.0),
    ("answer acc.", "answer_accuracy", "answer_accuracy"),
    ("p(right)", "p_right", "p_right"),
    ("win vs SFT", "win_rate", 0.5),
    ("resp. length", "response_length", "response_length"),
)


def format_table(per_seed: list[dict[str, Any]], variants: tuple[str, ...]) -> str:
    """Markdown table: one row per method (and the SFT start), mean ± std over seeds."""
    lines = ["| method | " + " | ".join(c[0] for c in TABLE_COLUMNS) + " |", "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    cells = []
    for _, _, sft_val in TABLE_COLUMNS:
        if sft_val is None:
            cells.append("-")
        elif isinstance(sft_val, str):
            cells.append(_agg([r["sft"][sft_val] for r in per_seed]))
        else:
            cells.append(f"{sft_val:.3f}" if sft_val else "0")
    lines.append("| SFT (start) | " + " | ".join(cells) + " |")
    for v in variants:
        rows = [r[v] for r in per_seed]
        lines.append(f"| {v} | " + " | ".join(_agg([r[key] for r in rows]) for _, key, _ in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def _mean_report(reports: list):
    """Average PrefixMarginReports of several seeds (curves cut to the shortest K)."""
    from poet_jax.evaluate.margins import PrefixMarginReport

    K = min(len(r.ks) for r in reports)
    stack = lambda name: np.stack([np.asarray(getattr(r, name))[:K] for r in reports])  # noqa: E731
    first = reports[0]
    rep = PrefixMarginReport(
        beta=first.beta, n_pairs=sum(r.n_pairs for r in reports), ks=np.arange(1, K + 1),
        mean_by_k=stack("mean_by_k").mean(0), positive_by_k=stack("positive_by_k").mean(0),
        fractions=first.fractions,
        mean_by_fraction=np.mean([r.mean_by_fraction for r in reports], 0),
        positive_by_fraction=np.mean([r.positive_by_fraction for r in reports], 0),
        margin=float(np.mean([r.margin for r in reports])), accuracy=float(np.mean([r.accuracy for r in reports])),
        mean_min_length=float(np.mean([r.mean_min_length for r in reports])), margins=np.zeros((0, K), np.float32),
    )
    m = stack("mean_by_k")
    return rep, (m.min(0), m.max(0))


def run_demo(s: DemoSettings) -> dict[str, Any]:
    """Run every seed, print and write the table, the plot and ``results.json``; returns the results."""
    from tqdm.auto import tqdm

    from poet_jax.evaluate.plots import plot_prefix_margins

    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = len(s.seeds) * (s.sft_steps + len(s.variants) * s.steps)
    t0 = time.perf_counter()
    per_seed, all_margins = [], {v: [] for v in s.variants}
    with tqdm(total=total, disable=not s.progress, unit="step", dynamic_ncols=True) as bar:
        for seed in s.seeds:
            res, margins = run_seed(s, seed, bar)
            per_seed.append(res)
            for v, rep in margins.items():
                all_margins[v].append(rep)
    table = format_table(per_seed, s.variants)
    mean_reports, bands = {}, {}
    for v, reps in all_margins.items():
        mean_reports[v], bands[v] = _mean_report(reps)
    plot = plot_prefix_margins(
        mean_reports, out / "prefix_margins.png", max_k=16, bands=bands if len(s.seeds) > 1 else None,
        title=f"M_k on held-out pairs (beta={s.beta}, vs the SFT start; mean over {len(s.seeds)} seed(s))",
    )
    elapsed = time.perf_counter() - t0
    settings = dataclasses.asdict(s)
    results = {"settings": settings, "seeds": list(s.seeds), "per_seed": per_seed, "table": table,
               "plot": str(plot), "seconds": elapsed}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    header = (f"poet-jax demo: {len(s.seeds)} seed(s) {list(s.seeds)}, {s.steps} steps x {s.batch} pairs per run, "
              f"{elapsed:.0f} s")
    (out / "table.md").write_text(header + "\n\n" + table + "\n\n" + LEGEND.format(beta=s.beta, repeats=s.gen_repeats) + "\n")
    print(header)
    print(table)
    print(LEGEND.format(beta=s.beta, repeats=s.gen_repeats))
    print(f"plot: {plot}\nresults: {out / 'results.json'}")
    return results


# ----------------------------------------------------------------------------- CLI


def build_parser(prog: str = "poet-jax demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reduced setting (what the test suite runs)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0)")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), help="methods to train")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per preference run")
    p.add_argument("--lr", type=float, default=None, help="learning rate of the DPO runs")
    p.add_argument("--simpo-lr", type=float, default=None, help="learning rate of the SimPO runs")
    p.add_argument("--beta", type=float, default=None, help="DPO beta")
    p.add_argument("--sft-steps", type=int, default=None, help="SFT steps")
    p.add_argument("--longer-side", choices=("rejected", "chosen", "random"), default=None,
                   help="which response carries the long tail")
    p.add_argument("--long-tail", type=int, nargs=2, metavar=("MIN", "MAX"), default=None, help="long tail length")
    p.add_argument("--p-long", type=float, default=None, help="probability of a long tail")
    p.add_argument("--label-noise", type=float, default=None, help="fraction of pairs with swapped labels")
    p.add_argument("--long-lead", type=int, default=None, help="neutral words before the distinctive long tail")
    p.add_argument("--heldout-questions", type=float, default=None,
                   help="fraction of questions kept out of preference training (default 0: held-out pairs are "
                        "fresh pairs on the same questions)")
    p.add_argument("--out", default=None, help="output directory (default: demo_out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def settings_from_args(args) -> DemoSettings:
    s = quick_settings() if args.quick else full_settings()
    task_changes = {}
    if args.longer_side is not None:
        task_changes["longer_side"] = args.longer_side
    if args.long_tail is not None:
        task_changes["long_tail"] = tuple(args.long_tail)
    if args.p_long is not None:
        task_changes["p_long"] = args.p_long
    if args.label_noise is not None:
        task_changes["label_noise"] = args.label_noise
    if args.long_lead is not None:
        task_changes["long_lead"] = args.long_lead
    changes: dict[str, Any] = {}
    if task_changes:
        changes["task"] = dataclasses.replace(s.task, **task_changes)
    for name, key in (("seeds", "seeds"), ("variants", "variants")):
        if getattr(args, name) is not None:
            changes[key] = tuple(getattr(args, name))
    for name, key in (("steps", "steps"), ("lr", "lr"), ("simpo_lr", "simpo_lr"), ("beta", "beta"),
                      ("sft_steps", "sft_steps"), ("out", "out_dir"), ("heldout_questions", "heldout_questions")):
        if getattr(args, name) is not None:
            changes[key] = getattr(args, name)
    if args.no_progress:
        changes["progress"] = False
    return dataclasses.replace(s, **changes)


def main_demo(argv: list[str] | None = None) -> int:
    """Entry point of ``poet-jax demo`` (returns the exit status)."""
    args = build_parser().parse_args(argv)
    try:
        s = settings_from_args(args)
    except ValueError as err:
        print(f"poet-jax demo: error: {err}", file=sys.stderr)
        return 2
    logging.getLogger("poet_jax").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_demo(s)
    return 0


if __name__ == "__main__":
    sys.exit(main_demo())
