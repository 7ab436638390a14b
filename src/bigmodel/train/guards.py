"""Guards that keep a long run honest: non-finite steps, loss spikes, and preemption signals.

`NonFiniteGuard` decides what happens when the loss or the gradient norm of a step is NaN/inf (agreed
across ranks by the loop before it asks): `skip` drops the update (weights and optimizer untouched) and
counts it, `stop` ends the run with an error before the update, `rollback` asks the loop to reload the last
good checkpoint and go on with the batches after the offending one. Too many bad steps in a row stop the
run whatever the policy. `SpikeDetector` flags losses far above the running median. `StopSignals` turns
SIGINT (Ctrl-C) and SIGTERM (preemption) into a request to stop at the next step boundary with a checkpoint.
"""

from __future__ import annotations

import math
import signal
import statistics
import sys
import threading
from collections import deque
from typing import Any

from bigmodel.config import NONFINITE as NONFINITE_POLICIES
from bigmodel.errors import UserError


class NonFiniteError(UserError):
    """Training stopped on a non-finite loss or gradient norm (policy `stop`, or too many in a row)."""


class NonFiniteGuard:
    def __init__(self, policy: str, max_in_row: int) -> None:
        if policy not in NONFINITE_POLICIES:
            raise UserError(f"train.on_nonfinite={policy!r} is invalid: expected {' | '.join(NONFINITE_POLICIES)}")
        self.policy, self.max_in_row = policy, max_in_row
        self.total, self.in_row = 0, 0

    def check(self, step: int, loss: float, grad_norm: float) -> str:
        """'ok' for a finite step; else the action to take: 'skip' or 'rollback' (or raise to stop)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_row = 0
            return "ok"
        self.total += 1
        self.in_row += 1
        kind = "loss" if not math.isfinite(loss) else "gradient norm"
        what = f"non-finite {kind} at step {step} (loss {loss}, grad norm {grad_norm})"
        if self.policy == "stop":
            raise NonFiniteError(f"{what}; stopped before the update (train.on_nonfinite=stop). {_HINT}")
        if self.in_row > self.max_in_row:
            raise NonFiniteError(
                f"{what}: {self.in_row} non-finite steps in a row (train.max_nonfinite_in_row="
                f"{self.max_in_row}); stopped. {_HINT}"
            )
        print(f"warning: {what}; {self.policy} ({self.total} so far)", file=sys.stderr)
        return self.policy

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_row": self.in_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.in_row = int(state.get("total", 0)), int(state.get("in_row", 0))


_HINT = "Lower train.lr, raise train.warmup_steps, or train in fp32 (train.precision=fp32)."


class SpikeDetector:
    """Flags a loss above `factor` x the median of the last `window` losses (once 10 are known)."""

    def __init__(self, factor: float, window: int = 100) -> None:
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=window)

    def update(self, loss: float) -> bool:
        spike = (
            self.factor > 0
            and len(self.recent) >= min(10, self.recent.maxlen or 10)
            and loss > self.factor * statistics.median(self.recent)
        )
        if math.isfinite(loss):
            self.recent.append(loss)
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent.clear()
        self.recent.extend(float(x) for x in state.get("recent", []))


class StopSignals:
    """SIGINT and SIGTERM request a stop at the next step boundary; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None  # "interrupted" (SIGINT) or "preempted" (SIGTERM)
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested == "interrupted":
            raise KeyboardInterrupt
        self.requested = "preempted" if signum == signal.SIGTERM else "interrupted"
        what = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        print(f"\n{what}: saving a checkpoint after this step, then exiting", file=sys.stderr)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
