"""One prepared benchmark of every method on one CUDA device (and, at tiny sizes, on the CPU).

    python bench/gpu.py                          # CUDA, paper sizes, sized for ~8 minutes on one H100-class GPU
    python bench/gpu.py --quick                  # CUDA, fp32 only, fewer steps, smaller PatchCore scale: ~1 minute
    python bench/gpu.py --device cpu --tiny      # CPU, tiny sizes: what tests/run/test_bench_gpu.py runs
    python bench/gpu.py --methods patchcore uniad --out /tmp/gpu.json

It needs only what the project installs (no weights, no data, no internet): every method runs
with random weights (``backbone=paper`` + ``method.backbone.weights=none``,
``clip_weights=random``, a random PDN teacher file, a random ADPretrain projector file) at the
paper's input size and batch (the method configs' defaults), on the synthetic set generated into
``--cache`` (``paths.cache_dir``) once.

Per method (the ``ENTRIES`` table; one entry per method, Dinomaly added when
``iad_lightning.models.dinomaly`` is importable):

* **fit** through the project's own LightningModule, datamodule and Trainer (``run._build``, as
  ``train.py`` builds them), once in ``32-true`` and once in ``bf16-mixed``: the median training
  step (``on_train_batch_start`` -> ``on_train_batch_end``, i.e. forward, backward and optimiser
  step, CUDA-synchronised, after 3 warm-up steps, 10 measured), the time between steps (loading the next
  batch from the real ``DataLoader`` with ``data.num_workers`` workers and ``pin_memory``, and its
  non-blocking copy to the device), their ratio as the data-loading share, and the peak GPU memory
  of the fit (``torch.cuda.max_memory_allocated``; the process peak RSS on CPU). Methods with no
  gradient step (PatchCore, PaDiM: feature extraction into the bank) report that step; FeatureNorm
  has none (its fit encodes a k-shot bank in ``on_train_start``) and reports the fit time.
* **inference**: ``predict_batch`` (what test.py, predict.py and export call) on the fitted
  module in fp32 under ``torch.inference_mode``, at batch 1 and at the paper's eval batch
  (``data.eval_batch_size``): median of 20 timed calls (CUDA events) after warm-up,
  images/s and the peak GPU memory.

PatchCore's GPU paths (``models/coreset.py``, ``models/nn_search.py``):

* the approximate greedy coreset (ratio 0.1, projection 128) on 10^6 x 1024 random features on the
  GPU (``--quick``: 10^5), and a CPU-vs-GPU selection check on a 10^5-row subset at ratio 0.01;
* exact 1-NN of one eval batch of patches (32 images x 784) against a 10^5 x 1024 bank: the torch
  matmul + topk path on the GPU (fp32, and fp16 + fp32 re-ranking) next to faiss-cpu
  (``IndexFlatL2``, all cores) on the same machine, each checked against the CPU torch result
  (share of equal neighbours, with distance ties counted as equal, and the largest distance error).

EfficientAD-S batch-1 latency is printed next to the paper's 2.2 ms (NVIDIA RTX A6000; a
different card: the ratio is indicative). Writes one JSON (``--out``, default
``outputs/bench/gpu_<device>.json``) and prints one table; docs/benchmarks.md says where the
figures go.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAPER_EFFICIENTAD_S_MS = 2.2  # EfficientAD paper, batch 1, NVIDIA RTX A6000


# ----------------------------------------------------------------------------------- the table
@dataclass
class Entry:
    """One method: Hydra overrides of ``train.yaml`` at paper sizes with random weights, the
    extra overrides of ``--tiny`` (CPU) and the files it needs written first."""

    name: str
    overrides: list[str]
    tiny: list[str] = field(default_factory=list)
    files: Callable[[Path, bool], list[str]] | None = None  # (work dir, tiny) -> more overrides
    fit_split: str = "train"  # the split the train loader serves (test: AnomalyCLIP, ADPretrain)
    requires: str | None = None  # a module whose absence skips the entry with a note
    trains: bool = True  # False: no training step (FeatureNorm); the fit time is reported instead
    cnn_backbone: bool = False  # the method.backbone group: paper backbone (tiny: Lite0), random weights
    infers: bool = True  # False: no inference of its own (ADPretrain: the projector serves other methods)
    steps_key: str | None = None  # a step-based method's schedule length (EfficientAD: method.num_steps)

    def method_overrides(self, tiny: bool, work: Path) -> list[str]:
        """The method part of the overrides (random weights, paper or tiny sizes), files written."""
        backbone = [f"backbone={'lite0' if tiny else 'paper'}", "method.backbone.weights=none"] if self.cnn_backbone else []
        files = self.files(work, tiny) if self.files else []
        return [*self.overrides, *(self.tiny if tiny else []), *backbone, *files, f"data.fit_split={self.fit_split}"]

    def run_overrides(self, steps: int) -> list[str]:
        """Fit exactly ``steps`` batches (one epoch, limited), whatever the method's schedule."""
        schedule = [f"{self.steps_key}={steps}"] if self.steps_key else []
        return ["trainer.max_epochs=1", f"trainer.max_steps={steps}", f"trainer.limit_train_batches={steps}",
                *schedule]


def available(entry: Entry) -> bool:
    return entry.requires is None or importlib.util.find_spec(entry.requires) is not None


def random_teacher(model_size: str) -> Callable[[Path, bool], list[str]]:
    """A random PDN teacher file in nelson's layout (EfficientAD refuses to train without one)."""

    def write(work: Path, tiny: bool) -> list[str]:
        from iad_lightning.models.efficientad import PDN

        path = work / f"teacher_{model_size}_random.pth"
        if not path.is_file():
            torch.save(PDN(model_size, 384, padding=False).state_dict(), path)
        return [f"method.teacher_weights={path}"]

    return write


def random_projector(backbone: str) -> Callable[[Path, bool], list[str]]:
    """A random ADPretrain projector file for ``backbone`` (FeatureNorm's input), paper shape."""

    def write(work: Path, tiny: bool) -> list[str]:
        from iad_lightning.models.adpretrain import LevelBackbone, MultiScaleProjector, projector_file

        name = "tf_efficientnet_lite0" if tiny else backbone
        path = work / f"projector_{name}_random.pt"
        if not path.is_file():
            bb = LevelBackbone(name, weights="none")
            proj = MultiScaleProjector(bb.channels, 16, num_ref_tokens=64 if tiny else 2048)
            torch.save(projector_file(proj, bb, 64 if tiny else 224, None), path)
        return [f"method.projector={path}"]

    return write


TINY_BATCH = ["data.batch_size=2"]
TINY_CLIP = ("{embed_dim:32,quick_gelu:true,vision_cfg:{layers:4,width:64,patch_size:8,image_size:32},"
             "text_cfg:{context_length:77,vocab_size:49408,width:64,heads:1,layers:10}}")
ENTRIES = [
    Entry("patchcore", ["method=patchcore"], TINY_BATCH + [
        "method.resize=64", "method.crop=64", "method.pretrain_embed_dimension=64", "method.target_embed_dimension=64"],
        cnn_backbone=True),
    Entry("padim", ["method=padim"], TINY_BATCH + ["method.resize=64", "method.crop=64", "method.n_features=32"],
          cnn_backbone=True),
    Entry("featurenorm", ["method=featurenorm"], TINY_BATCH + ["method.image_size=64", "method.shots=2"],
          files=random_projector("dinov2-base"), trains=False, cnn_backbone=True),
    Entry("efficientad_s", ["method=efficientad", "method.model_size=small", "method.penalty_dir=${data.root}"],
          ["method.image_size=64", "data.val_fraction=0.25"], files=random_teacher("small"), steps_key="method.num_steps"),
    Entry("efficientad_m", ["method=efficientad", "method.model_size=medium", "method.penalty_dir=${data.root}"],
          ["method.image_size=64", "data.val_fraction=0.25"], files=random_teacher("medium"), steps_key="method.num_steps"),
    Entry("uniad", ["method=uniad"], ["method.image_size=64", "method.effective_batch_size=2", "method.hidden_dim=32",
                                      "method.dim_feedforward=64", "method.num_encoder_layers=1",
                                      "method.num_decoder_layers=1",
                                      "method.neighbor_size=[3,3]"], cnn_backbone=True),
    Entry("anomalyclip", ["method=anomalyclip", "method.model.clip_weights=random"],  # ViT-L-14-336 at 518
          TINY_BATCH + [f"method.model.arch={TINY_CLIP}", "method.model.image_size=64", "method.model.features_list=[4]"],
          fit_split="test"),
    Entry("adpretrain", ["method=adpretrain", "method.center_max_images=64"],  # the projector step
          TINY_BATCH + ["method.image_size=64", "method.model.num_ref_tokens=32", "method.center_max_images=2",
                        "method.num_shots=[1]", "method.center_shots=1"],
          fit_split="test", cnn_backbone=True, infers=False),
    Entry("dinomaly", ["method=dinomaly", "method.model.encoder_weights=random"],
          ["method.effective_batch_size=2", "method.model.encoder=vit_small_patch14_reg4_dinov2", "method.image_size=56",
           "method.model.crop=42", "method.model.map_size=32"], requires="iad_lightning.models.dinomaly"),
]


# ----------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS (whole run so far)"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds per call: CUDA events on a GPU (one synchronize per call), perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def step_timer(device: torch.device):
    """A Lightning callback recording each training step and the gap before it (data + copy)."""
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.steps: list[float] = []
            self.gaps: list[float] = []
            self._start = self._end = None
            self.fit_seconds = 0.0

        def on_fit_start(self, trainer, pl_module) -> None:
            self._fit_t0 = time.perf_counter()

        def on_fit_end(self, trainer, pl_module) -> None:
            sync(device)
            self.fit_seconds = time.perf_counter() - self._fit_t0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._end = None  # the first batch of an epoch waits for the loader to start: not a gap

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            sync(device)
            now = time.perf_counter()
            if self._end is not None:
                self.gaps.append(now - self._end)
            self._start = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(device)
            self._end = time.perf_counter()
            self.steps.append(self._end - self._start)

    return StepTimer()


# ----------------------------------------------------------------------------------- one method
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def synthetic_overrides(n_train: int, n_test: int, tiny: bool) -> list[str]:
    """The synthetic set, all five categories: n_train train good and n_test test images each."""
    out = ["data=synthetic", "data.category=all", f"data.options.n_train={n_train}",
           f"data.options.n_test_good={n_test // 3}", f"data.options.n_test_defect={n_test - n_test // 3}"]
    return out + (["++data.eval_batch_size=2", "++data.options.image_size=64"] if tiny else [])


def input_size(module) -> tuple[int, int]:
    pre = module.preprocess
    if pre.output_size is not None:
        return pre.output_size
    r = pre.resize
    return (r, r) if isinstance(r, int) else tuple(r)


def fit_once(entry: Entry, precision: str, args, device: torch.device, method: list[str], work: Path):
    """Build method, datamodule and trainer as train.py does; fit ``steps`` batches; time them."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from iad_lightning.run import _build, configure_numerics

    steps = args.warmup + args.steps
    overrides = [
        *method, *entry.run_overrides(steps), *synthetic_overrides(args.n_train, args.n_test, args.tiny),
        f"data.num_workers={args.workers}", f"paths.cache_dir={args.cache}", f"paths.output_dir={work / 'run'}",
        "logger=none", "callbacks=none", f"trainer={'gpu' if device.type == 'cuda' else 'cpu'}",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        f"trainer.devices={[device.index] if device.index is not None else 1}",  # cuda:N -> that GPU
        f"trainer.precision={precision}", "trainer.limit_val_batches=0", "trainer.enable_checkpointing=false",
        "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0", "seed=0",
    ]
    cfg = compose(overrides)
    configure_numerics(cfg)
    torch.manual_seed(0)
    module = instantiate(cfg.method)
    module.method_config = OmegaConf.to_container(cfg.method, resolve=True)
    timer = step_timer(device)
    datamodule, trainer = _build(cfg, module, (timer,))
    reset_peak(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # penalty, worker-count and small-data warnings of a bench run
        trainer.fit(module, datamodule=datamodule)
    sync(device)
    mem, kind = peak_memory(device)
    measured, gaps = timer.steps[args.warmup:], timer.gaps[max(0, args.warmup - 1):]
    out: dict[str, Any] = {
        "precision": precision, "batch_size": datamodule.batch_size, "image_size": list(input_size(module)),
        "steps_measured": len(measured), "fit_seconds": timer.fit_seconds, "peak_memory_gib": mem,
        "peak_memory_kind": kind, "num_workers": datamodule.num_workers, "pin_memory": datamodule.loader_pin_memory(),
    }
    if entry.trains and measured:
        step = statistics.median(measured)
        gap = statistics.median(gaps) if gaps else 0.0
        out.update(step_ms=1e3 * step, data_ms=1e3 * gap, data_share=gap / (gap + step),
                   train_images_per_s=datamodule.batch_size / step)
    return module, datamodule, out


def infer(module, datamodule, args, device: torch.device) -> dict[str, Any]:
    """images/s of ``predict_batch`` at batch 1 and at the eval batch, fp32, inference mode."""
    module = module.to(device).eval()
    h, w = input_size(module)
    out: dict[str, Any] = {}
    for label, batch in (("batch1", 1), ("eval_batch", int(datamodule.eval_batch_size))):
        x = torch.randn(batch, 3, h, w, device=device)
        reset_peak(device)
        with torch.inference_mode():
            times = time_call(lambda: module.predict_batch(x), device, args.repeats, args.warmup)
        sec = statistics.median(times)
        mem, _ = peak_memory(device)
        out[label] = {"batch_size": batch, "ms": 1e3 * sec, "images_per_s": batch / sec, "peak_memory_gib": mem}
    return out


def bench_method(entry: Entry, args, device: torch.device, work: Path) -> dict[str, Any]:
    if not available(entry):
        return {"skipped": f"{entry.requires} is not importable (not in this checkout)"}
    method = entry.method_overrides(args.tiny, work)
    result: dict[str, Any] = {"train": {}}
    for precision in args.precisions:
        t0 = time.perf_counter()
        module, datamodule, fit = fit_once(entry, precision, args, device, method, work)
        if precision == args.precisions[0]:
            result["inference"] = (infer(module, datamodule, args, device) if entry.infers else
                                   {"skipped": "no inference of its own: its projector feeds FeatureNorm / PatchCore"})
        result["train"][precision] = fit
        del module, datamodule
        gc.collect()  # the trainer, its persistent loader workers and the model's GPU memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  {entry.name} {precision}: {time.perf_counter() - t0:.1f} s", flush=True)
    return result


# ----------------------------------------------------------------------------------- PatchCore paths
def bench_patchcore_paths(args, device: torch.device) -> dict[str, Any]:
    from iad_lightning.models.coreset import approximate_greedy_coreset
    from iad_lightning.models.nn_search import NearestNeighbourSearch, faiss_available, torch_knn

    out: dict[str, Any] = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    dim = 1024 if not args.tiny else 64
    # coreset on N x D features, on the device (the features generated there: 4 GB at 10^6 x 1024)
    n = args.coreset_rows
    feats = torch.randn(n, dim, device=device, generator=torch.Generator(device=device).manual_seed(0))
    times = time_call(lambda: approximate_greedy_coreset(feats, 0.1, 128, 10, seed=0), device, 1, 0)
    out["coreset"] = {"rows": n, "dim": dim, "ratio": 0.1, "selected": int(n * 0.1), "seconds": times[0],
                      "device": str(device)}
    del feats
    # the same selection on CPU and on the device, on a subset
    m = min(n, args.coreset_check_rows)
    sub = torch.randn(m, dim, generator=gen)
    ratio = 0.01 if m >= 10_000 else 0.1
    cpu_sel = approximate_greedy_coreset(sub, ratio, 128, 10, seed=0)
    dev_sel = approximate_greedy_coreset(sub.to(device), ratio, 128, 10, seed=0).cpu()
    same_prefix = int((cpu_sel == dev_sel).int().cumprod(0).sum())
    out["coreset_check"] = {"rows": m, "ratio": ratio, "selected": len(cpu_sel),
                            "same_selection": bool(torch.equal(cpu_sel, dev_sel)),
                            "identical_prefix": same_prefix,
                            "set_overlap": len(set(cpu_sel.tolist()) & set(dev_sel.tolist())) / max(1, len(cpu_sel))}
    # exact 1-NN: queries = one eval batch of patches, bank = 10^5 rows
    bank = torch.randn(args.bank_rows, dim, generator=gen)
    queries = torch.randn(args.queries, dim, generator=gen)
    ref_d, ref_i = torch_knn(queries, bank, 1)  # the CPU result every path is checked against

    def check(d: torch.Tensor, i: torch.Tensor) -> dict[str, Any]:
        d, i = d.cpu()[:, :1], i.cpu()[:, :1]
        same = i == ref_i
        tie = (d - ref_d).abs() <= 1e-4 * ref_d.abs().clamp(min=1.0)  # an equally near other row
        return {"same_neighbour": float(same.float().mean()), "same_or_tied": float((same | tie).float().mean()),
                "max_abs_distance_error": float((d - ref_d).abs().max())}

    nn_out: dict[str, Any] = {"bank_rows": args.bank_rows, "queries": args.queries, "dim": dim}
    paths: list[tuple[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]] = []
    if device.type == "cuda":
        qd, bd = queries.to(device), bank.to(device)
        paths.append(("torch_matmul_topk_fp32_" + device.type, lambda: torch_knn(qd, bd, 1)))
        half = NearestNeighbourSearch(backend="torch", device="cuda", precision="float16").fit(bd)
        paths.append(("torch_fp16_rerank_" + device.type, lambda: half.search(qd, 1)))
    paths.append(("torch_matmul_topk_fp32_cpu", lambda: torch_knn(queries, bank, 1)))
    if faiss_available():
        flat = NearestNeighbourSearch(backend="faiss", device="cpu", refine_distances=False).fit(bank)
        paths.append(("faiss_cpu_flat", lambda: flat.search(queries, 1)))
    else:
        nn_out["faiss_cpu_flat"] = {"skipped": "faiss is not installed (pip install faiss-cpu)"}
    for name, fn in paths:
        on_gpu = device.type == "cuda" and name.endswith(device.type)
        last: list = []
        times = time_call(lambda: last.append(fn()), device if on_gpu else torch.device("cpu"),
                          args.nn_repeats if on_gpu else 1, 1)  # CPU paths: seconds per call, timed once
        d, i = last[-1]
        nn_out[name] = {"seconds": statistics.median(times), **check(d, i)}
    out["knn"] = nn_out
    return out


# ----------------------------------------------------------------------------------- report
def fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(results: dict[str, Any], precisions: list[str]) -> str:
    head = ["method", "input", "batch", *[f"step ms {p.split('-')[0]}" for p in precisions], "data %",
            "train GiB", "img/s b1", "img/s eval (b)", "infer GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["methods"].items():
        if "skipped" in r or "error" in r:
            lines.append(f"| {name} | {r.get('skipped') or 'ERROR: ' + r['error'].splitlines()[0][:80]} |")
            continue
        fits = r["train"]
        first = fits[precisions[0]]
        inf = r["inference"]
        if "skipped" in inf:
            inf = {"batch1": {}, "eval_batch": {"batch_size": "-"}}
        steps = [fmt(fits[p].get("step_ms")) if p in fits else "-" for p in precisions]
        if "step_ms" not in first:
            steps = [f"fit {fits[p]['fit_seconds']:.1f} s" if p in fits else "-" for p in precisions]
        cells = [name, "x".join(map(str, first["image_size"])), str(first["batch_size"]), *steps,
                 fmt(100 * first["data_share"] if "data_share" in first else None, ".0f"),
                 fmt(max(f["peak_memory_gib"] for f in fits.values()), ".2f"),
                 fmt(inf["batch1"].get("images_per_s")),
                 f"{fmt(inf['eval_batch'].get('images_per_s'))} ({inf['eval_batch']['batch_size']})",
                 fmt(inf["eval_batch"].get("peak_memory_gib"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    ead = results["methods"].get("efficientad_s", {}).get("inference")
    if ead:
        ms = ead["batch1"]["ms"]
        lines.append(f"\nEfficientAD-S batch-1 latency: {ms:.2f} ms vs the paper's {PAPER_EFFICIENTAD_S_MS} ms "
                     f"(RTX A6000): {ms / PAPER_EFFICIENTAD_S_MS:.2f}x")
    pc = results.get("patchcore_paths")
    if pc and "error" not in pc:
        c, k = pc["coreset"], pc["coreset_check"]
        lines.append(f"PatchCore coreset {c['rows']:,} x {c['dim']} -> {c['selected']:,} on {c['device']}: "
                     f"{c['seconds']:.2f} s; CPU vs {c['device']} on {k['rows']:,} rows: same selection "
                     f"{k['same_selection']} (identical prefix {k['identical_prefix']} of {k['selected']}, "
                     f"overlap {100 * k['set_overlap']:.1f} %)")
        knn = pc["knn"]
        lines.append(f"PatchCore 1-NN, {knn['queries']:,} queries x {knn['bank_rows']:,}-row bank x {knn['dim']}:")
        for name, v in knn.items():
            if isinstance(v, dict) and "seconds" in v:
                lines.append(f"  {name:32s} {v['seconds'] * 1e3:9.1f} ms  same neighbour {100 * v['same_neighbour']:.2f} %"
                             f" (with ties {100 * v['same_or_tied']:.2f} %), max |d - d_cpu| {v['max_abs_distance_error']:.2e}")
            elif isinstance(v, dict):
                lines.append(f"  {name:32s} skipped: {v['skipped']}")
    elif pc:
        lines.append(f"PatchCore paths: ERROR {pc['error'].splitlines()[0]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda if available) | cuda | cuda:N | cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny models and images (the CPU check)")
    ap.add_argument("--quick", action="store_true", help="fewer steps, smaller PatchCore scale: < 1 minute on a GPU")
    ap.add_argument("--methods", nargs="+", default=None, help=f"subset of {[e.name for e in ENTRIES]}")
    ap.add_argument("--precisions", nargs="+", default=None,
                    help="trainer precisions of the fits (default 32-true bf16-mixed; --quick: 32-true)")
    ap.add_argument("--no-patchcore-paths", action="store_true")
    ap.add_argument("--workers", type=int, default=None, help="data.num_workers (default: min(8, cores) on CUDA, 0 on CPU)")
    ap.add_argument("--cache", type=Path, default=REPO / ".cache", help="paths.cache_dir: where the synthetic set is generated")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default outputs/bench/gpu_<device>.json)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: --device cuda but torch sees no CUDA device; use --device cpu --tiny", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    quick = args.quick or args.tiny
    args.precisions = args.precisions or (["32-true"] if args.quick else ["32-true", "bf16-mixed"])
    args.warmup, args.steps = (1, 1) if args.tiny else (1, 3) if args.quick else (3, 10)
    args.repeats = 1 if args.tiny else 3 if args.quick else 20
    args.nn_repeats = 1 if quick else 3
    args.workers = args.workers if args.workers is not None else (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    names = [e.name for e in ENTRIES]
    chosen = [e for e in ENTRIES if args.methods is None or e.name in args.methods]
    unknown = set(args.methods or []) - set(names)
    if unknown:
        print(f"bench/gpu.py: unknown --methods {sorted(unknown)}; choose from {names}", file=sys.stderr)
        return 2
    # the synthetic set: enough images for every measured step at the largest paper batch (UniAD 64,
    # ADPretrain 32 on the test split) over the five categories
    steps = args.warmup + args.steps
    args.n_train = 4 if args.tiny else math.ceil(64 * steps / 5) + 4
    args.n_test = 3 if args.tiny else math.ceil(32 * steps / 5) + 3
    args.coreset_rows = 2_000 if args.tiny else 100_000 if args.quick else 1_000_000
    args.coreset_check_rows = 2_000 if args.tiny else 100_000 if not args.quick else 20_000
    args.bank_rows = 2_000 if args.tiny else 10_000 if args.quick else 100_000
    args.queries = 256 if args.tiny else 4096 if args.quick else 32 * 784
    out_path = args.out or REPO / "outputs" / "bench" / f"gpu_{device.type}{'_tiny' if args.tiny else ''}.json"

    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "tiny": args.tiny, "quick": args.quick,
            "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "load_avg": os.getloadavg(),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    results: dict[str, Any] = {"meta": meta, "methods": {}}
    t_start = time.perf_counter()
    print(f"bench/gpu.py on {meta['device']} ({device}); {'tiny' if args.tiny else 'quick' if args.quick else 'full'} run",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="iad_gpu_bench_") as tmp:
        for entry in chosen:
            try:
                results["methods"][entry.name] = bench_method(entry, args, device, Path(tmp))
            except Exception as err:  # one broken method must not cost the other measurements
                traceback.print_exc()
                results["methods"][entry.name] = {"error": f"{type(err).__name__}: {err}"}
            if "skipped" in results["methods"][entry.name]:
                print(f"  {entry.name}: skipped ({results['methods'][entry.name]['skipped']})", flush=True)
        if not args.no_patchcore_paths and (args.methods is None or "patchcore" in args.methods):
            try:
                results["patchcore_paths"] = bench_patchcore_paths(args, device)
            except Exception as err:
                traceback.print_exc()
                results["patchcore_paths"] = {"error": f"{type(err).__name__}: {err}"}
    meta["seconds"] = time.perf_counter() - t_start
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results, args.precisions))
    print(f"\n{meta['device']}, torch {meta['torch']}, {meta['seconds']:.0f} s; written {out_path}")
    failed = [n for n, r in results["methods"].items() if "error" in r] + (
        ["patchcore_paths"] if "error" in results.get("patchcore_paths", {}) else [])
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
