"""Run logs: metrics.csv (always), TensorBoard events (when tensorboard is installed), loss.png."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import shutil
from pathlib import Path
from typing import Any

from bigmodel import atomic

COLUMNS = [
    "step",
    "tokens",
    "train_loss",
    "val_loss",
    "lr",
    "grad_norm",  # global gradient norm before clipping
    "tokens_per_s",  # units per second: tokens for language models, examples for other tasks
    "mfu",
    "elapsed_s",
    "skipped_steps",  # non-finite steps skipped or rolled back so far
    "loss_spike",  # 1 where the loss exceeded train.spike_factor x the running median
    "val_metric",  # the task's headline validation metric when it is not the loss (accuracy, exact match, ...)
    "penalty_l1",  # explicit regularisation terms, logged apart from the data loss
    "penalty_l2",
]


class MetricsLog:
    """Appends one row per logged step to RUN/metrics.csv; mirrors scalars to TensorBoard when available."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = run_dir / "metrics.csv"
        if resume_step is None:  # a fresh run: nothing from an earlier attempt in this folder survives
            self.path.unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        elif self.path.exists():
            self._truncate_after(resume_step)  # rows a killed run wrote after its last checkpoint
        self._open()
        self.tb: Any = None
        if importlib.util.find_spec("tensorboard") is not None:  # optional: pip install bigmodel[tensorboard]
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)

    def _open(self) -> None:
        new = not self.path.exists()
        self.file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS)
        if new:
            self.writer.writeheader()

    def rewind(self, step: int) -> None:
        """Drop rows after `step` (a rollback to a checkpoint re-trains those steps)."""
        self.file.close()
        self._truncate_after(step)
        self._open()

    def _truncate_after(self, step: int) -> None:
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        lines = [",".join(COLUMNS)] + [",".join(r.get(c, "") or "" for c in COLUMNS) for r in rows]
        atomic.write_text(self.path, "\n".join(lines) + "\n")

    def log(self, row: dict[str, Any]) -> None:
        self.writer.writerow({c: _fmt(row.get(c)) for c in COLUMNS})
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


def read_metrics(path: Path) -> list[dict[str, float | None]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) if v else None for k, v in r.items()} for r in csv.DictReader(f)]


def plot_loss(metrics_csv: Path, out_png: Path, title: str = "") -> None:
    """Train and val loss against tokens seen, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        xs = [r["tokens"] or 0.0 for r in rows if r[key] is not None]
        ys = [r[key] or 0.0 for r in rows if r[key] is not None]
        if xs:
            ax.plot(xs, ys, style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
