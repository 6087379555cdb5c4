"""anomalib's EfficientAD torch model timed like ``bench/efficientad.py`` times ours; runs in the
anomalib venv, started by ``bench/efficientad.py --with-anomalib``:

    /work/venvs/anomalib/bin/python bench/_anomalib_efficientad.py --sizes small --batches 1

``anomalib.models.image.efficient_ad.torch_model.EfficientAdModel(teacher_out_channels=384,
model_size=S|M, padding=False, pad_maps=True)`` with random weights, its teacher mean/std and map
quantiles set to non-zero values (so that its normalised inference path runs, as after training),
eval mode, ``torch.inference_mode``; input: random [0, 1] images (its networks ImageNet-normalise
inside). Our ``EfficientADModel`` (plain torch, imported from the repo) runs in the same process on
the ImageNet-normalised copy of the input, and the two are called alternately (ours, anomalib,
ours, ...) so that both see the same machine load: rows ``ours*``. FLOPs and the matmul floor come
from the same helpers as ``bench/efficientad.py``. Prints one JSON line prefixed ``BENCH_RESULT ``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
IMAGENET_MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
sys.path.insert(0, str(REPO))
from bench.efficientad import (
    MARK,
    build_ours,
    count_flops,
    matmul_floor,
    time_calls,
    warmup_count,
)


def build(size: str) -> torch.nn.Module:
    from anomalib.models.image.efficient_ad.torch_model import (
        EfficientAdModel,
        EfficientAdModelSize,
    )

    model = EfficientAdModel(teacher_out_channels=384, model_size=EfficientAdModelSize(size),
                             padding=False, pad_maps=True)
    if next(model.parameters()).device.type != "meta":
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            model.mean_std["mean"].copy_(torch.randn(model.mean_std["mean"].shape, generator=gen) * 0.1)
            model.mean_std["std"].copy_(torch.rand(model.mean_std["std"].shape, generator=gen) + 0.5)
            for name, value in (("qa_st", 0.02), ("qb_st", 0.05), ("qa_ae", 0.001), ("qb_ae", 0.004)):
                model.quantiles[name].fill_(value)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=["small"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for size in args.sizes:
        try:
            flops_1 = count_flops(lambda size=size: build(size), 1, args.image_size)
        except Exception:  # noqa: BLE001 - meta tracing of anomalib's is_set() branch fails: count on CPU
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter, torch.inference_mode():
                build(size).eval()(torch.rand(1, 3, args.image_size, args.image_size))
            flops_1 = int(counter.get_total_flops())
        per_image = None
        for batch in args.batches:
            theirs = build(size).eval().to(device=device, memory_format=torch.channels_last)
            ours = build_ours(size, args.image_size).eval().to(device=device, memory_format=torch.channels_last)
            x = torch.rand(batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            x_norm = ((x - IMAGENET_MEAN.to(device)) / IMAGENET_STD.to(device)).contiguous(memory_format=torch.channels_last)
            calls = {"anomalib": lambda m=theirs, v=x: m(v), "ours*": lambda m=ours, v=x_norm: m(v)}
            estimate = per_image * batch if per_image is not None else None
            times: dict[str, list[float]] = {k: [] for k in calls}
            with torch.inference_mode():
                if estimate is None:  # shapes, and the warm-up
                    assert tuple(theirs(x).anomaly_map.shape) == (batch, 1, args.image_size, args.image_size)
                for _ in range(warmup_count(estimate, args.warmup, args.budget_s)):
                    for fn in calls.values():
                        fn()
                start = time.perf_counter()  # alternate the two, so that both see the same machine load
                while len(times["ours*"]) < args.repeats and (
                        not times["ours*"] or time.perf_counter() - start < 2 * args.budget_s):
                    for name, fn in calls.items():
                        times[name] += time_calls(fn, device, 0, 1, args.budget_s)
            if batch == 1:
                per_image = max(statistics.median(t) for t in times.values())
            flops = flops_1 * batch
            floor = matmul_floor(flops, device, torch.float32, args.warmup, args.repeats, args.budget_s, estimate)
            for name, t in times.items():
                median = statistics.median(t)
                rows.append({
                    "impl": name, "model": f"EfficientAD-{size[0].upper()}", "layout": "channels_last",
                    "dtype": "float32", "batch": batch, "calls": len(t), "latency_ms": 1e3 * median,
                    "images_per_s": batch / median, "gflops_per_image": flops_1 / 1e9,
                    "gflops_per_s": flops / median / 1e9, "floor_ms": 1e3 * floor["median_s"], "floor_n": floor["n"],
                    "floor_gflops_per_s": floor["gflops_per_s"],
                    "ratio_to_floor": median / (floor["median_s"] * flops / floor["flops"]),
                })
    print(MARK + json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
