"""ADPretrain through train.py as a user runs it: pretrain on synthetic data (Lite0 stand-in,
labelled test split), then PatchCore with the projector the run wrote
(and its checkpoint rebuilt as test.py does). Tiny sizes (64 px, 32 reference tokens, 1 epoch): the
test pins the plumbing, not accuracy (bench/adpretrain.py measures that)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_entrypoints import run  # noqa: E402

DATA = [
    "backbone=lite0",
    "data.category=gear",
    "data.options.n_train=4",
    "data.options.n_test_good=2",
    "data.options.n_test_defect=4",
    "data.batch_size=4",
    "trainer.accelerator=cpu",
]


@pytest.fixture(scope="module")
def projector(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adpretrain")
    run("train.py", "method=adpretrain", *DATA, "data.fit_split=test", "method.image_size=56",
        "method.model.num_ref_tokens=32", "trainer.max_epochs=1", "method.cache_references=true",
        # the authors' test-set model selection, a named option (off by default): on another category
        "method.selection={format:synthetic,root:${data.root},category:wood,options:${data.options},"
        "metric:image_auroc,shots:2}",
        f"hydra.run.dir={out}")
    return out / "projector.pt"


def test_selection_option_writes_the_selected_projector_next_to_the_last_epoch(projector):
    best = torch.load(projector.with_name("projector_best.pt"), map_location="cpu", weights_only=True)
    last = torch.load(projector, map_location="cpu", weights_only=True)
    assert set(best["selection"]) == {"image_auroc"} and 0.0 <= best["selection"]["image_auroc"] <= 1.0
    assert "selection" not in last and last["epochs"] == best["epochs"] == 1  # the default stays the last epoch


def test_uniad_with_the_projector_concatenates_the_four_levels(projector, tmp_path):
    out = tmp_path / "uniad"
    run("train.py", "method=uniad", *DATA, f"method.projector={projector}", "method.image_size=56",
        "method.neighbor_size=[1,1]", "trainer.max_epochs=1", "callbacks.visualizer.n_images=0",
        f"hydra.run.dir={out}")
    res = json.loads((out / "results.json").read_text())
    assert res["mean"]["image_auroc"] is not None and res["mean"]["pixel_aupro"] is not None
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state["model.input_proj.weight"].shape == (256, 24 + 40 + 112 + 320)  # 4 projected levels
    assert state["feature_extractor.bank_l1"].shape == (4 * 4 * 4, 24)  # 4 shots x the 4x4 grid (56 px / 14)
    assert bytes(state["feature_extractor.bank_names"].tolist()).decode() == "gear"  # one bank per class


def test_pretraining_writes_a_safe_projector_file(projector):
    blob = torch.load(projector, map_location="cpu", weights_only=True)
    assert blob["backbone"] == "tf_efficientnet_lite0" and blob["levels"] == [1, 2, 3, 4]
    assert blob["image_size"] == 56 and blob["channels"] == [24, 40, 112, 320]
    assert [tuple(c.shape) for c in blob["centers"]] == [(24,), (40,), (112,), (320,)]
    assert any(float(c.abs().sum()) > 0 for c in blob["centers"])  # centres were computed
    assert blob["projectors"]["l1_proj.x_ref"].shape == (1, 32, 24)
    # the run's own Lightning checkpoint (resume) is safe too: no pickled model factory in it
    ckpt = torch.load(projector.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert "model" not in ckpt["hyper_parameters"]


def test_patchcore_with_the_projector_and_test_py(projector, tmp_path):
    out = tmp_path / "pc"
    run("train.py", "method=patchcore", *DATA, f"method.projector={projector}", "method.resize=56",
        "method.crop=56", "method.coreset_ratio=0.5", "callbacks.visualizer.n_images=1", f"hydra.run.dir={out}")
    res = json.loads((out / "results.json").read_text())
    assert res["mean"]["image_auroc"] is not None and res["mean"]["pixel_aupro"] is not None
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state["feature_extractor.bank_l2"].shape == (4 * 16, 40)  # 4 shots (all train images) x 4x4 grid
    assert "feature_extractor.projector.l2_proj.x_ref" in state and "feature_extractor.bank_l1" not in state
    from iad_lightning.checkpoint import load_method  # what test.py does: rebuild without re-fitting

    reloaded = load_method(out / "checkpoints" / "last.ckpt")
    assert torch.equal(reloaded.feature_extractor.bank_l4, state["feature_extractor.bank_l4"])


def test_backbone_mismatch_is_a_clear_error(projector):
    from iad_lightning.errors import ConfigError
    from iad_lightning.methods.featurenorm import FeatureNorm

    with pytest.raises(ConfigError, match="method.backbone.name=tf_efficientnet_lite0"):
        FeatureNorm({"name": "clip-base", "weights": "none"}, projector=str(projector))
