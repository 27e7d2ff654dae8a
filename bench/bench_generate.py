"""Greedy generation on SmolLM2-135M-Instruct (CPU): poet_jax vs transformers' generate.

Both generate exactly ``--new-tokens`` tokens (end tokens disabled / suppressed) for the
same left-padded chat prompts, fp32. poet_jax compile time is reported separately
(first call minus a timed second call).

    .venv/bin/python bench/bench_generate.py            # 8 prompts x 64 new tokens
    .venv/bin/python bench/bench_generate.py --quick    # 2 prompts x 8 new tokens
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for staying focused while studying.",
    "Explain what a prime number is to a ten-year-old.",
    "Translate 'good morning' into Spanish and German.",
    "What are the health benefits of drinking water?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Suggest a name for a small bakery.",
]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 prompts, 8 new tokens")
    ap.add_argument("--model", type=Path, default=None, help="HF directory (default: SmolLM2 from the GGUF)")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    n_prompts = args.prompts or (2 if args.quick else 8)
    new = args.new_tokens or (8 if args.quick else 64)

    import jax
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from poet_jax.models import from_pretrained, generate

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    path = args.model or common.smollm2_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS[:n_prompts]]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(map(len, rows))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = np.full((len(rows), T), pad, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1

    model = from_pretrained(path)
    t0 = time.perf_counter()
    out = generate(model, ids, mask, max_new_tokens=new, eos_token_ids=(), pad_token_id=pad)
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(model, ids, mask, max_new_tokens=new, eos_token_ids=(), pad_token_id=pad)
    jax.block_until_ready(out)
    jax_run = time.perf_counter() - t0
    jax_seqs = np.asarray(out.sequences)

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # like eos_token_ids=() above: always `new` tokens, no suppression
    with torch.no_grad():
        kw = dict(attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=new,
                  do_sample=False, pad_token_id=pad)
        hf.generate(torch.tensor(ids[:, -4:], dtype=torch.long), attention_mask=torch.ones(len(rows), 4,
                    dtype=torch.long), max_new_tokens=2, do_sample=False, pad_token_id=pad)  # warm-up
        t0 = time.perf_counter()
        ref = hf.generate(torch.tensor(ids, dtype=torch.long), **kw)
        hf_run = time.perf_counter() - t0
    hf_seqs = ref[:, T:].numpy()
    agree = float((hf_seqs == jax_seqs).mean())

    n_tok = len(rows) * new
    res = dict(prompts=len(rows), prompt_len=T, new_tokens=new, jax_compile_s=first - jax_run, jax_run_s=jax_run,
               hf_run_s=hf_run, jax_tok_s=n_tok / jax_run, hf_tok_s=n_tok / hf_run, speedup=hf_run / jax_run,
               token_agreement=agree, torch_threads=torch.get_num_threads(), loadavg=os.getloadavg()[0])
    print(f"SmolLM2-135M greedy generation, {len(rows)} prompts (padded to {T}) x {new} new tokens, fp32, "
          f"{jax.devices()[0].platform}, torch threads {res['torch_threads']}, load avg {res['loadavg']:.1f}")
    print(f"| {'impl':<22} | {'compile s':>9} | {'run s':>8} | {'tokens/s':>9} | {'speed vs HF':>11} |")
    print(f"|{'-' * 24}|{'-' * 11}|{'-' * 10}|{'-' * 11}|{'-' * 13}|")
    print(f"| {'poet_jax generate':<22} | {res['jax_compile_s']:>9.2f} | {jax_run:>8.2f} | {res['jax_tok_s']:>9.1f} | "
          f"{res['speedup']:>10.2f}x |")
    print(f"| {'transformers generate':<22} | {'-':>9} | {hf_run:>8.2f} | {res['hf_tok_s']:>9.1f} | {1.0:>10.2f}x |")
    print(f"greedy tokens identical to transformers: {agree * 100:.1f}%")
    return res


if __name__ == "__main__":
    main()
