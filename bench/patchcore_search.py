"""Benchmark: the predict-time search levers of PatchCore on CPU, on random data.

    python bench/patchcore_search.py [--bank 2508] [--queries 25088] [--dims 152 1024]

One batch of 32 images x 784 patches (25,088 queries) against a coreset bank (2,508 rows = 1 % of
MVTec screw) at each embedding size, 1-NN, exact. Levers timed (median of ``--repeats``): faiss
``IndexFlatL2`` with 1 and with all OpenMP threads (``method.search.num_threads``), the torch
matmul search (``backend=torch``) with 1 and all threads, and the float16 bank with float32
re-ranking (``precision=float16``, the GPU lever) through ``NearestNeighbourSearch``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from efficientad import time_calls  # noqa: E402  (the shared bench timer)

from iad_lightning.models.nn_search import NearestNeighbourSearch, faiss_available  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (bench/efficientad.py's timer)."""
    return statistics.median(time_calls(fn, torch.device("cpu"), warmup=1, repeats=repeats, budget_s=float("inf")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", type=int, default=2508)
    parser.add_argument("--queries", type=int, default=25088)
    parser.add_argument("--dims", type=int, nargs="+", default=[152, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    print(f"load average {os.getloadavg()}, torch threads {cores}\n")
    print("| dims | lever | time per batch (s) | vs faiss default |")
    print("|---:|---|---:|---:|")
    for d in args.dims:
        bank, queries = torch.randn(args.bank, d, generator=g), torch.randn(args.queries, d, generator=g)
        configs = []
        if faiss_available():
            configs += [("faiss, all threads (default)", dict(backend="faiss")),
                        ("faiss, num_threads=1", dict(backend="faiss", num_threads=1))]
        configs += [("torch matmul, all threads", dict(backend="torch")),
                    ("torch float16 + fp32 re-rank", dict(backend="torch", precision="float16"))]
        base = None
        for label, kw in configs:
            search = NearestNeighbourSearch(**kw).fit(bank)
            sec = timed(lambda: search.search(queries, 1), args.repeats)
            base = base or sec
            print(f"| {d} | {label} | {sec:.3f} | {base / sec:.2f}x |", flush=True)
        torch.set_num_threads(1)
        search = NearestNeighbourSearch(backend="torch").fit(bank)
        sec = timed(lambda: search.search(queries, 1), args.repeats)
        torch.set_num_threads(cores)
        print(f"| {d} | torch matmul, 1 thread | {sec:.3f} | {base / sec:.2f}x |", flush=True)
    print(f"\nload average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
