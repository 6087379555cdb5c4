"""Inference on new images, from a training checkpoint or an exported ONNX file.

    import iad_lightning
    model = iad_lightning.load("outputs/train/runs/<date>/checkpoints/last.ckpt")  # or "model.onnx"
    out = model.predict(["a.png", pil_image, numpy_array])
    out.scores, out.normalized_scores, out.decisions, out.maps, out.regions

Images may be file paths, PIL images or numpy arrays (HxW, HxWx1, HxWx3, HxWx4; uint8, uint16 or
float in [0, 1]); every one becomes 8-bit RGB by the rules of training (``data/io.py``) and goes
through the preprocessing the model was FITTED with (resize, centre crop or none, resize backend,
mean/std; data-level overrides such as ``data.center_crop=false`` included), read from the
checkpoint or the exported file's metadata (``data/geometry.py``), the same that ``test.py`` uses.

Maps are at the MODEL INPUT RESOLUTION (after resize and any centre crop: PatchCore's 224 crop,
a ``data=folder`` model's 256 x 256), the geometry the metrics use; they are not resized back to the original
image, because a centre crop discards the borders (no map exists there). ``out.views`` holds the
input as the method saw it (uint8 RGB at that resolution), on which ``predict.py`` draws overlays.

Decisions use the thresholds calibrated at fit time on out-of-sample scores of normal train
images (``iad_lightning.calibration``): ``anomalous`` iff score > image threshold, else ``normal``;
``unknown`` when the checkpoint carries no thresholds. ``regions`` = map > pixel threshold. A model
fitted on several categories (unified mode) carries one threshold pair per category:
``model.predict(images, category="screw")`` (or one name per image) uses that category's own; without
a category the global thresholds apply (calibrated on the normal images of all categories pooled).
``model.categories`` lists the calibrated categories.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from iad_lightning.calibration import normalize
from iad_lightning.data.geometry import PREPROCESS_KEY, preprocess_from_dict
from iad_lightning.data.io import array_to_rgb8, load_image, load_image_8bit, to_8bit, to_rgb8
from iad_lightning.data.transforms import PairTransform, Preprocess
from iad_lightning.errors import ConfigError

ImageLike = Any  # str | Path | PIL.Image.Image | np.ndarray
DECISIONS = ("anomalous", "normal", "unknown")


def as_rgb8(image: ImageLike, name: str | None = None) -> Image.Image:
    """A path, PIL image or array as 8-bit RGB (``DatasetError`` for unreadable input)."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        image.load()
        return to_rgb8(image, name or "PIL image")
    if isinstance(image, np.ndarray):
        return array_to_rgb8(image, name or "array")
    raise ConfigError(f"cannot predict on a {type(image).__name__}: pass file paths, PIL images or numpy arrays")


def as_image8(image: ImageLike, name: str | None = None) -> Image.Image:
    """Like ``as_rgb8`` but paths and PIL images keep their own 8-bit mode: the preprocessing
    converts to RGB before or after its resize (``Preprocess.rgb_after_resize``)."""
    if isinstance(image, (str, Path)):
        return load_image_8bit(image)
    if isinstance(image, Image.Image):
        image.load()
        to_rgb8(image, name or "PIL image")  # fails early, naming the input, on a mode with no RGB
        return to_8bit(image)
    return as_rgb8(image, name)


@dataclass
class Prediction:
    """Per image: raw score, normalised score (threshold -> 0.5), decision, raw map at the method
    input resolution, its normalised version, the predicted defect region and the input view.
    Maps are stacked (N, H, W) arrays when all inputs share the input size, else lists."""

    scores: np.ndarray
    normalized_scores: np.ndarray
    decisions: list[str]
    maps: Any
    normalized_maps: Any
    regions: Any
    views: Any

    def __len__(self) -> int:
        return len(self.scores)


class _TorchBackend:
    def __init__(self, method: Any, device: str) -> None:
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.method = method.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        out = self.method._predict_with_size({"image": images.to(self.device)})
        return (out["anomaly_map"][:, 0].float().cpu().numpy(), out["pred_score"].float().cpu().numpy())


class _OnnxBackend:
    def __init__(self, path: Path, device: str) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ConfigError("predicting with an ONNX file needs onnxruntime: pip install -e '.[onnx]'") from err
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), providers=providers)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.preprocess, self.thresholds, self.category_thresholds, self.method_name = _read_metadata(meta, path)
        shape = self.session.get_inputs()[0].shape
        self.batch = shape[0] if isinstance(shape[0], int) else None  # None: dynamic batch
        self.size = tuple(shape[2:]) if all(isinstance(s, int) for s in shape[2:]) else None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        x = images.numpy().astype(np.float32)
        if self.size is not None and tuple(x.shape[2:]) != self.size:
            raise ConfigError(f"the ONNX graph takes {self.size[0]}x{self.size[1]} inputs but the stored "
                              f"preprocessing gives {x.shape[2]}x{x.shape[3]}; re-export with image_size=H,W")
        step = self.batch or len(x)
        maps, scores = [], []
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            n = len(chunk)
            if self.batch and n < self.batch:  # a fixed-batch graph: pad the last chunk
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
            amap, score = self.session.run(["anomaly_map", "pred_score"], {self.input_name: chunk})[:2]
            maps.append(amap[:n, 0])
            scores.append(score[:n])
        return np.concatenate(maps), np.concatenate(scores)


class _TorchScriptBackend:
    """A ``python -m iad_lightning.export format=torchscript`` file, metadata from its extra file."""

    def __init__(self, path: Path, device: str) -> None:
        import warnings

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        extra = {"iad_metadata.json": ""}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is deprecated.*")
            self.module = torch.jit.load(str(path), map_location=self.device, _extra_files=extra)
        if not extra["iad_metadata.json"]:
            raise ConfigError(f"'{path}' has no iad_metadata.json; export it with python -m iad_lightning.export")
        self.preprocess, self.thresholds, self.category_thresholds, self.method_name = _read_metadata(json.loads(extra["iad_metadata.json"]), path)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        amap, score = self.module(images.to(self.device))[:2]
        return amap[:, 0].float().cpu().numpy(), score.float().cpu().numpy()


def _read_metadata(meta: dict[str, str], path: Path) -> tuple[Preprocess, dict[str, float], dict[str, dict[str, float]], str]:
    """(preprocess, global thresholds, per-category thresholds, method name) from an exported
    file's metadata (``export_metadata``)."""
    if PREPROCESS_KEY not in meta:
        raise ConfigError(f"'{path}' has no {PREPROCESS_KEY} metadata; export it with python -m iad_lightning.export")
    preprocess = preprocess_from_dict(json.loads(meta[PREPROCESS_KEY]), f"'{path}'")
    stored = json.loads(meta.get("iad_thresholds", "{}"))
    categories = {c: _four(t) for c, t in (stored.get("categories") or {}).items()}
    return preprocess, _four(stored), categories, meta.get("iad_method", "exported model")


class Predictor:
    """A trained model ready for new images; build it with ``iad_lightning.load``."""

    def __init__(self, backend: Any, preprocess: Preprocess, thresholds: dict[str, float], name: str,
                 category_thresholds: dict[str, dict[str, float]] | None = None) -> None:
        self.backend, self.name = backend, name
        self.preprocess = replace(preprocess, extra=())  # train augmentations never apply here
        self.transform = PairTransform(self.preprocess)
        self.thresholds = _four(thresholds)  # global
        self.category_thresholds = {c: _four(t) for c, t in (category_thresholds or {}).items()}
        self._mean = np.asarray(self.preprocess.mean, dtype=np.float32)[:, None, None]
        self._std = np.asarray(self.preprocess.std, dtype=np.float32)[:, None, None]

    @property
    def calibrated(self) -> bool:
        return math.isfinite(self.thresholds["image_threshold"])

    @property
    def categories(self) -> list[str]:
        """Categories with their own calibrated thresholds."""
        return list(self.category_thresholds)

    def thresholds_for(self, category: str | None = None) -> dict[str, float]:
        """The category's own thresholds; the global ones for ``None`` (or a model without them)."""
        if category is None:
            return self.thresholds
        if category not in self.category_thresholds:
            if not self.category_thresholds:
                return self.thresholds  # a model calibrated before per-category thresholds existed
            raise ConfigError(f"category='{category}' has no calibrated thresholds in {self.name}; "
                              f"known: {', '.join(self.category_thresholds)} (or none: the global threshold)")
        return self.category_thresholds[category]

    def __repr__(self) -> str:
        t = self.thresholds
        return (f"Predictor({self.name}, image_threshold={t['image_threshold']:.6g}, "
                f"pixel_threshold={t['pixel_threshold']:.6g})")

    # -- pieces predict.py reuses ------------------------------------------------------------
    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> the normalised (3, H, W) tensor the method takes."""
        tensor, _ = self.transform(image, np.zeros((image.size[1], image.size[0]), dtype=bool))
        return tensor

    def view(self, tensor: torch.Tensor) -> np.ndarray:
        """The normalised tensor back to uint8 RGB (H, W, 3): the input as the method saw it."""
        img = tensor.numpy() * self._std + self._mean
        return (np.clip(img.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)

    def decide(self, scores: np.ndarray, category: str | None = None) -> list[str]:
        t = self.thresholds_for(category)["image_threshold"]
        if not math.isfinite(t):
            return ["unknown"] * len(scores)
        return ["anomalous" if s > t else "normal" for s in scores]

    def normalize_scores(self, scores: np.ndarray, category: str | None = None) -> np.ndarray:
        t = self.thresholds_for(category)
        return normalize(scores, t["image_threshold"], t["image_scale"])

    def normalize_maps(self, maps: np.ndarray, category: str | None = None) -> np.ndarray:
        t = self.thresholds_for(category)
        return normalize(maps, t["pixel_threshold"], t["pixel_scale"])

    def regions(self, maps: np.ndarray, category: str | None = None) -> np.ndarray:
        return maps > self.thresholds_for(category)["pixel_threshold"]  # all False when uncalibrated (NaN)

    def predict_tensors(self, tensors: Sequence[torch.Tensor]) -> tuple[list[np.ndarray], np.ndarray]:
        """Maps (list of (H, W)) and scores of preprocessed tensors; same-size tensors share a batch."""
        maps: list[np.ndarray | None] = [None] * len(tensors)
        scores = np.zeros(len(tensors), dtype=np.float32)
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(tuple(t.shape), []).append(i)
        for idx in groups.values():
            amap, score = self.backend(torch.stack([tensors[i] for i in idx]))
            for j, i in enumerate(idx):
                maps[i], scores[i] = amap[j], score[j]
        return maps, scores  # type: ignore[return-value]

    # -- the API -----------------------------------------------------------------------------
    def predict(self, images: ImageLike | Iterable[ImageLike], batch_size: int = 16,
                category: str | Sequence[str | None] | None = None) -> Prediction:
        """Scores, normalised scores, decisions, maps and defect regions of ``images`` (one image
        or a list). ``category``: one name for all images or one per image (that category's own
        thresholds); None: the global thresholds. Unreadable input raises ``DatasetError`` naming
        it (``predict.py`` records it per file instead)."""
        if isinstance(images, (str, Path, Image.Image, np.ndarray)):
            images = [images]
        images = list(images)
        cats = [category] * len(images) if category is None or isinstance(category, str) else list(category)
        if len(cats) != len(images):
            raise ConfigError(f"category: {len(cats)} names for {len(images)} images; give one name or one per image")
        tensors = [self.to_tensor(as_image8(im, f"image {i}")) for i, im in enumerate(images)]
        maps: list[np.ndarray] = []
        scores = []
        for start in range(0, len(tensors), batch_size):
            m, s = self.predict_tensors(tensors[start:start + batch_size])
            maps += m
            scores.append(s)
        score = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        stack = (lambda xs: np.stack(xs)) if len({m.shape for m in maps}) == 1 else (lambda xs: list(xs))
        return Prediction(
            scores=score,
            normalized_scores=np.array([self.normalize_scores(s[None], c)[0] for s, c in zip(score, cats)],
                                       dtype=np.float32),
            decisions=[self.decide(s[None], c)[0] for s, c in zip(score, cats)],
            maps=stack(maps),
            normalized_maps=stack([self.normalize_maps(m, c) for m, c in zip(maps, cats)]),
            regions=stack([self.regions(m, c) for m, c in zip(maps, cats)]),
            views=stack([self.view(t) for t in tensors]),
        )


def load(path: str | Path, device: str = "auto") -> Predictor:
    """A ``Predictor`` from a training checkpoint (``.ckpt``: rebuilt safely with
    ``checkpoint.load_method``, nothing downloaded), an exported ONNX file (``.onnx``: onnxruntime
    only) or TorchScript file (``.pt``); preprocessing and thresholds come from the checkpoint or
    the file's metadata. ``device``: auto | cpu | cuda | cuda:N."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"ckpt_path='{p}' does not exist; pass a training run's checkpoints/last.ckpt "
                          "or an exported .onnx file")
    exported = {".onnx": (_OnnxBackend, "ONNX"), ".pt": (_TorchScriptBackend, "TorchScript")}
    if p.suffix.lower() in exported:
        kind, what = exported[p.suffix.lower()]
        backend = kind(p, device)
        return Predictor(backend, backend.preprocess, backend.thresholds, f"{backend.method_name} ({what} {p.name})",
                         backend.category_thresholds)
    from iad_lightning.calibration import category_thresholds, thresholds_of
    from iad_lightning.checkpoint import load_method

    method = load_method(p)
    return Predictor(_TorchBackend(method, device), method.input_preprocess, thresholds_of(method), type(method).__name__,
                     category_thresholds(method.calibration_info))


def _four(thresholds: dict[str, Any]) -> dict[str, float]:
    return {k: math.nan if thresholds.get(k) is None else float(thresholds[k]) for k in
            ("image_threshold", "image_scale", "pixel_threshold", "pixel_scale")}
