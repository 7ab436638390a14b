"""THE training loop (`bigmodel train`): task -> model -> AdamW steps -> logs, evals, checkpoints, export.

Reading order: `train()` sets up (task, process group, model and its parallel wrapper, optimizer, resume),
runs `_step()` until max_steps, the wall-clock budget or a stop signal, then exports RUN/final/. What is
trained comes from the task (tasks/: model, batches, loss, metrics); how ranks cooperate from
train/distributed.py; what to do with NaNs, spikes and SIGTERM from train/guards.py; checkpoint files from
train/checkpoint.py. Under torchrun every rank runs this same function; only rank 0 logs, plots and exports.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from bigmodel import atomic, hardware
from bigmodel.config import RunConfig, resolve_config, to_toml
from bigmodel.errors import UserError
from bigmodel.nn.regularizers import Regularizer
from bigmodel.tasks import TASKS, BatchStream, Task
from bigmodel.train import checkpoint
from bigmodel.train.distributed import (
    Distributed,
    full_tensor,
    resolve_parallel,
    set_gradient_sync,
    wrap_model,
)
from bigmodel.train.guards import NonFiniteGuard, SpikeDetector, StopSignals
from bigmodel.train.logging import MetricsLog, plot_loss
from bigmodel.train.optim import lr_at, make_optimizer
from bigmodel.train.selection import EarlyStopping

# Testing hook: SIGKILL this process right after optimizer step N (proves that resume is exact).
KILL_AT_STEP_ENV = "BIGMODEL_KILL_AT_STEP"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int  # units seen (tokens for language models, examples otherwise)
    train_loss: float
    val: dict[str, float] | None
    stop_reason: str  # max_steps | max_minutes | early_stopping | interrupted | preempted
    seconds: float
    detail: str = ""  # why, in words (early stopping: the metric, its best value and step)


def _prepare_run_dir(out: Path, resume: str | None) -> Path | None:
    """Return the checkpoint to resume from (None for a fresh run), refusing to overwrite an earlier run."""
    ckpts = out / "checkpoints"
    if resume is None:
        if checkpoint.complete_checkpoints(ckpts, warn=False) or (out / "final").exists():
            raise UserError(f"{out} already holds a run; pass --resume auto to continue it, or choose a new --out")
        return None
    if resume == "auto":
        found = checkpoint.latest_checkpoint(ckpts)
        if found is None:
            print(f"no complete checkpoint in {ckpts}; starting from scratch", file=sys.stderr)
        return found
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint folder; use --resume auto or a step-NNNNNNN folder")
    return path


def make_task(config: RunConfig, data: str | Path) -> Task:
    if config.task not in TASKS:
        raise UserError(f"unknown task {config.task!r}; choose one of: {', '.join(sorted(TASKS))}")
    return TASKS[config.task](config, data)


def train(
    config: RunConfig, data: str | Path, out: str | Path, resume: str | None = None, progress: bool = True
) -> TrainResult:
    """Train `config` on `data` into run directory `out` (under torchrun: on every rank, collectively)."""
    ctx = Distributed.from_env(hardware.default_device())
    try:
        return _train(config, Path(data), Path(out), resume, progress, ctx)
    finally:
        ctx.close()


def _train(
    config: RunConfig, data: Path, out: Path, resume: str | None, progress: bool, ctx: Distributed
) -> TrainResult:
    t_start = time.time()
    cfg = config.train
    device = ctx.device
    strategy = resolve_parallel(cfg.parallel, ctx.world_size)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    say = _printer(ctx)

    # --- task, data, model, optimizer ---
    task = make_task(config, data)
    accum = task.accum_steps(ctx.world_size)
    stream = task.batches(cfg.micro_batch, cfg.seed, ctx.rank, ctx.world_size)
    resume_from = _prepare_run_dir(out, resume)
    ctx.barrier()  # every rank has checked the run folder before rank 0 writes into it
    model = task.build_model().to(device)  # the same initial weights on every rank (same seed)
    if ctx.rank:
        torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)  # but independent dropout streams
    if cfg.activation_checkpointing:
        if not hasattr(model, "activation_checkpointing"):
            raise UserError(f"train.activation_checkpointing: {type(model).__name__} does not support it")
        model.activation_checkpointing = True  # type: ignore[assignment]
    amp = hardware.autocast_dtype(cfg.precision, device)
    wrapped = wrap_model(model, strategy, ctx, amp)
    optimizer = make_optimizer(model, cfg)  # after sharding: FSDP2 replaces parameters with DTensor shards
    fwd: nn.Module = torch.compile(wrapped) if cfg.compile else wrapped  # type: ignore[assignment]
    nonfinite = NonFiniteGuard(cfg.on_nonfinite, cfg.max_nonfinite_in_row)
    spikes = SpikeDetector(cfg.spike_factor)
    reg = Regularizer.from_train_config(cfg)
    stopper = EarlyStopping.from_train_config(cfg)
    if cfg.early_stopping_patience and not task.has_validation():
        raise UserError("train.early_stopping_patience needs a validation split; prepare the data with one")
    step, units, elapsed_before = 0, 0, 0.0

    def restore(path: Path) -> None:
        nonlocal step, units, elapsed_before
        state = checkpoint.load_checkpoint(path, model, optimizer, ctx)
        if state["data"] != task.fingerprint():
            raise UserError(
                f"checkpoint {path} was trained on other data than {data}; "
                "resume with the same --data, or start a new --out"
            )
        stream.load_state_dict(state["loader"])
        nonfinite.load_state_dict(state.get("nonfinite", {}))
        spikes.load_state_dict(state.get("spikes", {}))
        if "early_stopping" in state:
            stopper.load_state_dict(state["early_stopping"])
        step, units, elapsed_before = state["step"], state["tokens"], state["elapsed_s"]

    if resume_from is not None:
        changed = checkpoint.check_compatible(resume_from, config)
        if changed and ctx.is_main:
            warnings.warn(f"resuming with changed training settings: {'; '.join(changed)}", stacklevel=3)
        restore(resume_from)
        say(f"resumed from {resume_from} at step {step}")
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(out / "config.toml", to_toml(config))
    peak = hardware.matmul_peak_flops(amp or torch.float32, device.type)
    flops = task.flops_per_unit(model)
    log = MetricsLog(out, resume_step=step if resume_from is not None else None) if ctx.is_main else None
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0"))
    budget_s = cfg.max_minutes * 60
    t_loop = time.time()

    def save(at_step: int, export: nn.Module | None) -> None:
        """Checkpoint `at_step`; `export` is `_consolidated(...)`'s model (rank 0) for the model directory."""
        state = {
            "step": at_step,
            "tokens": units,
            "elapsed_s": elapsed_before + time.time() - t_loop,
            "loader": stream.state_dict(),
            "data": task.fingerprint(),
            "parallel": strategy,
            "nonfinite": nonfinite.state_dict(),
            "spikes": spikes.state_dict(),
            "early_stopping": stopper.state_dict(),
        }
        checkpoint.save_checkpoint(
            out / "checkpoints",
            at_step,
            model=model,
            optimizer=optimizer,
            save_model=(lambda d: task.save(export, d)) if export is not None else None,
            config=config,
            state=state,
            keep=cfg.keep_checkpoints,
            ctx=ctx,
        )

    say(
        f"training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters ({task.name}) on "
        f"{ctx.world_size} x {device.type} ({strategy if strategy != 'none' else 'one process'}, "
        f"{'bf16 autocast' if amp else 'fp32'}{', activation checkpointing' if cfg.activation_checkpointing else ''}),"
        f" {accum} micro-batch(es) of {cfg.micro_batch} per rank and step"
    )
    if reg.active:
        say(reg.describe(model))
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not (progress and ctx.is_main),
        file=sys.stderr,
        dynamic_ncols=True,
    )
    wrapped.train()
    stop_reason, detail, loss, t_last, units_last = "max_steps", "", math.nan, time.time(), units
    with StopSignals() as signals:
        while step < cfg.max_steps:
            elapsed = elapsed_before + time.time() - t_loop
            # all ranks stop at the same step: one all-reduce answers both questions
            signalled, out_of_time = ctx.flags(signals.requested is not None, bool(budget_s) and elapsed >= budget_s)
            if signalled:
                stop_reason = signals.requested or "interrupted"
                break
            if out_of_time:
                stop_reason = "max_minutes"
                break
            lr = lr_at(cfg, step, elapsed / budget_s if budget_s else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            log_step = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
            loss, grad_norm, step_units, penalties = _step(
                fwd, model, task, stream, accum, cfg.grad_clip, device, amp, strategy, reg, log_step
            )
            loss = ctx.sum(loss) / ctx.world_size  # the same value on every rank: they act on it together
            action = nonfinite.check(step + 1, loss, grad_norm)
            if action == "rollback":
                optimizer.zero_grad(set_to_none=True)
                counts = nonfinite.state_dict()  # the checkpoint's counters predate this bad step
                _rollback(out, restore, stream, step + 1, say)
                nonfinite.load_state_dict(counts)
                if log is not None:
                    log.rewind(step)
                units_last = units
                continue
            if action == "ok":
                optimizer.step()
                reg.apply_max_norm(model)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            units += step_units * ctx.world_size
            bar.update(1)
            row: dict[str, Any] = {}
            if spikes.update(loss):
                say(f"warning: loss spike at step {step}: {loss:.4f} > {cfg.spike_factor} x the running median")
                row["loss_spike"] = 1
            if log_step or row:
                now = time.time()
                ups = (units - units_last) / max(now - t_last, 1e-9)
                t_last, units_last = now, units
                row |= {
                    "train_loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": ups,
                    "mfu": ups * flops / (peak * ctx.world_size),
                    "skipped_steps": nonfinite.total,
                    **{f"penalty_{k}": v for k, v in penalties.items()},
                }
                bar.set_postfix(loss=f"{loss:.3f}", rate=f"{ups:,.0f}", refresh=False)
            stop_early = False
            if task.has_validation() and cfg.eval_every and step % cfg.eval_every == 0:
                metrics = _evaluate(task, model, device, amp, cfg.eval_tokens)
                row["val_loss"] = metrics["loss"]
                if task.metric != "loss":
                    row["val_metric"] = metrics[task.metric]
                if cfg.early_stopping_patience:
                    if stopper.update(_selected_metric(metrics, cfg.early_stopping_metric), step):
                        _save_best(model, task, strategy, ctx, out, step, stopper)
                    stop_early = stopper.should_stop
            if row and log is not None:
                log.log({"step": step, "tokens": units, "elapsed_s": elapsed_before + time.time() - t_loop, **row})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save(step, _consolidated(model, task, strategy, ctx))
            if kill_at and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop_early:
                stop_reason, detail = "early_stopping", stopper.reason
                say(detail)
                break
    bar.close()
    train_seconds = elapsed_before + time.time() - t_loop
    if stop_reason in ("interrupted", "preempted"):
        save(step, _consolidated(model, task, strategy, ctx))
        if log is not None:
            log.close()
        say(f"{stop_reason} at step {step}; checkpoint saved, continue with --resume auto")
        _write_summary(out, ctx, stop_reason, f"stopped by a signal at step {step}", step, units, stopper)
        return TrainResult(out, step, units, loss, None, stop_reason, time.time() - t_start)

    # --- the end: last checkpoint, final evaluation, export, plot (one consolidated copy for both) ---
    export = _consolidated(model, task, strategy, ctx)
    if not checkpoint.step_dir(out / "checkpoints", step).exists():
        save(step, export)
    ctx.barrier()
    result_val = _evaluate(task, model, device, amp, None) if task.has_validation() else None
    if log is not None and export is not None:
        if result_val is not None:
            log.log({"step": step, "tokens": units, "val_loss": result_val["loss"], "elapsed_s": train_seconds})
        log.close()
        task.save(export, out / "final")
        plot_loss(out / "metrics.csv", out / "loss.png", title=f"{out.name}: {config.preset} preset")
    ctx.barrier()
    summary = f"{step} steps, {units:,} {task.unit} in {train_seconds / 60:.1f} min, train loss {loss:.3f}"
    if result_val is not None:
        summary += ", " + ", ".join(f"val {k} {v:.4g}" for k, v in result_val.items() if k != task.unit)
    say(f"{summary} ({stop_reason}) -> {out / 'final'}")
    _write_summary(out, ctx, stop_reason, detail, step, units, stopper)
    return TrainResult(out, step, units, loss, result_val, stop_reason, time.time() - t_start, detail)


def _step(
    fwd: nn.Module,
    model: nn.Module,
    task: Task,
    stream: BatchStream,
    accum: int,
    grad_clip: float,
    device: torch.device,
    amp: torch.dtype | None,
    strategy: str,
    reg: Regularizer | None = None,
    log_penalty: bool = False,
) -> tuple[float, float, int, dict[str, float]]:
    """Forward/backward over `accum` micro-batches (gradients synced on the last one only), then the
    explicit L1/L2 penalty's gradient once (`reg`), added to the synced gradients.

    Returns (this rank's mean data loss, global gradient norm before clipping, units seen by this rank,
    the penalty terms when `log_penalty`). The caller decides from the loss and norm whether to step.
    """
    total = torch.zeros((), device=device)
    units = 0
    for i in range(accum):
        batch = {k: v.to(device, non_blocking=True) for k, v in stream.next_batch().items()}
        set_gradient_sync(fwd, strategy, i == accum - 1)
        with hardware.autocast(device, amp):
            loss = task.loss(fwd, batch)
        (loss / accum).backward()
        total += loss.detach()
        units += task.units(batch)
    penalties = reg.add_penalty_gradients(model, with_values=log_penalty) if reg is not None else {}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    return (total / accum).item(), full_tensor(norm).item(), units, penalties


def _evaluate(
    task: Task, model: nn.Module, device: torch.device, amp: torch.dtype | None, limit: int | None
) -> dict[str, float]:
    """Validation metrics; every rank runs it (FSDP's forward needs all of them), all get the same numbers."""
    was_training = model.training
    model.eval()
    with hardware.autocast(device, amp):
        metrics = task.evaluate(model, limit=limit)
    model.train(was_training)
    return metrics


def _consolidated(model: nn.Module, task: Task, strategy: str, ctx: Distributed) -> nn.Module | None:
    """The whole model on rank 0 (None elsewhere), for model directories. A collective call under FSDP."""
    if strategy != "fsdp":
        return model if ctx.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not ctx.is_main:
        return None
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG stream
        copy = task.build_model()
    copy.load_state_dict(full)
    return copy


def _selected_metric(metrics: dict[str, float], name: str) -> float:
    """`val_loss` -> metrics["loss"], `val_accuracy` -> metrics["accuracy"], ..."""
    key = name.removeprefix("val_")
    if key not in metrics:
        options = ", ".join(f"val_{k}" for k in metrics)
        raise UserError(f"train.early_stopping_metric={name!r} is not reported by this task; choose one of {options}")
    return metrics[key]


def _save_best(
    model: nn.Module, task: Task, strategy: str, ctx: Distributed, out: Path, step: int, stopper: EarlyStopping
) -> None:
    """RUN/best/: the model of the best evaluation so far, replaced atomically (folder rename)."""
    export = _consolidated(model, task, strategy, ctx)
    if export is None:
        return
    tmp, best = out / ".best.tmp", out / "best"
    shutil.rmtree(tmp, ignore_errors=True)
    task.save(export, tmp)
    atomic.write_json(tmp / "selection.json", {"step": step, "metric": stopper.metric, "value": stopper.best})
    old = out / ".best.old"
    if best.exists():
        best.rename(old)
    tmp.rename(best)
    shutil.rmtree(old, ignore_errors=True)
    atomic.fsync_dir(out)


def _write_summary(
    out: Path, ctx: Distributed, reason: str, detail: str, step: int, units: int, stopper: EarlyStopping
) -> None:
    """RUN/summary.json: why and where the run stopped, and the best evaluation when selection was on."""
    if not ctx.is_main:
        return
    summary: dict[str, Any] = {"stop_reason": reason, "detail": detail, "steps": step, "units": units}
    if stopper.best is not None:
        summary["best"] = {"metric": stopper.metric, "value": stopper.best, "step": stopper.best_step}
    atomic.write_json(out / "summary.json", summary)


def _rollback(out: Path, restore: Any, stream: BatchStream, bad_step: int, say: Any) -> None:
    """Reload the newest complete checkpoint; the data position stays after the offending batches."""
    last = checkpoint.latest_checkpoint(out / "checkpoints")
    if last is None:
        raise UserError(
            f"non-finite step {bad_step} with train.on_nonfinite=rollback, but there is no checkpoint to roll back "
            "to yet; lower train.checkpoint_every or use train.on_nonfinite=skip"
        )
    position = stream.state_dict()
    restore(last)
    stream.load_state_dict(position)  # skip the offending batches instead of reading them again
    say(f"rolled back to {last.name}; continuing with the batches after step {bad_step}'s")


def _printer(ctx: Distributed) -> Any:
    def say(message: str) -> None:
        if ctx.is_main:
            print(message, file=sys.stderr, flush=True)

    return say


def run_train(args: Any) -> int:
    config = resolve_config(args.preset, args.config, args.set, task=getattr(args, "task", None))
    result = train(config, args.data, args.out, resume=args.resume)
    return 130 if result.stop_reason == "interrupted" else 0
