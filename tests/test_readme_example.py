"""The README's "Use the losses in your own JAX code" example runs and prints the right number."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Use the losses in your own JAX code"


def _until_next_heading(text: str) -> str:
    """Text up to the next level-1/2 heading outside code fences."""
    lines, in_fence = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#{1,2} ", line):
            break
        lines.append(line)
    return "".join(lines)


def _section_code() -> tuple[str, Path]:
    path = ROOT / "README.md"
    text = path.read_text(encoding="utf-8")
    assert HEADING in text, f"README.md lost its {HEADING!r} section"
    section = _until_next_heading(text.split(HEADING, 1)[1])
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, f"no ```python block under {HEADING!r} in {path}"
    return "\n".join(blocks), path


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_readme_example_runs_and_matches_numpy():
    code, path = _section_code()
    ns: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(path), "exec"), ns)  # noqa: S102 - our own documentation
    printed = re.search(r"DPO\+POET loss:\s*([-0-9.eE]+)", out.getvalue())
    assert printed, out.getvalue()

    # independent recomputation in numpy from the example's own inputs
    b = ns["B"]
    ids = np.asarray(ns["input_ids"])
    resp = np.asarray(ns["response_mask"])[:, 1:].astype(bool)

    def seq_logps(logits):
        lp = np.take_along_axis(_np_log_softmax(np.asarray(logits)[:, :-1]), ids[:, 1:, None], -1)[..., 0]
        n = resp.sum(1)
        k = np.minimum(n[:b], n[b:])
        k = np.concatenate([k, k])
        out = np.zeros(2 * b)
        for i in range(2 * b):
            pos = np.nonzero(resp[i])[0][: k[i]]  # first k tokens of this response
            out[i] = lp[i, pos].sum()
        return out

    pol, ref = seq_logps(ns["logits"]), seq_logps(ns["ref_logits"])
    margin = 0.1 * ((pol[:b] - ref[:b]) - (pol[b:] - ref[b:]))
    want = np.mean(np.logaddexp(0.0, -margin))  # -log sigmoid
    np.testing.assert_allclose(float(printed.group(1)), want, rtol=1e-5)
    np.testing.assert_allclose(float(ns["total"] / ns["count"]), want, rtol=1e-6)
    assert abs(want - np.log(2)) > 1e-4  # the example is not trivially at the zero-margin value
