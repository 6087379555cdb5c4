"""Benchmark: PatchCore fit memory at scale, bounded (streaming) fit against the full-bank fit.

    python bench/patchcore_scale.py [--images 4000] [--old-images 1000] [--ratio 0.001]

Random features, so it runs anywhere without data or weights: every image gets seeded random
patch embeddings of the paper's shape, 784 x 1024 (a 28 x 28 grid at 224 px, 1024 dims: 4,000
images = 3.1 M patches), in place of backbone + embedding (their memory does not grow with N;
``--embed`` runs the real ``PatchEmbedding`` on random WideResNet-50-shaped maps instead, ~50x
slower). Each configuration runs in a fresh subprocess; peak memory is its max RSS
(``ru_maxrss``), and a thread sampling VmRSS every 20 ms gives the peak of each phase.

* ``new``: what ``PatchCore.training_step`` / ``on_train_epoch_end`` do now
  (``methods/patchcore.py:_StreamingBank``): per batch the 128-d coreset projection written into
  one (128, N) buffer in dataset order (sized from the number of images, as ``training_step``
  sizes it from the train set), the full rows spilled to a temporary file, the coreset on that
  buffer in place, the selected rows read back.
* ``old``: the code before it: every batch's (B, 784, 1024) float32 embedding kept, the bank put
  in dataset order (``_bank_in_dataset_order``), ``approximate_greedy_coreset(bank)``, then
  ``bank[keep]``. It needs the whole N x 1024 bank (12.8 GB at 4,000 images), so by default it
  runs on ``--old-images`` and its peak is extrapolated linearly to ``--images`` (labelled).

Both runs at ``--old-images`` print a digest of the selected bank: equal digests = the same
selection and rows. The coreset ratio defaults to 0.001 to keep the run short on 2 shared cores;
memory hardly depends on it (the bank is ratio x N rows), the coreset time grows with it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARK = "SCALE_RESULT "


def features(index: int):
    import torch

    g = torch.Generator().manual_seed(index)
    return [torch.rand(1, 512, 28, 28, generator=g), torch.rand(1, 1024, 14, 14, generator=g)]


def batch_embedding(idx: list[int], embed):
    """(B, 784, 1024) patch embeddings of images ``idx``: random (seeded per image), or the real
    ``PatchEmbedding`` of random WR50-shaped maps when ``embed`` is given."""
    import torch

    if embed is not None:
        return embed([torch.cat(m) for m in zip(*(features(i) for i in idx))])[0]
    return torch.stack([torch.rand(784, 1024, generator=torch.Generator().manual_seed(i)) for i in idx])


class RssSampler:
    """Peak VmRSS (from /proc/self/status, every 20 ms in a thread) per named phase, in MiB."""

    def __init__(self) -> None:
        import threading

        self.phase, self.peaks, self._stop = "start", {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def rss_mib() -> float:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.mark(self.phase)

    def mark(self, phase: str) -> None:
        self.phase = phase
        rss = self.rss_mib()
        if not rss <= self.peaks.get(phase, 0.0):
            self.peaks[phase] = rss

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {k: round(v) for k, v in self.peaks.items()}


def worker(mode: str, images: int, ratio: float, batch: int, seed: int, use_embed: bool = False) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from iad_lightning.methods.patchcore import _bank_in_dataset_order, _StreamingBank
    from iad_lightning.models.coreset import approximate_greedy_coreset
    from iad_lightning.models.patchcore import PatchEmbedding

    base_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # interpreter + torch, no data yet
    embed = PatchEmbedding(1024, 1024) if use_embed else None
    cpu = torch.device("cpu")
    order = torch.randperm(images, generator=torch.Generator().manual_seed(seed)).tolist()  # shuffled loader
    rss = RssSampler()
    t0 = time.perf_counter()
    coreset_s = 0.0
    with torch.no_grad():
        if mode == "new":
            rss.mark("embed+add")
            stream = None
            for start in range(0, images, batch):
                idx = order[start : start + batch]
                emb = batch_embedding(idx, embed)
                # the train set's size, as PatchCore.training_step passes it from the train loader
                stream = stream or _StreamingBank(emb.shape[-1], 128, seed, cpu, num_images=images)
                stream.add(emb, torch.tensor(idx))
            t1 = time.perf_counter()
            rss.mark("select")
            bank, n = stream.select(ratio, 10, cpu)
            coreset_s = time.perf_counter() - t1  # coreset + reading the selected rows back
        else:
            rss.mark("embed")
            feats, indices = [], []
            for start in range(0, images, batch):
                idx = order[start : start + batch]
                emb = batch_embedding(idx, embed)
                feats.append(emb.to("cpu", torch.float32))
                indices.append(torch.tensor(idx))
            rss.mark("dataset order")
            full = _bank_in_dataset_order(feats, indices, cpu)
            t1 = time.perf_counter()
            rss.mark("coreset")
            keep = approximate_greedy_coreset(full, ratio, projection_dim=128, num_starts=10, seed=seed, device=cpu)
            coreset_s = time.perf_counter() - t1
            bank, n = full[keep], full.shape[0]
            del full
    total = time.perf_counter() - t0
    phases = rss.stop()
    return {
        "mode": mode, "images": images, "patches": n, "bank": list(bank.shape), "ratio": ratio,
        "fit_s": total, "coreset_s": coreset_s,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mib": base_mib,
        "phase_peak_rss_mib": phases,
        "digest": hashlib.sha256(bank.numpy().tobytes()).hexdigest()[:16],
        "torch_threads": torch.get_num_threads(),
    }


def run(mode: str, images: int, args) -> dict | None:
    cmd = [sys.executable, __file__, "--_worker", mode, "--images", str(images), "--ratio", str(args.ratio),
           "--batch-size", str(args.batch_size), "--seed", str(args.seed)] + (["--embed"] if args.embed else [])
    print(f"[scale] {mode} {images} images ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        print(f"[scale] {mode} {images} FAILED (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return None
    r = json.loads(lines[-1][len(MARK):])
    print(f"[scale] {mode} {images}: fit {r['fit_s']:.1f} s (coreset {r['coreset_s']:.1f} s), "
          f"peak RSS {r['max_rss_mib']:.0f} MiB (per phase {r['phase_peak_rss_mib']}), bank {r['bank']}, "
          f"digest {r['digest']}", flush=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--old-images", type=int, default=1000,
                        help="images for the full-bank path (its peak is extrapolated to --images)")
    parser.add_argument("--ratio", type=float, default=0.001)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embed", action="store_true", help="real PatchEmbedding on random WR50-shaped maps")
    parser.add_argument("--out", default="/tmp/patchcore_scale.json")
    parser.add_argument("--_worker", dest="worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(MARK + json.dumps(worker(args.worker, args.images, args.ratio, args.batch_size, args.seed, args.embed)), flush=True)
        return
    load_before = os.getloadavg()
    runs = [r for r in (run("old", args.old_images, args), run("new", args.old_images, args),
                        run("new", args.images, args) if args.images != args.old_images else None) if r]
    out = {"argv": sys.argv[1:], "load_before": load_before, "load_after": os.getloadavg(), "runs": runs}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"\nload average before {load_before}, after {os.getloadavg()}; results {args.out}\n")
    print("| path | images | patches | bank | fit (s) | of which coreset (s) | peak RSS (MiB) | bank digest |")
    print("|---|---:|---:|---|---:|---:|---:|---|")
    for r in runs:
        print(f"| {r['mode']} | {r['images']} | {r['patches']:,} | {'x'.join(map(str, r['bank']))} | {r['fit_s']:.1f} "
              f"| {r['coreset_s']:.1f} | {r['max_rss_mib']:.0f} | {r['digest']} |")
    old = next((r for r in runs if r["mode"] == "old"), None)
    if old and args.images != args.old_images:
        # the old peak above the imports (its N x 1024 float32 bank, the dataset-order copy being
        # built, the N x 128 projection) grows linearly with N
        base = old["base_rss_mib"]
        est = base + (old["max_rss_mib"] - base) * args.images / old["images"]
        print(f"| old (extrapolated linearly from {old['images']}) | {args.images} | {args.images * 784:,} | | | "
              f"| ~{est:.0f} | |")


if __name__ == "__main__":
    main()
