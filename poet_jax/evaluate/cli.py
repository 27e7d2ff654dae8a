"""``poet-jax eval``: prefix margins ``M_k`` (and optionally generations) of one or more policies.

    poet-jax eval --reference SFT_DIR --policy DPO=runs/dpo/hf --policy POET=runs/poet/hf \\
        --data heldout.jsonl --beta 0.1 --max-pairs 256 --out eval_out \\
        [--generate 64 --reward lm:RM_DIR | --reward my_module:my_reward]

Writes ``<out>/prefix_margins.json`` (every policy's report), ``<out>/prefix_margins.png``
(the curves side by side) and, with ``--generate N``, ``<out>/generations_<label>.json``
(N held-out prompts, one sample each at temperature 0.7 / top-p 1.0 by default, scored by
the reward, with the win rate against the reference's samples). Prints a summary table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from poet_jax.evaluate.generation import PAPER_TEMPERATURE, PAPER_TOP_P


class EvalError(ValueError):
    """A user error in ``poet-jax eval`` arguments (bad path, bad reward spec, ...)."""


def build_parser(prog: str = "poet-jax eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Prefix-margin (M_k) and generation evaluation.")
    p.add_argument("--policy", action="append", required=True, metavar="[LABEL=]DIR",
                   help="policy to evaluate (Hugging Face directory); repeat for several checkpoints/runs")
    p.add_argument("--reference", required=True, metavar="DIR", help="reference model (the initial policy)")
    p.add_argument("--data", required=True, help="held-out preference pairs (any format the data pipeline reads)")
    p.add_argument("--format", default="auto", help="record format of --data (default: auto)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the reference's)")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the implicit reward (default 0.1)")
    p.add_argument("--max-pairs", type=int, default=256, help="evaluate at most this many pairs (0 = all)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per forward pass")
    p.add_argument("--max-length", type=int, default=1024, help="maximum prompt+response tokens per row")
    p.add_argument("--max-prompt-length", type=int, default=512, help="maximum prompt tokens")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0],
                   help="relative positions (fractions of the shorter response)")
    p.add_argument("--no-chat-template", action="store_true", help="plain text + EOS instead of the chat template")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="also sample N held-out prompts and score them")
    p.add_argument("--reward", default=None,
                   help="reward for --generate: 'lm:DIR' (mean response log-prob under a causal LM) or "
                        "'module:function' taking (prompt_text, response_text) -> float, e.g. "
                        "poet_jax.demo.task:answer_reward (the demo task's answer check)")
    p.add_argument("--temperature", type=float, default=PAPER_TEMPERATURE)
    p.add_argument("--top-p", type=float, default=PAPER_TOP_P)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", default="eval_out", help="output directory")
    return p


def parse_policies(specs: list[str]) -> dict[str, Path]:
    """``["A=dir1", "dir2"]`` -> ``{"A": dir1, "dir2": dir2}`` (labels must be unique)."""
    out: dict[str, Path] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = spec, spec
        if label in out:
            raise EvalError(f"--policy: label {label!r} is given twice")
        out[label] = Path(path)
    return out


def load_reward(spec: str):
    """A reward from its command-line spec (see ``--reward``)."""
    if spec.startswith("lm:"):
        from poet_jax.evaluate.generation import CausalLMReward

        path = Path(spec[3:])
        if not (path / "config.json").is_file():
            raise EvalError(f"--reward {spec}: {path} is not a model directory (no config.json)")
        return CausalLMReward.from_pretrained(path)
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name:
        raise EvalError(f"--reward {spec!r}: expected 'lm:DIR' or 'module:function'")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as err:
        raise EvalError(f"--reward {spec!r}: cannot import it ({err})") from None
    if not callable(fn):
        raise EvalError(f"--reward {spec!r} is not callable")
    return fn


def load_prompts(path: str, fmt: str = "auto", max_prompts: int | None = None) -> list[list[dict]]:
    """Prompt message lists of the pairs in ``path`` (first ``max_prompts``, duplicates removed)."""
    from poet_jax.data import detect_record_format, open_source, to_conversation

    src = open_source(path)
    prompts, seen = [], set()
    f = None if fmt == "auto" else fmt
    for rec_no, rec, line in src.records():
        if isinstance(rec, Exception):
            continue
        f = f or detect_record_format(rec)
        if f is None:
            continue
        try:
            conv = to_conversation(rec, f, src.name, rec_no, line)
        except ValueError:
            continue
        key = json.dumps(conv.prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            prompts.append([dict(m) for m in conv.prompt])
        if max_prompts and len(prompts) >= max_prompts:
            break
    if not prompts:
        raise EvalError(f"--data {path}: no prompts could be read")
    return prompts


def _check_dir(path: Path, flag: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise EvalError(f"{flag} {path}: not a Hugging Face model directory (no config.json)")


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``poet-jax eval`` with parsed arguments; returns ``{label: {"prefix_margins": ..., "generation": ...}}``."""
    from transformers import AutoTokenizer

    from poet_jax.data import DataConfig, build_preference_data
    from poet_jax.evaluate.generation import evaluate_generation, sample_responses, score
    from poet_jax.evaluate.margins import prefix_margin_report
    from poet_jax.evaluate.plots import plot_prefix_margins
    from poet_jax.models import from_pretrained

    policies = parse_policies(args.policy)
    _check_dir(Path(args.reference), "--reference")
    for label, path in policies.items():
        _check_dir(path, f"--policy {label}=")
    if not Path(args.data).exists():
        raise EvalError(f"--data {args.data}: no such file or folder")
    if args.generate and not args.reward:
        raise EvalError("--generate needs --reward (lm:DIR or module:function)")
    reward = load_reward(args.reward) if args.generate else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or str(args.reference))
    data = build_preference_data(
        DataConfig(path=args.data, format=args.format, max_length=args.max_length,
                   max_prompt_length=args.max_prompt_length, chat_template=not args.no_chat_template,
                   bucket_lengths=(), show_progress=False),
        tokenizer,
    )
    examples = data.train_examples[: args.max_pairs or None]
    reference = from_pretrained(args.reference)
    prompts = load_prompts(args.data, args.format, args.generate) if args.generate else None
    gen_kw = dict(seed=args.seed, temperature=args.temperature, top_p=args.top_p,
                  max_new_tokens=args.max_new_tokens, chat_template=not args.no_chat_template)
    ref_samples = sample_responses(reference, tokenizer, prompts, **gen_kw) if prompts else None
    ref_rewards = score(reward, ref_samples.prompts, ref_samples.responses) if prompts else None

    results: dict[str, Any] = {}
    reports = {}
    for label, path in policies.items():
        policy = from_pretrained(path)
        rep = prefix_margin_report(policy, reference, examples, data.pad_id, beta=args.beta,
                                   batch_size=args.batch_size, fractions=args.fractions)
        reports[label] = rep
        results[label] = {"path": str(path), "prefix_margins": rep.to_dict()}
        if prompts:
            gen = evaluate_generation(policy, tokenizer, prompts, reward, reference_samples=ref_samples,
                                      reference_rewards=ref_rewards, **gen_kw)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
            gen.save_json(out / f"generations_{safe}.json")
            results[label]["generation"] = gen.to_dict()
    (out / "prefix_margins.json").write_text(json.dumps(results, indent=1))
    plot = plot_prefix_margins(reports, out / "prefix_margins.png",
                               title=f"M_k on {len(examples)} held-out pairs (beta={args.beta})")
    print(format_summary(results))
    print(f"wrote {out / 'prefix_margins.json'} and {plot}")
    return results


def format_summary(results: dict[str, Any], ks=(1, 2, 4, 8, 16)) -> str:
    """One line per policy: full margin, accuracy and M_k at a few absolute k and fractions."""
    lines = []
    for label, r in results.items():
        pm = r["prefix_margins"]
        parts = [f"{label}: margin {pm['margin']:.4f} acc {pm['accuracy']:.3f}"]
        for k in ks:
            if k <= len(pm["k"]):
                parts.append(f"M_{k} {pm['mean_M_k'][k - 1]:.4f} ({pm['positive_M_k'][k - 1]:.2f}>0)")
        for f, m, p in zip(pm["fractions"], pm["mean_M_fraction"], pm["positive_M_fraction"]):
            parts.append(f"M@{f:g} {m:.4f} ({p:.2f}>0)")
        g = r.get("generation")
        if g:
            parts.append(f"reward {g['mean_reward']:.4f} win {g['win_rate']:.3f} len {g['mean_length']:.1f}")
        lines.append(" | ".join(parts))
    return "\n".join(lines)


def main_eval(argv: list[str] | None = None) -> int:
    """Entry point of ``poet-jax eval``; user errors print one line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        run_eval(args)
    except (EvalError, FileNotFoundError) as err:
        print(f"poet-jax eval: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main_eval())
