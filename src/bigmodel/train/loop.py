"""THE training loop (`bigmodel train`): data -> model -> AdamW steps -> logs, evals, checkpoints, export.

Reading order: `train()` sets up (config, data, model, optimizer, resume), runs `_step()` until max_steps or
the wall-clock budget, then exports RUN/final/. Everything else (schedule, checkpoint files, metrics) lives
in its own module.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bigmodel import atomic, hardware
from bigmodel.config import RunConfig, resolve_config, to_toml
from bigmodel.data.loader import TokenShards, WindowLoader, data_fingerprint
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError
from bigmodel.evaluation import evaluate
from bigmodel.models.gpt import GPT
from bigmodel.train import checkpoint
from bigmodel.train.logging import MetricsLog, plot_loss
from bigmodel.train.optim import lr_at, make_optimizer

# Testing hook: SIGKILL this process right after optimizer step N (proves that resume is exact).
KILL_AT_STEP_ENV = "BIGMODEL_KILL_AT_STEP"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    train_loss: float
    val: dict[str, float | int] | None
    stop_reason: str
    seconds: float


class StopOnInterrupt:
    """Turns the first Ctrl-C into a request to stop at the next step boundary (a second one aborts)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to abort without a checkpoint)", file=sys.stderr)

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6 * parameters for the matmuls + attention's 12 * L * T * C (PaLM appendix B)."""
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * c.block_size * c.n_embd


def _prepare_run_dir(out: Path, resume: str | None) -> Path | None:
    """Return the checkpoint to resume from (None for a fresh run), refusing to overwrite an earlier run."""
    ckpts = out / "checkpoints"
    if resume is None:
        if checkpoint.complete_checkpoints(ckpts) or (out / "final").exists():
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


def train(
    config: RunConfig, data: str | Path, out: str | Path, resume: str | None = None, progress: bool = True
) -> TrainResult:
    out, data = Path(out), Path(data)
    t_start = time.time()
    cfg = config.train
    device = hardware.default_device()
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    # --- data and tokenizer ---
    shards = TokenShards(data, "train")
    val = TokenShards(data, "val") if shards.manifest["splits"]["val"]["tokens"] > 1 else None
    tokenizer = Tokenizer.from_pretrained(data)
    if config.model.vocab_size is None:
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise UserError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the data's vocabulary "
            f"({tokenizer.vocab_size} tokens); remove the override or raise it"
        )
    accum = config.grad_accum_steps()
    loader = WindowLoader(shards, config.model.block_size, cfg.micro_batch, cfg.seed)

    # --- model, optimizer, resume ---
    resume_from = _prepare_run_dir(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    model = GPT(config.model).to(device)
    optimizer = make_optimizer(model, cfg)
    step, tokens, elapsed_before = 0, 0, 0.0
    if resume_from is not None:
        changed = checkpoint.check_compatible(resume_from, config)
        if changed:
            warnings.warn(f"resuming with changed training settings: {'; '.join(changed)}", stacklevel=2)
        state = checkpoint.load_checkpoint(resume_from, model, optimizer)
        if state["data"] != data_fingerprint(shards.manifest):
            raise UserError(
                f"checkpoint {resume_from} was trained on other data than {data}; "
                "resume with the same --data, or start a new --out"
            )
        loader.load_state_dict(state["loader"])
        step, tokens, elapsed_before = state["step"], state["tokens"], state["elapsed_s"]
        print(f"resumed from {resume_from} at step {step}", file=sys.stderr)
    atomic.write_text(out / "config.toml", to_toml(config))
    amp = hardware.autocast_dtype(cfg.precision, device)
    fwd = torch.compile(model) if cfg.compile else model
    peak = hardware.matmul_peak_flops(amp or torch.float32, device.type)
    fpt = flops_per_token(model)
    log = MetricsLog(out, resume_step=step if resume_from is not None else None)
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0"))
    budget_s = cfg.max_minutes * 60

    def save(at_step: int) -> None:
        state = {
            "step": at_step,
            "tokens": tokens,
            "elapsed_s": elapsed_before + time.time() - t_loop,
            "loader": loader.state_dict(),
            "data": data_fingerprint(shards.manifest),
        }
        checkpoint.save_checkpoint(
            out / "checkpoints", at_step, model, tokenizer, optimizer, config, state, cfg.keep_checkpoints
        )

    print(
        f"training {model.num_params() / 1e6:.2f}M parameters on {device.type} "
        f"({'bf16 autocast' if amp else 'fp32'}), {cfg.batch_tokens:,} tokens/step "
        f"({cfg.micro_batch} x {config.model.block_size} x {accum} accumulation)",
        file=sys.stderr,
    )
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    model.train()
    t_loop = time.time()
    stop_reason, loss, t_last, tok_last = "max_steps", math.nan, time.time(), tokens
    with StopOnInterrupt() as interrupt:
        while step < cfg.max_steps:
            elapsed = elapsed_before + time.time() - t_loop
            if interrupt.requested:
                stop_reason = "interrupted"
                break
            if budget_s and elapsed >= budget_s:
                stop_reason = "max_minutes"
                break
            lr = lr_at(cfg, step, elapsed / budget_s if budget_s else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = _step(fwd, model, optimizer, loader, accum, cfg.grad_clip, device, amp)
            if not math.isfinite(loss):
                raise UserError(
                    f"the loss became {loss} at step {step + 1}; lower train.lr or use train.precision=fp32"
                )
            step += 1
            tokens += cfg.batch_tokens
            bar.update(1)
            row: dict[str, Any] = {}
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.time()
                tps = (tokens - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, tokens
                row = {
                    "train_loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens_per_s": tps,
                    "mfu": tps * fpt / peak,
                }
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            if val is not None and cfg.eval_every and step % cfg.eval_every == 0:
                row["val_loss"] = evaluate(model, val, max_tokens=cfg.eval_tokens, autocast_dtype=amp)["loss"]
            if row:
                log.log(
                    {
                        "step": step,
                        "tokens": tokens,
                        "elapsed_s": elapsed_before + time.time() - t_loop,
                        **row,
                    }
                )
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save(step)
            if kill_at and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    train_seconds = elapsed_before + time.time() - t_loop
    if stop_reason == "interrupted":
        save(step)
        log.close()
        print(f"interrupted at step {step}; checkpoint saved, continue with --resume auto", file=sys.stderr)
        return TrainResult(out, step, tokens, loss, None, stop_reason, time.time() - t_start)

    # --- the end: last checkpoint, final evaluation, export, plot ---
    if not checkpoint.step_dir(out / "checkpoints", step).exists():
        save(step)
    result_val = evaluate(model, val, autocast_dtype=amp) if val is not None else None
    if result_val is not None:
        log.log({"step": step, "tokens": tokens, "val_loss": result_val["loss"], "elapsed_s": train_seconds})
    log.close()
    model.save_pretrained(out / "final", tokenizer)
    plot_loss(out / "metrics.csv", out / "loss.png", title=f"{out.name}: {config.preset} preset")
    summary = f"{step} steps, {tokens:,} tokens in {train_seconds / 60:.1f} min, train loss {loss:.3f}"
    if result_val is not None:
        summary += f", val loss {result_val['loss']:.3f} ({result_val['bits_per_byte']:.3f} bits/byte)"
    print(f"{summary} ({stop_reason}) -> {out / 'final'}", file=sys.stderr)
    return TrainResult(out, step, tokens, loss, result_val, stop_reason, time.time() - t_start)


def _step(
    fwd: Any,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    loader: WindowLoader,
    accum: int,
    grad_clip: float,
    device: torch.device,
    amp: torch.dtype | None,
) -> tuple[float, float]:
    """One optimizer step over `accum` micro-batches; returns (mean loss, gradient norm before clipping)."""
    total = torch.zeros((), device=device)
    for _ in range(accum):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with hardware.autocast(device, amp):
            _, loss = fwd(x, y)
        (loss / accum).backward()
        total += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return (total / accum).item(), norm.item()


def run_train(args: Any) -> int:
    config = resolve_config(args.preset, args.config, args.set)
    result = train(config, args.data, args.out, resume=args.resume)
    return 130 if result.stop_reason == "interrupted" else 0
