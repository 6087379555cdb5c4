"""Test predictions are reduced per category as soon as it is complete, with the same metrics as
gathering everything at the end (DistributedSampler padding and index order included)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def element_wise_map(images):
    """Maps and scores that are an element-wise function of each image (no batch effect), so one
    process and two DDP ranks give bit-identical predictions."""
    amap = images[:, :1] * 0.7 + images[:, 1:2].sin()
    return amap, amap.flatten(1).amax(1)


def run_probe(out: Path, root: Path, mode: str) -> dict:
    """``trainer.test`` of a probe method over ``root`` (batch 3), one process or DDP (torchrun);
    returns the results and, per category, the number of test batches seen when it was reduced."""
    import warnings

    import lightning as L
    import torch

    from iad_lightning.data.datamodule import AnomalyDataModule
    from iad_lightning.data.transforms import Preprocess
    from iad_lightning.methods.base import AnomalyModule

    class Probe(AnomalyModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.rows, self.reduced_at, self.batches = [], {}, 0

        @property
        def preprocess(self):
            return Preprocess(resize=(32, 32), crop=None)

        def predict_batch(self, images):
            amap, score = element_wise_map(images)
            return {"anomaly_map": amap, "pred_score": score}

        def test_step(self, batch, batch_idx):
            self.batches += 1
            self.rows.append({"index": batch["index"].tolist(), "category": list(batch["category"])})
            return super().test_step(batch, batch_idx)

        def _reduce_category(self, cat, pred):
            self.reduced_at[cat] = self.batches
            return super()._reduce_category(cat, pred)

    warnings.filterwarnings("ignore")
    dm = AnomalyDataModule(format="mvtec", root=str(root), category="all", batch_size=3, num_workers=0)
    model = Probe()
    dm.preprocess = model.preprocess
    kw = dict(strategy="ddp", devices=2) if mode == "ddp" else dict(devices=1)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **kw)
    trainer.test(model, datamodule=dm, verbose=False)
    run = {"results": model.results, "reduced_at": model.reduced_at, "batches": model.batches, "rows": model.rows}
    (out / f"{mode}_{trainer.global_rank}.json").write_text(json.dumps(run))
    return run


WORKER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_category_buffer import run_probe
run_probe(Path(sys.argv[1]), Path(sys.argv[2]), "ddp")
"""


def all_at_end(preds, categories):
    """Today's (pre-streaming) computation: keep every map, de-duplicate at the end, then metrics
    per category with a global has_masks (kept here verbatim as the reference)."""
    from iad_lightning.metrics import compute_metrics
    from iad_lightning.results import mean_over_categories

    merged = {k: np.concatenate([p[k] for p in preds]) for k in preds[0]}
    _, first = np.unique(merged["index"], return_index=True)
    pred = {k: v[first] for k, v in merged.items()}
    cats = [c for c in categories if c in set(pred["category"])]
    has_masks = bool(pred["mask"].any())
    per_cat = {}
    for cat in cats:
        sel = pred["category"] == cat
        per_cat[cat] = compute_metrics(pred["pred_score"][sel], pred["label"][sel],
                                       pred["anomaly_map"][sel] if has_masks else None,
                                       pred["mask"][sel] if has_masks else None)
    return {"categories": per_cat, "mean": mean_over_categories(per_cat)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """3 categories, 4 + 4 + 3 = 11 test images (odd: the 2-rank sampler pads with index 0),
    batch 3 (batches straddle categories); one process, then 2 gloo ranks under torchrun."""
    sys.path.insert(0, str(REPO / "tests"))
    from data import fixtures as fx

    out = tmp_path_factory.mktemp("stream")
    root = fx.make_mvtec(out / "data", ("bottle", "cable", "capsule"))
    (root / "capsule" / "test" / "good" / "001.png").unlink()
    worker = out / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(out), str(root), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_probe(out, root, "single")
    return out, root


def reference(root):
    """The same predictions, computed batch by batch in one process, then reduced all at end."""
    import torch

    from iad_lightning.data.datamodule import AnomalyDataModule
    from iad_lightning.data.transforms import Preprocess

    dm = AnomalyDataModule(format="mvtec", root=str(root), category="all", batch_size=3)
    dm.preprocess = Preprocess(resize=(32, 32), crop=None)
    preds = []
    for batch in dm.test_dataloader():
        amap, score = element_wise_map(batch["image"])
        preds.append({"index": batch["index"].numpy(), "pred_score": score.numpy(),
                      "label": torch.as_tensor(batch["label"]).numpy(), "anomaly_map": amap.numpy()[:, 0],
                      "mask": batch["mask"].numpy()[:, 0] > 0.5, "category": np.asarray(batch["category"])})
    return all_at_end(preds, dm.categories)


def test_streamed_metrics_equal_all_at_end_one_process_and_ddp(runs):
    out, root = runs
    ref = json.loads(json.dumps(reference(root)))  # same float -> JSON round trip as the runs
    single = json.loads((out / "single_0.json").read_text())
    assert list(single["results"]["categories"]) == ["bottle", "cable", "capsule"]
    metrics = {k: single["results"][k] for k in ("categories", "mean")}
    assert metrics == ref  # exactly, not approximately
    # no crop here: every defect is kept whole, and the per-category crop check says so
    crops = single["results"]["crop_check"]
    assert list(crops) == ["bottle", "cable", "capsule"]
    assert all(c["partly_outside"] == c["wholly_outside"] == 0 and c["mask_pixels_kept"] == 1.0 for c in crops.values())
    for rank in (0, 1):
        ddp = json.loads((out / f"ddp_{rank}.json").read_text())
        assert {k: ddp["results"][k] for k in ("categories", "mean")} == ref, rank
        assert ddp["results"]["crop_check"] == crops, rank
    # rank 1 got the padding copy of index 0 (a 'bottle' image) in its last batch
    rank1 = json.loads((out / "ddp_1.json").read_text())["rows"]
    assert rank1[-1]["index"][-1] == 0 and rank1[-1]["category"][-1] == "bottle"


def test_categories_are_reduced_before_the_end_of_testing(runs):
    out, _ = runs
    single = json.loads((out / "single_0.json").read_text())
    # 11 images, batch 3: bottle (0-3) ends in batch 2, cable (4-7) in batch 3, capsule at the end
    assert single["batches"] == 4
    assert single["reduced_at"] == {"bottle": 2, "cable": 3, "capsule": 4}
    for rank in (0, 1):
        ddp = json.loads((out / f"ddp_{rank}.json").read_text())
        # rank r holds indices r, r+2, ...: 2 batches of 3; bottle is released before the last batch
        assert ddp["batches"] == 2 and ddp["reduced_at"]["bottle"] < 2, ddp["reduced_at"]


def test_bit_packed_masks_and_float32_maps_round_trip():
    from iad_lightning.methods.category_buffer import CategoryBuffer

    rng = np.random.default_rng(0)
    buf = CategoryBuffer({"a": 3, "b": 5})
    masks = rng.random((5, 7, 9)) > 0.5  # odd sizes: bits do not fill whole bytes
    maps = rng.random((5, 7, 9)).astype(np.float32)
    cats = np.array(["a", "a", "a", "b", "b"])
    buf.add({"index": np.arange(2), "category": cats[:2], "mask": masks[:2], "anomaly_map": maps[:2]})
    assert buf.ready() == []
    buf.add({"index": np.arange(2, 5), "category": cats[2:], "mask": masks[2:], "anomaly_map": maps[2:]})
    assert buf.ready() == ["a"]
    a = buf.release("a")
    np.testing.assert_array_equal(a["mask"], masks[:3])
    assert a["mask"].dtype == np.bool_ and a["anomaly_map"].dtype == np.float32
    np.testing.assert_array_equal(a["anomaly_map"], maps[:3])
    buf.add({"index": np.array([0]), "category": np.array(["a"]), "mask": masks[:1], "anomaly_map": maps[:1]})  # padding copy
    with pytest.raises(RuntimeError, match="in order"):  # a real late image is an error, never dropped
        buf.add({"index": np.array([7]), "category": np.array(["a"]), "mask": masks[:1], "anomaly_map": maps[:1]})
    assert buf.rest() == ["b"]
    np.testing.assert_array_equal(buf.release("b")["mask"], masks[3:])
