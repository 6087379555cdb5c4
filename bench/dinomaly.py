"""Benchmark: Dinomaly on the CPU with random weights (no data, no downloads).

    python bench/dinomaly.py step  [--encoder base] [--batch 2] [--crop 392] [--repeats 3]
    python bench/dinomaly.py infer [--encoders small base] [--batch 1] [--crop 392] [--repeats 3]
    python bench/dinomaly.py step --tiny      # a width-128 encoder at 42 px: checks that it runs

``step``: one training step exactly as the LightningModule runs it: the frozen encoder's blocks
0..9 under no_grad, bottleneck (dropout on) and 8 linear-attention decoder blocks, the
hard-mined global cosine loss (p = 0.9), backward, gradient-norm clipping at 0.1, StableAdamW.
FLOPs are counted by ``torch.utils.flop_counter`` over one such forward + backward; the floor
is a square fp32 matmul of the same FLOPs timed in the same process, before and after the steps,
the faster kept (``bench/efficientad.py``'s helpers). Printed: median step, floor, ratio, and the
profile's top operators.

``infer``: images / s of the whole inference (``DinomalyModel.maps``: encoder blocks 0..9,
bottleneck, decoder, maps, 256 resize, blur, top-1 % score) at 392 for each encoder, next to a
plain timm forward of the same encoder at the same size (all blocks + final norm,
``forward_features``), timed alternately in the same process; the ratio ours / timm is the price
of the decoder and the maps over reading the features.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = {"embed_dim": 128, "num_heads": 2, "depth": 12, "img_size": 70}


def _model(encoder: str, crop: int, tiny: bool):
    from iad_lightning.models.dinomaly import DinomalyModel

    return DinomalyModel(encoder=f"vit_{encoder}_patch14_reg4_dinov2", encoder_weights="random", crop=crop,
                         arch=TINY if tiny else None, map_size=32 if tiny else 256)


def step_bench(encoder: str, batch: int, crop: int, repeats: int, tiny: bool, profile: bool = True) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(REPO / "bench"))
    from efficientad import step_against_floor

    from iad_lightning.models.dinomaly import StableAdamW, hard_mining_cosine_loss

    torch.manual_seed(0)
    model = _model(encoder, crop, tiny).train()
    params = model.trainable_parameters()
    opt = StableAdamW(params, lr=2e-3, eps=1e-10, weight_decay=1e-4)
    x = torch.randn(batch, 3, crop, crop, generator=torch.Generator().manual_seed(1))

    def step() -> None:
        en, de = model(x)
        loss = hard_mining_cosine_loss(en, de, p=0.9, factor=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:
        en, de = model(x)
        hard_mining_cosine_loss(en, de, p=0.9).backward()
    opt.zero_grad(set_to_none=True)
    flops = int(counter.get_total_flops())
    out = step_against_floor(step, flops, torch.device("cpu"), 1, repeats, budget_s=180.0, profile=profile)
    return {"encoder": encoder, "batch": batch, "crop": crop, **out}


def infer_bench(encoder: str, batch: int, crop: int, repeats: int, tiny: bool) -> dict:
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(REPO / "bench"))
    from efficientad import time_calls

    torch.manual_seed(0)
    ours = _model(encoder, crop, tiny).eval()
    plain = timm.create_model(f"vit_{encoder}_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=crop,
                              **({k: v for k, v in TINY.items() if k != "img_size"} if tiny else {})).eval()
    x = torch.randn(batch, 3, crop, crop, generator=torch.Generator().manual_seed(1))
    flops = {}
    for name, fn in (("ours", lambda: ours.maps(x)), ("timm", lambda: plain.forward_features(x))):
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            fn()
        flops[name] = counter.get_total_flops() / 1e9
    cpu = torch.device("cpu")
    t = {"ours": [], "timm": []}
    with torch.inference_mode():
        for _ in range(max(1, repeats)):  # alternate, so that load changes hit both sides alike
            t["ours"] += time_calls(lambda: ours.maps(x), cpu, 1, 1, budget_s=300.0)
            t["timm"] += time_calls(lambda: plain.forward_features(x), cpu, 1, 1, budget_s=300.0)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"encoder": encoder, "batch": batch, "crop": crop, "ours_img_s": batch / med["ours"],
            "timm_img_s": batch / med["timm"], "ratio": med["ours"] / med["timm"], "gflops_ours": flops["ours"] / batch,
            "gflops_timm": flops["timm"] / batch, "load": os.getloadavg()[0], "threads": torch.get_num_threads()}


def main() -> None:
    sys.path.insert(0, str(REPO))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["step", "infer"])
    parser.add_argument("--encoder", default="base", choices=["small", "base", "large"], help="step: the encoder")
    parser.add_argument("--encoders", nargs="+", default=["small", "base"], help="infer: the encoders side by side")
    parser.add_argument("--batch", type=int, default=None, help="step: 2, infer: 1")
    parser.add_argument("--crop", type=int, default=392)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="width-128 encoder at crop 42 (a smoke check)")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    crop = 42 if args.tiny else args.crop
    if args.what == "step":
        r = step_bench(args.encoder, args.batch or 2, crop, args.repeats, args.tiny, not args.no_profile)
        print(f"Dinomaly training step, ViT-{args.encoder[0].upper()}{' (tiny)' if args.tiny else ''}, batch {r['batch']} "
              f"at {crop} px, {r['threads']} threads, load {r['load']:.1f}: {r['step_s']:.3f} s (median of {r['steps']}); "
              f"{r['gflops']:.1f} GFLOP fwd+bwd; matmul floor {r['floor_s']:.3f} s ({r['floor_gflops_per_s']:.0f} "
              f"GFLOP/s); ratio {r['ratio_to_floor']:.2f}x")
        if "profile" in r:
            print(r["profile"])
        return
    print(f"| encoder | batch | px | ours img/s | timm forward img/s | ours / timm time | GFLOP/img ours | timm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for enc in args.encoders:
        r = infer_bench(enc, args.batch or 1, crop, args.repeats, args.tiny)
        print(f"| ViT-{enc[0].upper()}{' tiny' if args.tiny else ''} | {r['batch']} | {crop} | {r['ours_img_s']:.2f} | "
              f"{r['timm_img_s']:.2f} | {r['ratio']:.2f}x | {r['gflops_ours']:.1f} | {r['gflops_timm']:.1f} |")
    print(f"(random weights, fp32 CPU, {r['threads']} threads, load {r['load']:.1f})")


if __name__ == "__main__":
    main()
