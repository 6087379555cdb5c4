"""Benchmark: EfficientAD-S/M inference speed against a matmul floor of the same FLOPs.

    python bench/efficientad.py                         # CPU: S and M, batch 1 and 16 (~5 min on 2 cores)
    python bench/efficientad.py --device cuda           # + fp16 batch-1 latency vs the paper's 2.2 ms
    python bench/efficientad.py --with-anomalib         # + anomalib 2.7's EfficientAD torch model, same input
    python bench/efficientad.py --anomalib-only --sizes small --batches 1 16   # only the side-by-side
    python bench/efficientad.py --sizes small --batches 1 --layouts contiguous channels_last

What is timed: ``EfficientADModel.forward``, the whole deployable path (teacher, student, AE,
teacher-channel and quantile normalisation, 4-px padding, bilinear resize of the map to 256x256,
image score), under ``torch.inference_mode`` and in eval mode, on random 256x256 input. The
networks have random weights and non-trivial normalisation buffers: speed does not depend on the
weight values. Latency is the median of the timed calls (wall clock, with ``cuda.synchronize``
on a GPU) after warm-up; throughput is batch / median latency.

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one whole forward (on the meta device,
so counting costs nothing); it counts convolutions and matmuls as 2 FLOPs per multiply-add, not
the element-wise ops, pooling and interpolation (a few % of the work). The **matmul floor** is a
square-ish ``n x n @ n x n`` matmul with 2 n^3 = the FLOPs of the batch, in the same dtype, timed
in the same process the same way: the time this machine needs for that much dense arithmetic in
its best-tuned kernel. ``time / floor`` close to 1 means the convolutions run near the BLAS peak
(below 1 is possible: oneDNN/cuDNN convolutions can beat one large GEMM). On CUDA, fp32 rows use
TF32 for both (cuDNN's default for convolutions, switched on for the matmul too).

Warm-up: ``--warmup`` calls at the measured shape, except where one call is estimated (from the
batch-1 median) to take longer than ``--budget-s / 3``: there the batch-1 calls already made
stand in (the same code paths and weights; creating kernels for a new batch size costs
milliseconds against a call of many seconds). Timed calls stop after ``--repeats`` calls or once
``--budget-s`` seconds are spent, whichever is first (at least one call).

anomalib (``--with-anomalib``): ``bench/_anomalib_efficientad.py`` in the venv of
``--anomalib-python`` builds ``anomalib.models.image.efficient_ad.torch_model.EfficientAdModel``
(same sizes, padding off, pad_maps on, teacher mean/std and quantiles set so that its full
normalised path runs) and times its eval forward on the same random input (anomalib's networks
ImageNet-normalise inside, so it gets the [0, 1] image; ours gets the normalised one) with the
same protocol and thread count. In that process our model is timed too, call by call alternating
with anomalib's (rows ``ours*``), so that the side-by-side ratio is not skewed by other jobs' load
on a shared machine.

Results print as a markdown table and go to ``--out`` as JSON (default
``/tmp/efficientad_bench_<host>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_ANOMALIB_PYTHON = "/work/venvs/anomalib/bin/python"
PAPER_S_MS = 2.2  # EfficientAD-S latency in the paper, RTX A6000 (fp16, batch 1)
MARK = "BENCH_RESULT "


# ----------------------------------------------------------------------------- timing helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int, budget_s: float) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` calls; stops early past the budget."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def warmup_count(estimate_s: float | None, warmup: int, budget_s: float) -> int:
    """Same-shape warm-up calls, or 0 where one call would eat a third of the budget."""
    return 0 if estimate_s is not None and estimate_s > budget_s / 3 else warmup


def count_flops(build: Callable[[], torch.nn.Module], batch: int, image_size: int) -> int:
    """FLOPs of one forward at ``batch`` (FlopCounterMode on the meta device: no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build().eval()
        x = torch.empty(batch, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x)
    return int(counter.get_total_flops())


def matmul_floor(flops: float, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int,
                 budget_s: float, estimate_s: float | None = None) -> dict[str, float]:
    """Median time of an n x n @ n x n matmul with 2 n^3 ~= ``flops`` (n rounded to a multiple of 64)."""
    n = max(64, round((flops / 2) ** (1 / 3) / 64) * 64)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    small = a[:256, :256] @ b[:256, :256]  # lazily initialised BLAS, threads
    del small
    with torch.inference_mode():
        times = time_calls(lambda: a @ b, device, warmup_count(estimate_s, warmup, budget_s), repeats, budget_s)
    median = statistics.median(times)
    return {"n": n, "flops": 2 * n**3, "median_s": median, "gflops_per_s": 2 * n**3 / median / 1e9,
            "calls": len(times)}


def step_against_floor(step: Callable[[], Any], flops: float, device: torch.device, warmup: int, repeats: int,
                       budget_s: float, profile: bool = False, row_limit: int = 10) -> dict[str, Any]:
    """Median time of a training ``step`` of ``flops`` next to a matmul of the same FLOPs (the floor).
    The floor is timed before and after the steps and the faster kept: in one process its rate moved
    by up to 40 % between the two (e.g. 174 vs 123 GFLOP/s), so the ratio is not flattered."""
    import os

    before = matmul_floor(flops, device, torch.float32, warmup, repeats, budget_s=60.0)
    times = time_calls(step, device, warmup, repeats, budget_s=budget_s)
    after = matmul_floor(flops, device, torch.float32, warmup, repeats, budget_s=60.0)
    floor = min(before, after, key=lambda f: f["median_s"])
    median = statistics.median(times)
    out: dict[str, Any] = {
        "threads": torch.get_num_threads(), "step_s": median, "steps": len(times), "gflops": flops / 1e9,
        "floor_s": floor["median_s"] * flops / floor["flops"], "floor_n": floor["n"],
        "floor_gflops_per_s": floor["gflops_per_s"], "load": os.getloadavg()[0]}
    out["ratio_to_floor"] = median / out["floor_s"]
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)
    return out


# ------------------------------------------------------------------------------------- ours
def build_ours(size: str, image_size: int) -> torch.nn.Module:
    from iad_lightning.models.efficientad import EfficientADModel

    model = EfficientADModel(size, 384, padding=False, pad_maps=True, image_size=image_size)
    gen = torch.Generator().manual_seed(0)
    if model.teacher_mean.device.type != "meta":  # non-trivial normalisation (random values)
        model.teacher_mean.copy_(torch.randn(model.teacher_mean.shape, generator=gen) * 0.1)
        model.teacher_std.copy_(torch.rand(model.teacher_std.shape, generator=gen) + 0.5)
        for name, value in (("q_st_start", 0.02), ("q_st_end", 0.05), ("q_ae_start", 0.001), ("q_ae_end", 0.004)):
            getattr(model, name).fill_(value)
    return model


def bench_ours(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for size in args.sizes:
        flops_1 = count_flops(lambda size=size: build_ours(size, args.image_size), 1, args.image_size)
        configs = [(layout, torch.float32, batch) for layout in args.layouts for batch in args.batches]
        if device.type == "cuda":  # the paper's setting: fp16, batch 1
            configs.append(("channels_last" if "channels_last" in args.layouts else args.layouts[0], torch.float16, 1))
        per_image_s: dict[tuple, float] = {}
        for layout, dtype, batch in configs:
            model = build_ours(size, args.image_size).eval().to(device=device, dtype=dtype)
            x = torch.randn(batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
            x = x.to(device=device, dtype=dtype)
            if layout == "channels_last":
                model = model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            estimate = per_image_s.get((layout, dtype)) and per_image_s[(layout, dtype)] * batch
            with torch.inference_mode():
                amap, score = model(x) if estimate is None else (None, None)  # first call also checks shapes
                if amap is not None:
                    assert amap.shape == (batch, 1, args.image_size, args.image_size) and score.shape == (batch,)
                warm = warmup_count(estimate, args.warmup, args.budget_s)
                times = time_calls(lambda model=model, x=x: model(x), device, warm, args.repeats, args.budget_s)
            median = statistics.median(times)
            if batch == 1:
                per_image_s[(layout, dtype)] = median
            flops = flops_1 * batch
            floor = matmul_floor(flops, device, dtype, args.warmup, args.repeats, args.budget_s, estimate)
            rows.append({
                "impl": "ours", "model": f"EfficientAD-{size[0].upper()}", "layout": layout,
                "dtype": str(dtype).removeprefix("torch."), "batch": batch, "calls": len(times),
                "latency_ms": 1e3 * median, "images_per_s": batch / median,
                "gflops_per_image": flops_1 / 1e9, "gflops_per_s": flops / median / 1e9,
                "floor_ms": 1e3 * floor["median_s"], "floor_n": floor["n"], "floor_gflops_per_s": floor["gflops_per_s"],
                "ratio_to_floor": median / (floor["median_s"] * flops / floor["flops"]),
            })
            print(_row(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------- anomalib
def bench_anomalib(args: argparse.Namespace) -> list[dict[str, Any]]:
    script = REPO / "bench" / "_anomalib_efficientad.py"
    cmd = [args.anomalib_python, str(script), "--device", args.device, "--image-size", str(args.image_size),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--budget-s", str(args.budget_s),
           "--threads", str(torch.get_num_threads()), "--sizes", *args.sizes,
           "--batches", *map(str, args.anomalib_batches or args.batches)]
    if not Path(args.anomalib_python).is_file():
        print(f"anomalib skipped: no Python at {args.anomalib_python} (see bench/README.md for the venv)")
        return []
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        print(f"anomalib run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return []
    rows = json.loads(lines[-1][len(MARK):])
    for row in rows:
        print(_row(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------ report
HEADER = ("| impl | model | layout, dtype | batch | images/s | latency ms (median) | GFLOP/image | GFLOP/s "
          "| matmul floor ms (n) | floor GFLOP/s | time / floor | calls |\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def _row(r: dict[str, Any]) -> str:
    floor = f"{r['floor_ms']:.1f} ({r['floor_n']})" if r.get("floor_ms") is not None else "–"
    ffl = f"{r['floor_gflops_per_s']:.0f}" if r.get("floor_gflops_per_s") is not None else "–"
    ratio = f"{r['ratio_to_floor']:.2f}x" if r.get("ratio_to_floor") is not None else "–"
    return (f"| {r['impl']} | {r['model']} | {r['layout']}, {r['dtype']} | {r['batch']} | {r['images_per_s']:.2f} "
            f"| {r['latency_ms']:.1f} | {r['gflops_per_image']:.1f} | {r['gflops_per_s']:.0f} | {floor} | {ffl} "
            f"| {ratio} | {r['calls']} |")


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]
    head = (f"device: {result['device']}, torch {result['torch']}, {result['threads']} threads, "
            f"input {result['image_size']}x{result['image_size']}, random weights")
    lines = [head, "", HEADER]
    lines += [_row(r) for r in rows]
    for r in rows:
        if r["impl"] == "ours" and r["model"] == "EfficientAD-S" and r["dtype"] == "float16" and r["batch"] == 1:
            paper = (f"EfficientAD-S fp16 batch-1 latency: {r['latency_ms']:.2f} ms on {result['device']} "
                     f"vs the paper's {PAPER_S_MS} ms on an RTX A6000 ({r['latency_ms'] / PAPER_S_MS:.2f}x)")
            lines += ["", paper]
    # side by side: ours* (timed alternately with anomalib in its process) where present
    ours = {(r["model"], r["batch"]): r for r in rows if r["impl"] == "ours*"}
    theirs = [r for r in rows if r["impl"] == "anomalib"]
    if theirs:
        lines += ["", "ours* and anomalib called alternately in one process (same input, same load):", "",
                  "| model | batch | ours images/s | anomalib images/s | ours / anomalib |", "|---|---:|---:|---:|---:|"]
        for r in theirs:
            o = ours.get((r["model"], r["batch"]))
            if o:
                lines.append(f"| {r['model']} | {r['batch']} | {o['images_per_s']:.2f} | {r['images_per_s']:.2f} "
                             f"| {o['images_per_s'] / r['images_per_s']:.2f}x |")
    lines += ["", f"wall time of the whole bench: {result['wall_s']:.0f} s"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=["small", "medium"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--layouts", nargs="+", default=None, choices=["contiguous", "channels_last"],
                        help="memory layouts (default: channels_last: 1.9 s vs 2.5 s for S at batch 1 on the "
                             "2-core CPU; the usual layout for fp16 convolutions on GPUs)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default: cpu 1, cuda 20)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: cpu 3, cuda 100)")
    parser.add_argument("--budget-s", type=float, default=30.0, help="stop timing a config after this many s")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--with-anomalib", action="store_true")
    parser.add_argument("--anomalib-python", default=DEFAULT_ANOMALIB_PYTHON)
    parser.add_argument("--anomalib-batches", nargs="+", type=int, default=None)
    parser.add_argument("--anomalib-only", action="store_true", help="only the side-by-side run (ours* vs anomalib)")
    parser.add_argument("--out", default=f"/tmp/efficientad_bench_{platform.node()}.json")
    parser.add_argument("--render", nargs="+", default=None, help="print tables of saved JSON results and exit")
    args = parser.parse_args()
    if args.render:
        for path in args.render:
            print(render(json.loads(Path(path).read_text())))
        return
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (20 if cuda else 1)
    args.repeats = args.repeats if args.repeats is not None else (100 if cuda else 3)
    args.layouts = args.layouts or ["channels_last"]
    if cuda:
        torch.backends.cudnn.benchmark = True
        # fp32 convolutions use TF32 by default in cuDNN; let the fp32 matmul floor do the same
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    t0 = time.perf_counter()
    rows = [] if args.anomalib_only else bench_ours(args, device)
    if args.with_anomalib or args.anomalib_only:
        rows += bench_anomalib(args)
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "image_size": args.image_size,
        "args": {k: v for k, v in vars(args).items() if k != "render"}, "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\n" + render(result) + f"\n\nJSON: {args.out}")


if __name__ == "__main__":
    main()
