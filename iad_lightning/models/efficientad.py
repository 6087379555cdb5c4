"""EfficientAD (Batzner et al., WACV 2024) as plain torch: PDN, autoencoder and the inference graph.

Follows specs/efficientad.md (reference: nelson1425/EfficientAD ``common.py`` / ``efficientad.py``):

- ``PDN``: the patch description network, an ``nn.Sequential`` laid out exactly like nelson's
  ``get_pdn_small`` / ``get_pdn_medium`` so that their ``teacher_*.pth`` keys (``0.weight``,
  ``3.weight``, ...) load directly; anomalib's ``conv1..conv6`` keys are mapped by
  ``load_teacher_weights``.
- ``AutoEncoder``: the 64-d bottleneck autoencoder; decoder resize targets follow anomalib's rule
  (H//64-1, H//32, H//16-1, H//8, H//4-1, H//2-1, then ceil(H/4)-8 unpadded / ceil(H/4) padded),
  which is 3, 8, 15, 32, 63, 127, 56 for 256 (spec §2).
- ``EfficientADModel``: teacher, student (2x channels) and AE, with the fit-time statistics as
  buffers (teacher channel mean/std, the four map quantiles) so that ``forward`` is the whole
  deployable graph: images -> (anomaly map at input size, image score). No Lightning here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iad_lightning.errors import WeightsError
from iad_lightning.safe_load import PDN_MODULES, safe_torch_load

__all__ = [
    "PDN",
    "AutoEncoder",
    "EfficientADModel",
    "exact_quantile",
    "hard_feature_loss",
    "load_teacher_weights",
    "normalize_map",
]

MODEL_SIZES = ("small", "medium")

# nn.Sequential indices of the convolutions in nelson's get_pdn_small / get_pdn_medium, in order;
# anomalib names the same layers conv1, conv2, ...
_CONV_INDICES = {"small": (0, 3, 6, 8), "medium": (0, 3, 6, 8, 10, 12)}


class PDN(nn.Sequential):
    """Patch description network (spec §2): PDN-S or PDN-M with ``out_channels`` outputs.

    ``padding=False`` (how both reimplementations train and test): 256 -> 56x56; ``padding=True``
    (how the teacher is pretrained): 256 -> 64x64. The same weights work in both cases.
    Receptive field 33x33, total stride 4.
    """

    def __init__(self, model_size: str = "small", out_channels: int = 384, padding: bool = False) -> None:
        if model_size not in MODEL_SIZES:
            raise ValueError(f"model_size='{model_size}' must be one of {MODEL_SIZES}")
        p = 1 if padding else 0
        if model_size == "small":
            layers = [
                nn.Conv2d(3, 128, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(128, 256, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(256, 256, 3, padding=p), nn.ReLU(inplace=True),
                nn.Conv2d(256, out_channels, 4),
            ]
        else:
            layers = [
                nn.Conv2d(3, 256, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(256, 512, 4, padding=3 * p), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2, padding=p),
                nn.Conv2d(512, 512, 1), nn.ReLU(inplace=True),
                nn.Conv2d(512, 512, 3, padding=p), nn.ReLU(inplace=True),
                nn.Conv2d(512, out_channels, 4), nn.ReLU(inplace=True),
                nn.Conv2d(out_channels, out_channels, 1),
            ]
        super().__init__(*layers)
        self.model_size, self.out_channels, self.padding = model_size, out_channels, padding


def pdn_output_size(size: int, padding: bool = False) -> int:
    """Spatial PDN output size for an input side ``size`` (same for PDN-S and PDN-M)."""
    return math.ceil(size / 4) if padding else math.ceil(size / 4) - 8


class AutoEncoder(nn.Module):
    """EfficientAD autoencoder (spec §2): 6 strided convs to a 64x1x1 latent, then 6 blocks of
    bilinear resize -> Conv(64, k4, p2) -> ReLU -> Dropout(0.2), a resize to the PDN map size and two
    3x3 convs to ``out_channels``.

    Deviation for ``image_size < 256`` (not in the paper, which uses 256 only): the last encoder
    conv (k8) gets zero padding so that its output stays 1x1 (for 128 px the 4x4 map is padded by 2);
    at 256 the padding is 0 and the layer is exactly the paper's. Parameter counts do not change.
    """

    def __init__(self, out_channels: int = 384, padding: bool = False, image_size: int = 256) -> None:
        super().__init__()
        self.image_size, self.padding = int(image_size), bool(padding)
        last = max(1, self.image_size // 32)
        enc_pad = max(0, (8 - last + 1) // 2)
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 8, stride=1, padding=enc_pad),
        )
        s = self.image_size
        # anomalib's rule; for 256: 3, 8, 15, 32, 63, 127 (convs make them 4, 9, 16, 33, 64, 128);
        # clamped to >= 1 for image_size < 128 (small test sizes only)
        sizes = (s // 64 - 1, s // 32, s // 16 - 1, s // 8, s // 4 - 1, s // 2 - 1)
        self.decoder_sizes = tuple(max(1, v) for v in sizes)
        self.output_size = pdn_output_size(s, self.padding)
        if self.output_size < 1:
            raise ValueError(f"image_size={image_size} is too small for EfficientAD (use >= 64)")
        self.decoder = nn.ModuleList(
            nn.Sequential(nn.Conv2d(64, 64, 4, stride=1, padding=2), nn.ReLU(inplace=True), nn.Dropout(0.2))
            for _ in self.decoder_sizes
        )
        self.head = nn.Sequential(
            nn.Conv2d(64, 64, 3, stride=1, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, out_channels, 3, stride=1, padding=1),
        )

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        for size, block in zip(self.decoder_sizes, self.decoder):
            z = block(F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False))
        z = F.interpolate(z, size=(self.output_size, self.output_size), mode="bilinear", align_corners=False)
        return self.head(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


# ------------------------------------------------------------------------------- maths helpers
def exact_quantile(x: Tensor, q: float) -> Tensor:
    """``torch.quantile(x.flatten(), q)`` (linear interpolation) without its 2**24-element limit.

    Up to 2**24 elements this is ``torch.quantile``; above, the same interpolation on a full sort
    (exact, no subsampling; ``kthvalue``'s quickselect degrades to quadratic time on sorted data).
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if n <= 2**24:
        return torch.quantile(flat, q)
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    ordered = flat.sort().values
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


def hard_feature_loss(distance: Tensor, quantile: float = 0.999) -> Tensor:
    """L_hard = mean(D[D >= d_hard]), d_hard the ``quantile`` of D over all elements (spec §4).

    The ``>=`` keeps the threshold element (1,205 of 1,204,224 elements for distinct values).
    """
    d_hard = exact_quantile(distance.detach(), quantile)
    keep = (distance >= d_hard).to(distance.dtype)
    return (distance * keep).sum() / keep.sum()


def normalize_map(m: Tensor, q_start: Tensor, q_end: Tensor) -> Tensor:
    """M_hat = 0.1 * (M - q_a) / (q_b - q_a): q_a -> 0, q_b -> 0.1 (spec §5)."""
    return 0.1 * (m - q_start) / (q_end - q_start)


# ------------------------------------------------------------------------------------- model
class EfficientADModel(nn.Module):
    """Teacher (frozen PDN), student (PDN with 2x channels) and autoencoder.

    Buffers: ``teacher_mean``/``teacher_std`` (1, C, 1, 1), fitted on the train split;
    ``q_st_start``/``q_st_end``/``q_ae_start``/``q_ae_end`` (0-d), fitted on the validation split.
    Their defaults (0, 1 and 0, 0.1) make the normalisations the identity.
    """

    def __init__(
        self,
        model_size: str = "small",
        out_channels: int = 384,
        padding: bool = False,
        pad_maps: bool = True,
        image_size: int = 256,
        ae_map_weight: float = 0.5,
    ) -> None:
        super().__init__()
        self.model_size, self.out_channels = model_size, int(out_channels)
        self.ae_map_weight = float(ae_map_weight)  # M = (1 - w) M_ST + w M_AE; the paper: w = 0.5
        self.padding, self.pad_maps, self.image_size = bool(padding), bool(pad_maps), int(image_size)
        self.teacher = PDN(model_size, out_channels, padding)
        self.student = PDN(model_size, 2 * out_channels, padding)
        self.autoencoder = AutoEncoder(out_channels, padding, image_size)
        self.teacher.requires_grad_(False)
        self.register_buffer("teacher_mean", torch.zeros(1, out_channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, out_channels, 1, 1))
        self.register_buffer("q_st_start", torch.tensor(0.0))
        self.register_buffer("q_st_end", torch.tensor(0.1))
        self.register_buffer("q_ae_start", torch.tensor(0.0))
        self.register_buffer("q_ae_end", torch.tensor(0.1))

    def train(self, mode: bool = True) -> "EfficientADModel":
        super().train(mode)
        self.teacher.eval()  # the teacher stays in eval mode at all times (spec §8.9)
        return self

    def teacher_features(self, images: Tensor) -> Tensor:
        """Normalised teacher output T_hat = (T - mu) / sigma."""
        with torch.no_grad():
            t = self.teacher(images)
        return (t - self.teacher_mean) / self.teacher_std

    def raw_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Un-normalised M_ST and M_AE, each (B, 1, h, w) at the PDN output size."""
        c = self.out_channels
        t = self.teacher_features(images)
        s = self.student(images)
        a = self.autoencoder(images)
        map_st = ((t - s[:, :c]) ** 2).mean(dim=1, keepdim=True)
        map_ae = ((a - s[:, c:]) ** 2).mean(dim=1, keepdim=True)
        return map_st, map_ae

    def combine(self, map_st: Tensor, map_ae: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
        """Quantile-normalise, average, pad by 4 (unpadded PDN) and resize to ``size`` (nelson's order)."""
        w = self.ae_map_weight
        m = (1.0 - w) * normalize_map(map_st, self.q_st_start, self.q_st_end)
        m = m + w * normalize_map(map_ae, self.q_ae_start, self.q_ae_end)
        if self.pad_maps and not self.padding:
            m = F.pad(m, (4, 4, 4, 4))  # restores the alignment lost by unpadded 33-px patches
        return F.interpolate(m, size=tuple(size), mode="bilinear", align_corners=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Inference: (anomaly_map (B, 1, H, W) at the input size, pred_score (B,) = map max)."""
        map_st, map_ae = self.raw_maps(images)
        amap = self.combine(map_st, map_ae, images.shape[-2:])
        return amap, amap.flatten(1).amax(dim=1)


# ---------------------------------------------------------------------------- teacher weights
def _expected_shapes(model_size: str, out_channels: int) -> "OrderedDict[str, torch.Size]":
    return OrderedDict((k, v.shape) for k, v in PDN(model_size, out_channels).state_dict().items())


def anomalib_key_map(model_size: str) -> dict[str, str]:
    """anomalib's PDN state-dict keys (``conv1.weight`` ...) -> ours / nelson's (``0.weight`` ...)."""
    indices = _CONV_INDICES[model_size]
    return {f"conv{i + 1}.{w}": f"{idx}.{w}" for i, idx in enumerate(indices) for w in ("weight", "bias")}


def load_teacher_weights(path: str | Path, model_size: str, out_channels: int = 384) -> dict[str, Tensor]:
    """A state dict for ``PDN(model_size, out_channels)`` from a teacher file.

    Accepted layouts (always loaded with ``torch.load(weights_only=True)``, ``safe_load``):
    - our ``method=efficientad_teacher`` output and nelson1425/EfficientAD ``teacher_*.pth``:
      ``nn.Sequential`` keys ``0.weight``, ``3.weight``, ...;
    - a whole pickled PDN (nelson's ``torch.save(teacher)``: ``teacher_final.pth``,
      ``teacher_*_final.pth``), when it is made of plain torch.nn Sequential / Conv2d / ReLU /
      AvgPool2d only; its state dict is used;
    - anomalib's ``pretrained_teacher_*.pth``: ``conv1.weight`` ... ``conv4.weight`` (S) /
      ``conv6.weight`` (M), mapped here to the Sequential indices;
    - either wrapped in ``{"state_dict": ...}`` or with a ``module.`` / ``teacher.`` prefix.
    Raises ``WeightsError`` naming the file and what was expected otherwise.
    """
    p = Path(path).expanduser()
    raw = safe_torch_load(p, extra_globals=PDN_MODULES, what="teacher weights file")
    if isinstance(raw, nn.Module):  # nelson's torch.save(teacher): only torch.nn PDN layers allowed
        raw = raw.state_dict()
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise WeightsError(f"teacher weights file '{p}' does not hold a state dict of tensors")
    state = {str(k): v for k, v in raw.items()}
    for prefix in ("module.", "teacher."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    indices = _CONV_INDICES[model_size]
    if any(k.startswith("conv") for k in state):  # anomalib layout
        mapping = anomalib_key_map(model_size)
        state = {mapping.get(k, k): v for k, v in state.items()}
    expected = _expected_shapes(model_size, out_channels)
    got = {k: tuple(v.shape) for k, v in state.items()}
    if set(got) != set(expected) or any(got[k] != tuple(s) for k, s in expected.items()):
        exp = ", ".join(f"{k}{tuple(s)}" for k, s in expected.items())
        raise WeightsError(
            f"teacher weights file '{p}' does not match PDN-{model_size[0].upper()} with {out_channels} "
            f"output channels: expected keys {exp} (nelson/ours) or conv1..conv{len(indices)} (anomalib); "
            f"got {', '.join(f'{k}{s}' for k, s in list(got.items())[:8])}"
            f"{' ...' if len(got) > 8 else ''}. Is method.model_size right?"
        )
    return {k: state[k].float() for k in expected}
