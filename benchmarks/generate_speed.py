"""Decoding speed: bigmodel's generation engine against transformers' `generate`, one process.

A GPT-2-124M-shaped model with random weights (seeded); the same weights are loaded into transformers'
GPT2LMHeadModel. Greedy decoding of 128 new tokens after a 32-token prompt, at batch 1 and batch 8:
transformers (fp32), bigmodel fp32, bf16 and int8 (each CPU int8 kernel installed: numba, fbgemm). The
fp32, bf16 and numba-int8 rows run the compiled decoding step (models/gpt_numba.py) where it applies (up
to 16 rows; bf16 on CPUs with native bf16 up to 8); their "op by op" rows run the same model with
BIGMODEL_COMPILED_STEP=0, the PyTorch forward of every step.
Prints tokens/s (new tokens, prefill included) and the ratio to transformers; then the decoding steps
alone (from the first new token to the last: each step reads every weight once, the 32-token prefill is
compute-bound and does not) as tokens/s, their ratio, and their fraction of the memory-bandwidth limit:
weight bytes read per decoding step against the machine's measured read bandwidth. Ours run through the
engine's step iterator (`generation.decode`, what `generate`, the CLI and the server run), transformers'
`generate` with a streamer; both mark the time of the first new token.
The host's bandwidth swings by up to 2x within minutes, and a neighbour on the host slows compute-heavy
kernels more than plain reads, so every row is timed once per round, `--repeats` rounds, each round
starting with another row: a row's tokens/s are its best round's (its median beside it). On the CPU the
bandwidth is read just before and just after every timed row, and each round's steps count against the
larger of those two readings: the row's share of the limit is that of its fastest round, with the
median share over its rounds beside it, and then its fastest round against the best reading of the
whole batch's run ("of peak", a lower bound). A phase change of the host during a row is not seen by
the readings beside it, and a row whose share passes 100% is marked (a reading too low).

On a GPU (`--device cuda`) the same rows run on the device: the decoding steps of ours are then the
model's forward captured as a CUDA graph (models/gpt_graph.py), "op by op" the forward launched kernel by
kernel; int8 is `torch._weight_int8pack_mm` (the CPU int8 kernels do not apply), and the bandwidth is
eight sums over a 512 MB tensor on the device, once per round; there every round counts against the best
reading of the run.

    python benchmarks/generate_speed.py [--new 128] [--repeats 3] [--batches 1 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import time
from collections.abc import Callable
from unittest import mock

import numpy as np
import torch

from bigmodel.compress import int8_kernels
from bigmodel.compress.quantize import fbgemm_available
from bigmodel.config import GPTConfig
from bigmodel.generation import GenerationConfig, cast_for_inference, decode
from bigmodel.models.gpt import GPT
from bigmodel.models.hf import to_hf_state_dict

KERNELS = ("numba", "fbgemm")  # CPU int8 kernels, in the order compress/quantize.py prefers them


def available(kernel: str) -> bool:
    return int8_kernels.available() if kernel == "numba" else fbgemm_available()


CFG = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
PROMPT = 32


def _compiled_sum() -> Callable[[np.ndarray], float] | None:
    """A parallel float32 sum compiled by numba (None without numba): plain streaming loads on every core."""
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(parallel=True, fastmath={"reassoc", "contract"}, boundscheck=False)
    def total(buf: np.ndarray) -> float:
        chunk, acc = 1 << 16, np.float32(0.0)
        for c in numba.prange((buf.shape[0] + chunk - 1) // chunk):
            part = np.float32(0.0)
            for i in range(c * chunk, min(buf.shape[0], (c + 1) * chunk)):
                part += buf[i]
            acc += part
        return acc

    return total


@functools.cache
def _readers(mb: int, device: str = "cpu") -> tuple[int, list[Callable[[], object]]]:
    """The bytes one reading reads from a buffer of `mb` MB (larger than the caches) and the ways to read
    it, built and compiled once: the run reads the bandwidth beside every row. On a GPU, eight sums
    back to back: one 512 MB sum takes ~0.1 ms there, so that launching and synchronising weigh little."""
    buf = torch.ones(mb * 1024 * 1024 // 4, device=device)
    if buf.device.type == "cuda":

        def read() -> None:
            for _ in range(8):
                buf.sum()
            torch.cuda.synchronize()

        return 8 * buf.numel() * 4, [read]
    readers: list[Callable[[], object]] = [buf.sum]
    compiled = _compiled_sum()
    if compiled is not None:
        arr = buf.numpy()
        compiled(arr[:1024])  # compile outside the timing
        readers.append(lambda: compiled(arr))
    return buf.numel() * 4, readers


def read_bandwidth(mb: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes/s of a streaming read over a buffer larger than the caches: the best of `repeats` runs of torch's
    sum and of a compiled parallel sum (numba), whichever is faster. torch's sum alone stays ~20% below what
    plain loads reach here, and the fp32 decoding kernels read their weights faster than it. On a CUDA
    device, eight of torch's sums there per run."""
    size, readers = _readers(mb, device)
    best = 0.0
    for read in readers:
        for _ in range(repeats):
            t0 = time.perf_counter()
            read()
            best = max(best, size / (time.perf_counter() - t0))
    return best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decoding step: every weight except the embeddings' lookups (wpe always; wte too when
    the output head has its own int8 copy, else wte is read in full as the tied output head)."""
    named = dict(model.named_parameters())  # tied weights appear once
    named.update(dict(model.named_buffers()))
    untied = "lm_head.weight_int8" in named
    return sum(
        t.numel() * t.element_size()
        for name, t in named.items()
        if "wpe" not in name and not (untied and "wte" in name)
    )


def shares(step_seconds: list[float], limits: list[float], step_bytes: int, peak: float) -> tuple[float, ...]:
    """A row's share of the bandwidth limit from its rounds: the seconds of each round's decoding steps,
    the bandwidth read beside each round (bytes/s), the bytes those steps read, the run's best reading.
    Returns the fastest round's share (against its own reading), the median of the rounds' shares, and
    the fastest round's share of the peak (a lower bound)."""
    each = [step_bytes / s / b for s, b in zip(step_seconds, limits, strict=True)]
    fastest = step_seconds.index(min(step_seconds))
    return each[fastest], statistics.median(each), step_bytes / step_seconds[fastest] / peak


def hf_generate(hf: torch.nn.Module, ids: torch.Tensor, new: int, streamer: object = None) -> torch.Tensor:
    """transformers' greedy generate of exactly `new` tokens."""
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, streamer=streamer)
    return hf.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)  # type: ignore[operator]


class _Stamps:
    """A transformers streamer that records when each call came: the prompt's, then one per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_generate(model: torch.nn.Module, ids: torch.Tensor, new: int, compiled_step: bool) -> tuple[float, float]:
    """Seconds of one greedy generate of `new` tokens: ours (with or without the compiled decoding step) or
    transformers'; and the seconds of its decoding steps alone, from the first new token to the last."""
    cuda = ids.device.type == "cuda"
    with mock.patch.dict(os.environ, {"BIGMODEL_COMPILED_STEP": "1" if compiled_step else "0"}):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if isinstance(model, GPT):
            first = None
            for _ in decode(model, ids.tolist(), GenerationConfig(max_new_tokens=new), logprobs=False):  # as generate
                if first is None:
                    if cuda:  # the prompt's kernels done, as transformers' streamer (.cpu()) waits for them
                        torch.cuda.synchronize()
                    first = time.perf_counter()
        else:
            stamps = _Stamps()
            hf_generate(model, ids, new, streamer=stamps)
            first = stamps.times[1]  # [0]: the prompt, before the prefill
        if cuda:
            torch.cuda.synchronize()
        end = time.perf_counter()
    assert first is not None
    return end - t0, end - first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=128, help="new tokens per call (at least 2)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every row")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU")
    args = ap.parse_args()
    if args.new < 2:
        ap.error("--new must be at least 2: the decoding steps are timed from the first new token to the last")
    device = args.device
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT(CFG).eval().to(device)
    hf_cfg = GPT2Config(
        vocab_size=CFG.vocab_size, n_positions=CFG.block_size, n_embd=CFG.n_embd, n_layer=CFG.n_layer, n_head=CFG.n_head
    )
    hf = GPT2LMHeadModel(hf_cfg).eval()
    hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    hf.tie_weights()
    hf.to(device)
    variants = {
        "bigmodel fp32": cast_for_inference(ours, "fp32"),  # as `bigmodel generate` does: weights on huge pages
        "bigmodel bf16": cast_for_inference(copy.deepcopy(ours), "bf16"),
    }
    cpu = torch.device(device).type == "cpu"
    with mock.patch.dict(os.environ):  # the user's environment comes back afterwards
        os.environ.pop("BIGMODEL_INT8_KERNEL", None)
        for kernel in [k for k in KERNELS if cpu and available(k)] or [None]:  # each CPU int8 kernel, the default first
            if kernel:
                os.environ["BIGMODEL_INT8_KERNEL"] = kernel
            variants[f"bigmodel int8 {kernel or 'int8pack'}"] = cast_for_inference(copy.deepcopy(ours), "int8")
    op_by_op = {
        f"{name} op by op": variants[name]
        for name in ("bigmodel fp32", "bigmodel bf16", "bigmodel int8 numba" if cpu else "bigmodel int8 int8pack")
        if name in variants
    }
    variants.update(op_by_op)
    bw = read_bandwidth(device=device)
    where = f"{torch.get_num_threads()} threads" if cpu else torch.cuda.get_device_name(device)
    print(
        f"GPT-2 124M shape, random weights; prompt {PROMPT} tokens, {args.new} new tokens, greedy; "
        f"{where}; {args.repeats} rounds; read bandwidth at the start {bw / 1e9:.1f} GB/s"
    )

    for batch in args.batches:
        ids = torch.randint(0, CFG.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
        ids = ids.to(device)
        with torch.no_grad():
            ref = hf_generate(hf, ids, args.new)
        same = torch.equal(ours.generate(ids, max_new_tokens=args.new), ref)
        models = {"transformers fp32": hf, **variants}
        names = list(models)
        for name in names:  # warm-up: first calls load compiled kernels and allocate
            time_generate(models[name], ids, 2, name not in op_by_op)
        seconds: dict[str, list[float]] = {name: [] for name in names}  # whole generate calls
        steps: dict[str, list[float]] = {name: [] for name in names}  # their decoding steps alone
        near: dict[str, list[float]] = {name: [] for name in names}  # the limit beside each timing (CPU)
        readings: list[float] = []
        for r in range(args.repeats):  # rounds of every row: drift of the host slows all rows alike
            for name in names[r % len(names) :] + names[: r % len(names)]:  # each round starts with another row
                if cpu:
                    readings.append(read_bandwidth(repeats=3, device=device))
                total, decoding = time_generate(models[name], ids, args.new, name not in op_by_op)
                if cpu:
                    readings.append(read_bandwidth(repeats=3, device=device))
                    near[name].append(max(readings[-2:]))
                seconds[name].append(total)
                steps[name].append(decoding)
            if not cpu:
                readings.append(read_bandwidth(repeats=3, device=device))
        peak = max(readings)
        if not cpu:  # no neighbour shares a GPU: every round against the run's best reading
            near = {name: [peak] * len(steps[name]) for name in names}
        base = batch * args.new / min(seconds["transformers fp32"])
        base_steps = batch * (args.new - 1) / min(steps["transformers fp32"])
        print(
            f"\nbatch {batch} (greedy tokens identical to transformers in fp32: {same}; read bandwidth "
            f"{min(readings) / 1e9:.1f}-{peak / 1e9:.1f} GB/s in the run; "
            + ("each round against the larger reading beside it)" if cpu else "every round against the best)")
        )
        print(f"{'':28s} {'generate, prefill included':^26s}   {'decoding steps alone':^53s}")
        head = f"{'tokens/s':>9s} {'median':>7s} {'ratio':>8s}"
        print(f"{'':28s} {head}   {head} {'of limit':>9s} {'median':>7s} {'of peak':>8s}")
        for name in names:
            best, median = (batch * args.new / f(seconds[name]) for f in (min, statistics.median))
            s_best, s_median = (batch * (args.new - 1) / f(steps[name]) for f in (min, statistics.median))
            # each round's steps against the bandwidth read beside it (per row: batch rows share the weights)
            fastest, median_share, of_peak = shares(
                steps[name], near[name], (args.new - 1) * weight_bytes(models[name]), peak
            )
            mark = "  (over 100%: a reading too low)" if max(fastest, median_share) > 1 else ""
            print(
                f"{name:28s} {best:9.1f} {median:7.1f} {best / base:7.2f}x   {s_best:9.1f} {s_median:7.1f} "
                f"{s_best / base_steps:7.2f}x {fastest:9.0%} {median_share:7.0%} {of_peak:8.0%}{mark}"
            )


if __name__ == "__main__":
    main()
