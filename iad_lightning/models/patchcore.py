"""PatchCore (Roth et al., CVPR 2022) as plain torch: patch embedding, memory bank and scoring.

Follows the official `amazon-science/patchcore-inspection` (see specs/patchcore.md):

- embedding (`PatchCore._embed`): unfold every layer's map into 3x3 neighbourhoods (zero padding),
  bilinearly align coarser layers to the first layer's patch grid, ``MeanMapper`` (adaptive average
  pooling of the flattened (C, p, p) to ``pretrain_embed_dimension``), stack the layers and
  ``Aggregator`` (adaptive average pooling of the flattened (L * D) to ``target_embed_dimension``);
- scoring: squared L2 nearest-neighbour distance to the memory bank (faiss semantics), image score
  = max patch score, anomaly map = bilinear upsampling of the patch scores to the input size, then
  a Gaussian blur (sigma 4 px, truncate 4, scipy 'reflect' borders).

The backbone (a list of feature maps) and the memory-bank construction (coreset over all training
patches) live elsewhere: `models/backbones.py`, `models/coreset.py`, `methods/patchcore.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iad_lightning.models.nn_search import NearestNeighbourSearch, exportable_knn, torch_knn

__all__ = [
    "Aggregator",
    "MeanMapper",
    "PatchCoreInference",
    "PatchCoreModel",
    "PatchEmbedding",
    "adaptive_avg_pool_channels",
    "adaptive_pool_windows",
    "align_to_grid",
    "embed_reference",
    "gaussian_blur",
    "gaussian_kernel1d",
    "resolve_embed_dimensions",
    "unfold_neighbourhood",
    "upsample_and_blur",
]

# Official MeanMapper / Aggregator size; also the cap of the "unfolded" and "auto" rules.
PAPER_EMBED_DIMENSION = 1024
EMBED_RULES = ("auto", "channels", "unfolded")


# --------------------------------------------------------------------------- embedding pieces
def _unfold_components(feat: Tensor, patch_size: int = 3) -> Tensor:
    """Neighbourhood components as (B, C * p * p, h, w), in ``nn.Unfold``'s (C, p, p) order.

    Equal to ``F.unfold(feat, p, padding=(p - 1) // 2, stride=1)`` reshaped to the patch grid,
    built from p * p shifted slices of the zero-padded map (about 2x faster than im2col on CPU).
    """
    b, c, h, w = feat.shape
    pad = (patch_size - 1) // 2
    out_h, out_w = h + 2 * pad - patch_size + 1, w + 2 * pad - patch_size + 1
    padded = F.pad(feat, (pad, pad, pad, pad))
    shifts = [padded[:, :, i : i + out_h, j : j + out_w] for i in range(patch_size) for j in range(patch_size)]
    return torch.stack(shifts, dim=2).reshape(b, c * patch_size * patch_size, out_h, out_w)  # any memory layout


def unfold_neighbourhood(feat: Tensor, patch_size: int = 3) -> Tensor:
    """Local p x p neighbourhood of every position: (B, C, H, W) -> (B, H * W, C, p, p).

    Official ``PatchMaker.patchify``: ``nn.Unfold(kernel_size=p, stride=1, padding=(p-1)//2)``,
    zero padding, so the patch grid keeps H x W positions for odd p.
    """
    b, c = feat.shape[:2]
    comps = _unfold_components(feat, patch_size)
    return comps.view(b, c, patch_size, patch_size, -1).permute(0, 4, 1, 2, 3)


def adaptive_pool_windows(in_size: int, out_size: int) -> tuple[Tensor, Tensor]:
    """(start, length) of the windows of 1-D adaptive average pooling ``in_size -> out_size``.

    PyTorch's rule: window i covers [floor(i * in / out), ceil((i + 1) * in / out)).
    """
    i = torch.arange(out_size)
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil division
    return start, end - start


def adaptive_avg_pool_channels(x: Tensor, out_size: int) -> Tensor:
    """1-D adaptive average pooling along dim 1: (B, In, L) -> (B, out_size, L).

    Same windows as ``F.adaptive_avg_pool1d`` applied to every column x[b, :, l], without
    transposing x. With g = gcd(In, out), the windows repeat every out/g outputs and In/g inputs,
    never crossing a period, so pooling is a handful of slice sums on a (B, g, In/g, L) view.
    """
    b, length = x.shape[0], x.shape[2]
    in_size = int(x.shape[1])  # a Python int even under ONNX export (where shapes are tensors whose
    if in_size == out_size:    # negative floor divisions would be folded as truncations)
        return x
    g = math.gcd(in_size, out_size)
    period_in, period_out = in_size // g, out_size // g
    if period_out > 16:  # irregular ratio: gather one window offset at a time (<= ceil(In/out)+1 passes)
        start, size = adaptive_pool_windows(in_size, out_size)
        start, size = start.to(x.device), size.to(x.device)
        acc = x.index_select(1, start)
        for offset in range(1, int(size.max())):
            term = x.index_select(1, (start + offset).clamp(max=in_size - 1))
            acc += term * (size > offset).to(x.dtype).view(1, -1, 1)
        return acc / size.to(x.dtype).view(1, -1, 1)
    blocks = x.reshape(b, g, period_in, length)
    if period_out == 1:  # e.g. 9216 -> 1024 (windows of 9), 2048 -> 1024 (pairs)
        return blocks.sum(dim=2).div_(period_in)
    out = x.new_empty(b, g, period_out, length)
    for phase in range(period_out):  # phases of one period: 1 (9216->1024, 2048->1024) or 2 (4608->1024)
        lo = (phase * period_in) // period_out
        hi = -((-(phase + 1) * period_in) // period_out)
        out[:, :, phase] = blocks[:, :, lo:hi].sum(dim=2).div_(hi - lo)
    return out.view(b, out_size, length)


def align_to_grid(unfolded: Tensor, grid: tuple[int, int], ref_grid: tuple[int, int]) -> Tensor:
    """Official alignment: bilinearly resize every (C, p, p) component of a coarser layer's
    unfolded patches (B, h * w, C, p, p) to the reference patch grid -> (B, H * W, C, p, p).

    ``align_corners=False``, applied on the patch grid after unfolding (spec section 9.8).
    """
    b, _, c, p, q = unfolded.shape
    if tuple(grid) == tuple(ref_grid):
        return unfolded
    comps = unfolded.permute(0, 2, 3, 4, 1).reshape(b, c * p * q, *grid)
    comps = F.interpolate(comps, size=tuple(ref_grid), mode="bilinear", align_corners=False)
    return comps.view(b, c, p, q, -1).permute(0, 4, 1, 2, 3)


class MeanMapper(nn.Module):
    """Official per-layer reduction: flatten each patch's (C, p, p) and adaptive-average-pool it
    to ``output_dim`` values, (N, C, p, p) -> (N, output_dim). No learned weights."""

    def __init__(self, output_dim: int) -> None:
        super().__init__()
        self.output_dim = output_dim

    def forward(self, patches: Tensor) -> Tensor:
        flat = patches.reshape(len(patches), -1, 1)
        return adaptive_avg_pool_channels(flat, self.output_dim).squeeze(-1)


class Aggregator(nn.Module):
    """Official layer aggregation: flatten the stacked (N, L, D) and adaptive-average-pool it to
    ``target_dim``, (N, L, D) -> (N, target_dim). For L=2, D=1024, target 1024 each output averages a
    consecutive pair, so dims 0..511 come from the first layer and 512..1023 from the second."""

    def __init__(self, target_dim: int) -> None:
        super().__init__()
        self.target_dim = target_dim

    def forward(self, stacked: Tensor) -> Tensor:
        flat = stacked.reshape(len(stacked), -1, 1)
        return adaptive_avg_pool_channels(flat, self.target_dim).squeeze(-1)


def embed_reference(
    features: Sequence[Tensor], pretrain_embed_dimension: int | Sequence[int] = 1024,
    target_embed_dimension: int = 1024, patch_size: int = 3,
) -> tuple[Tensor, tuple[int, int]]:
    """Literal official ``_embed`` order (unfold, align unfolded components, MeanMapper, stack,
    Aggregator). Memory-hungry (the aligned layer3 is (B, 784, 1024, 3, 3)); kept as the reference
    that ``PatchEmbedding`` is tested against. Per-layer sizes (a list) are concatenated before
    the Aggregator, which for equal sizes is the official stack-and-flatten."""
    unfolded = [unfold_neighbourhood(f.float(), patch_size) for f in features]
    grids = [_grid(f, patch_size) for f in features]
    aligned = [align_to_grid(u, g, grids[0]) for u, g in zip(unfolded, grids)]
    b = features[0].shape[0]
    dims = _per_layer(pretrain_embed_dimension, len(features))
    aggregator = Aggregator(target_embed_dimension)
    per_layer = [MeanMapper(d)(a.reshape(-1, *a.shape[-3:])) for a, d in zip(aligned, dims)]  # (N, D_l) each
    embedding = aggregator(torch.cat(per_layer, dim=1)[:, :, None])  # (N, target)
    return embedding.view(b, -1, target_embed_dimension), grids[0]


def _per_layer(dims: int | Sequence[int], num_layers: int) -> list[int]:
    if isinstance(dims, int):
        return [dims] * num_layers
    dims = [int(d) for d in dims]
    if len(dims) != num_layers:
        raise ValueError(f"PatchEmbedding: {len(dims)} per-layer pretrain_embed_dimension values {dims} "
                         f"for {num_layers} feature layers; give one per layer or a single int.")
    return dims


def resolve_embed_dimensions(
    pretrain: int | Sequence[int] | str, target: int | str, channels: Sequence[int], patch_size: int = 3,
) -> tuple[int | list[int], int]:
    """Per-layer ``MeanMapper`` sizes and the ``Aggregator`` size from a config value.

    pretrain: an int (official: the same for every layer), a list (one per layer), or a rule:
        ``"channels"``: C_l per layer, i.e. each channel's 3x3 neighbourhood mean (the adaptive
        windows of C_l * p^2 -> C_l are exactly one channel's p x p values), anomalib's feature;
        ``"unfolded"``: min(C_l * p^2, 1024), the unfolded neighbourhood kept as it is up to 1024;
        ``"auto"``: the paper's 1024 when every layer has C_l * p^2 >= 1024 values (pooling then
        only compresses, as for WideResNet-50's 4608 and 9216), otherwise ``"channels"``, because
        1024 would stretch a small layer by repeating its values (Lite0: 360 and 1008), which
        costs search time and memory without information; ``bench/patchcore.py --dims`` measured
        it (docs/methods/patchcore.md, "Embedding size").
    target: an int, or ``"auto"``: min(sum of the per-layer sizes, 1024), so 1024 for the paper's
        1024 + 1024 and no aggregation (identity) for ``"channels"`` on small backbones.
    """
    if isinstance(pretrain, str):
        if pretrain not in EMBED_RULES:
            raise ValueError(f"pretrain_embed_dimension={pretrain!r}: use an int, a list of ints (one per "
                             f"layer) or one of {EMBED_RULES}.")
        unfolded = [c * patch_size * patch_size for c in channels]
        rule = pretrain
        if rule == "auto":
            rule = "paper" if min(unfolded) >= PAPER_EMBED_DIMENSION else "channels"
        if rule == "paper":
            pretrain = PAPER_EMBED_DIMENSION
        elif rule == "channels":
            pretrain = [int(c) for c in channels]
        else:
            pretrain = [min(u, PAPER_EMBED_DIMENSION) for u in unfolded]
    per_layer = _per_layer(pretrain, len(channels))
    if isinstance(target, str):
        if target != "auto":
            raise ValueError(f"target_embed_dimension={target!r}: use an int or 'auto'.")
        target = min(sum(per_layer), PAPER_EMBED_DIMENSION)
    if isinstance(pretrain, list) and len(set(pretrain)) == 1:
        pretrain = pretrain[0]
    return pretrain, int(target)


def _grid(feat: Tensor, patch_size: int) -> tuple[int, int]:
    pad = (patch_size - 1) // 2
    return feat.shape[-2] + 2 * pad - patch_size + 1, feat.shape[-1] + 2 * pad - patch_size + 1


class PatchEmbedding(nn.Module):
    """Official PatchCore patch features from a list of backbone maps (first = finest grid).

    Returns (B, H * W, target_embed_dimension) and the patch grid (H, W) of the first layer.

    Implementation note: the official code bilinearly resizes all C * p * p unfolded components of a
    coarse layer before ``MeanMapper`` pools them. Pooling (a fixed linear map over components) and
    bilinear resizing (a fixed linear map over grid positions) act on different axes, so they
    commute: we pool first and resize the pooled (B, D, h, w) map, which gives the same features (to
    float rounding, ~1e-7 relative; tested against ``embed_reference``) with 9x less memory and work
    for layer3. Per layer the peak is the (B, C * p * p, h * w) unfold (462 MB for 32 images at
    layer2 of WR50 at 224).
    """

    def __init__(self, pretrain_embed_dimension: int | Sequence[int] = 1024, target_embed_dimension: int = 1024,
                 patch_size: int = 3) -> None:
        super().__init__()
        # an int (official: every layer) or one size per layer (concatenated before the Aggregator)
        self.pretrain_embed_dimension = (pretrain_embed_dimension if isinstance(pretrain_embed_dimension, int)
                                         else [int(d) for d in pretrain_embed_dimension])
        self.target_embed_dimension = target_embed_dimension
        self.patch_size = patch_size

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, tuple[int, int]]:
        if len(features) == 0:
            raise ValueError("PatchEmbedding: got an empty list of feature maps.")
        ref_grid = _grid(features[0], self.patch_size)
        b = features[0].shape[0]
        layers = []
        for feat, dim in zip(features, _per_layer(self.pretrain_embed_dimension, len(features))):
            if dim == feat.shape[1]:
                # C * p * p -> C: every adaptive window is one channel's p x p neighbourhood, so
                # MeanMapper is a zero-padded p x p mean (divisor p * p): no unfold needed.
                pad = (self.patch_size - 1) // 2
                pooled = F.avg_pool2d(feat.float(), self.patch_size, stride=1, padding=pad, count_include_pad=True)
                h, w = pooled.shape[-2:]
            else:
                comps = _unfold_components(feat.float(), self.patch_size)  # (B, C*p*p, h, w)
                h, w = comps.shape[-2:]
                # MeanMapper: adaptive avg pool of the flattened (C, p, p) -> pretrain_embed_dimension.
                pooled = adaptive_avg_pool_channels(comps.view(b, -1, h * w), dim)
                del comps
                pooled = pooled.view(b, -1, h, w)
            if (h, w) != ref_grid:  # align to the first layer's patch grid
                pooled = F.interpolate(pooled, size=ref_grid, mode="bilinear", align_corners=False)
            layers.append(pooled.reshape(b, dim, -1))
        # Stack to (N, L, D), flatten to L * D and Aggregator-pool to target_embed_dimension; along
        # dim 1 of (B, L * D, H * W) this is the same flattening order.
        stacked = torch.cat(layers, dim=1) if len(layers) > 1 else layers[0]
        del layers
        embedding = adaptive_avg_pool_channels(stacked, self.target_embed_dimension)
        return embedding.transpose(1, 2).contiguous(), ref_grid


# ------------------------------------------------------------------------------ map smoothing
def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> Tensor:
    """scipy.ndimage's Gaussian kernel: radius int(truncate * sigma + 0.5), normalised in float64."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 / sigma**2 * x**2)
    return (phi / phi.sum()).to(dtype=dtype, device=device)


def _reflect_index(size: int, radius: int, device: torch.device) -> Tensor:
    """Indices padding a length-``size`` axis by ``radius`` with scipy's 'reflect' mode, i.e.
    half-sample symmetric (d c b a | a b c d | d c b a), periodic with period 2 * size so that it
    also holds when radius > size (torch's 'reflect' pad mode is the *mirror* mode, without the edge)."""
    i = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(i >= size, 2 * size - 1 - i, i)


def gaussian_blur(maps: Tensor, sigma: float = 4.0, truncate: float = 4.0) -> Tensor:
    """Per-channel Gaussian blur equal to ``scipy.ndimage.gaussian_filter(m, sigma, truncate=4,
    mode='reflect')`` on every (H, W) map of a (B, C, H, W) tensor: a separable convolution of
    radius int(truncate * sigma + 0.5) (16 px for sigma 4) with half-sample symmetric borders."""
    if sigma <= 0:
        return maps
    b, c, h, w = maps.shape
    kernel = gaussian_kernel1d(sigma, truncate, maps.dtype, maps.device)
    radius = (kernel.numel() - 1) // 2
    x = maps.reshape(b * c, 1, h, w)
    x = x.index_select(2, _reflect_index(h, radius, maps.device))  # axis 0 first, like scipy
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = x.index_select(3, _reflect_index(w, radius, maps.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x.view(b, c, h, w)


def upsample_and_blur(patch_scores: Tensor, grid: tuple[int, int], input_size: tuple[int, int],
                      sigma: float = 4.0) -> Tensor:
    """(B, H * W) patch scores -> (B, 1, H_in, W_in): bilinear (align_corners=False) to the input
    size, then the Gaussian blur of ``sigma`` px at that size (official RescaleSegmentor)."""
    maps = patch_scores.view(-1, 1, *grid)
    maps = F.interpolate(maps, size=tuple(input_size), mode="bilinear", align_corners=False)
    return gaussian_blur(maps, sigma)


# -------------------------------------------------------------------------------------- model
class PatchCoreModel(nn.Module):
    """PatchCore memory bank and scoring, no training and no Lightning.

    Args:
        pretrain_embed_dimension: ``MeanMapper`` output per layer (official 1024), or a list with one
            size per layer (see ``resolve_embed_dimensions``).
        target_embed_dimension: ``Aggregator`` output, the patch feature dim D (official 1024).
        patch_size: neighbourhood p of the unfold (official 3).
        num_neighbors: k of the patch score, the mean of the k squared NN distances (official 1).
        paper_reweighting: use the paper's Eq. 7 image score instead of the official plain max.
        reweight_neighbors: b, the size of the support set N_b(m*) of Eq. 7 (anomalib: 9).
        blur_sigma: Gaussian sigma in pixels of the input size (official 4; 0 disables).
        nn_search: the k-NN backend (default: exact faiss ``IndexFlatL2``, torch fallback).

    ``memory_bank`` is a buffer (saved in the state dict); loading a state dict resizes it, so a
    checkpoint with any bank size loads into a fresh model.
    """

    memory_bank: Tensor

    def __init__(
        self,
        pretrain_embed_dimension: int | Sequence[int] = 1024,
        target_embed_dimension: int = 1024,
        patch_size: int = 3,
        num_neighbors: int = 1,
        paper_reweighting: bool = False,
        reweight_neighbors: int = 9,
        blur_sigma: float = 4.0,
        nn_search: NearestNeighbourSearch | None = None,
    ) -> None:
        super().__init__()
        if num_neighbors < 1:
            raise ValueError(f"PatchCoreModel: num_neighbors={num_neighbors} must be >= 1.")
        self.embedding = PatchEmbedding(pretrain_embed_dimension, target_embed_dimension, patch_size)
        self.num_neighbors = num_neighbors
        self.paper_reweighting = paper_reweighting
        self.reweight_neighbors = reweight_neighbors
        self.blur_sigma = blur_sigma
        self.nn_search = nn_search if nn_search is not None else NearestNeighbourSearch()
        self.register_buffer("memory_bank", torch.empty(0, target_embed_dimension))

    # ------------------------------------------------------------------ bank
    def fit(self, bank: Tensor) -> "PatchCoreModel":
        """Set the memory bank (M, D), e.g. the coreset of all training patch embeddings."""
        d = self.embedding.target_embed_dimension
        if bank.ndim != 2 or bank.shape[1] != d:
            raise ValueError(f"PatchCoreModel.fit: bank must be (M, {d}), got {tuple(bank.shape)}.")
        bank = bank.detach().to(device=self.memory_bank.device, dtype=torch.float32).contiguous()
        if bank.is_inference() and not torch.is_inference_mode_enabled():
            bank = bank.clone()  # a normal tensor, so that load_state_dict can later write into it
        self.memory_bank = bank
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # noqa: D401 - torch hook
        # The bank's size is data-dependent: resize the buffer to the incoming one before loading.
        bank = state_dict.get(prefix + "memory_bank")
        current = self.memory_bank
        if isinstance(bank, Tensor) and (bank.shape != current.shape or current.is_inference()):
            self.memory_bank = torch.empty(bank.shape, dtype=self.memory_bank.dtype, device=self.memory_bank.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---------------------------------------------------------------- scoring
    def embed(self, features: Sequence[Tensor]) -> tuple[Tensor, tuple[int, int]]:
        """Patch embeddings (B, H * W, D) and the patch grid (H, W) from backbone maps."""
        return self.embedding(features)

    def nearest_neighbours(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """k nearest bank rows of (Q, D) queries: (squared L2 distances, indices), each (Q, k)."""
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("PatchCoreModel: the memory bank is empty; call fit(bank) (or load a "
                               "checkpoint) before predict.")
        self.nn_search.fit(self.memory_bank)  # no-op unless the bank changed
        return self.nn_search.search(queries, k)

    def patch_scores(self, embedding: Tensor, leave_out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Patch score = mean of the k squared NN distances (official, k = num_neighbors).

        Args: embedding (B, P, D); ``leave_out`` = (images (B,), bank_images (M,)): the train image
        of each query and of each bank row, for the bank's own train images scored each without
        its own rows (leave-one-image-out calibration; exact torch search, ``torch_knn`` with
        owners). Returns (scores (B, P), nearest bank index (B, P)).
        """
        b, p, d = embedding.shape
        queries = embedding.reshape(b * p, d)
        if leave_out is None:
            dist, idx = self.nearest_neighbours(queries, self.num_neighbors)
        else:
            images, bank_images = leave_out
            dist, idx = torch_knn(queries, self.memory_bank, self.num_neighbors,
                                  query_owner=images.to(embedding.device).repeat_interleave(p), bank_owner=bank_images)
        return dist.mean(1).view(b, p), idx[:, 0].view(b, p)

    def reweighted_image_scores(self, embedding: Tensor, patch_scores: Tensor, nn_index: Tensor) -> Tensor:
        """Paper Eq. 7: s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*.

        s* is each image's largest patch score, here our (squared) one; the weight is
        ``reweighting_weights``. The official code does not implement this (issues #27, #54).
        """
        return self.reweighting_weights(embedding, patch_scores, nn_index) * patch_scores.amax(1)

    def reweighting_weights(self, embedding: Tensor, patch_scores: Tensor, nn_index: Tensor) -> Tensor:
        """The weight of Eq. 7 per image, (B,): 1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||.

        m_test* is each image's patch with the largest score, m* its nearest bank row and N_b(m*)
        the b = ``reweight_neighbors`` nearest bank rows of m* (m* itself first). The norms are
        Euclidean, as in anomalib's ``1 - softmax(distances)[0]``.
        """
        b = embedding.shape[0]
        rows = torch.arange(b, device=embedding.device)
        top = patch_scores.argmax(1)
        m_test = embedding[rows, top]  # m_test*, (B, D)
        bank = self.memory_bank.to(embedding.device)
        m_star = bank[nn_index[rows, top].to(bank.device)]  # m*, (B, D)
        _, support = self.nearest_neighbours(m_star, min(self.reweight_neighbors, bank.shape[0]))  # N_b(m*)
        d_star = (m_test - m_star).norm(dim=1)  # ||m_test* - m*||
        d_support = (m_test.unsqueeze(1) - bank[support.to(bank.device)]).norm(dim=2)  # (B, b)
        # exp(d*) / sum exp(d_m), computed stably in log space.
        return 1.0 - torch.exp(d_star - torch.logsumexp(d_support, dim=1))

    def anomaly_map(self, patch_scores: Tensor, grid: tuple[int, int], input_size: tuple[int, int]) -> Tensor:
        """(B, H * W) patch scores -> (B, 1, H_in, W_in): bilinear (align_corners=False) to the input
        size, then Gaussian blur sigma ``blur_sigma`` px at that size (official RescaleSegmentor)."""
        return upsample_and_blur(patch_scores, grid, input_size, self.blur_sigma)

    @torch.no_grad()
    def predict(self, features: Sequence[Tensor], input_size: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Anomaly maps (B, 1, H_in, W_in) and image scores (B,) from the backbone feature maps.

        The image score is the official one, the max over the patch scores *before* upsampling and
        blurring (``PatchCore._predict``: ``image_scores = max over patches``), unless
        ``paper_reweighting`` selects the paper's Eq. 7.
        """
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        embedding, grid = self.embed(features)
        return self.score_embedding(embedding, grid, input_size)

    @torch.no_grad()
    def score_embedding(self, embedding: Tensor, grid: tuple[int, int], input_size: tuple[int, int],
                        leave_out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``predict`` from patch embeddings (B, H * W, D) already computed (cross-fitting scores
        the stored train embeddings against fold banks with it; ``leave_out``: see ``patch_scores``)."""
        if leave_out is not None and self.paper_reweighting:
            raise ValueError("PatchCoreModel.score_embedding: leave_out with the paper's reweighting, which "
                             "searches the bank from bank rows; use fold banks (threshold.leave_one_out=false)")
        scores, nn_index = self.patch_scores(embedding, leave_out)
        if self.paper_reweighting:
            image_scores = self.reweighted_image_scores(embedding, scores, nn_index)
        else:
            image_scores = scores.amax(1)
        return self.anomaly_map(scores, grid, input_size), image_scores

    def forward(self, features: Sequence[Tensor], input_size: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        return self.predict(features, input_size)


class PatchCoreInference(nn.Module):
    """The exportable graph ``normalised images -> (anomaly_map, pred_score)`` of a fitted PatchCore.

    The memory bank (transposed, in chunks of ``bank_chunk`` rows, with its squared row norms) is
    in buffers, so ONNX / TorchScript carry it as constants (one copy: 410 MB for 10^5 x 1024), and the nearest-neighbour search is
    ``exportable_knn`` (matmul + topk per bank chunk, exact; distances refined like the eager
    search) instead of faiss. Embedding, the mean of the k distances, the paper's re-weighting
    (Eq. 7), bilinear upsampling and the sigma-4 blur are the eager ``PatchCoreModel`` code.
    ``bank_chunk`` bank rows per matmul bound the peak memory: (B * H * W) x bank_chunk floats
    (784 x 16384 x 4 B = 51 MB per 224 px image).
    """

    def __init__(self, feature_extractor: nn.Module, model: PatchCoreModel, bank_chunk: int = 16384) -> None:
        super().__init__()
        if model.memory_bank.shape[0] == 0:
            raise ValueError("PatchCoreInference: the memory bank is empty; export a fitted model.")
        self.feature_extractor, self.embedding, self.bank_chunk = feature_extractor, model.embedding, bank_chunk
        self.num_neighbors, self.paper_reweighting = model.num_neighbors, model.paper_reweighting
        self.reweight_neighbors, self.blur_sigma = model.reweight_neighbors, model.blur_sigma
        bank = model.memory_bank.detach().float()
        self.bank_size, self.n_chunks = bank.shape[0], 0
        for j, rows in enumerate(bank.split(bank_chunk)):  # separate buffers: one copy in an ONNX file
            self.register_buffer(f"bank_t_{j}", rows.t().contiguous())  # persistent: an initializer, not
            self.register_buffer(f"bank_sq_{j}", (rows * rows).sum(1))  # a Constant inlined at every use
            self.n_chunks += 1

    def _search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        chunks = [getattr(self, f"bank_t_{j}") for j in range(self.n_chunks)]
        norms = [getattr(self, f"bank_sq_{j}") for j in range(self.n_chunks)]
        return exportable_knn(queries, chunks, norms, k)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        embedding, grid = self.embedding(self.feature_extractor(images))
        b, p, d = embedding.shape
        dist, _, rows = self._search(embedding.reshape(b * p, d), min(self.num_neighbors, self.bank_size))
        scores = dist.mean(1).view(b, p)
        if self.paper_reweighting:
            image_scores = self._reweighted(embedding, scores, rows[:, 0].view(b, p, d))
        else:
            image_scores = scores.amax(1)
        return upsample_and_blur(scores, grid, images.shape[-2:], self.blur_sigma), image_scores

    def _reweighted(self, embedding: Tensor, patch_scores: Tensor, nearest_rows: Tensor) -> Tensor:
        """``PatchCoreModel.reweighted_image_scores`` (Eq. 7) with the exportable search."""
        top = patch_scores.argmax(1, keepdim=True)  # (B, 1)
        pick = top.unsqueeze(-1).expand(-1, -1, embedding.shape[-1])
        s_star = patch_scores.gather(1, top)[:, 0]  # s*
        m_test = embedding.gather(1, pick)[:, 0]  # m_test*, (B, D)
        m_star = nearest_rows.gather(1, pick)[:, 0]  # m*, its nearest bank row
        _, _, support = self._search(m_star, min(self.reweight_neighbors, self.bank_size))  # N_b(m*)
        d_star = (m_test - m_star).norm(dim=1)
        d_support = (m_test.unsqueeze(1) - support).norm(dim=2)
        return (1.0 - torch.exp(d_star - torch.logsumexp(d_support, dim=1))) * s_star
