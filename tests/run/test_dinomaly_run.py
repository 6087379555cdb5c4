"""Dinomaly through train.py / test.py / export on a tiny random DINOv2-reg ViT (width 128,
2 heads, 12 blocks, native grid 5 x 5) given as a file in META's layout, at 56 px -> crop 42
(3 x 3 patches), maps at 32 px. Unified over two synthetic categories.

What a run must do: metrics per category, the loss falls, the LR is stepped per iteration and the
unified recipe's eps is used, test.py reproduces the results without the weights file, an
official-layout model.pth written from the trained run evaluates to the same results with
``trainer.max_steps=0``, exports equal eager, a resumed run equals an uninterrupted one, and 2
DDP processes equal 1.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_dinomaly_model import meta_layout, random_timm_state  # noqa: E402
from test_entrypoints import run  # noqa: E402

from iad_lightning.models.dinomaly import warm_cosine_lr  # noqa: E402

GEOMETRY = ["method=dinomaly", "data=synthetic", "method.model.encoder=vit_small_patch14_reg4_dinov2",
            "method.model.crop=42", "method.image_size=56", "method.model.map_size=32", "trainer.accelerator=cpu"]
STEPS = 6
RECIPE = ["method.total_iters=6", "method.warmup_iters=2", "method.p_ramp=2"]  # a 6-iteration schedule


def _meta_file(root: Path) -> Path:
    path = root / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(meta_layout(random_timm_state(0)), path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dinomaly")
    meta = _meta_file(root)
    out = root / "run"
    run("train.py", *GEOMETRY, "data.category=[fabric,wood]", f"method.model.encoder_weights={meta}", *RECIPE,
        f"trainer.max_steps={STEPS}", "callbacks.visualizer.n_images=1", f"hydra.run.dir={out}")
    return out, meta


def test_unified_run_learns_with_the_per_iteration_schedule(trained):
    out, _ = trained
    res = json.loads((out / "results.json").read_text())
    assert list(res["categories"]) == ["fabric", "wood"]
    assert all(v is not None and 0.0 <= v <= 1.0 for m in [*res["categories"].values(), res["mean"]] for v in m.values())
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    sched, opt = ckpt["lr_schedulers"][0], ckpt["optimizer_states"][0]
    assert sched["last_epoch"] == STEPS  # stepped per iteration, not per epoch
    assert sched["_last_lr"][0] == pytest.approx(warm_cosine_lr(STEPS, 2e-3, 2e-4, 6, 2))
    assert opt["param_groups"][0]["eps"] == 1e-10 and opt["param_groups"][0]["amsgrad"]  # unified recipe
    cfg = ckpt["iad_method_config"]["model"]
    assert cfg["arch"]["embed_dim"] == 128 and cfg["encoder_weights"].endswith(".pth")
    lines = (out / "csv" / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("train/loss_epoch")
    losses = [float(r.split(",")[col]) for r in lines[1:] if r.split(",")[col]]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], losses  # 28 train images: 2 iterations an epoch


def test_test_py_reproduces_without_the_weights_file(trained, tmp_path):
    out, meta = trained
    moved = meta.with_suffix(".away")
    meta.rename(moved)  # test.py must not need the encoder file: its tensors are in the checkpoint
    try:
        run("test.py", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", "data=synthetic", "data.category=[fabric,wood]",
            "trainer.accelerator=cpu", "callbacks=none", "logger=none", f"hydra.run.dir={tmp_path}")
    finally:
        moved.rename(meta)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads((out / "results.json").read_text())


def test_official_model_pth_evaluates_as_its_source_without_training(trained, tmp_path):
    """encoder.* (Meta's file) + the trained bottleneck.0.* / decoder.i.* in the official layout;
    max_steps=0 evaluates it; encoder_weights stays 'hub' and is never touched (offline)."""
    out, meta = trained
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    official = {f"encoder.{k}": v for k, v in torch.load(meta, weights_only=True).items()}
    official.update({k.removeprefix("model."): v for k, v in state.items() if k.startswith(("model.bottleneck.", "model.decoder."))})
    torch.save(official, tmp_path / "model.pth")
    run("train.py", *GEOMETRY, "data.category=[fabric,wood]", f"method.official_checkpoint={tmp_path / 'model.pth'}",
        "trainer.max_steps=0", "callbacks=none", "logger=none", f"hydra.run.dir={tmp_path / 'eval'}")
    got = json.loads((tmp_path / "eval" / "results.json").read_text())
    want = json.loads((out / "results.json").read_text())
    for cat, metrics in want["categories"].items():
        assert got["categories"][cat] == pytest.approx(metrics, abs=1e-6), cat


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_equals_eager(trained, tmp_path, fmt, capsys):
    from iad_lightning.export import main

    out, _ = trained
    assert main([f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", f"format={fmt}", f"output={tmp_path / 'm'}"]) == 0
    printed = capsys.readouterr().out
    assert f"exported Dinomaly ({fmt}" in printed and "max abs diff vs eager" in printed


def test_ddp_two_processes_equal_one(tmp_path):
    """One category, 16 train images = one batch of 16 (1 process) or 2 x 8 (2 processes, gloo):
    the same global batch, so with the dropout off and the hard-mining threshold taken over the
    gathered batch (p = 0.9 from iteration 1) the two runs train the same weights."""
    common = [*GEOMETRY, "data.category=[fabric]", "method.model.encoder_weights=random",
              "+method.model.arch={embed_dim:64,num_heads:2,depth:12,img_size:70}", "method.bottleneck_dropout=0",
              "method.total_iters=3", "method.warmup_iters=2", "method.p_ramp=1", "trainer.max_steps=3",
              "threshold.holdout_fraction=0", "callbacks=none", "logger=none"]
    run("train.py", *common, f"hydra.run.dir={tmp_path / 'one'}")
    run("train.py", *common, "trainer=ddp", "trainer.devices=2", f"hydra.run.dir={tmp_path / 'two'}")
    ck = [torch.load(next((tmp_path / d / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=True)
          for d in ("one", "two")]
    assert ck[0]["global_step"] == ck[1]["global_step"] == 3  # per device 16 / 2 = 8
    for key, value in ck[0]["state_dict"].items():
        if key.startswith("model.decoder.") or key.startswith("model.bottleneck."):
            torch.testing.assert_close(ck[1]["state_dict"][key], value, atol=2e-5, rtol=1e-4, msg=key)
    res = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two")]
    assert res[1]["categories"]["fabric"] == pytest.approx(res[0]["categories"]["fabric"], abs=1e-4)


def test_a_killed_run_resumes_to_the_uninterrupted_result(trained, tmp_path):
    """Killed (SIGKILL) after its periodic checkpoint at iteration 3 of 6 (mid-epoch), resumed
    from that last.ckpt: the same weights, StableAdamW moments and per-iteration LR as the
    uninterrupted run (dropout streams, data order, p and the schedule continue)."""
    from test_resume import _killed_run

    out, meta = trained
    common = [*GEOMETRY, "data.category=[fabric,wood]", f"method.model.encoder_weights={meta}", *RECIPE,
              f"trainer.max_steps={STEPS}", "test=false", "callbacks.visualizer.n_images=0", "logger=none",
              "callbacks.model_checkpoint.every_n_train_steps=3"]
    ckpt = _killed_run(tmp_path / "a", common)
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 3
    run("train.py", *common, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'b'}")
    full = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == STEPS and resumed["lr_schedulers"][0]["_last_lr"] == full["lr_schedulers"][0]["_last_lr"]
    for key, value in full["state_dict"].items():
        if key.startswith(("model.bottleneck.", "model.decoder.")):
            torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    for i, state in full["optimizer_states"][0]["state"].items():
        torch.testing.assert_close(resumed["optimizer_states"][0]["state"][i]["max_exp_avg_sq"], state["max_exp_avg_sq"])


def test_a_run_stopped_at_an_epoch_end_resumes_longer_to_the_uninterrupted_result(trained, tmp_path):
    """``trainer.max_steps=4`` ends on the last batch of epoch 2 (32 images, batch 16); resumed from
    its last.ckpt with ``trainer.max_steps=6``: the uninterrupted 6-iteration run (Lightning alone
    trains one batch too many in the finished epoch; ``checkpoint.close_finished_epoch``)."""
    out, meta = trained
    common = [*GEOMETRY, "data.category=[fabric,wood]", f"method.model.encoder_weights={meta}", *RECIPE,
              "test=false", "callbacks.visualizer.n_images=0", "logger=none"]
    run("train.py", *common, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'a'}")
    first = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["global_step"] == 4
    run("train.py", *common, f"trainer.max_steps={STEPS}", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={tmp_path / 'b'}")
    full = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (resumed["global_step"], resumed["epoch"]) == (full["global_step"], full["epoch"]) == (STEPS, 3)
    assert resumed["lr_schedulers"][0]["_last_lr"] == full["lr_schedulers"][0]["_last_lr"]
    for key, value in full["state_dict"].items():
        if key.startswith(("model.bottleneck.", "model.decoder.")):
            torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_predict_gives_the_test_path_score_for_every_file(trained):
    """iad_lightning.load(...).predict on the test image FILES = the module's scores on the test
    loader's batches (the geometry and the score come from the checkpoint alone)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import iad_lightning
    from iad_lightning.checkpoint import load_method

    out, _ = trained
    ckpt = out / "checkpoints" / "last.ckpt"
    method = load_method(ckpt).eval()
    cfg = OmegaConf.load(out / ".hydra" / "config.yaml")
    cfg.paths.output_dir = str(out)
    dm = instantiate(cfg.data, batch_size=8)
    dm.preprocess = method.preprocess
    dm.setup("test")
    paths, scores = [], []
    with torch.no_grad():
        for batch in dm.test_dataloader():
            paths += list(batch["path"])
            scores.append(method.predict_batch(batch["image"])["pred_score"])
    pred = iad_lightning.load(ckpt, device="cpu").predict(paths, batch_size=5)
    assert len(paths) == 36
    torch.testing.assert_close(torch.as_tensor(pred.scores, dtype=torch.float32), torch.cat(scores), atol=1e-6, rtol=1e-5)
    assert pred.maps[0].shape == (42, 42)
