"""The datamodule: splits, unified mode, transforms of image and mask, the batch contract."""

import numpy as np
import pytest
import torch

from iad_lightning.data.datamodule import AnomalyDataModule, split_validation
from iad_lightning.data.records import Record
from iad_lightning.data.transforms import PairTransform, Preprocess
from iad_lightning.errors import ConfigError, DatasetError

from . import fixtures as fx


def _dm(root, **kw) -> AnomalyDataModule:
    dm = AnomalyDataModule(format="mvtec", root=str(root), batch_size=2, **kw)
    dm.preprocess = Preprocess(resize=32, crop=24)
    return dm


def test_unified_mode_and_batch_contract(tmp_path):
    root = fx.make_mvtec(tmp_path / "mv")
    dm = _dm(root, category="all")
    dm.setup("fit")
    assert dm.categories == ["bottle", "cable"]
    splits = dm.index_records()
    assert len(splits["train"]) == 4 and len(splits["test"]) == 8 and not splits["val"]
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"image", "mask", "label", "category", "path", "index", "mask_kept"}
    assert batch["image"].shape == (2, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (2, 1, 24, 24)
    assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
    for label, mask in zip(batch["label"], batch["mask"]):
        assert bool(mask.any()) == bool(label)


def test_single_category_and_list(tmp_path):
    root = fx.make_mvtec(tmp_path / "mv")
    dm = _dm(root, category="cable")
    dm.setup()
    assert dm.categories == ["cable"] and {r.category for r in dm.index_records()["test"]} == {"cable"}
    dm = _dm(root, category=["cable", "bottle"])
    dm.setup()
    assert dm.categories == ["cable", "bottle"]
    with pytest.raises(DatasetError, match="unknown category.*'nope'"):
        _dm(root, category="nope").setup()


def test_validation_split_is_from_train_good_only_and_deterministic():
    recs = [Record(f"/x/{c}/{i}.png", 0, c, "train") for c in ("a", "b") for i in range(10)]
    train, val = split_validation(recs, 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert {r.category for r in val} == {"a", "b"} and all(r.label == 0 for r in val)
    assert split_validation(recs, 0.2, seed=3) == (train, val)
    assert not set(r.image for r in train) & set(r.image for r in val)
    with pytest.raises(ConfigError, match="val_fraction"):
        split_validation(recs, 1.0, seed=0)


def test_val_fraction_never_touches_test(tmp_path):
    root = fx.make_mvtec(tmp_path / "mv")
    dm = _dm(root, val_fraction=0.5)
    dm.setup()
    splits = dm.index_records()
    assert len(splits["val"]) == 2 and len(splits["train"]) == 2 and len(splits["test"]) == 8
    assert all("/train/" in r.image for r in splits["val"])


def test_pair_transform_resize_crop_normalise():
    from PIL import Image

    img = Image.fromarray(np.full((40, 80, 3), 255, np.uint8))
    mask = np.zeros((40, 80), bool)
    mask[10:30, 38:42] = True
    t = PairTransform(Preprocess(resize=20, crop=16, mean=(0.5,) * 3, std=(0.5,) * 3))
    x, m = t(img, mask)
    assert x.shape == (3, 16, 16) and m.shape == (1, 16, 16)
    assert torch.allclose(x, torch.ones_like(x))  # (1 - 0.5) / 0.5
    assert m.sum() > 0 and set(m.unique().tolist()) <= {0.0, 1.0}
    assert Preprocess(resize=256, crop=224).output_size == (224, 224)


def test_loader_without_preprocess_or_train_images(tmp_path):
    root = fx.make_mvtec(tmp_path / "mv")
    dm = AnomalyDataModule(format="mvtec", root=str(root))
    with pytest.raises(ConfigError, match="preprocess"):
        dm.test_dataloader()


def test_fit_split_serves_labelled_test_images_and_warns_on_test(tmp_path):
    """data.fit_split=test is the auxiliary-data protocol (AnomalyCLIP, ADPretrain): the train
    loader serves the labelled test split of all categories, masks included; 'all' adds train."""
    root = fx.make_mvtec(tmp_path / "mv")
    dm = _dm(root, fit_split="test")
    dm.setup("fit")
    assert dm.fits_on_test
    seen = [b for b in dm.train_dataloader()]
    labels = torch.cat([torch.as_tensor(b["label"]) for b in seen])
    assert len(labels) == 8 and set(labels.tolist()) == {0, 1}
    assert all(bool(m.any()) == bool(lab) for b in seen for m, lab in zip(b["mask"], b["label"]))
    assert {c for b in seen for c in b["category"]} == {"bottle", "cable"}
    with pytest.warns(UserWarning, match="NOT held-out"):
        dm.test_dataloader()
    both = _dm(root, fit_split="all")
    both.setup()
    assert len(both.fit_records()) == 4 + 8
    plain = _dm(root)
    plain.setup()
    assert not plain.fits_on_test and [r.split for r in plain.fit_records()] == ["train"] * 4
    with pytest.raises(ConfigError, match="fit_split='val'"):
        _dm(root, fit_split="val")


def test_items_are_built_with_one_intra_op_thread_and_the_count_is_restored(tmp_path, monkeypatch):
    """The per-item tensor ops run single-threaded in the main process (an OpenMP team waiting for
    a descheduled thread made them ~100x slower on a busy machine); the caller's count comes back."""
    root = fx.make_mvtec(tmp_path / "mv")
    dm = _dm(root, category="bottle")
    dm.setup("test")
    dataset = dm.dataset("test")
    seen = []
    apply = dataset.transform.apply
    monkeypatch.setattr(dataset.transform, "apply", lambda *a: (seen.append(torch.get_num_threads()), apply(*a))[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dataset[0]
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_num_workers_capped_at_the_usable_cpus(monkeypatch, caplog):
    """More loader processes than the process's CPUs only compete (torch warns on every loader):
    lowered to the CPU count, logged once per process; fewer are kept."""
    import logging

    from iad_lightning.data import datamodule as dmod

    monkeypatch.setattr(dmod.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(dmod, "_LOWERED", set())
    with caplog.at_level(logging.INFO, logger=dmod.__name__):
        assert [dmod.usable_workers(n) for n in (0, 1, 2, 4, 8, 4)] == [0, 1, 2, 2, 2, 2]
    lines = [r.getMessage() for r in caplog.records if "lowered" in r.getMessage()]
    assert lines == ["data.num_workers=4 lowered to 2, the CPUs this process may use",
                     "data.num_workers=8 lowered to 2, the CPUs this process may use"]
