"""Sparse vs dense connections: time (forward + backward) and memory of one m x k layer, by density.

The peer is torch's dense nn.Linear of the same shape; bigmodel's SparseLinear stores and multiplies only
the kept connections (CSR, int32 indices). Prints one row per density: time of each, the time ratio
(sparse / dense, < 1 = sparse faster), the weight memory of each (values + indices for sparse), and the
memory ratio. Medians of --repeats timed runs after a warm-up. On a shared machine, run it twice.

    python benchmarks/connections.py                       # 2048 x 2048, batch 64, one thread
    python benchmarks/connections.py --m 4096 --k 4096 --batch 128 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bigmodel.nn.connections import SparseLinear

DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def _time(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of forward + backward (input and weight gradients)."""

    def once() -> None:
        y = layer(x)
        y.backward(torch.ones_like(y))

    for _ in range(2):
        once()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=2048, help="inputs")
    p.add_argument("--k", type=int, default=2048, help="outputs")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch threads (2-thread runs on a shared machine stall)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.m, requires_grad=True)
    dense = nn.Linear(args.m, args.k)
    mem_dense = dense.weight.numel() * 4
    print(
        f"{args.m} x {args.k} layer, batch {args.batch}, {args.threads} threads; times are medians of forward + "
        f"backward, the dense layer re-timed beside each density (shared machines drift); dense weights "
        f"{mem_dense / 2**20:.1f} MiB"
    )
    print(
        f"{'density':>8} {'sparse ms':>10} {'dense ms':>9} {'time ratio':>11} {'sparse MiB':>11} {'memory ratio':>13}"
    )
    for density in DENSITIES:
        sparse = SparseLinear(args.m, args.k, density)
        t_dense = _time(dense, x, args.repeats)
        t_sparse = _time(sparse, x, args.repeats)
        t_dense = min(t_dense, _time(dense, x, args.repeats))
        mem_sparse = sparse.values.numel() * 4 + sparse.index_bytes()
        print(
            f"{density:>8.2f} {t_sparse * 1e3:>10.2f} {t_dense * 1e3:>9.2f} {t_sparse / t_dense:>10.2f}x "
            f"{mem_sparse / 2**20:>11.2f} {mem_sparse / mem_dense:>12.2f}x"
        )


if __name__ == "__main__":
    main()
