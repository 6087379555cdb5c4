"""ADPretrain (Yao et al., NeurIPS 2025) as plain torch: 4-level frozen backbones, residual
features, the per-level Feature Projector, patch labels and the angle / norm losses.

Follows the authors' code (``xcyao00/ADPretrain`` at 8baa6df, see ``specs/adpretrain.md``);
where paper and code differ, the code wins (spec section 9). Lightning-free; the pretraining
loop lives in ``methods/adpretrain.py``, the downstream plug-in in ``ResidualProjectorExtractor``.

Backbones (spec section 2), each with 4 levels = raw block outputs (no final norm, no projection):

========================  ==========================================  ===============  =====
name                      timm model                                  blocks (1-idx)   C
========================  ==========================================  ===============  =====
dinov2-base               vit_base_patch14_dinov2.lvd142m             3, 6, 9, 12      768
dinov2-large              vit_large_patch14_dinov2.lvd142m            6, 12, 18, 24    1024
clip-base                 vit_base_patch16_clip_quickgelu_224.openai  3, 6, 9, 12      768
clip-large                vit_large_patch14_clip_quickgelu_224.openai 6, 12, 18, 24    1024
tf_efficientnet_lite0     Lite0 stages (timm feature indices 1..4)    all on 16 x 16   24/40/112/320
========================  ==========================================  ===============  =====

``tf_efficientnet_lite0`` (alias ``lite0``, selected by ``backbone=lite0``) is our **offline
stand-in**, not part of ADPretrain. Its 4 stages sit on grids of stride 4/8/16/32 (56/28/14/7 at
224); each is resampled (bilinear, antialiased when shrinking) to the grid of a patch-14 ViT, 16 x 16
at 224, so every level has DINOv2-B/L's 256 tokens per image. Why: the projector's cost grows with the
tokens (attention to its 2,048 reference tokens, the angle loss's 2N x 2N products): the raw stride-4
stage (3,136 tokens) made pretraining at batch 32 need tens of GB, and the 14 px cells keep the
authors' patch-label rule (> 32 of 196 mask pixels) as it is. The widths stay different, so each
level's projector takes the largest head count <= 16 that divides its C (24 -> 12, 40 -> 10,
112 -> 16, 320 -> 16). CLIP goes through timm's port of the
OpenAI weights (the spec suggests open_clip; same weights and QuickGELU, timm is what we ship).
ImageBind is not offered (no timm port).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from iad_lightning.errors import ConfigError, WeightsError
from iad_lightning.safe_load import NUMPY_SCALARS, safe_torch_load
from iad_lightning.models.backbones import FeatureExtractor, create_timm_model

__all__ = [
    "BACKBONES",
    "LevelBackbone",
    "MultiLayerAttention",
    "MultiScaleProjector",
    "ResidualProjectorExtractor",
    "angle_loss",
    "dinov2_interpolate_pos_embed",
    "feature_norm",
    "load_projector_file",
    "match_residual",
    "norm_loss",
    "patch_label_threshold",
    "patchify_mask",
    "projector_file",
    "pseudo_huber_norm",
    "residual_features",
]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROJECTOR_FORMAT = "iad_lightning.adpretrain/1"


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    levels: tuple[int, ...]  # 0-based block indices (ViT) or timm feature indices (CNN)
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    kind: str  # "vit" | "cnn"
    dinov2_pos_embed: bool = False
    token_patch: int | None = None  # cnn: every level resampled to the (H // p, W // p) grid of a patch-p ViT


BACKBONES: dict[str, BackboneSpec] = {
    "dinov2-base": BackboneSpec("vit_base_patch14_dinov2.lvd142m", (2, 5, 8, 11), IMAGENET_MEAN, IMAGENET_STD,
                                "vit", dinov2_pos_embed=True),
    "dinov2-large": BackboneSpec("vit_large_patch14_dinov2.lvd142m", (5, 11, 17, 23), IMAGENET_MEAN, IMAGENET_STD,
                                 "vit", dinov2_pos_embed=True),
    "clip-base": BackboneSpec("vit_base_patch16_clip_quickgelu_224.openai", (2, 5, 8, 11), CLIP_MEAN, CLIP_STD, "vit"),
    "clip-large": BackboneSpec("vit_large_patch14_clip_quickgelu_224.openai", (5, 11, 17, 23), CLIP_MEAN, CLIP_STD,
                               "vit"),
    # offline stand-in: the Lite0 weights' own normalisation (timm pretrained cfg, 0.5 / 0.5)
    "tf_efficientnet_lite0": BackboneSpec("tf_efficientnet_lite0", (1, 2, 3, 4), None, None, "cnn", token_patch=14),
}
_ALIASES = {"lite0": "tf_efficientnet_lite0"}


def canonical_backbone_name(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in BACKBONES:
        raise ConfigError(
            f"ADPretrain backbone '{name}' is unknown; use one of {sorted(BACKBONES)} "
            "(method.backbone.name, or backbone=lite0 for the offline stand-in)"
        )
    return name


def dinov2_interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int], offset: float = 0.1) -> Tensor:
    """DINOv2's own ``interpolate_pos_encoding``: the (1, 1 + M*M, C) table (CLS first) resampled
    to ``grid`` with bicubic, ``scale_factor = (grid + offset) / M``, no antialias (timm instead
    resamples to a size with antialias, which gives slightly different values; spec section 2)."""
    n, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    m = int(math.sqrt(n))
    h0, w0 = grid
    if n == h0 * w0 and h0 == w0:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = F.interpolate(
        patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2).float(),
        scale_factor=((h0 + offset) / m, (w0 + offset) / m),
        mode="bicubic",
        antialias=False,
    )
    if tuple(patch_pos.shape[-2:]) != (h0, w0):
        raise RuntimeError(f"DINOv2 pos-embed interpolation gave {tuple(patch_pos.shape[-2:])}, expected {grid}")
    patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([cls_pos, patch_pos], dim=1)


class LevelBackbone(nn.Module):
    """A frozen backbone returning ADPretrain's 4 levels as (B, C_l, h_l, w_l) maps.

    ``weights``: ``hub`` (timm download), a local state-dict file, ``lite0`` (offline Lite0) or
    ``none`` (random, tests). Offline ``hub`` fails with one error naming
    ``method.backbone.weights=/path/to/file`` (``models/backbones.create_timm_model``).
    Extra keys of a method's backbone dict (e.g. PatchCore's ``layers``) are ignored: the levels
    are fixed by the backbone name, as in the authors' code.
    """

    def __init__(
        self,
        name: str,
        weights: str = "hub",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        self.name = canonical_backbone_name(name)
        spec = BACKBONES[self.name]
        self.spec = spec
        self.levels = list(spec.levels)
        if spec.kind == "cnn":
            self.cnn = FeatureExtractor(spec.timm_name, self.levels, weights=weights, mean=mean, std=std)
            self.channels = list(self.cnn.channels)
            self.reductions = [spec.token_patch] * 4 if spec.token_patch else list(self.cnn.reductions)
            self.mean, self.std = self.cnn.mean, self.cnn.std
            self.vit = None
        else:
            self.cnn = None
            vit = create_timm_model(spec.timm_name, weights)
            vit.patch_embed.strict_img_size = False  # built at 518 (DINOv2); we run at 224
            self.vit = vit.eval().requires_grad_(False)
            del self.vit.blocks[max(self.levels) + 1:]  # later blocks are never used
            self.channels = [vit.embed_dim] * 4
            self.patch_size = vit.patch_embed.patch_size[0]
            self.reductions = [self.patch_size] * 4
            self.mean = tuple(mean if mean is not None else spec.mean)
            self.std = tuple(std if std is not None else spec.std)

    def train(self, mode: bool = True) -> "LevelBackbone":
        return super().train(False)  # frozen, always eval

    def _vit_forward(self, images: Tensor) -> list[Tensor]:
        vit = self.vit
        b, _, h, w = images.shape
        grid = (h // self.patch_size, w // self.patch_size)
        x = vit.patch_embed(images)  # (B, h*w, C)
        if self.spec.dinov2_pos_embed:
            x = torch.cat([vit.cls_token.expand(b, -1, -1), x], dim=1)
            x = x + dinov2_interpolate_pos_embed(vit.pos_embed, grid).to(x.dtype)
        else:  # CLIP at its native 224: the table fits as it is
            x = vit._pos_embed(x)
        x = vit.norm_pre(x)  # CLIP's ln_pre; identity for DINOv2
        prefix = vit.num_prefix_tokens
        out = []
        for i, block in enumerate(vit.blocks):
            x = block(x)
            if i in self.levels:  # raw residual stream, no final norm; CLS / registers dropped
                out.append(x[:, prefix:].transpose(1, 2).reshape(b, -1, *grid))
        return out

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        if self.cnn is not None:
            feats = self.cnn(images)
            p = self.spec.token_patch
            if p:  # the stand-in's levels on a patch-p ViT's grid (module docstring)
                grid = (images.shape[-2] // p, images.shape[-1] // p)
                feats = [f if tuple(f.shape[-2:]) == grid else
                         F.interpolate(f, size=grid, mode="bilinear", align_corners=False, antialias=True)
                         for f in feats]
            return feats
        return self._vit_forward(images)


def default_num_heads(channels: int, wanted: int = 16) -> int:
    """``wanted`` heads when they divide C (all ADPretrain backbones), else the largest divisor of
    C below it (the Lite0 stand-in: 24 -> 12, 40 -> 10)."""
    return max(h for h in range(1, wanted + 1) if channels % h == 0)


# ------------------------------------------------------------------------------ residuals
def match_residual(feats: Tensor, bank: Tensor, chunk: int = 1 << 24) -> Tensor:
    """Residual r_i = f_i - R_{j*}, j* = argmax_j cos(f_i, R_j), on raw vectors (spec section 3).

    feats (B, L, C); bank (B, K, C) (one bank per image) or (K, C) (shared). Returns (B, L, C).
    The B x L x K similarity is computed in image chunks of about ``chunk`` elements.
    """
    b, length, c = feats.shape
    shared = bank.ndim == 2
    bank_n = F.normalize(bank.float(), dim=-1)
    out = torch.empty_like(feats)
    step = max(1, chunk // max(1, length * bank.shape[-2]))
    for s in range(0, b, step):
        f = feats[s:s + step]
        sim = F.normalize(f.float(), dim=-1) @ (bank_n.T if shared else bank_n[s:s + step].transpose(1, 2))
        idx = sim.argmax(-1)  # (b', L)
        nearest = bank[idx] if shared else torch.gather(bank[s:s + step], 1, idx[..., None].expand(-1, -1, c))
        out[s:s + step] = f - nearest.to(f.dtype)
    return out


def residual_features(feats: Sequence[Tensor], banks: Sequence[Tensor]) -> list[Tensor]:
    """Per level: (B, C, h, w) maps and banks (B|-, K, C) -> residual maps (B, C, h, w)."""
    out = []
    for f, bank in zip(feats, banks):
        b, c, h, w = f.shape
        tokens = f.flatten(2).transpose(1, 2)
        out.append(match_residual(tokens, bank).transpose(1, 2).reshape(b, c, h, w))
    return out


def bank_tokens(feats: Sequence[Tensor]) -> list[Tensor]:
    """Reference maps (n, C, h, w) per level -> banks (n*h*w, C), patches of all images flattened."""
    return [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in feats]


# ------------------------------------------------------------------------------ projector
def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's rule (the authors' SE uses it for the reduced width: 4C / 16 -> 192 at C = 768)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class SqueezeExcite(nn.Module):
    """Token squeeze-excitation: s = sigmoid(W2 ReLU(W1 mean_tokens(h))), h * s."""

    def __init__(self, channels: int, rd_ratio: float = 1 / 16) -> None:
        super().__init__()
        reduced = make_divisible(channels * rd_ratio, 8)
        self.fc1 = nn.Linear(channels, reduced)
        self.fc2 = nn.Linear(reduced, channels)

    def forward(self, h: Tensor) -> Tensor:
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean(dim=1)))))
        return h * s[:, None]


class ProjectorMLP(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, 4 * channels)
        self.se = SqueezeExcite(4 * channels)
        self.fc2 = nn.Linear(4 * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.se(self.fc1(x))))


class AttentionLayer(nn.Module):
    """x1 = x - MHA(x, Rp, Rp); out = MLP(x1) + x1 (subtractive residual, no LayerNorm)."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.mlp = ProjectorMLP(channels)

    def attend(self, x: Tensor, refs: Tensor) -> Tensor:
        """``cross_attn(x, refs, refs)`` with the key / value projections of the (1, N_r, C) reference
        tokens computed once, not once per image as ``nn.MultiheadAttention`` does with broadcast
        keys (at C = 768, N_r = 2048, batch 32 that is ~77 GFLOP per level saved). Same weights and
        numbers (tested against ``nn.MultiheadAttention``)."""
        attn = self.cross_attn
        b, length, c = x.shape
        heads = attn.num_heads
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        q = F.linear(x, w_q, b_q).view(b, length, heads, c // heads).transpose(1, 2)
        k = F.linear(refs, w_k, b_k).view(1, -1, heads, c // heads).transpose(1, 2).expand(b, -1, -1, -1)
        v = F.linear(refs, w_v, b_v).view(1, -1, heads, c // heads).transpose(1, 2).expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, c)
        return attn.out_proj(out)

    def forward(self, x: Tensor, refs: Tensor) -> Tensor:
        x1 = x - self.attend(x, refs)  # subtractive residual
        return self.mlp(x1) + x1


class RefProjection(nn.Module):
    """``Conv1d(C, C, 1)`` over the learnable reference tokens (key ``ref_proj.project``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.project = nn.Conv1d(channels, channels, kernel_size=1)
        nn.init.kaiming_normal_(self.project.weight, mode="fan_in", nonlinearity="leaky_relu")

    def forward(self, tokens: Tensor) -> Tensor:  # (1, N_r, C) -> (1, N_r, C)
        return self.project(tokens.transpose(1, 2)).transpose(1, 2)


class MultiLayerAttention(nn.Module):
    """One level's Feature Projector (authors' ``MultiLayerAttention``, num_layers = 1).

    K = V = ref_proj(x_ref), x_ref (1, N_r = 2048, C) learnable, randn-initialised.
    Input and output (B, C, h, w). 10,431,168 parameters at C = 768.
    """

    def __init__(self, channels: int, num_heads: int = 16, num_ref_tokens: int = 2048, num_layers: int = 1) -> None:
        super().__init__()
        if channels % num_heads:
            raise ConfigError(f"projector: {num_heads} heads do not divide C = {channels}")
        self.x_ref = nn.Parameter(torch.randn(1, num_ref_tokens, channels))
        self.ref_proj = RefProjection(channels)
        self.layers = nn.ModuleList(AttentionLayer(channels, num_heads) for _ in range(num_layers))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        refs = self.ref_proj(self.x_ref)
        for layer in self.layers:
            tokens = layer(tokens, refs)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class MultiScaleProjector(nn.Module):
    """4 independent level projectors ``l1_proj .. l4_proj`` (authors' MultiScaleAttentionProjector)."""

    def __init__(self, channels: Sequence[int], num_heads: int | Sequence[int] | None = 16,
                 num_ref_tokens: int = 2048, num_layers: int = 1) -> None:
        super().__init__()
        if num_heads is None or isinstance(num_heads, int):
            heads = [default_num_heads(c, num_heads or 16) for c in channels]
        else:
            heads = list(num_heads)
        self.channels, self.num_heads = [int(c) for c in channels], heads
        self.num_ref_tokens, self.num_layers = num_ref_tokens, num_layers
        for k, (c, nh) in enumerate(zip(channels, heads), start=1):
            self.add_module(f"l{k}_proj", MultiLayerAttention(c, nh, num_ref_tokens, num_layers))

    def level(self, k: int) -> MultiLayerAttention:
        return getattr(self, f"l{k + 1}_proj")

    def forward(self, feats: Sequence[Tensor], levels: Sequence[int] | None = None) -> list[Tensor]:
        """Project each level; ``levels`` (0-based) says which projector each input map goes to."""
        levels = list(range(len(feats))) if levels is None else list(levels)
        return [self.level(k)(f) for k, f in zip(levels, feats)]


# ------------------------------------------------------------------------------ labels
def patch_label_threshold(patch: int) -> float:
    """Authors: a patch is abnormal when more than 32 of its mask pixels are set, for their 14 or 16
    px ViT patches. Our Lite0 stand-in has smaller cells (4..32 px at 224): below 14 px the count
    scales with the area, 32 * p^2 / 196 (same fraction as a 14 px patch); 14 px and up keep 32."""
    return 32.0 if patch >= 14 else 32.0 * patch * patch / 196.0


def patchify_mask(mask: Tensor, grid: tuple[int, int], threshold: float | None = None) -> Tensor:
    """m1 (angle loss): (B, 1, H, W) {0,1} mask -> (B, h*w) bool, True when > threshold pixels of the
    (H/h x W/w) patch are 1 (authors' ``patchify_mask``, threshold 32)."""
    b, _, height, width = mask.shape
    ph, pw = height // grid[0], width // grid[1]
    thr = patch_label_threshold(min(ph, pw)) if threshold is None else threshold
    m = mask[..., : ph * grid[0], : pw * grid[1]].float()
    counts = m.reshape(b, grid[0], ph, grid[1], pw).sum(dim=(2, 4))
    return (counts > thr).reshape(b, -1)


def downsample_mask(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """m2 (norm loss): nearest downsampling of the mask to the level's grid -> (B, h*w) bool."""
    return F.interpolate(mask.float(), size=tuple(grid), mode="nearest").reshape(mask.shape[0], -1) > 0.5


# ------------------------------------------------------------------------------ losses
def pseudo_huber_norm(e: Tensor) -> Tensor:
    """A = sqrt(||e||_2 + 1) - 1: the authors' code uses the norm, not its square (spec 9.2)."""
    return torch.sqrt(e.float().norm(dim=-1) + 1.0) - 1.0


def _neg_logsumexp(z: Tensor, labels: Tensor, tau: float, start: int, stop: int) -> Tensor:
    sim = z[start:stop] @ z.T / tau
    same = labels[start:stop, None] == labels[None, :]
    return torch.logsumexp(sim.masked_fill(same, float("-inf")), dim=1)


def angle_loss(e1: Tensor, e2: Tensor, labels: Tensor, center: Tensor | None = None, tau: float = 0.15,
               chunk_elems: int = 1 << 24) -> Tensor:
    """Angle-oriented loss (authors' ``angle_loss``), both views as anchors (spec 9.1).

    e1, e2 (N, C) projector outputs of the two views, labels (N,) bool (m1), center (C,) or None.
    L = mean_a -log(pos_a / neg_a), pos_a = exp(<z1_i, z2_i>/tau), neg_a = sum over the patches of
    the *other* label, both views; the positive is not in the denominator. Computed as
    log(neg_a) - <z1_i, z2_i>/tau with a log-sum-exp over anchor chunks, each chunk recomputed in
    the backward pass (checkpointing), so memory stays at one (chunk, 2N) block. Returns -inf
    when one label is absent (no negatives); the caller maps non-finite values to 0.
    """
    if center is not None:
        e1, e2 = e1 - center, e2 - center
    z1, z2 = F.normalize(e1.float(), dim=-1), F.normalize(e2.float(), dim=-1)
    z = torch.cat([z1, z2])
    y = torch.cat([labels, labels]).bool()
    pos = (z1 * z2).sum(-1) / tau
    pos = torch.cat([pos, pos])
    n2 = z.shape[0]
    step = max(1, chunk_elems // n2)
    parts = []
    for s in range(0, n2, step):
        if z.requires_grad:
            parts.append(checkpoint(_neg_logsumexp, z, y, tau, s, min(s + step, n2), use_reentrant=False))
        else:
            parts.append(_neg_logsumexp(z, y, tau, s, min(s + step, n2)))
    return (torch.cat(parts) - pos).mean()


def _weighted_softplus(t: Tensor) -> Tensor:
    """softplus(t) * sg(exp(t)), mean over the entries; 0 when there are none."""
    if t.numel() == 0:
        return t.new_zeros(())
    return (F.softplus(t) * torch.exp(t).detach()).mean()


def norm_loss(e: Tensor, abnormal: Tensor, r_max: float = 0.4, margin: float = 0.75, shell: float = 0.99,
              adapt: float = 0.9) -> Tensor:
    """Norm-oriented loss (authors' ``norm_loss``): normal norms in the thin shell
    [0.99 r_max, r_max] with r_max = min(0.9 min_abnormal A (no grad), 0.4), abnormal norms pushed
    past r_max + 0.75. e (N, C), abnormal (N,) bool (m2)."""
    a = pseudo_huber_norm(e)
    abnormal = abnormal.bool()
    radius = a.new_tensor(r_max)
    if abnormal.any():
        radius = torch.minimum(adapt * a[abnormal].min().detach(), radius)
    r_min = shell * radius
    an, aa = a[~abnormal], a[abnormal]
    normal_term = _weighted_softplus((an - radius)[an > radius]) + _weighted_softplus((r_min - an)[an < r_min])
    bound = radius + margin
    abnormal_term = _weighted_softplus((bound - aa)[aa < bound])
    return normal_term + abnormal_term


def feature_norm(feats: Sequence[Tensor], input_size: tuple[int, int], blur_sigma: float = 4.0) -> tuple[Tensor, Tensor]:
    """FeatureNorm scoring (authors' ``val_norm.py``): per patch sqrt(||e|| + 1) - 1, each level
    upsampled bilinearly (align_corners=True) to the input size, averaged over the levels, Gaussian
    sigma 4; image score = max of the map. Returns (maps (B, 1, H, W), scores (B,))."""
    from iad_lightning.models.patchcore import gaussian_blur

    maps = []
    for f in feats:
        a = torch.sqrt(f.float().norm(dim=1, keepdim=True) + 1.0) - 1.0
        maps.append(F.interpolate(a, size=tuple(input_size), mode="bilinear", align_corners=True))
    amap = gaussian_blur(torch.stack(maps).mean(0), blur_sigma)
    return amap, amap.flatten(1).amax(1)


# ------------------------------------------------------------------------------ files
def projector_file(projector: MultiScaleProjector, backbone: LevelBackbone, image_size: int,
                   centers: Sequence[Tensor] | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pretraining run's output: tensors and plain types only (``weights_only`` loadable)."""
    return {
        "format": PROJECTOR_FORMAT,
        "projectors": {k: v.detach().cpu() for k, v in projector.state_dict().items()},
        "backbone": backbone.name,
        "levels": list(backbone.levels),
        "channels": list(projector.channels),
        "num_heads": list(projector.num_heads),
        "num_ref_tokens": projector.num_ref_tokens,
        "image_size": int(image_size),
        "centers": [c.detach().float().cpu() for c in centers] if centers is not None else None,
        **(extra or {}),
    }


def _infer_layout(state: dict[str, Tensor], path: Path) -> tuple[list[int], int, int]:
    channels, k = [], 1
    while f"l{k}_proj.x_ref" in state:
        channels.append(int(state[f"l{k}_proj.x_ref"].shape[-1]))
        k += 1
    if not channels:
        raise WeightsError(f"projector file '{path}': no 'l1_proj.x_ref' in 'projectors'; not an ADPretrain file")
    layers = 1 + max(int(key.split(".")[2]) for key in state if key.startswith("l1_proj.layers."))
    return channels, int(state["l1_proj.x_ref"].shape[1]), layers


def load_projector_file(path: str | Path, backbone: str | None = None) -> tuple[MultiScaleProjector, dict[str, Any]]:
    """Load our projector file or a released ADPretrain checkpoint (``{'projectors': state_dict,
    'img_auc', ...}``, spec section 4 key names) with ``weights_only=True``.

    ``backbone`` (the downstream method's backbone name) must match the file's; released files name
    no backbone, so only the channel widths can be checked (by the caller) and a warning says so.
    Returns the projector (eval, frozen) and the file's metadata.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"projector file '{path}' does not exist; set method.projector=/path/to/projector.pt "
                           "(written by `python train.py method=adpretrain ...`, or a released checkpoints_*.pth)")
    # the authors' main.py stores img_auc / pix_auc / pix_pro as numpy.float64: numpy scalars (and
    # nothing else beyond tensors and plain containers) are allowed, weights_only stays on
    blob = safe_torch_load(path, NUMPY_SCALARS, what="projector file")
    if not isinstance(blob, dict) or not isinstance(blob.get("projectors"), dict):
        raise WeightsError(f"projector file '{path}' has no 'projectors' state dict")
    state = {k.removeprefix("module."): v for k, v in blob["projectors"].items()}
    channels, n_ref, n_layers = _infer_layout(state, path)
    meta = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in blob.items() if k != "projectors"}
    if meta.get("backbone") is not None and backbone is not None:
        if canonical_backbone_name(meta["backbone"]) != canonical_backbone_name(backbone):
            raise ConfigError(
                f"projector file '{path}' was pretrained on backbone '{meta['backbone']}', but the method's "
                f"backbone is '{backbone}'; set method.backbone.name={meta['backbone']} (or use a projector "
                "pretrained on this backbone)"
            )
        expected = list(BACKBONES[canonical_backbone_name(backbone)].levels)
        if list(meta.get("levels", expected)) != expected:
            raise ConfigError(f"projector file '{path}': levels {meta['levels']} differ from backbone "
                              f"'{backbone}' levels {expected}")
    elif meta.get("backbone") is None:
        warnings.warn(f"projector file '{path}' names no backbone (a released ADPretrain checkpoint?): only the "
                      "channel widths are checked; make sure method.backbone.name is the one it was trained on",
                      stacklevel=2)
    heads = meta.get("num_heads") or 16
    projector = MultiScaleProjector(channels, heads, n_ref, n_layers)
    target = projector.state_dict()
    fixed = {}
    for key, value in state.items():  # e.g. an SE stored as 1x1 conv: same numbers, other shape
        if key in target and value.shape != target[key].shape and value.numel() == target[key].numel():
            value = value.reshape(target[key].shape)
        fixed[key] = value
    try:
        projector.load_state_dict(fixed, strict=True)
    except RuntimeError as err:
        raise WeightsError(f"projector file '{path}' does not fit the ADPretrain projector layout: {err}") from err
    meta.setdefault("channels", channels)
    return projector.eval().requires_grad_(False), meta


# ------------------------------------------------------------------------------ downstream
class ResidualProjectorExtractor(nn.Module):
    """Downstream features = projector(residual(backbone(x), bank)) (spec section 7) for the
    ``levels`` (0-based of the 4) a method uses, as a list of NCHW maps like ``FeatureExtractor``.

    ``projector=None`` gives the baseline features (raw backbone levels, no residual). The bank
    (per level (K, C) reference patches) is set by ``set_bank`` from k-shot normal images, one bank
    per category: each image is matched against its own category's bank, as the authors'
    ``train_val_*.py`` do (they run per class; in unified mode every image still uses its class's
    bank). Categories come with ``forward(images, categories)`` or the ``batch_categories`` context.
    Without category names (exported graphs, ``predict.py``, the Python API) or for a name with no
    bank, an image is matched against the banks of all categories together (the nearest reference
    patch of any class); with one category that is its bank. The banks are buffers (rows of all
    categories, ``bank_offsets``, the names as UTF-8 ``bank_names``), saved with the method and
    reloaded at any size.
    """

    def __init__(self, backbone: LevelBackbone, projector: MultiScaleProjector | None,
                 levels: Sequence[int] = (0, 1, 2, 3)) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector.eval().requires_grad_(False) if projector is not None else None
        self.levels = [int(k) for k in levels]
        if any(not 0 <= k < 4 for k in self.levels):
            raise ConfigError(f"projector levels {self.levels} must be in 0..3")
        if projector is not None and list(projector.channels) != list(backbone.channels):
            raise ConfigError(f"projector channels {projector.channels} do not match backbone '{backbone.name}' "
                              f"channels {backbone.channels}")
        self.channels = [backbone.channels[k] for k in self.levels]
        self.reductions = [backbone.reductions[k] for k in self.levels]
        self.mean, self.std = backbone.mean, backbone.std
        for k in self.levels:
            self.register_buffer(f"bank_l{k + 1}", torch.empty(0, backbone.channels[k]))
        self.register_buffer("bank_offsets", torch.zeros(1, dtype=torch.long))  # rows of category i: [o_i, o_i+1)
        self.register_buffer("bank_names", torch.zeros(0, dtype=torch.uint8))  # "\n"-joined category names
        self._categories: list[str] | None = None
        self._warned: set[str] = set()

    @property
    def uses_bank(self) -> bool:
        return self.projector is not None

    @property
    def bank_categories(self) -> list[str]:
        raw = bytes(self.bank_names.cpu().tolist()).decode("utf-8")
        return raw.split("\n") if raw else []

    def train(self, mode: bool = True) -> "ResidualProjectorExtractor":
        return super().train(False)

    @torch.no_grad()
    def set_bank(self, reference_images: Tensor, batch_size: int = 8, categories: Sequence[str] | None = None) -> None:
        """Encode the k-shot normal reference images (n, 3, S, S) and store their patches per level,
        grouped by ``categories`` (one name per image; None: one bank)."""
        names = [""] * len(reference_images) if categories is None else [str(c) for c in categories]
        if len(names) != len(reference_images):
            raise ValueError(f"set_bank: {len(names)} category names for {len(reference_images)} images")
        order = list(dict.fromkeys(names))
        perm = [i for cat in order for i in range(len(names)) if names[i] == cat]
        reference_images = reference_images[perm]
        feats = [[] for _ in self.levels]
        for s in range(0, len(reference_images), batch_size):
            out = self.backbone(reference_images[s:s + batch_size])
            for j, k in enumerate(self.levels):
                feats[j].append(out[k])
        for j, k in enumerate(self.levels):
            setattr(self, f"bank_l{k + 1}", bank_tokens([torch.cat(feats[j])])[0].float().contiguous())
        per_image = feats[0][0].shape[-2] * feats[0][0].shape[-1] if feats[0] else 0
        counts = [names.count(cat) * per_image for cat in order]
        self.bank_offsets = torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.long,
                                         device=self.bank_offsets.device)
        encoded = "\n".join(order).encode("utf-8") if categories is not None else b""
        self.bank_names = torch.tensor(list(encoded), dtype=torch.uint8, device=self.bank_names.device)

    @contextmanager
    def batch_categories(self, categories: Sequence[str] | None) -> Iterator[None]:
        """Within the block, ``forward(images)`` takes these per-image category names."""
        previous, self._categories = self._categories, (list(categories) if categories is not None else None)
        try:
            yield
        finally:
            self._categories = previous

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # noqa: D401 - torch hook: banks have a data-dependent size
        names = [f"bank_l{k + 1}" for k in self.levels] + ["bank_offsets", "bank_names"]
        for name in names:
            key = f"{prefix}{name}"
            if isinstance(state_dict.get(key), Tensor):
                current = getattr(self, name)
                setattr(self, name, torch.empty_like(state_dict[key], device=current.device))
        if f"{prefix}bank_offsets" not in state_dict and f"{prefix}bank_l{self.levels[0] + 1}" in state_dict:
            # a file from before the per-category banks: one bank
            rows = state_dict[f"{prefix}bank_l{self.levels[0] + 1}"].shape[0]
            state_dict = {**state_dict, f"{prefix}bank_offsets": torch.tensor([0, rows]),
                          f"{prefix}bank_names": torch.zeros(0, dtype=torch.uint8)}
            self.bank_offsets = torch.zeros(2, dtype=torch.long, device=self.bank_offsets.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _bank_rows(self, category: str | None) -> tuple[int, int] | None:
        """(start, stop) of a category's bank rows; None: all rows (no name, one bank or unknown name)."""
        if category is None:
            return None
        names = self.bank_categories
        if len(names) <= 1:
            return None
        if category not in names:
            if category not in self._warned:
                self._warned.add(category)
                warnings.warn(f"ADPretrain bank: no reference images of category '{category}' (banks: {names}); "
                              "its images are matched against the banks of all categories", stacklevel=3)
            return None
        i = names.index(category)
        return int(self.bank_offsets[i]), int(self.bank_offsets[i + 1])

    @torch.no_grad()
    def forward(self, images: Tensor, categories: Sequence[str] | None = None) -> list[Tensor]:
        feats = self.backbone(images)
        feats = [feats[k] for k in self.levels]
        if self.projector is None:
            return feats
        banks = [getattr(self, f"bank_l{k + 1}") for k in self.levels]
        if any(b.shape[0] == 0 for b in banks):
            raise RuntimeError("ResidualProjectorExtractor: the reference bank is empty; call set_bank(images) "
                               "with k-shot normal images (the method does it in setup) before predicting")
        categories = self._categories if categories is None else list(categories)
        if categories is None:  # no names (exported graphs, predict): the banks of all classes, no Python loop
            return self.projector(residual_features(feats, banks), self.levels)
        if len(categories) != len(images):
            raise ValueError(f"{len(categories)} category names for a batch of {len(images)} images")
        groups: dict[tuple[int, int] | None, list[int]] = {}
        for i, cat in enumerate(categories):
            groups.setdefault(self._bank_rows(cat), []).append(i)
        if len(groups) == 1:
            rows = next(iter(groups))
            res = residual_features(feats, banks if rows is None else [b[rows[0]:rows[1]] for b in banks])
        else:  # a batch of several categories: each group against its own bank
            res = [torch.empty_like(f) for f in feats]
            for rows, idx in groups.items():
                sel = torch.tensor(idx, device=images.device)
                part = residual_features([f[sel] for f in feats],
                                         banks if rows is None else [b[rows[0]:rows[1]] for b in banks])
                for r, pr in zip(res, part):
                    r[sel] = pr
        return self.projector(res, self.levels)


# ------------------------------------------------------------------------------ pretraining model
class ADPretrainModel(nn.Module):
    """The pretraining graph: frozen backbone, residuals against per-image banks, the projector
    and the summed loss L = sum_l [L_angle(e1, e2, m1, c_l) + L_norm(e1, m2) + L_norm(e2, m2)].

    ``centers`` (buffers ``center_l1..4``, (C_l,)) are the mean normal residuals (spec section 5),
    set by the method before training with ``set_centers``.
    """

    def __init__(self, backbone: LevelBackbone, num_heads: int | Sequence[int] | None = 16,
                 num_ref_tokens: int = 2048, num_layers: int = 1, tau: float = 0.15, r_max: float = 0.4,
                 margin: float = 0.75, angle_chunk_elems: int = 1 << 24) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = MultiScaleProjector(backbone.channels, num_heads, num_ref_tokens, num_layers)
        self.tau, self.r_max, self.margin, self.angle_chunk_elems = tau, r_max, margin, angle_chunk_elems
        for k, c in enumerate(backbone.channels, start=1):
            self.register_buffer(f"center_l{k}", torch.zeros(c))

    @property
    def centers(self) -> list[Tensor]:
        return [getattr(self, f"center_l{k}") for k in range(1, 5)]

    def set_centers(self, centers: Sequence[Tensor]) -> None:
        for k, c in enumerate(centers, start=1):
            getattr(self, f"center_l{k}").copy_(c.to(getattr(self, f"center_l{k}")))

    def train(self, mode: bool = True) -> "ADPretrainModel":
        super().train(mode)
        self.backbone.train(False)
        return self

    def residuals(self, images: Tensor, banks: Sequence[Tensor]) -> list[Tensor]:
        """Residual maps of ``images`` against per-image banks (B, K, C_l) or shared (K, C_l)."""
        return residual_features(self.backbone(images), banks)

    def loss(self, view1: Tensor, view2: Tensor, mask: Tensor, banks: Sequence[Tensor]) -> tuple[Tensor, dict]:
        """Total loss and its per-term sums (detached) for two views sharing ``mask`` (B, 1, H, W)."""
        dtype = self.projector.l1_proj.x_ref.dtype  # bf16 with method.param_dtype=bf16 (authors' cast)
        e1s = self.projector([r.to(dtype) for r in self.residuals(view1, banks)])
        e2s = self.projector([r.to(dtype) for r in self.residuals(view2, banks)])
        total = view1.new_zeros((), dtype=torch.float32)
        parts = {"angle": 0.0, "norm": 0.0}
        for e1, e2, center in zip(e1s, e2s, self.centers):
            grid = tuple(e1.shape[-2:])
            m1 = patchify_mask(mask, grid).reshape(-1)
            m2 = downsample_mask(mask, grid).reshape(-1)
            f1 = e1.permute(0, 2, 3, 1).reshape(-1, e1.shape[1]).float()
            f2 = e2.permute(0, 2, 3, 1).reshape(-1, e2.shape[1]).float()
            la = angle_loss(f1, f2, m1, center, self.tau, self.angle_chunk_elems)
            if not torch.isfinite(la):  # no patch of one label at this level (authors: set to 0)
                la = la.new_zeros(())
            ln = norm_loss(f1, m2, self.r_max, self.margin) + norm_loss(f2, m2, self.r_max, self.margin)
            total = total + la + ln
            parts["angle"] += float(la.detach())
            parts["norm"] += float(ln.detach())
        return total, parts


class FeatureNormInference(nn.Module):
    """Exportable FeatureNorm graph: images -> (anomaly_map (B, 1, H, W), pred_score (B,))."""

    def __init__(self, extractor: ResidualProjectorExtractor, blur_sigma: float = 4.0) -> None:
        super().__init__()
        self.extractor, self.blur_sigma = extractor, blur_sigma

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return feature_norm(self.extractor(images), images.shape[-2:], self.blur_sigma)
