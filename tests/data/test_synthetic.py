"""The procedural ``synthetic`` dataset: layout, determinism, exact masks, atomic generation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iad_lightning.data.formats import synthetic
from iad_lightning.data.formats.base import get_index
from iad_lightning.data.formats.synthetic import CATEGORIES, DEFECTS, Synthetic, render_sample
from iad_lightning.errors import DatasetError

SMALL = {"image_size": 64, "n_train": 3, "n_test_good": 2, "n_test_defect": 4}
SURFACE, PARTS = {"scratch", "hole", "stain"}, {"missing", "misplaced"}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _load(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Synthetic:
    """All categories at 64 px, generated once for the module."""
    index = get_index("synthetic", tmp_path_factory.mktemp("synthetic"), **SMALL)
    index.prepare()
    return index


def test_categories_and_defect_kinds() -> None:
    assert len(CATEGORIES) >= 4
    textures = [c for c in CATEGORIES if set(DEFECTS[c]) <= SURFACE]
    objects = [c for c in CATEGORIES if set(DEFECTS[c]) & PARTS]
    assert textures and objects and len(textures) + len(objects) == len(CATEGORIES)
    assert all(len(DEFECTS[c]) >= 3 for c in CATEGORIES)
    assert set().union(*DEFECTS.values()) == SURFACE | PARTS


def test_layout_counts_and_masks(small: Synthetic) -> None:
    assert isinstance(small, Synthetic) and small.categories() == list(CATEGORIES)
    assert small.folder.name == "synthetic-v1-s0-64-3-2-4"
    for category in CATEGORIES:
        records = small.records(category)
        train = [r for r in records if r.split == "train"]
        good = [r for r in records if r.split == "test" and r.label == 0]
        bad = [r for r in records if r.split == "test" and r.label == 1]
        assert (len(train), len(good), len(bad)) == (3, 2, 4)
        assert all(r.category == category and r.label == 0 and r.masks == () for r in train + good)
        kinds = DEFECTS[category]
        assert sorted(r.defect for r in bad) == sorted(kinds[i % len(kinds)] for i in range(4))
        for r in train + good:
            assert _load(r.image).shape == (64, 64, 3)
        for r in bad:
            mask = _load(r.masks[0])
            assert Path(r.masks[0]).name == Path(r.image).stem + "_mask.png"
            assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}


@pytest.mark.parametrize("category", CATEGORIES)
def test_masks_are_exactly_the_changed_pixels(category: str) -> None:
    for i, kind in enumerate(DEFECTS[category]):
        sample = render_sample(category, "test_defect", i, seed=3, image_size=64)
        assert sample.defect == kind and sample.mask.any()
        assert np.array_equal((sample.image != sample.clean).any(-1), sample.mask)
        good = render_sample(category, "test_good", i, seed=3, image_size=64)
        assert not good.mask.any() and good.image is good.clean


def test_written_files_match_the_renders(small: Synthetic) -> None:
    bad = [r for r in small.records("pcb") if r.label == 1]
    for r in bad:
        i = int(Path(r.image).stem) * len(DEFECTS["pcb"]) + DEFECTS["pcb"].index(r.defect)
        sample = render_sample("pcb", "test_defect", i, seed=0, image_size=64)
        assert np.array_equal(_load(r.image), sample.image)
        assert np.array_equal(_load(r.masks[0]) > 0, sample.mask)


def test_deterministic_and_order_independent(tmp_path: Path) -> None:
    options = dict(SMALL, categories=["fabric", "pcb"])
    a, b = Synthetic(tmp_path / "a", **options), Synthetic(tmp_path / "b", **options)
    a.prepare(["fabric", "pcb"])
    b.prepare(["pcb", "fabric"])
    assert _files(a.folder) == _files(b.folder)
    other = Synthetic(tmp_path / "c", **dict(options, seed=1))
    other.prepare()
    theirs = _files(other.folder)
    differing = [k for k, v in _files(a.folder).items() if k.endswith(".png") and theirs.get(k) != v]
    assert len(differing) == len([k for k in theirs if k.endswith(".png")])


def test_defects_stand_out_from_normal_variation(small: Synthetic) -> None:
    """Not a model: the distance to the per-pixel median of train images is larger inside masks."""
    for category in CATEGORIES:
        records = small.records(category)
        median = np.median([_load(r.image).astype(float) for r in records if r.split == "train"], axis=0)
        inside, outside = [], []
        for r in (r for r in records if r.label == 1):
            dist, mask = np.abs(_load(r.image) - median).mean(-1), _load(r.masks[0]) > 0
            inside.append(dist[mask].mean())
            outside.append(dist[~mask].mean())
        assert np.mean(inside) > 1.1 * np.mean(outside), category


def test_leftovers_are_never_taken_as_complete(tmp_path: Path) -> None:
    index = Synthetic(tmp_path, **dict(SMALL, categories="fabric"))
    index.folder.mkdir(parents=True)
    leftover = index.folder / ".tmp-fabric-1-deadbeef"  # a crashed run's temporary copy
    (leftover / "train" / "good").mkdir(parents=True)
    (leftover / "train" / "good" / "000.png").write_bytes(b"junk")
    partial = index.folder / "fabric" / "train" / "good"  # a half-written category, no marker
    partial.mkdir(parents=True)
    (partial / "000.png").write_bytes(b"junk")
    (partial / "999.png").write_bytes(b"junk")
    records = index.records("fabric")
    assert len(records) == 3 + 2 + 4 and not (partial / "999.png").exists()
    assert all(_load(r.image).shape == (64, 64, 3) for r in records)
    assert not [p for p in index.folder.iterdir() if p.name.startswith(".stale")]


def test_interrupted_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = Synthetic(tmp_path, **dict(SMALL, categories="wood"))
    calls = []

    def crash(*args: object) -> None:
        calls.append(args)
        if len(calls) == 4:
            raise RuntimeError("killed")

    monkeypatch.setattr(synthetic, "_write_sample", crash)
    with pytest.raises(RuntimeError, match="killed"):
        index.prepare()
    assert os.listdir(index.folder) == []
    monkeypatch.undo()
    assert len(index.records("wood")) == 9


def test_losing_the_rename_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes generate the same category: the second rename fails and its copy is dropped."""
    options = dict(SMALL, categories="gear")
    publish, rivals = synthetic._publish, []

    def rival_publishes_first(tmp: Path, final: Path) -> None:
        if not rivals:  # another process finishes first, while our copy waits to be renamed
            rivals.append(Synthetic(tmp_path, **options))
            rivals[0].prepare()
            assert (final / synthetic.MARKER).is_file()
        publish(tmp, final)

    monkeypatch.setattr(synthetic, "_publish", rival_publishes_first)
    index = Synthetic(tmp_path, **options)
    index.prepare()
    assert rivals and os.listdir(index.folder) == ["gear"]  # the loser's temporary copy is gone
    assert len(index.records("gear")) == 9


def test_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="categories"):
        Synthetic(tmp_path, categories="fabric,nope")
    with pytest.raises(DatasetError, match="image_size"):
        Synthetic(tmp_path, image_size=8)
    with pytest.raises(DatasetError, match="unknown option"):
        get_index("synthetic", tmp_path, colour="red")
    assert Synthetic(tmp_path, categories="pcb, fabric").categories() == ["fabric", "pcb"]
    assert not list(tmp_path.iterdir())  # nothing is generated before records() or prepare()
