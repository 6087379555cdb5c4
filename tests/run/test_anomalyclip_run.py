"""AnomalyCLIP through train.py / test.py on a tiny random CLIP (OpenAI-layout state dict file).

The auxiliary protocol as a user runs it: prompts trained on the labelled test split of one
dataset (MVTec layout fixture, ``data.fit_split=test``), evaluated zero-shot on another data
config (VisA layout fixture, ``eval_data=visa``) in the same run; then test.py on the checkpoint
(no CLIP file needed), an official-layout ``epoch_15.pth`` built from the trained prompts
started from without training, a medical meta.json set with an image-only class, and export.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_entrypoints import fx, run  # noqa: E402
from tiny_clip import write_tiny_clip  # noqa: E402

TINY = [
    "method=anomalyclip",
    "method.model.image_size=64",  # 8 x 8 patches on the 32 px-native tiny CLIP (resized pos-embed)
    "method.model.features_list=[4]",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "callbacks.visualizer.n_images=1",
    "logger=csv",
]


def test_config_paper_defaults_and_every_eval_data_option_composes():
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", ["method=anomalyclip", "data=visa", "data.fit_split=test", "eval_data=mvtec"])
        m = cfg.method
        assert (m.model.model_name, m.model.clip_weights, m.model.image_size) == ("ViT-L-14-336-quickgelu", "openai", 518)
        assert (list(m.model.features_list), m.lambda_local, m.model.temperature, m.model.n_ctx) == ([24], 4.0, 0.07, 12)
        assert (m.lr, list(m.betas), m.sigma, cfg.seed) == (1e-3, [0.5, 0.999], 4.0, 111)
        assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.data.fit_split) == (15, 8, "test")
        assert (cfg.data.format, cfg.eval_data.format) == ("visa", "mvtec")
        assert compose("train", []).get("eval_data") is None  # every other run: test on data's own test split
        for option in sorted(p.stem for p in (conf / "eval_data").glob("*.yaml")):
            assert compose("train", [f"eval_data={option}"]).eval_data.format == option


def test_evaluating_on_the_training_dataset_warns(tmp_path, recwarn):
    from iad_lightning.run import _warn_if_fitted_on

    fit = {"format": "visa", "root": str(tmp_path / "visa"), "category": "all", "fit_split": "test"}
    with pytest.warns(UserWarning, match="NOT zero-shot"):
        _warn_if_fitted_on(fit, {**fit, "root": str(tmp_path / "x" / ".." / "visa"), "fit_split": "train"})
    _warn_if_fitted_on(fit, {**fit, "format": "mvtec"})
    _warn_if_fitted_on(None, fit)
    assert not [w for w in recwarn if "zero-shot" in str(w.message)]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("acl")
    return {
        "clip": write_tiny_clip(base / "tiny_clip.pt"),
        "mvtec": fx.make_mvtec(base / "mvtec"),
        "visa": fx.make_visa(base / "visa"),
        "medical": fx.make_anomalyclip_medical(base / "medical"),
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, roots) -> Path:
    out = tmp_path_factory.mktemp("train")
    run("train.py", *TINY, f"method.model.clip_weights={roots['clip']}", "data=mvtec", f"data.root={roots['mvtec']}",
        "data.fit_split=test", "data.batch_size=4", "trainer.max_epochs=2", "eval_data=visa",
        f"eval_data.root={roots['visa']}", "eval_data.num_workers=0", f"hydra.run.dir={out}")
    return out


def test_zero_shot_run_trains_prompts_and_evaluates_another_dataset(trained, roots):
    res = json.loads((trained / "results.json").read_text())
    assert list(res["categories"]) == ["candle", "capsules"]  # the eval_data categories, all of them
    assert all(v is not None for v in res["mean"].values())
    assert res["trained_on"] == {
        "data": {"format": "mvtec", "root": str(roots["mvtec"]), "category": "all", "fit_split": "test"},
        "train_steps": 4,  # 8 test images of 2 categories, batch 4, 2 epochs
    }
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert ckpt["iad_method_config"]["model"]["arch"]["vision_cfg"]["width"] == 128
    assert "model.clip.visual.proj" in sd  # the frozen CLIP travels with the checkpoint
    init = torch.load(roots["clip"], map_location="cpu", weights_only=True)
    assert torch.equal(sd["model.clip.visual.proj"], init["visual.proj"].float())  # frozen
    lines = (trained / "csv" / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("train/loss")
    losses = [float(r.split(",")[col]) for r in lines[1:] if r.split(",")[col]]
    assert len(losses) == 2 and losses[1] < losses[0], losses  # per epoch


def test_test_py_reproduces_without_the_clip_file(trained, roots, tmp_path):
    expected = json.loads((trained / "results.json").read_text())
    out = tmp_path / "test"
    moved = roots["clip"].with_suffix(".away")
    roots["clip"].rename(moved)  # test.py must not need the CLIP weights file
    try:
        proc = run("test.py", f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}", "data=visa", f"data.root={roots['visa']}",
            "data.num_workers=0", "trainer.accelerator=cpu", "callbacks.visualizer.n_images=1", f"hydra.run.dir={out}")
    finally:
        moved.rename(roots["clip"])
    assert "NOT zero-shot" not in proc.stderr  # trained on mvtec, tested on visa
    assert json.loads((out / "results.json").read_text()) == expected  # trained_on travels too


def test_official_prompt_checkpoint_zero_epoch_run_gives_the_trained_scores(trained, roots, tmp_path, capsys):
    """run.train in-process (the train.py body, Hydra-composed) with method.prompt_checkpoint and
    0 epochs, on an official-layout epoch_15.pth mapped by hand from the trained state dict."""
    from hydra import compose, initialize_config_dir

    from iad_lightning.run import train

    expected = json.loads((trained / "results.json").read_text())
    sd = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    p = "model.prompt_learner."
    official = {
        "ctx_pos": sd[p + "ctx_normal"].reshape(1, 1, 12, -1),
        "ctx_neg": sd[p + "ctx_abnormal"].reshape(1, 1, 12, -1),
        **{f"compound_prompts_text.{i}": sd[f"{p}compound.{i}"] for i in range(8)},
        **{f"compound_prompt_projections.{i}.{n}": torch.randn(896, 64) if n == "weight" else torch.randn(896)
           for i in range(8) for n in ("weight", "bias")},  # dead in the official forward
    }
    prompt_file = tmp_path / "epoch_15.pth"
    torch.save({"prompt_learner": official, "epoch": 15}, prompt_file)
    out = tmp_path / "official"
    overrides = [*(o for o in TINY if not o.startswith(("callbacks.", "logger="))), "logger=none", "callbacks=none", f"method.model.clip_weights={roots['clip']}",
                 f"method.prompt_checkpoint={prompt_file}", "trainer.max_epochs=0", "data=visa",
                 f"data.root={roots['visa']}", "eval_data=visa", f"eval_data.root={roots['visa']}",
                 "eval_data.num_workers=0", f"paths.output_dir={out}", "+trainer.enable_progress_bar=false"]
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with pytest.warns(UserWarning, match="NOT zero-shot"):  # evaluated on the dataset it was run on
        train(cfg)
    assert "16 dead compound_prompt_projections" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["trained_on"] == {"prompt_checkpoint": str(prompt_file), "train_steps": 0}
    assert {k: res[k] for k in ("categories", "mean")} == {k: expected[k] for k in ("categories", "mean")}


def test_medical_meta_json_with_image_only_class_and_export(trained, roots, tmp_path):
    import lightning as L
    import onnxruntime as ort

    from iad_lightning.checkpoint import load_method
    from iad_lightning.data.datamodule import AnomalyDataModule
    from iad_lightning.export import ExportConfig, export

    model = load_method(trained / "checkpoints" / "last.ckpt")
    assert model.trained_on["data"]["format"] == "mvtec"  # restored from the checkpoint
    dm = AnomalyDataModule("anomalyclip", str(roots["medical"]), batch_size=4, num_workers=0)
    dm.preprocess = model.preprocess
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.test(model, datamodule=dm, verbose=False)
    cats = model.results["categories"]
    assert cats["colon"]["pixel_auroc"] is not None and cats["colon"]["image_auroc"] is not None
    assert cats["brain"]["image_auroc"] is not None and cats["brain"]["pixel_auroc"] is None  # image-only

    path = export(ExportConfig(ckpt_path=str(trained / "checkpoints" / "last.ckpt"), format="onnx",
                               output=str(tmp_path / "acl.onnx")))  # image tower + DPAM, text as a constant
    images = torch.randn(1, 3, 64, 64)
    amap, score = ort.InferenceSession(str(path)).run(["anomaly_map", "pred_score"], {"image": images.numpy()})
    with torch.no_grad():
        want = model.predict_batch(images)
    torch.testing.assert_close(torch.from_numpy(amap), want["anomaly_map"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(score), want["pred_score"], rtol=1e-4, atol=1e-5)
