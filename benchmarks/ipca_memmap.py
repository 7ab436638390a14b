"""IncrementalPCA on a float32 matrix larger than it should ever hold in memory: peak memory of the fit.

Writes a ~4 GB float32 .npy (1.37 million x 784 rows, low-rank plus noise, written in chunks) to a
temporary folder, fits bigmodel's IncrementalPCA on `np.load(path, mmap_mode="r")` in a fresh child process,
and reports that process's peak resident memory (VmHWM from /proc/self/status: Python, torch and all)
next to the file size, the fit time, and how close the components are to the true subspace. The file is
deleted at the end. (getrusage(RUSAGE_CHILDREN) would not do: Linux folds the parent's peak into a
child started with vfork/exec, and the parent just wrote 4 GB.)

    python benchmarks/ipca_memmap.py [--gb 4] [--batch-size 10000] [--components 50] [--threads 0] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FEATURES = 784
RANK = 60


def write_matrix(path: Path, rows: int, chunk: int = 50_000) -> None:
    """Low-rank plus noise, seeded, written chunk by chunk so this process stays small too."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((FEATURES, RANK)))[0].T.astype(np.float32)  # (RANK, FEATURES)
    scales = np.linspace(10, 1, RANK, dtype=np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, FEATURES))
    for i in range(0, rows, chunk):
        n = min(chunk, rows - i)
        block = (rng.standard_normal((n, RANK)).astype(np.float32) * scales) @ basis
        block += 0.1 * rng.standard_normal((n, FEATURES)).astype(np.float32)
        out[i : i + n] = block
        out.flush()
    del out
    np.save(path.with_suffix(".basis.npy"), basis)


def child(path: str, components: int, batch_size: int, threads: int) -> None:
    """The measured process: open the memmap, fit, print a JSON summary."""
    import torch

    from bigmodel.features import IncrementalPCA

    if threads:
        torch.set_num_threads(threads)

    X = np.load(path, mmap_mode="r")
    t0 = time.perf_counter()
    ipca = IncrementalPCA(components, batch_size=batch_size).fit(X)
    seconds = time.perf_counter() - t0
    basis = np.load(Path(path).with_suffix(".basis.npy"))  # (RANK, FEATURES), orthonormal rows
    top = ipca.components_[: min(components, RANK)]
    # cosines of the principal angles between the learned components and the true subspace
    cos = np.linalg.svd(top @ basis.T, compute_uv=False)
    peak = peak_rss()
    print(json.dumps({"seconds": seconds, "min_cosine": float(cos.min()), "peak": peak}))


def peak_rss() -> int:
    """Peak resident bytes of this process since it started (exec)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere: best effort


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=4.0, help="size of the matrix to write and fit")
    ap.add_argument("--batch-size", type=int, default=10_000)
    ap.add_argument("--components", type=int, default=50)
    ap.add_argument("--dir", default="/tmp", help="where to write the temporary file (needs --gb free)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the fit (0: torch's default)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.components, args.batch_size, args.threads)
        return
    rows = int(args.gb * 1e9 / (4 * FEATURES))
    folder = Path(tempfile.mkdtemp(prefix="ipca-memmap-", dir=args.dir))
    try:
        path = folder / "x.npy"
        t0 = time.perf_counter()
        write_matrix(path, rows)
        size = path.stat().st_size
        print(f"wrote {rows:,} x {FEATURES} float32 = {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
        cmd = [sys.executable, __file__, "--child", str(path), "--components", str(args.components)]
        cmd += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        peak = result["peak"]
        print(
            f"IncrementalPCA({args.components}, batch_size={args.batch_size:,}) on the {size / 1e9:.2f} GB memmap: "
            f"{result['seconds']:.0f} s, peak resident memory {peak / 2**20:,.0f} MiB "
            f"({peak / size:.1%} of the file); smallest cosine to the true subspace {result['min_cosine']:.4f}"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
