"""Peak memory per rank, measured against `bigmodel plan`: a ~50M-parameter GPT, 2 ranks on CPU (gloo),
DDP vs FSDP2 vs FSDP2 + activation checkpointing.

    python benchmarks/memory.py            # launches torchrun 3 times and prints the table

Each rank measures its own peak resident memory (Linux VmHWM, reset through /proc/self/clear_refs after
the imports and the process group are up), so the figure is what training added to the process: weights,
gradients, optimizer state, activations, communication buffers and allocator slack. The workers run with
MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors go back to the OS and RSS follows live memory. It runs 3 optimizer
steps of fp32 AdamW (the peak is reached once the optimizer state exists) through the loop's own
`_step`, `wrap_model` and `make_optimizer`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = dict(vocab_size=8192, block_size=256, n_layer=9, n_head=10, n_embd=640)
MICRO_BATCH = 4
STEPS = 3
RUNS = [("ddp", False), ("fsdp", False), ("fsdp", True)]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def worker(strategy: str, checkpointing: bool, out: Path) -> None:
    import torch

    from bigmodel.config import GPTConfig, resolve_config
    from bigmodel.models.gpt import GPT
    from bigmodel.train.distributed import Distributed, wrap_model
    from bigmodel.train.loop import _step
    from bigmodel.train.optim import make_optimizer

    torch.set_num_threads(1)
    ctx = Distributed.from_env(torch.device("cpu"))
    cfg = resolve_config("tiny", None, [f"train.micro_batch={MICRO_BATCH}"]).train
    gen = torch.Generator().manual_seed(ctx.rank)
    data = torch.randint(0, CONFIG["vocab_size"], (STEPS, MICRO_BATCH, CONFIG["block_size"] + 1), generator=gen)

    class Stream:
        i = 0

        def next_batch(self) -> dict[str, torch.Tensor]:
            x = data[self.i % STEPS]
            self.i += 1
            return {"input_ids": x[:, :-1], "labels": x[:, 1:]}

    class Task:
        @staticmethod
        def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return model(batch["input_ids"], batch["labels"])[1]

        @staticmethod
        def units(batch: dict[str, torch.Tensor]) -> int:
            return batch["input_ids"].numel()

    ctx.barrier()
    baseline = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))  # type: ignore[arg-type]
    model.activation_checkpointing = checkpointing
    wrapped = wrap_model(model, strategy, ctx, None)
    optimizer = make_optimizer(model, cfg)
    stream = Stream()
    for _ in range(STEPS):
        _step(wrapped, model, Task(), stream, 1, 1.0, ctx.device, None, strategy)  # type: ignore[arg-type]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    ctx.barrier()
    peak = (_status_kib("VmHWM") - baseline) * 1024
    (out / f"rank{ctx.rank}.json").write_text(json.dumps({"peak": peak, "params": model.num_params(False)}))
    ctx.close()


def main() -> None:
    from bigmodel.config import GPTConfig
    from bigmodel.train.plan import plan_memory

    print(
        f"GPT {CONFIG['n_layer']}L/{CONFIG['n_embd']} (vocab {CONFIG['vocab_size']}, context {CONFIG['block_size']}),"
        f" micro-batch {MICRO_BATCH}, fp32 AdamW, 2 ranks on CPU (gloo), {STEPS} steps\n"
    )
    print(f"{'run':<22}{'rank 0 peak':>14}{'rank 1 peak':>14}{'planned':>12}{'plan/measured':>16}")
    for strategy, ckpt in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__]
            cmd += ["--worker", strategy, "--out", tmp] + (["--checkpointing"] if ckpt else [])
            # glibc's malloc raises its mmap threshold as blocks are freed and then keeps freed memory in the
            # heap, so RSS would measure the allocator's retention; a fixed threshold returns large blocks
            # to the OS on free and RSS follows the live tensors
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in (0, 1)]
        plan = plan_memory(GPTConfig(**CONFIG), MICRO_BATCH, 2, strategy)  # type: ignore[arg-type]
        planned = plan.total_ckpt if ckpt else plan.total
        measured = max(r["peak"] for r in ranks)
        name = strategy + (" + act. ckpt" if ckpt else "")
        mib = [f"{r['peak'] / 2**20:,.0f} MiB" for r in ranks]
        print(f"{name:<22}{mib[0]:>14}{mib[1]:>14}{planned / 2**20:>8,.0f} MiB{planned / measured:>15.2f}x")
    print(f"\nparameters: {ranks[0]['params'] / 1e6:.1f}M. Goal: plan within 15% of measured (0.85x-1.15x).")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.checkpointing, args.out)
    else:
        main()
