"""python -m iad_lightning.export: ONNX / TorchScript graphs equal the eager EfficientAD, PatchCore and UniAD
models."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iad_lightning.checkpoint import load_method
from iad_lightning.errors import ConfigError
from iad_lightning.export import compare, main, parse_args
from iad_lightning.methods.efficientad import EfficientAD

REPO = Path(__file__).resolve().parents[2]
SIZE = 64  # small input keeps the test fast; the graph is the same as at 256


def _rel_close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= rtol * float(ref.abs().max())  # relative to the output scale


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An EfficientAD-S training checkpoint with random networks and non-trivial normalisation."""
    torch.manual_seed(0)
    cfg = {"_target_": "iad_lightning.methods.efficientad.EfficientAD", "_convert_": "all",
           "model_size": "small", "out_channels": 384, "image_size": SIZE}
    method = EfficientAD(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    method.method_config = cfg
    m = method.model
    m.teacher_mean.copy_(torch.randn_like(m.teacher_mean) * 0.1)
    m.teacher_std.copy_(torch.rand_like(m.teacher_std) + 0.5)
    with torch.no_grad():  # quantiles of the raw maps, so that the normalised maps span both signs
        map_st, map_ae = m.raw_maps(torch.randn(2, 3, SIZE, SIZE))
    for name, raw, q in (("q_st_start", map_st, 0.3), ("q_st_end", map_st, 0.9),
                         ("q_ae_start", map_ae, 0.3), ("q_ae_end", map_ae, 0.9)):
        getattr(m, name).fill_(float(raw.quantile(q)))
    checkpoint = {"state_dict": method.state_dict()}
    method.on_save_checkpoint(checkpoint)  # writes iad_method_config, as during fit
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def eager(ckpt):
    model = load_method(ckpt).model.eval()
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        amap, score = model(images)
        plain = type(model)("small", 384, image_size=SIZE).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("teacher_", "q_"))},
                              strict=False)
        plain_map, _ = plain(images)
    # the normalisation buffers really shape the output (so the export must carry them)
    assert float((plain_map - amap).abs().max()) > 10 * float(amap.abs().max()) * 1e-2
    assert amap.shape == (3, 1, SIZE, SIZE) and score.shape == (3,)
    assert amap.min() < 0 < amap.max() and (score > 0).all() and score.unique().numel() == 3
    return images, amap, score


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_torchscript_export_equals_eager(ckpt, eager, capsys):
    assert main([f"ckpt_path={ckpt}", "format=torchscript", "batch_size=3"]) == 0
    out = ckpt.with_suffix(".pt")  # default output: beside the checkpoint
    printed = capsys.readouterr().out
    assert f"to {out}" in printed and "max abs diff vs eager" in printed
    images, amap, score = eager
    loaded = torch.jit.load(str(out), map_location="cpu")
    with torch.no_grad():
        got_map, got_score, image_thr, pixel_thr = loaded(images)
    _rel_close(got_map, amap)
    _rel_close(got_score, score)
    assert image_thr.shape == (3,) and torch.isnan(image_thr).all() and torch.isnan(pixel_thr).all()  # uncalibrated


def test_onnx_export_equals_eager_with_a_dynamic_batch(ckpt, eager, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    proc = subprocess.run([sys.executable, "-m", "iad_lightning.export", f"ckpt_path={ckpt}", "format=onnx",
                           f"output={out}", "dynamic_batch=true"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max abs diff vs eager on a random batch of 2" in proc.stdout
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["anomaly_map", "pred_score", "image_threshold", "pixel_threshold"]
    images, amap, score = eager  # batch 3, exported with batch 1: the batch dimension is free
    got_map, got_score, _, _ = session.run(None, {"image": images.numpy()})
    _rel_close(torch.from_numpy(got_map), amap)
    _rel_close(torch.from_numpy(got_score), score)


LITE0 = {"name": "tf_efficientnet_lite0", "layers": [2, 3], "weights": "none"}


def _save(method, cfg: dict, path: Path) -> Path:
    method.method_config = cfg
    checkpoint = {"state_dict": method.state_dict()}
    method.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def _patchcore(tmp_path: Path, fitted: bool = True) -> tuple[Path, object]:
    from iad_lightning.methods.patchcore import PatchCore

    torch.manual_seed(0)
    kwargs = {"backbone": LITE0, "resize": SIZE, "crop": SIZE, "pretrain_embed_dimension": 128,
              "target_embed_dimension": 128, "num_neighbors": 3, "paper_reweighting": True}
    method = PatchCore(**kwargs).eval()
    if fitted:  # a bank of perturbed train patches, as a coreset would hold
        with torch.no_grad():
            emb, _ = method.model.embed(method.feature_extractor(torch.randn(4, 3, SIZE, SIZE)))
        rows = emb.reshape(-1, 128)[::2]
        method.model.fit(rows + 0.05 * torch.randn_like(rows))
    cfg = {"_target_": "iad_lightning.methods.patchcore.PatchCore", "_convert_": "all", **kwargs}
    return _save(method, cfg, tmp_path / "pc.ckpt"), method


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_patchcore_exports_with_the_bank_and_equals_faiss(tmp_path):
    """k = 3 neighbours and the paper's re-weighting: the graph's matmul search reproduces the
    eager faiss model (ONNX with a free batch, TorchScript), bank and blur inside the file."""
    ort = pytest.importorskip("onnxruntime")
    path, method = _patchcore(tmp_path)
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = method.predict_batch(images)  # faiss IndexFlatL2 (torch fallback without faiss)
    assert main([f"ckpt_path={path}", "format=onnx", f"output={tmp_path / 'pc.onnx'}", "dynamic_batch=true"]) == 0
    session = ort.InferenceSession(str(tmp_path / "pc.onnx"), providers=["CPUExecutionProvider"])
    got_map, got_score = session.run(["anomaly_map", "pred_score"], {"image": images.numpy()})
    _rel_close(torch.from_numpy(got_map), ref["anomaly_map"])
    _rel_close(torch.from_numpy(got_score), ref["pred_score"])
    assert main([f"ckpt_path={path}", "format=torchscript", "batch_size=3"]) == 0
    loaded = torch.jit.load(str(path.with_suffix(".pt")), map_location="cpu")
    with torch.no_grad():
        got_map, got_score = loaded(images)[:2]  # + the two thresholds
    _rel_close(got_map, ref["anomaly_map"])
    _rel_close(got_score, ref["pred_score"])


def test_unfitted_patchcore_says_why_it_cannot_be_exported(tmp_path, capsys):
    path, _ = _patchcore(tmp_path, fitted=False)
    assert main([f"ckpt_path={path}", "format=onnx", f"output={tmp_path / 'pc.onnx'}"]) == 1
    assert "empty memory bank" in capsys.readouterr().err
    assert not (tmp_path / "pc.onnx").exists()


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_uniad_exports_through_the_command(tmp_path, fmt, capsys):
    from iad_lightning.methods.uniad import UniAD

    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    kwargs = {"backbone": {**LITE0, "layers": [0, 1, 2, 3]}, "image_size": SIZE, "hidden_dim": 32, "nhead": 4,
              "num_encoder_layers": 1, "num_decoder_layers": 1, "dim_feedforward": 64, "neighbor_size": [3, 3],
              "score_kernel": 4}
    method = UniAD(**kwargs).eval()
    path = _save(method, {"_target_": "iad_lightning.methods.uniad.UniAD", "_convert_": "all", **kwargs},
                 tmp_path / "uniad.ckpt")
    assert main([f"ckpt_path={path}", f"format={fmt}", "batch_size=2"]) == 0
    printed = capsys.readouterr().out
    assert f"exported UniAD ({fmt}" in printed and "max abs diff vs eager" in printed


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="format=tflite"):
        parse_args(["ckpt_path=x.ckpt", "format=tflite"])
    with pytest.raises(ConfigError, match="unknown option 'batch'"):
        parse_args(["ckpt_path=x.ckpt", "batch=2"])
    with pytest.raises(ConfigError, match="ckpt_path=... is required"):
        parse_args(["format=onnx"])
    with pytest.raises(ConfigError, match=str(tmp_path / "missing.ckpt")):
        from iad_lightning.export import export

        export(parse_args([f"ckpt_path={tmp_path / 'missing.ckpt'}"]))
    cfg = parse_args(["ckpt_path=x.ckpt", "image_size=128,96", "dynamic_batch=true", "opset=18"])
    assert cfg.image_size == (128, 96) and cfg.dynamic_batch and cfg.opset == 18 and cfg.format == "onnx"
    ref = (torch.ones(1, 1, 2, 2), torch.ones(1))
    with pytest.raises(ConfigError, match="differs from eager"):
        compare((ref[0] * 1.01, ref[1]), ref, rtol=1e-4, atol=1e-5)
