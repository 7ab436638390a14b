"""Training throughput: bigmodel's GPT against transformers' GPT2LMHeadModel, same config, one process.

Config (issue 2): 6 layers, 6 heads, 384 wide, block 256, batch 16, vocab 8192, bf16 autocast where the
CPU supports bf16 natively (AVX512-BF16/AMX), else fp32 for both (bf16 is emulated and ~500x slower there).
Prints tokens/s (median of timed steps) for each, the ratio, and MFU against the machine's measured
matmul peak in the same dtype.

    python benchmarks/train_throughput.py [--steps 8] [--warmup 3] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bigmodel import hardware
from bigmodel.config import GPTConfig
from bigmodel.models.gpt import GPT

CFG = GPTConfig(vocab_size=8192, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.0)
BATCH = 16


def hf_model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=CFG.vocab_size,
        n_positions=CFG.block_size,
        n_embd=CFG.n_embd,
        n_layer=CFG.n_layer,
        n_head=CFG.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(config)


def time_steps(step_fn, steps: int, warmup: int) -> float:
    """Median seconds per training step."""
    for _ in range(warmup):
        step_fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_step(model: torch.nn.Module, hf: bool, amp: torch.dtype | None, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=None)
    device = torch.device("cpu")

    def step() -> None:
        with hardware.autocast(device, amp):
            if hf:
                loss = model(input_ids=x, labels=x).loss
            else:
                _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    amp = hardware.autocast_dtype("auto", torch.device("cpu"))
    dtype_name = "bf16 autocast" if amp else "fp32 (no native bf16 on this CPU)"
    peak = hardware.matmul_peak_flops(amp or torch.float32, "cpu", 2048, 1.0)
    x = torch.randint(0, CFG.vocab_size, (BATCH, CFG.block_size + 1))
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    tokens = BATCH * CFG.block_size
    ours = GPT(CFG)
    fpt = ours.flops_per_token()
    print(f"config: 6L/6H/384, block 256, batch 16, vocab 8192, {dtype_name}, {torch.get_num_threads()} threads")
    print(
        f"measured matmul peak: {peak / 1e12:.3f} TFLOP/s ({'bf16' if amp else 'fp32'}); "
        f"{fpt / 1e6:.1f} MFLOP per token"
    )

    results = {}
    results["transformers GPT2LMHeadModel"] = time_steps(
        make_step(hf_model(), True, amp, x, y), args.steps, args.warmup
    )
    results["bigmodel GPT (eager)"] = time_steps(make_step(ours, False, amp, x, y), args.steps, args.warmup)
    if not args.no_compile:
        compiled = GPT(CFG)
        results["bigmodel GPT (torch.compile)"] = time_steps(
            make_step(torch.compile(compiled), False, amp, x, y), args.steps, args.warmup + 2
        )
    base = tokens / results["transformers GPT2LMHeadModel"]
    print(f"{'':32s} {'tokens/s':>10s} {'ratio':>7s} {'MFU':>6s}")
    for name, sec in results.items():
        tps = tokens / sec
        print(f"{name:32s} {tps:10,.0f} {tps / base:6.2f}x {tps * fpt / peak:6.1%}")


if __name__ == "__main__":
    main()
