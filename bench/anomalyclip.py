"""Benchmark: AnomalyCLIP zero-shot inference speed and peak memory, next to plain open_clip.

    python bench/anomalyclip.py [--models L518 B224] [--images 2] [--batch-size 1]
                                [--device cpu|cuda] [--out /tmp/anomalyclip_bench.json]
    python bench/anomalyclip.py --side-by-side --models B224 [--rounds 20]

For each model (``L518``: ViT-L-14-336-quickgelu at 518 px, the paper setting; ``B224``:
ViT-B-16-quickgelu at 224 px, the cheap option), random weights (speed does not depend on them):

- ``open_clip``: the plain image tower, ``model.encode_image`` of an open_clip model created at
  that resolution (``force_image_size``): the baseline.
- ``anomalyclip``: the exported inference graph (``AnomalyCLIPInference``: our block loop with the
  DPAM V-V path, global + local similarities, 518 px upsampling, Gaussian sigma 4), with the text
  features precomputed as in evaluation. The DPAM share is 1 - (image tower with DPAM off) /
  (with DPAM on), from three extra interleaved calls of ``encode_image`` each (min of each).

Each (model, variant) runs in its own subprocess so that the peak memory is its own: peak RSS of
the process on CPU (weights included), ``torch.cuda.max_memory_allocated`` on CUDA. Timings:
one warm-up batch, then ``--images`` images in batches of ``--batch-size``, fp32, no_grad.

``--side-by-side``: both variants in ONE process on the same input, interleaved (plain, ours,
plain, ours, ... for ``--rounds`` rounds after a warm-up of each), so that a machine whose load
changes hurts both alike; prints the median wall time of each, the ratio ours / plain (the
target: <= 1.35 at B224 on CPU) and the same ratio in process CPU time:

    python bench/anomalyclip.py --side-by-side --models B224 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = {"L518": ("ViT-L-14-336-quickgelu", 518, [24]), "B224": ("ViT-B-16-quickgelu", 224, [12])}


def worker(model_key: str, variant: str, images: int, batch: int, device: str) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    import iad_lightning.models.anomalyclip as acl

    name, size, layers = MODELS[model_key]
    torch.manual_seed(0)
    if variant == "open_clip":
        import open_clip

        clip = open_clip.create_model(name, pretrained=None, force_image_size=size).eval().to(device)

        def forward(x):
            return clip.encode_image(x)
    else:
        model = acl.AnomalyCLIPModel(name, clip_weights="random", image_size=size, features_list=layers)
        graph = acl.AnomalyCLIPInference(model.eval()).to(device).eval()

        def forward(x):
            return graph(x)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        forward(x)  # warm-up
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        n, t0 = 0, time.perf_counter()
        while n < images:
            forward(x)
            n += batch
        sync()
        elapsed = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    out = {"model": name, "image_size": size, "variant": variant, "images": n, "batch_size": batch,
           "seconds": elapsed, "images_per_s": n / elapsed, "peak_memory_gib": peak / 2**30,
           "peak_memory_kind": "cuda max_memory_allocated" if device == "cuda" else "process peak RSS"}
    if variant == "anomalyclip":  # the image tower with DPAM on vs off (same input, interleaved)
        with torch.no_grad():
            on, off = [], []
            for _ in range(3):
                for dpam, acc in ((True, on), (False, off)):
                    sync()
                    t = time.perf_counter()
                    model.encode_image(x, dpam=dpam)
                    sync()
                    acc.append(time.perf_counter() - t)
        out["dpam_share"] = max(0.0, 1 - min(off) / min(on))
    return out


def side_by_side(model_key: str, batch: int, device: str, rounds: int) -> dict:
    """Plain open_clip image tower and our inference graph, interleaved in this process."""
    import statistics

    import open_clip
    import torch

    sys.path.insert(0, str(REPO))
    import iad_lightning.models.anomalyclip as acl

    name, size, layers = MODELS[model_key]
    torch.manual_seed(0)
    clip = open_clip.create_model(name, pretrained=None, force_image_size=size).eval().to(device)
    model = acl.AnomalyCLIPModel(name, clip_weights="random", image_size=size, features_list=layers)
    graph = acl.AnomalyCLIPInference(model.eval()).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    variants = {"open_clip": lambda: clip.encode_image(x), "anomalyclip": lambda: graph(x)}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(rounds):
            for key, fn in variants.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                wall[key].append(time.perf_counter() - t0)
                cpu[key].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"model": name, "image_size": size, "batch_size": batch, "rounds": rounds, "threads": torch.get_num_threads(),
            "seconds_median": med, "cpu_seconds_median": med_cpu,
            "images_per_s": {k: batch / v for k, v in med.items()},
            "ratio": med["anomalyclip"] / med["open_clip"],
            "cpu_time_ratio": med_cpu["anomalyclip"] / med_cpu["open_clip"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=Path("/tmp/anomalyclip_bench.json"))
    ap.add_argument("--side-by-side", action="store_true", help="both variants in one process, interleaved")
    ap.add_argument("--rounds", type=int, default=10, help="--side-by-side: timed calls of each variant")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args.images, args.batch_size, args.device)))
        return 0
    if args.side_by_side:
        rows = []
        for key in args.models:
            r = side_by_side(key, args.batch_size, args.device, args.rounds)
            rows.append(r)
            ips = r["images_per_s"]
            print(f"{r['model']} @ {r['image_size']} batch {r['batch_size']}, {r['rounds']} interleaved rounds, "
                  f"{r['threads']} threads: open_clip {ips['open_clip']:.3f} images/s, anomalyclip "
                  f"{ips['anomalyclip']:.3f} images/s -> ours / plain = {r['ratio']:.3f}x wall "
                  f"({r['cpu_time_ratio']:.3f}x CPU time)", flush=True)
        args.out.write_text(json.dumps({"meta": {"load_avg": os.getloadavg(), "device": args.device},
                                        "side_by_side": rows}, indent=2) + "\n")
        print(f"load average {os.getloadavg()}; written {args.out}")
        return 0
    rows = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in args.models:
        for variant in ("open_clip", "anomalyclip"):
            cmd = [sys.executable, __file__, "--worker", key, variant, "--images", str(args.images),
                   "--batch-size", str(args.batch_size), "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(line[-1][7:]))
            r = rows[-1]
            share = f", DPAM {100 * r['dpam_share']:.1f}% of the time" if "dpam_share" in r else ""
            print(f"{r['model']} @ {r['image_size']} {variant:11s}: {r['images_per_s']:.3f} images/s "
                  f"(batch {r['batch_size']}, {r['images']} images), peak {r['peak_memory_gib']:.2f} GiB{share}",
                  flush=True)
    import torch

    meta = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "load_avg": os.getloadavg(),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"load average {meta['load_avg']}; written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
