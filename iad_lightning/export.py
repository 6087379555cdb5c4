"""Export a trained method's inference graph (ONNX or TorchScript), with normalisation baked in.

    python -m iad_lightning.export ckpt_path=runs/.../checkpoints/last.ckpt format=onnx
    python -m iad_lightning.export ckpt_path=... format=torchscript batch_size=8 output=model.pt
    python -m iad_lightning.export ckpt_path=... format=onnx dynamic_batch=true opset=17

Options (``key=value``, Hydra-style):
    ckpt_path       training checkpoint (required); rebuilt safely with ``checkpoint.load_method``
    format          onnx | torchscript (default onnx)
    output          file to write (default: next to the checkpoint, ``<stem>.onnx`` / ``<stem>.pt``)
    batch_size      batch of the example input (default 1)
    dynamic_batch   true: the batch dimension is free (default false: fixed ``batch_size``)
    image_size      H,W of the input (default: the output size of the preprocessing the model was fitted with)
    opset           ONNX opset (default 17)
    exporter        ONNX exporter: legacy (TorchScript-based, needs only ``onnx``) | dynamo
                    (``torch.export``-based, also needs ``onnxscript``); default legacy
    rtol, atol      tolerance of the check against eager: atol + rtol * max|eager| (defaults 1e-4, 0)

The graph is ``images (B, 3, H, W), preprocessed as the model was fitted -> (anomaly_map
(B, 1, H, W), pred_score (B,), image_threshold (B,), pixel_threshold (B,))``; input name ``image``,
output names ``anomaly_map``, ``pred_score``, ``image_threshold`` and ``pixel_threshold`` (the
calibrated thresholds of ``iad_lightning.calibration``, repeated per image; NaN if the checkpoint
was not calibrated): an image is anomalous iff ``pred_score > image_threshold``, its defect region
is ``anomaly_map > pixel_threshold``. Resizing and mean/std normalisation of raw images stay
outside the graph, as in training: the preprocessing the model was fitted with (every field of
``Preprocess``: resize, crop or none, resize backend, mean/std; ``data.center_crop=false`` shows as
``"crop": null``), read from the checkpoint (``data/geometry.py``). The ONNX file stores it, the
thresholds and the widths of the normalised score in its ``metadata_props`` (``iad_preprocess``,
``iad_thresholds``, JSON; with ``categories``: the per-category thresholds of a unified model, which
``iad_lightning.load(...).predict(..., category=...)`` uses), so that ``python predict.py ckpt_path=model.onnx`` needs no checkpoint
(TorchScript: the same JSON as the extra file ``iad_metadata.json``). After writing, the file is loaded again and run on a
random input (onnxruntime for ONNX, ``torch.jit.load`` for TorchScript); the largest difference to
the eager module is printed, and the export fails when it exceeds ``atol + rtol * max|eager|``.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from iad_lightning.checkpoint import load_method
from iad_lightning.data.geometry import PREPROCESS_KEY, preprocess_to_dict
from iad_lightning.errors import ConfigError, IADError

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "pred_score", "image_threshold", "pixel_threshold")
METADATA_KEYS = ("iad_method", PREPROCESS_KEY, "iad_thresholds")
_KEYS = ("ckpt_path", "format", "output", "batch_size", "dynamic_batch", "image_size", "opset", "exporter",
         "rtol", "atol")


@dataclass
class ExportConfig:
    ckpt_path: str
    format: str = "onnx"
    output: str | None = None
    batch_size: int = 1
    dynamic_batch: bool = False
    image_size: tuple[int, int] | None = None
    opset: int = 17
    exporter: str = "legacy"
    rtol: float = 1e-4
    atol: float = 0.0


class ExportError(ConfigError):
    """The exported model could not be written or does not reproduce the eager outputs."""


# ----------------------------------------------------------------------------------- arguments
def _bool(key: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ConfigError(f"{key}={value}: expected true or false")


def _number(key: str, value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{key}={value}: expected {'an integer' if kind is int else 'a number'}") from None


def parse_args(argv: Sequence[str]) -> ExportConfig:
    """``key=value`` arguments (a leading ``+`` or ``--`` is ignored) -> ``ExportConfig``."""
    raw: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.lstrip("+-").partition("=")
        if not sep:
            raise ConfigError(f"argument '{arg}' is not key=value; keys: {', '.join(_KEYS)}")
        if key not in _KEYS:
            raise ConfigError(f"unknown option '{key}'; keys: {', '.join(_KEYS)}")
        raw[key] = value.strip().strip("'\"")
    if "ckpt_path" not in raw:
        raise ConfigError("ckpt_path=... is required: python -m iad_lightning.export "
                          "ckpt_path=outputs/train/runs/<run>/checkpoints/last.ckpt [format=onnx|torchscript]")
    cfg = ExportConfig(ckpt_path=raw["ckpt_path"])
    if "format" in raw:
        cfg.format = raw["format"].lower()
    if cfg.format not in FORMATS:
        raise ConfigError(f"format={cfg.format}: expected one of {', '.join(FORMATS)}")
    cfg.output = raw.get("output") or None
    for key in ("batch_size", "opset"):
        if key in raw:
            setattr(cfg, key, _number(key, raw[key], int))
    for key in ("rtol", "atol"):
        if key in raw:
            setattr(cfg, key, _number(key, raw[key], float))
    if "dynamic_batch" in raw:
        cfg.dynamic_batch = _bool("dynamic_batch", raw["dynamic_batch"])
    if "image_size" in raw:
        parts = raw["image_size"].strip("[]() ").replace("x", ",").split(",")
        size = [_number("image_size", p.strip(), int) for p in parts if p.strip()]
        if len(size) not in (1, 2):
            raise ConfigError(f"image_size={raw['image_size']}: expected H,W or one side")
        cfg.image_size = (size[0], size[-1])
    if "exporter" in raw:
        cfg.exporter = raw["exporter"].lower()
        if cfg.exporter not in ("legacy", "dynamo"):
            raise ConfigError(f"exporter={cfg.exporter}: expected legacy or dynamo")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1")
    return cfg


# ------------------------------------------------------------------------------------ graph
class TupleOutputs(nn.Module):
    """``images -> (anomaly_map, pred_score, image_threshold, pixel_threshold)`` for modules that
    return a tuple or the dict of ``predict_batch``; exporters want a fixed tuple of tensors. The
    thresholds (the method's calibrated buffers, the same for every method) are repeated per image."""

    def __init__(self, module: nn.Module, image_threshold: float = float("nan"),
                 pixel_threshold: float = float("nan")) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("image_threshold", torch.tensor([float(image_threshold)]))
        self.register_buffer("pixel_threshold", torch.tensor([float(pixel_threshold)]))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = self.module(images)
        if isinstance(out, dict):
            anomaly_map, pred_score = out["anomaly_map"], out["pred_score"]
        else:
            anomaly_map, pred_score = out
        return (anomaly_map, pred_score, self.image_threshold.expand_as(pred_score),
                self.pixel_threshold.expand_as(pred_score))


def inference_graph(method: Any) -> nn.Module:
    """The method's export module in eval mode on the CPU, with a tuple output and the thresholds.

    Its backbones are switched to their batch-norm-folded copies in place (they share the
    method's modules), so call it on a method loaded for export, as ``export`` does."""
    module = method.export_module()  # raises ConfigError for methods that cannot be exported
    thr = {k: float(getattr(method, k, float("nan"))) for k in ("image_threshold", "pixel_threshold")}
    from iad_lightning.models.backbones import FeatureExtractor

    graph = TupleOutputs(module, **thr).eval().to("cpu").requires_grad_(False)
    for sub in graph.modules():  # the batch-norm-folded backbones, as registered modules
        if isinstance(sub, FeatureExtractor):
            sub.fold_in_place()
    return graph


def export_metadata(method: Any) -> dict[str, str]:
    """JSON strings that a deployment needs besides the graph: the preprocessing the model was
    fitted with (``data/geometry.py``) and the thresholds."""
    names = ("image_threshold", "image_scale", "pixel_threshold", "pixel_scale")
    thresholds = {k: float(getattr(method, k, float("nan"))) for k in names}
    thresholds = {k: (v if v == v else None) for k, v in thresholds.items()}  # NaN -> null (valid JSON)
    from iad_lightning.calibration import category_thresholds  # unified mode: one set per category

    cats = category_thresholds(getattr(method, "calibration_info", None))
    if cats:
        thresholds["categories"] = {c: {k: (v if v == v else None) for k, v in t.items()} for c, t in cats.items()}
    return {"iad_method": type(method).__name__, PREPROCESS_KEY: json.dumps(preprocess_to_dict(method.input_preprocess)),
            "iad_thresholds": json.dumps(thresholds)}


def add_onnx_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def input_size(method: Any, cfg: ExportConfig) -> tuple[int, int]:
    if cfg.image_size is not None:
        return cfg.image_size
    size = method.input_preprocess.output_size
    if size is None:
        raise ConfigError(
            f"{type(method).__name__}'s preprocessing has no fixed output size (it keeps the aspect ratio); "
            "give image_size=H,W"
        )
    return int(size[0]), int(size[1])


def default_output(cfg: ExportConfig) -> Path:
    ckpt = Path(cfg.ckpt_path).expanduser()
    return ckpt.with_suffix(".onnx" if cfg.format == "onnx" else ".pt")


def export_onnx(module: nn.Module, example: Tensor, path: Path, cfg: ExportConfig) -> None:
    dynamic = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": list(OUTPUT_NAMES),
                              "opset_version": cfg.opset}
    if cfg.exporter == "dynamo":  # torch.export-based; needs the onnxscript package
        try:
            import onnxscript  # noqa: F401
        except ImportError as err:
            raise ConfigError("exporter=dynamo needs the onnxscript package (pip install onnxscript); "
                              "exporter=legacy needs only onnx") from err
        if cfg.dynamic_batch:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1)},)
        torch.onnx.export(module, (example,), str(path), dynamo=True, external_data=False, **kwargs)
        return
    # The TorchScript-based exporter: with torch 2.14 it is deprecated but produces graphs that
    # onnxruntime runs with only the onnx package installed (dynamo also needs onnxscript).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*will be removed.*")
        warnings.filterwarnings("ignore", message=".*Constant folding.*")
        torch.onnx.export(module, (example,), str(path), dynamo=False, do_constant_folding=True,
                          dynamic_axes=dynamic if cfg.dynamic_batch else None, **kwargs)


def export_torchscript(module: nn.Module, example: Tensor, path: Path, metadata: dict[str, str] | None = None) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is deprecated.*")
        traced = torch.jit.trace(module, (example,), check_trace=False)
        traced = torch.jit.freeze(traced)  # weights and buffers (the normalisation) become constants
        extra = {"iad_metadata.json": json.dumps(metadata)} if metadata else {}
        torch.jit.save(traced, str(path), _extra_files=extra)


def run_exported(path: Path, fmt: str, images: Tensor) -> tuple[Tensor, ...]:
    """Load the written file and run it on ``images`` (onnxruntime / torch.jit)."""
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ConfigError("checking an ONNX export needs onnxruntime: pip install -e '.[onnx]'") from err
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})
        return tuple(torch.from_numpy(o) for o in outs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is deprecated.*")
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return tuple(loaded(images))


def compare(exported: Sequence[Tensor], eager: Sequence[Tensor], rtol: float, atol: float) -> dict[str, tuple]:
    """(max abs difference, max |eager|) per output; raises ExportError above ``atol + rtol * max|eager|``."""
    diffs = {}
    for name, got, ref in zip(OUTPUT_NAMES, exported, eager):
        if tuple(got.shape) != tuple(ref.shape):
            raise ExportError(f"exported '{name}' has shape {tuple(got.shape)}, eager {tuple(ref.shape)}")
        got, ref = got.float(), ref.float()
        if not torch.equal(torch.isnan(got), torch.isnan(ref)):  # NaN: an uncalibrated threshold
            raise ExportError(f"exported '{name}' has NaN where eager has not (or the reverse)")
        got, ref = got.nan_to_num(0.0), ref.nan_to_num(0.0)
        diff = float((got - ref).abs().max())
        limit = atol + rtol * float(ref.abs().max())
        diffs[name] = (diff, float(ref.abs().max()))
        if not diff <= limit:  # also catches NaN
            raise ExportError(f"exported '{name}' differs from eager by {diff:.3g} (> {limit:.3g} allowed)")
    return diffs


def export(cfg: ExportConfig) -> Path:
    """Load the checkpoint, export, reload and check; returns the written path."""
    method = load_method(cfg.ckpt_path)
    module = inference_graph(method)
    h, w = input_size(method, cfg)
    path = Path(cfg.output).expanduser() if cfg.output else default_output(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(cfg.batch_size, 3, h, w, generator=gen)
    metadata = export_metadata(method)
    try:
        if cfg.format == "onnx":
            export_onnx(module, example, path, cfg)
            add_onnx_metadata(path, metadata)
        else:
            export_torchscript(module, example, path, metadata)
    except IADError:
        raise
    except Exception as err:  # an op the exporter cannot express: one clear line, not a traceback
        raise ExportError(f"{cfg.format} export of {type(method).__name__} failed: {type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from err
    # the check: a fresh random batch (another batch size when the batch dimension is free)
    check_batch = cfg.batch_size + 1 if cfg.dynamic_batch else cfg.batch_size
    images = torch.randn(check_batch, 3, h, w, generator=gen)
    with torch.no_grad():
        eager = module(images)
    diffs = compare(run_exported(path, cfg.format, images), eager, cfg.rtol, cfg.atol)
    print(f"exported {type(method).__name__} ({cfg.format}, input {'B' if cfg.dynamic_batch else cfg.batch_size}"
          f"x3x{h}x{w}) to {path}")
    print("max abs diff vs eager on a random batch of "
          f"{check_batch}: " + ", ".join(f"{k} {d:.3g} (max |eager| {m:.3g})" for k, (d, m) in diffs.items()))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
    try:
        export(parse_args(argv))
    except IADError as err:  # bad options, checkpoint, weights, a failed check: one clear line
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
