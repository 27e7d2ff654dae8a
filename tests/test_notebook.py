"""examples/colab_quickstart.ipynb executes top to bottom (nbclient, a kernel on this venv's python).

The notebook asserts its own results (loss at step 1 = ln 2 and falling, files written,
POET kept fraction, M_k shape and M_k at full length = the trainer's held-out margin);
this test additionally checks what it left behind against the trainer's metrics files.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "colab_quickstart.ipynb"
KERNEL = "poet-jax-venv"


def _kernel_dir(root: Path) -> Path:
    """A Jupyter data dir whose only kernel runs ipykernel on this interpreter (the venv's python)."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "poet_jax venv",
        "language": "python",
    }))
    return root


def _load() -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def test_notebook_is_clean_and_guards_install():
    nb = _load()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook without outputs"
    install = code[0].source
    assert 'find_spec("poet_jax") is None' in install and "%pip install" in install
    src = "\n".join(c.source for c in code)
    for needle in ("jax.devices()", "poet_jax.train.loop import train", "prefix_margin_report", "plt.show()"):
        assert needle in src, needle


@pytest.mark.slow
def test_notebook_executes(tmp_path, monkeypatch, shared_data):
    from nbclient import NotebookClient

    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_dir(tmp_path / "jupyter")))
    monkeypatch.setenv("POET_JAX_DATA", str(shared_data / "dpo_en_demo.json"))  # never download
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    nb = _load()
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(run_dir)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell's traceback) if any cell fails
    seconds = time.perf_counter() - t0

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "poet_jax from" in text and "pip install" not in text.lower()  # the guard skipped the install
    assert re.search(r"\d+ x CPU \(", text), text[:500]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 2, f"expected the loss/accuracy and the M_k figures, got {len(images)}"

    work = run_dir / "runs" / "colab_quickstart"
    for run in ("dpo", "dpo-poet"):
        recs = [json.loads(line) for line in (work / run / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in recs if r["split"] == "train"]
        assert [r["step"] for r in train] == list(range(1, 17))
        assert abs(train[0]["loss"] - math.log(2)) < 1e-4
        assert sum(r["loss"] for r in train[-4:]) / 4 < math.log(2) - 0.05
        assert (work / run / "hf" / "model.safetensors").is_file()
        kept = train[-1]["poet/kept_fraction"]
        assert (kept < 1.0) if run == "dpo-poet" else (kept == 1.0)
    assert (work / "model" / "tokenizer.json").is_file()
    print(f"notebook executed in {seconds:.1f} s")
    assert seconds < 300
