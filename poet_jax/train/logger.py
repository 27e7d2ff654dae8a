"""Metric sinks: a JSONL file, TensorBoard event files (tensorboardX) and a tqdm progress bar.

Each record is ``{"step": int, "split": "train"|"eval", <metric>: float, ...}``; JSONL
lines are appended, so a resumed run continues the same file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# Shown on the progress bar (short names), in this order, when present.
_BAR_KEYS = (("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"), ("learning_rate", "lr"))


def _clean(v) -> float:
    return float(v)


class MetricsLogger:
    """Writes metrics to ``<dir>/metrics.jsonl`` and (optionally) ``<dir>/tb`` event files."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.dir = Path(out_dir)
        self.jsonl_path = self.dir / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tb"))

    def log(self, step: int, metrics: dict, split: str = "train") -> dict:
        """Append one record; returns it (floats)."""
        record = {"step": int(step), "split": split, "time": time.time()}
        for k, v in metrics.items():
            if v is None:
                continue
            record[k] = _clean(v)
        if not self.enabled:
            return record
        with open(self.jsonl_path, "a") as fh:
            fh.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k in ("step", "split", "time") or v is None:
                    continue
                self._tb.add_scalar(f"{split}/{k}", v, global_step=int(step))
            self._tb.flush()
        return record

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path, split: str | None = None) -> list[dict]:
    """Records of a metrics.jsonl file (optionally one split)."""
    out = []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                if split is None or rec.get("split") == split:
                    out.append(rec)
    return out


class Progress:
    """A tqdm bar over optimizer steps (rate and ETA), starting at the resumed step."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, n: int = 1, metrics: dict | None = None) -> None:
        if self._bar is None:
            return
        if metrics:
            post = {}
            for key, short in _BAR_KEYS:
                if key in metrics and metrics[key] is not None:
                    post[short] = f"{float(metrics[key]):.4g}"
            self._bar.set_postfix(post, refresh=False)
        self._bar.update(n)

    def write(self, msg: str) -> None:
        if self._bar is None:
            print(msg)
        else:
            self._bar.write(msg)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
