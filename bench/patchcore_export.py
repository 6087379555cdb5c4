"""PatchCore export at scale: a 10^5 x 1024 memory bank inside an ONNX graph vs the eager faiss model.

    python bench/patchcore_export.py [--bank 100000] [--batch 1] [--size 224] [--repeats 3]

Builds a PatchCore on the offline Lite0 backbone (random weights are enough for timing and for
the equality check; layers 2 and 3, so a 28 x 28 patch grid at 224 px as with WR50), fills the
bank with random rows of the embedding scale, writes the checkpoint, runs the real export command
(ONNX, which checks the file against eager), then times on one batch: eager ``predict_batch``
(faiss IndexFlatL2 + refined distances) and onnxruntime on the exported file; prints the file
size, the largest differences and both times (median of ``--repeats``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from efficientad import time_calls  # the shared bench timer

from iad_lightning.export import main as export_main
from iad_lightning.methods.patchcore import PatchCore


def _median_time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (bench/efficientad.py's timer)."""
    return statistics.median(time_calls(fn, torch.device("cpu"), warmup=1, repeats=repeats, budget_s=float("inf")))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bank", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import onnxruntime as ort

    torch.manual_seed(0)
    backbone = {"name": "tf_efficientnet_lite0", "layers": [2, 3], "weights": "none"}
    # the 1024-d embedding of the README figure (Lite0's "auto" rule would give 152 dims)
    kwargs = {"backbone": backbone, "resize": args.size, "crop": args.size,
              "pretrain_embed_dimension": 1024, "target_embed_dimension": 1024}
    method = PatchCore(**kwargs).eval()
    images = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        emb, _ = method.model.embed(method.feature_extractor(images))
    scale = float(emb.std())
    method.model.fit(torch.randn(args.bank, 1024) * scale + float(emb.mean()))
    method.method_config = {"_target_": "iad_lightning.methods.patchcore.PatchCore", "_convert_": "all", **kwargs}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "pc.ckpt"
        checkpoint = {"state_dict": method.state_dict()}
        method.on_save_checkpoint(checkpoint)
        torch.save(checkpoint, ckpt)
        t = time.perf_counter()
        assert export_main([f"ckpt_path={ckpt}", "format=onnx", f"batch_size={args.batch}"]) == 0
        export_s = time.perf_counter() - t
        onnx_path = ckpt.with_suffix(".onnx")
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        feed = {"image": images.numpy()}
        with torch.no_grad():
            ref = method.predict_batch(images)
        got_map, got_score = session.run(["anomaly_map", "pred_score"], feed)
        eager_s = _median_time(lambda: method.predict_batch(images), args.repeats)
        onnx_s = _median_time(lambda: session.run(["anomaly_map", "pred_score"], feed), args.repeats)
        size_mb = onnx_path.stat().st_size / 2**20
    print(f"bank {args.bank} x 1024, batch {args.batch} at {args.size} px ({emb.shape[1]} patches per image), "
          f"torch threads {torch.get_num_threads()}")
    print(f"ONNX file {size_mb:.0f} MB, export + check {export_s:.1f} s")
    print(f"max |onnx - eager faiss|: map {float((torch.from_numpy(got_map) - ref['anomaly_map']).abs().max()):.3g}, "
          f"score {float((torch.from_numpy(got_score) - ref['pred_score']).abs().max()):.3g} "
          f"(max score {float(ref['pred_score'].max()):.3g})")
    print(f"per batch: eager faiss {eager_s:.3f} s, onnxruntime {onnx_s:.3f} s")


if __name__ == "__main__":
    main()
