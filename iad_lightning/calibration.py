"""Decision thresholds from out-of-sample scores of NORMAL training images, never from test data.

Where the normal scores come from (``threshold`` block of ``conf/train.yaml``):

- **cross-fitting** (``threshold.folds``, default 5) for methods whose fit is cheap and that
  implement it (``AnomalyModule.supports_crossfit``: PatchCore, PaDiM, FeatureNorm and the
  ADPretrain plug-ins on them). The train good images of each category are split into K folds
  (``crossfit.py``); each fold is scored by a model fitted on the other folds, from the features
  already extracted (the backbone runs once); the final model is then fitted on ALL images, the
  papers' protocol. Every train good image gets one out-of-sample score (images a method fits on
  by construction, e.g. ADPretrain's k-shot reference bank, are left out and counted);
- **a held-out split** for methods whose training is long (UniAD, EfficientAD, AnomalyCLIP):
  the datamodule's validation split (``data.val_fraction``, e.g. EfficientAD's 0.1), or
  ``threshold.holdout_fraction`` of each category's train good images when that is 0
  (``threshold.folds=0`` selects this path for every method).

The rule (``normal_threshold``), per category and once over all categories (the global threshold),
for the requested rate ``a = threshold.normal_fpr`` and ``n`` normal scores:

- **conformal rank** whenever it exists (``n >= 1 / a - 1``): the ``ceil((n + 1)(1 - a))``-th
  smallest score. Guarantee (split conformal; the calibration scores exchangeable with new normal
  images' scores): the false-alarm rate on new normal images is <= ``a`` in expectation over the
  calibration draw. With cross-fitted scores it is the cross-conformal rule (Vovk 2015; Barber et
  al. 2021, CV+): the guarantee holds up to a factor 2 in the worst case and ~``a`` in practice;
  the final model is fitted on more normal images than each fold's, so its normal scores are if
  anything lower (conservative). It needs at least ``1 / a - 1`` normal images (99 for 0.01).
- **a tail model** where no rank exists (``n < 1 / a - 1``: the maximum would give a rate of
  ``1 / (n + 1) > a``), or, with ``threshold.tail=gpd``, also whenever fewer than
  ``threshold.min_exceedances`` (5) normal images are expected above the threshold: peaks over
  threshold with a generalised Pareto distribution (GPD). ``u`` = the ``(N_u + 1)``-th largest
  score with ``N_u = max(10, ceil(threshold.tail_fraction * n))`` tail images; the excesses over
  ``u`` are fitted by maximum likelihood (``scipy.stats.genpareto``, location 0) and the threshold
  solves ``N_u / n * (1 - F_GPD(t - u)) = a``. Assumes: exchangeable normal scores whose upper
  tail beyond ``u`` is GPD-shaped (Pickands-Balkema-de Haan: true in the limit for the usual
  score distributions) and no defective image among the normal train images. It extrapolates,
  so it carries no finite-sample guarantee: on GPD-distributed scores (``tests/test_calibration.py``,
  simulated) it is median-unbiased (realised rate ~``a`` in a typical draw, where the max gives
  ``1 / (n + 1)``) but its mean rate is above ``a`` (at n = 320, a = 0.01: mean 1.16 a against the
  conformal rank's 0.91 a, similar spread), which is why ``auto`` keeps the rank wherever it
  exists. A degenerate fit (fewer than 11 scores, fewer than 5 distinct excesses, a non-finite
  fit, shape >= 1: an infinite-mean tail) falls back to the rank, the maximum if there is none.

``Threshold.determined_by`` says how many images determine the value (1 for a rank rule, ``N_u``
for the tail fit). The uncertainty that the calibration set can support is the Clopper-Pearson
95 % interval of the false-alarm rate given ``x`` of the ``n`` normal scores above the threshold
(``results.json`` ``calibrated.thresholds.categories.<cat>.image_fpr_interval``). A warning fires
only when it matters: fewer normal images than ``1 / a`` (no rank rule can resolve the rate); it
names the number, the rule used and what to do.

``image_threshold``: an image is *anomalous* iff its raw score is ``> image_threshold``.
``pixel_threshold``: the conformal rank over a fixed strided sample (``pixel_sample``) of the
normal anomaly maps' pixels at ``threshold.pixel_normal_fpr`` (default ``normal_fpr``); the
predicted defect region is ``anomaly_map > pixel_threshold``.

Storage: the global thresholds are buffers of ``AnomalyModule`` (``state_dict``, loads with
``weights_only=True``; NaN = not calibrated, decisions ``unknown``). The per-category thresholds
(unified mode: each from that category's own normal images), the rule details and the
out-of-sample normal scores are a plain-type checkpoint entry (``CALIBRATION_KEY``), exported in
the ONNX / TorchScript metadata. Test, predict and the Python API use a category's own thresholds
when the category is known, else the global ones (computed over the normal images of all
categories pooled).

Normalised score (display only, metrics always use raw scores): ``sigmoid((s - t) / w)`` with
``t`` the threshold and ``w = (t - median of the normal values) / ln 9``: the threshold maps to
0.5 and the median normal value to 0.1. The same mapping with the pixel threshold normalises maps.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from iad_lightning.distributed import gather_rows, is_distributed
from iad_lightning.errors import ConfigError

log = logging.getLogger(__name__)
CALIBRATION_KEY = "iad_calibration"  # checkpoint entry: calibration details (plain types)
THRESHOLD_BUFFERS = ("image_threshold", "image_scale", "pixel_threshold", "pixel_scale")
CALIBRATED_KEYS = ("image_precision", "image_recall", "image_f1", "image_fpr", "pixel_iou")
LN9 = math.log(9.0)
MIN_EXCEEDANCES = 5  # normal scores expected above the threshold for the rank rule to be used
MIN_TAIL = 10  # images of the GPD tail fit
PIXELS_PER_IMAGE = 4096  # at most ~ this many pixels per normal map enter the pixel threshold


@dataclass
class Threshold:
    """One calibrated threshold and how it was obtained."""

    value: float
    scale: float  # w of the normalised score
    requested_fpr: float
    fpr: float  # rate of the calibration values above ``value``
    n: int  # calibration values (images or pixels)
    rule: str = "conformal"  # conformal | gpd | max
    determined_by: int = 1  # values that determine ``value``
    fpr_interval: tuple[float, float] = (0.0, 1.0)  # Clopper-Pearson 95 % of the rate on new normals
    note: str = ""  # why a fallback was taken

    def summary(self) -> dict[str, Any]:
        return {"threshold": self.value, "rule": self.rule, "determined_by": self.determined_by,
                "normal_values": self.n, "requested_fpr": self.requested_fpr, "fpr_calibration": self.fpr,
                "fpr_interval": list(self.fpr_interval), **({"note": self.note} if self.note else {})}


def clopper_pearson(x: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided ``level`` interval of a binomial rate from ``x`` of ``n``."""
    from scipy.stats import beta

    if n <= 0:
        return (0.0, 1.0)
    a = 1.0 - level
    lo = 0.0 if x <= 0 else float(beta.ppf(a / 2, x, n - x + 1))
    hi = 1.0 if x >= n else float(beta.ppf(1 - a / 2, x + 1, n - x))
    return (lo, hi)


def conformal_rank(n: int, fpr: float) -> int:
    """1-based rank (ascending) of the split-conformal threshold: ceil((n + 1)(1 - fpr)); > n when
    ``n`` values cannot resolve ``fpr``."""
    return math.ceil((n + 1) * (1.0 - fpr) - 1e-9)


def gpd_tail_threshold(sorted_values: np.ndarray, fpr: float, tail_fraction: float = 0.2) -> tuple[float, int, str]:
    """(threshold, tail images N_u, "") from a GPD fit to the excesses of the N_u largest of the
    ascending ``sorted_values`` over the next one; (nan, N_u, reason) when the fit is degenerate."""
    from scipy.stats import genpareto

    n = len(sorted_values)
    n_tail = max(MIN_TAIL, math.ceil(tail_fraction * n))
    if n < MIN_TAIL + 1:
        return math.nan, n_tail, f"{n} values, the tail fit needs >= {MIN_TAIL + 1}"
    n_tail = min(n_tail, n - 1)
    if fpr * n >= n_tail:
        return math.nan, n_tail, "the requested rate is not in the tail"
    u = float(sorted_values[n - n_tail - 1])
    excess = sorted_values[n - n_tail:] - u
    if len(np.unique(excess[excess > 0])) < 5:
        return math.nan, n_tail, "fewer than 5 distinct scores above the tail's start"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shape, _, scale = genpareto.fit(excess, floc=0.0)
    # shape >= 1: infinite mean, no usable extrapolation. shape < -1 (the MLE is irregular there)
    # is kept: its quantiles lie at the largest excess, the fitted endpoint of a short tail.
    if not (math.isfinite(shape) and math.isfinite(scale) and scale > 0 and shape < 1.0):
        return math.nan, n_tail, f"degenerate GPD fit (shape {shape:.3g}, scale {scale:.3g})"
    value = u + float(genpareto.ppf(1.0 - fpr * n / n_tail, shape, loc=0.0, scale=scale))
    if not math.isfinite(value):
        return math.nan, n_tail, "non-finite GPD quantile"
    return value, n_tail, ""


def normal_threshold(values: torch.Tensor | np.ndarray, fpr: float, what: str = "image", tail: str = "auto",
                     min_exceedances: float = MIN_EXCEEDANCES, tail_fraction: float = 0.2,
                     where: str = "", advice: str = "add normal train images") -> Threshold:
    """The threshold for normal ``values`` at the requested rate ``fpr``; see the module doc.
    ``tail``: auto (the tail model only where no conformal rank exists) | gpd (also when fewer
    than ``min_exceedances`` values are expected above) | conformal (never: the max instead)."""
    if not 0.0 <= fpr < 1.0:
        raise ConfigError(f"threshold.normal_fpr={fpr} must be in [0, 1)")
    if tail not in ("auto", "gpd", "conformal"):
        raise ConfigError(f"threshold.tail={tail!r}: expected auto, gpd or conformal")
    v = np.sort(np.asarray(torch.as_tensor(values).detach().cpu().double().flatten()))
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        raise ConfigError(f"no finite normal {what} values to calibrate a threshold on")
    rank = conformal_rank(n, fpr)
    rule, determined_by, note, value = "conformal", 1, "", math.nan
    unresolved = rank > n  # fewer than 1 / fpr - 1 values: no rank has the guarantee
    if fpr > 0 and (unresolved or (tail == "gpd" and n * fpr < min_exceedances)) and tail != "conformal":
        value, n_tail, note = gpd_tail_threshold(v, fpr, tail_fraction)
        if math.isfinite(value):
            rule, determined_by = "gpd", n_tail
    if not math.isfinite(value):
        if unresolved:
            rule = "max"
        value = float(v[min(rank, n) - 1])
    above = int((v > value).sum())
    median = float(np.median(v))
    scale = (value - median) / LN9
    if not scale > 0:  # degenerate (all values equal): any positive width keeps the order
        scale = max(abs(value), 1.0) * 1e-3
    t = Threshold(value, scale, fpr, above / n, n, rule, determined_by, clopper_pearson(above, n), note)
    if fpr > 0 and n < math.ceil(1.0 / fpr):
        _warn_small(t, what, where, advice)
    return t


def _warn_small(t: Threshold, what: str, where: str, advice: str) -> None:
    need = math.ceil(1.0 / t.requested_fpr)
    how = (f"extrapolated by a generalised Pareto fit to the largest {t.determined_by} scores" if t.rule == "gpd"
           else f"the largest of the {t.n} scores ({t.note})" if t.rule == "max" else "a conformal rank")
    lo, hi = t.fpr_interval
    warnings.warn(
        f"threshold calibration{f' ({where})' if where else ''}: {t.n} normal {what}s cannot resolve a "
        f"false-alarm rate of {t.requested_fpr:g} (that needs >= {need}); the threshold {t.value:.6g} is {how}, "
        f"and the data support a rate anywhere in [{lo:.3g}, {hi:.3g}] (95 %). To fix: {advice} "
        f"({need - t.n} more), or request threshold.normal_fpr >= {1.0 / (t.n + 1):.2g}.",
        stacklevel=3,
    )


def _rewarn_together(messages: list[str]) -> None:
    """The small-sample warnings of several categories as ONE warning (a unified run of 15
    categories would otherwise print 15 near-identical lines): each category's own line, indented."""
    if len(messages) == 1:
        warnings.warn(messages[0], stacklevel=2)  # at calibrate_from's line
    elif messages:
        body = "\n  ".join(m.removeprefix("threshold calibration ") for m in messages)
        warnings.warn(f"threshold calibration: {len(messages)} categories have too few normal images for "
                      f"the requested false-alarm rate:\n  {body}", stacklevel=2)


def normalize(values: np.ndarray | torch.Tensor, threshold: float, scale: float) -> Any:
    """``sigmoid((values - threshold) / scale)``: the threshold maps to 0.5 (NaN if uncalibrated)."""
    if isinstance(values, torch.Tensor):
        return torch.sigmoid((values - threshold) / scale)
    z = (np.asarray(values, dtype=np.float64) - threshold) / scale
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)  # overflow-free sigmoid


# ------------------------------------------------------------------------------ normal scores
def pixel_sample(maps: torch.Tensor, per_image: int = PIXELS_PER_IMAGE) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) maps -> (B, S) pixels: every s-th pixel in raster order, s =
    ceil(H * W / per_image), the same positions for every image (maps are smooth: sigma-4 blur)."""
    flat = maps.reshape(maps.shape[0], -1)
    step = max(1, math.ceil(flat.shape[1] / per_image))
    return flat[:, ::step].float()


@dataclass
class NormalScores:
    """Out-of-sample scores of normal images: per image its train-set index, category, score and
    a ``pixel_sample`` of its map (rows aligned); ``source`` says where they come from."""

    index: np.ndarray
    category: list[str]
    score: np.ndarray
    pixels: np.ndarray  # (N, S)
    source: str
    excluded: int = 0  # train images left out (in-sample by construction)
    extra: dict[str, Any] = field(default_factory=dict)


class ScoreCollector:
    """Collects (index, maps, scores) batches of one rank; ``finish`` gathers all ranks (dataset
    order, one row per image)."""

    def __init__(self) -> None:
        self.index: list[torch.Tensor] = []
        self.score: list[torch.Tensor] = []
        self.pixels: list[torch.Tensor] = []

    def add(self, index: torch.Tensor, maps: torch.Tensor, scores: torch.Tensor) -> None:
        self.index.append(torch.as_tensor(index).detach().cpu().long().view(-1))
        self.score.append(scores.detach().float().cpu().view(-1))
        self.pixels.append(pixel_sample(maps.detach().float().cpu()))

    def finish(self, categories: list[str], source: str, group_device: torch.device | None = None,
               excluded: int = 0) -> NormalScores:
        width = self.pixels[0].shape[1] if self.pixels else 0
        index = torch.cat(self.index) if self.index else torch.zeros(0, dtype=torch.long)
        score = torch.cat(self.score) if self.score else torch.zeros(0)
        pixels = torch.cat(self.pixels) if self.pixels else torch.zeros(0, width)
        if is_distributed():
            group_device = group_device or torch.device("cpu")
            index = gather_rows(index[:, None], group_device)[:, 0]
            score = gather_rows(score[:, None], group_device)[:, 0]
            pixels = gather_rows(pixels, group_device)
        index, first = np.unique(index.numpy(), return_index=True)  # sorted, padding duplicates dropped
        return NormalScores(index, [categories[i] for i in index], score.numpy()[first], pixels.numpy()[first],
                            source, excluded)


@torch.no_grad()
def held_out_scores(module: Any, datamodule: Any, batch_size: int = 16) -> NormalScores | None:
    """Run ``module`` on the held-out normal images (the validation split's label-0 records; every
    rank its strided shard, gathered)."""
    ds = datamodule.dataset("val")
    keep = [i for i, rec in enumerate(ds.records) if int(rec.label) == 0]
    if not keep:
        return None
    shard = keep
    if is_distributed():
        shard = keep[torch.distributed.get_rank()::torch.distributed.get_world_size()]
    loader = DataLoader(Subset(ds, shard), batch_size=batch_size, shuffle=False,
                        num_workers=getattr(datamodule, "num_workers", 0))
    was_training = module.training
    module.eval()
    collector = ScoreCollector()
    for batch in loader:
        out = module._predict_with_size({"image": batch["image"].to(module.device), "category": batch.get("category")})
        collector.add(batch["index"], out["anomaly_map"], out["pred_score"])
    module.train(was_training)
    group = module.device if module.device.type == "cuda" else torch.device("cpu")
    return collector.finish([r.category for r in ds.records], f"held-out split ({len(keep)} images)", group)


def apply_holdout(datamodule: Any, holdout_fraction: float) -> None:
    """Hold out ``holdout_fraction`` of the train good images for calibration when the method
    holds none out itself (``data.val_fraction`` 0, e.g. UniAD); call before indexing."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError(f"threshold.holdout_fraction={holdout_fraction} must be in [0, 1)")
    if getattr(datamodule, "val_fraction", None) == 0.0 and holdout_fraction > 0:
        datamodule.val_fraction = holdout_fraction


def cross_fits(module: Any, datamodule: Any, folds: int) -> bool:
    """Whether this fit cross-fits its calibration scores: a method that supports it, ``folds`` >= 2
    and a train loader that serves normal train images only (``data.fit_split=train``)."""
    if folds < 0 or folds == 1:
        raise ConfigError(f"threshold.folds={folds}: use 0 (a held-out split) or >= 2 folds")
    return bool(getattr(module, "supports_crossfit", False)) and folds >= 2 and \
        getattr(datamodule, "fit_split", "train") == "train"


# ------------------------------------------------------------------------------ calibration
def calibrate_from(module: Any, normal: NormalScores, normal_fpr: float = 0.01, pixel_normal_fpr: float | None = None,
                   tail: str = "auto", min_exceedances: float = MIN_EXCEEDANCES, tail_fraction: float = 0.2,
                   advice: str = "add normal train images") -> dict[str, Any]:
    """Per-category and global thresholds from ``normal``; sets the module's global buffers and its
    ``calibration_info`` (the plain-type checkpoint entry); returns that."""
    pixel_fpr = normal_fpr if pixel_normal_fpr is None else pixel_normal_fpr
    kw = dict(tail=tail, min_exceedances=min_exceedances, tail_fraction=tail_fraction, advice=advice)
    cats = np.asarray(normal.category)
    per_cat: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:  # one warning for all categories, below
        warnings.simplefilter("always")
        for cat in dict.fromkeys(normal.category):
            sel = cats == cat
            image = normal_threshold(normal.score[sel], normal_fpr, "image", where=f"category '{cat}'", **kw)
            pixel = normal_threshold(normal.pixels[sel], pixel_fpr, "pixel", tail="conformal", where=f"category '{cat}'")
            per_cat[cat] = {**_values(image, pixel), "image": image.summary(), "pixel": _pixel_summary(pixel),
                            "scores": [float(s) for s in normal.score[sel]]}
    for w in caught:  # anything else caught above, as it was
        if not str(w.message).startswith("threshold calibration"):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    _rewarn_together([str(w.message) for w in caught if str(w.message).startswith("threshold calibration")])
    if len(per_cat) == 1:
        cat = next(iter(per_cat))
        glob = {k: per_cat[cat][k] for k in THRESHOLD_BUFFERS}
        glob_info = {"image": per_cat[cat]["image"], "pixel": per_cat[cat]["pixel"]}
    else:
        with warnings.catch_warnings():  # each category warned already
            warnings.simplefilter("ignore")
            image_t = normal_threshold(normal.score, normal_fpr, "image", **kw)
            pixel_t = normal_threshold(normal.pixels, pixel_fpr, "pixel", tail="conformal")
        glob, glob_info = _values(image_t, pixel_t), {"image": image_t.summary(), "pixel": _pixel_summary(pixel_t)}
    for name in THRESHOLD_BUFFERS:
        getattr(module, name).fill_(glob[name])
    info = {"source": normal.source, "normal_images": int(len(normal.score)), "excluded_images": normal.excluded,
            "image_normal_fpr": normal_fpr, "pixel_normal_fpr": pixel_fpr, "tail": tail,
            "global": {**glob, **glob_info}, "categories": per_cat, **normal.extra}
    module.calibration_info = info
    if not is_distributed() or torch.distributed.get_rank() == 0:
        for cat, c in per_cat.items():
            i = c["image"]
            lo, hi = i["fpr_interval"]
            log.info(f"Calibrated '{cat}' on {i['normal_values']} normal images ({normal.source}): image threshold "
                     f"{i['threshold']:.6g} by {i['rule']} ({i['determined_by']} image(s) determine it), "
                     f"false-alarm rate {i['fpr_calibration']:.3g} on them [95 %: {lo:.3g}, {hi:.3g}], requested "
                     f"{normal_fpr:g}; pixel threshold {c['pixel_threshold']:.6g}")
    return info


def _pixel_summary(pixel: Threshold) -> dict[str, Any]:
    """Pixels of one map are strongly correlated: no binomial interval for them."""
    return {k: v for k, v in pixel.summary().items() if k != "fpr_interval"}


def _values(image: Threshold, pixel: Threshold) -> dict[str, float]:
    return {"image_threshold": image.value, "image_scale": image.scale,
            "pixel_threshold": pixel.value, "pixel_scale": pixel.scale}


def set_thresholds(module: Any, image: Threshold, pixel: Threshold) -> None:
    for name, value in _values(image, pixel).items():
        getattr(module, name).fill_(value)


def thresholds_of(module: Any) -> dict[str, float]:
    """The four global threshold buffers as floats (NaN when not calibrated)."""
    return {name: float(getattr(module, name)) for name in THRESHOLD_BUFFERS}


def category_thresholds(info: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Per category the four thresholds of a ``calibration_info`` (empty for older checkpoints)."""
    cats = (info or {}).get("categories") or {}
    return {cat: {k: float(c[k]) for k in THRESHOLD_BUFFERS} for cat, c in cats.items()
            if all(k in c for k in THRESHOLD_BUFFERS)}


def thresholds_for(module: Any, category: str | None) -> dict[str, float]:
    """The category's own thresholds when calibrated, else the global ones."""
    return category_thresholds(getattr(module, "calibration_info", None)).get(category) or thresholds_of(module)


# ------------------------------------------------------------------------------ test time
def metrics_at_thresholds(scores: np.ndarray, labels: np.ndarray, maps: np.ndarray | None,
                          masks: np.ndarray | None, image_threshold: float, pixel_threshold: float) -> dict:
    """Image precision, recall, F1, false-alarm rate and the pixel IoU (over all pixels of the
    given images) at fixed thresholds; a value the data cannot define is None."""
    out: dict[str, float | None] = dict.fromkeys(CALIBRATED_KEYS)
    if math.isfinite(image_threshold):
        pred = np.asarray(scores) > image_threshold
        lab = np.asarray(labels).astype(bool)
        tp, fp = int((pred & lab).sum()), int((pred & ~lab).sum())
        fn = int((~pred & lab).sum())
        out["image_precision"] = tp / (tp + fp) if tp + fp else None
        out["image_recall"] = tp / (tp + fn) if tp + fn else None
        out["image_f1"] = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None
        out["image_fpr"] = fp / int((~lab).sum()) if (~lab).any() else None
    if maps is not None and masks is not None and math.isfinite(pixel_threshold):
        region = maps > pixel_threshold
        union = int((region | masks).sum())
        out["pixel_iou"] = int((region & masks).sum()) / union if union else None
    return out


def calibrated_category(scores: np.ndarray, labels: np.ndarray, maps: np.ndarray | None,
                        masks: np.ndarray | None, module: Any, category: str | None = None) -> dict:
    """``metrics_at_thresholds`` of one category at its calibrated thresholds (``thresholds_for``)."""
    thr = thresholds_for(module, category)
    return metrics_at_thresholds(scores, labels, maps, masks, thr["image_threshold"], thr["pixel_threshold"])


def calibrated_results(per_cat: dict[str, dict], module: Any) -> dict[str, Any]:
    """The ``calibrated`` entry of results.json: thresholds (global and per category, with the
    rule, the images that determine it and the Clopper-Pearson interval of the rate; the normal
    scores themselves stay in the checkpoint) and the metrics at them, with the unweighted mean."""
    mean = {}
    for key in CALIBRATED_KEYS:
        values = [m[key] for m in per_cat.values() if m[key] is not None]
        mean[key] = float(sum(values)) / len(values) if values else None
    finite = {k: (v if math.isfinite(v) else None) for k, v in thresholds_of(module).items()}
    info = dict(getattr(module, "calibration_info", None) or {})
    if "categories" in info:
        info["categories"] = {cat: {k: v for k, v in c.items() if k != "scores"} for cat, c in info["categories"].items()}
    return {"thresholds": {**finite, **info}, "categories": per_cat, "mean": mean}
