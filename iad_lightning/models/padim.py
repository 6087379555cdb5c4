"""PaDiM (Defard et al., ICPR 2020) as plain torch: per-position Gaussians and Mahalanobis maps.

Paper defaults (also the reference implementation ``xiahaifeng1995/PaDiM-Anomaly-Detection-
Localization-master``): WideResNet-50 layers 1-3 (1792 channels) with a random subset of d = 550
channels (ResNet-18: 448 -> 100), coarser layers aligned to layer 1's grid by nearest upsampling
(the reference ``embedding_concat``), one Gaussian per patch position with covariance
``Sigma + 0.01 I`` (unbiased), Mahalanobis distance, the map upsampled bilinearly to the input size
and blurred with a Gaussian of sigma 4; image score = max of the map.

``groups`` > 1 is ADPretrain's variant (spec section 7): one Gaussian per level on that level's
own grid and full width, each level's map upsampled (bilinear, align_corners=True) and the levels
averaged. The reference code also min-max normalises the maps over each category's whole test set;
that affine rescaling changes no per-category metric and would fit on test data, so it is left out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iad_lightning.models.patchcore import gaussian_blur


def embedding_concat(features: Sequence[Tensor]) -> Tensor:
    """Reference ``embedding_concat``: every map nearest-upsampled to the first map's grid and
    concatenated on channels (the unfold/fold of the reference code is exactly this)."""
    grid = features[0].shape[-2:]
    return torch.cat([f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="nearest")
                      for f in features], dim=1)


def random_channel_subset(total: int, d: int, seed: int = 1024) -> Tensor:
    """d of ``total`` channel indices, a seeded draw without replacement (sorted)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[:d].sort().values


class PaDiMModel(nn.Module):
    """Gaussians (mean (P, d), inverse covariance (P, d, d)) for ``groups`` feature maps."""

    def __init__(self, groups: int = 1, eps: float = 0.01, blur_sigma: float = 4.0, align_corners: bool = False,
                 chunk: int = 64) -> None:
        super().__init__()
        self.groups, self.eps, self.blur_sigma = groups, eps, blur_sigma
        self.align_corners, self.chunk = align_corners, chunk
        for g in range(groups):
            self.register_buffer(f"mean_{g}", torch.empty(0, 0))
            self.register_buffer(f"cov_inv_{g}", torch.empty(0, 0, 0))
        self.register_buffer("grid_sizes", torch.zeros(groups, 2, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # noqa: D401 - torch hook: data-dependent buffer sizes
        for g in range(self.groups):
            for name in (f"mean_{g}", f"cov_inv_{g}"):
                if isinstance(state_dict.get(prefix + name), Tensor):
                    setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def fit(self, features: Sequence[Tensor], rows: Tensor | None = None) -> "PaDiMModel":
        """features: per group (N, d, h, w) train features (any device; computed in position chunks);
        ``rows``: fit on these images only (cross-fitting folds), without copying the others."""
        if len(features) != self.groups:
            raise ValueError(f"PaDiMModel.fit: {len(features)} feature groups, expected {self.groups}")
        for g, feat in enumerate(features):
            n, d, h, w = feat.shape
            x = feat.reshape(n, d, h * w).permute(2, 0, 1)  # (P, N, d)
            if rows is not None:
                n = rows.numel()
            if n < 2:
                raise ValueError("PaDiMModel.fit: at least 2 train images are needed for a covariance")
            if rows is None:
                mean = x.mean(dim=1)
            else:  # per position chunk: the selected images' rows only
                mean = torch.cat([x[s:s + self.chunk].index_select(1, rows).mean(dim=1)
                                  for s in range(0, h * w, self.chunk)])
            cov_inv = torch.empty(h * w, d, d, dtype=torch.float32)
            eye = torch.eye(d, dtype=torch.float64)
            for s in range(0, h * w, self.chunk):
                xs = x[s:s + self.chunk] if rows is None else x[s:s + self.chunk].index_select(1, rows)
                xc = (xs - mean[s:s + self.chunk, None]).double()
                cov = xc.transpose(1, 2) @ xc / (n - 1) + self.eps * eye  # np.cov (unbiased) + 0.01 I
                chol, info = torch.linalg.cholesky_ex(cov)  # SPD (eps * I): Cholesky, stabler than LU
                if bool((info > 0).any()) or not bool(torch.isfinite(cov).all()):
                    raise ValueError("PaDiMModel.fit: a covariance is not positive definite or not finite "
                                     "(non-finite features?); raise eps")
                cov_inv[s:s + self.chunk] = torch.cholesky_inverse(chol).float()
            setattr(self, f"mean_{g}", mean.float().contiguous().to(self.grid_sizes.device))
            setattr(self, f"cov_inv_{g}", cov_inv.to(self.grid_sizes.device))
            self.grid_sizes[g] = torch.tensor([h, w])
        return self

    def mahalanobis(self, feat: Tensor, g: int) -> Tensor:
        """(B, d, h, w) -> (B, 1, h, w) Mahalanobis distances to group g's per-position Gaussians."""
        mean, cov_inv = getattr(self, f"mean_{g}"), getattr(self, f"cov_inv_{g}")
        if mean.numel() == 0:
            raise RuntimeError("PaDiMModel: not fitted; call fit(features) or load a checkpoint first")
        b, d, h, w = feat.shape
        diff = feat.float().reshape(b, d, h * w).permute(2, 0, 1) - mean[:, None]  # (P, B, d)
        dist = torch.einsum("pbd,pde,pbe->pb", diff, cov_inv, diff)
        return dist.clamp_min(0).sqrt().T.reshape(b, 1, h, w)

    @torch.no_grad()
    def predict(self, features: Sequence[Tensor], input_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        maps = [F.interpolate(self.mahalanobis(f, g), size=tuple(input_size), mode="bilinear",
                              align_corners=self.align_corners) for g, f in enumerate(features)]
        amap = gaussian_blur(torch.stack(maps).mean(0), self.blur_sigma)
        return amap, amap.flatten(1).amax(1)


class PaDiMFeatures(nn.Module):
    """The features PaDiM models: baseline = aligned concat + channel subset (one group); with an
    ADPretrain extractor (``per_level``) = the projected levels as they are (one group each)."""

    def __init__(self, extractor: nn.Module, channel_index: Tensor | None, per_level: bool) -> None:
        super().__init__()
        self.extractor, self.per_level = extractor, per_level
        self.register_buffer("channel_index", channel_index if channel_index is not None else torch.zeros(0, dtype=torch.long))

    def forward(self, images: Tensor) -> list[Tensor]:
        feats = self.extractor(images)
        if self.per_level:
            return [f.float() for f in feats]
        emb = embedding_concat([f.float() for f in feats])
        return [emb.index_select(1, self.channel_index) if self.channel_index.numel() else emb]


class PaDiMInference(nn.Module):
    """Exportable PaDiM graph: images -> (anomaly_map (B, 1, H, W), pred_score (B,))."""

    def __init__(self, features: PaDiMFeatures, model: PaDiMModel) -> None:
        super().__init__()
        self.features, self.model = features, model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.predict(self.features(images), images.shape[-2:])
