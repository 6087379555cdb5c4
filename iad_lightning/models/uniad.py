"""UniAD (You et al., NeurIPS 2022): the reconstruction transformer and its maths, in plain torch.

Spec: ``specs/uniad.md``. Tokens are sequence-first ``(L, B, C)`` with token index ``h * W + w``,
as in the official code. The pieces:

- ``align_features``: the MFCN neck; every backbone map resized to the stride-16 grid (bilinear,
  ``align_corners=True``) and concatenated: ``feature_align`` (B, C, 14, 14), also the target.
- ``neighbor_mask``: the additive (L, L) mask that *blocks* the 7x7 neighbourhood (self included).
- ``feature_jitter``: training-time noise ``eps * scale * ||f_t|| / C`` on the input tokens.
- ``UniADModel``: 272->256 projection, learned positional table, 4 post-norm encoder layers,
  4 layer-wise query decoder layers, final LayerNorm, 256->272 projection.
- ``anomaly_map`` / ``image_score``: L2 reconstruction error upsampled (align corners); score =
  max of the 16x16 stride-1 average-pooled map.
- ``official_to_ours`` / ``load_official_checkpoint``: the published ``ckpt.pth.tar`` key layout
  mapped onto ``UniADModel`` (table ``OFFICIAL_KEY_MAP``).

Module names follow the official ones except the decoder's two attentions, renamed by what they
attend to (official ``self_attn`` attends the encoder output, it is no self-attention).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iad_lightning.errors import WeightsError
from iad_lightning.safe_load import EASYDICT, safe_torch_load


# ------------------------------------------------------------------------------- neck and maths
def align_features(features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """MFCN: resize each map to ``size`` (bilinear, align corners; no pooling) and concatenate."""
    maps = [
        f if tuple(f.shape[-2:]) == tuple(size) else F.interpolate(f, size=size, mode="bilinear", align_corners=True)
        for f in features
    ]
    return torch.cat(maps, dim=1)


def neighbor_mask(feature_size: Sequence[int], neighbor_size: Sequence[int]) -> torch.Tensor:
    """(H*W, H*W) float mask: -inf where key j is inside the window centred on query i (i itself
    included, window clipped at the borders), 0 elsewhere. Vectorised; same for all heads."""
    h, w = feature_size
    hm, wm = neighbor_size
    rows = torch.arange(h).repeat_interleave(w)  # token t = r * w + c
    cols = torch.arange(w).repeat(h)
    near = ((rows[:, None] - rows[None, :]).abs() <= hm // 2) & ((cols[:, None] - cols[None, :]).abs() <= wm // 2)
    mask = torch.zeros(h * w, h * w)
    return mask.masked_fill(near, float("-inf"))


def feature_jitter(tokens: torch.Tensor, scale: float, prob: float) -> torch.Tensor:
    """Add ``eps ~ N(0, 1)`` times ``scale * ||f_t||_2 / C`` to every token (L, B, C); one coin flip
    per batch decides (probability ``prob``). The divisor is C, not sqrt(C) (spec §5.1)."""
    if prob <= 0 or float(torch.rand(())) > prob:
        return tokens
    norms = tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1]  # (L, B, 1)
    return tokens + torch.randn_like(tokens) * norms * scale


def anomaly_map(feature_rec: torch.Tensor, feature_align: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """pred = ||feature_rec - feature_align||_2 over channels (B, 1, h, w), upsampled to ``size``
    with bilinear ``align_corners=True`` (no blur)."""
    pred = torch.sqrt(((feature_rec - feature_align) ** 2).sum(dim=1, keepdim=True))
    return F.interpolate(pred, size=tuple(size), mode="bilinear", align_corners=True)


def image_score(amap: torch.Tensor, kernel: int = 16) -> torch.Tensor:
    """Max of the ``kernel`` x ``kernel`` stride-1 average-pooled map (no padding): (B,)."""
    return F.avg_pool2d(amap, kernel, stride=1).flatten(1).max(dim=1).values


# ------------------------------------------------------------------------------- transformer
def keep_mask(shape: Sequence[int], p: float, device: torch.device) -> torch.Tensor:
    """Bool dropout keep mask, each element kept with probability 1 - p, independently.

    On CUDA ``torch.rand(shape) >= p``. On CPU torch's generator (mt19937, one thread) is the most
    expensive op of a UniAD step (issue 12), so the mask comes from numpy's SFC64 instead: raw
    64-bit words, read as 32-bit integers u, kept where u >= round(p * 2^32), i.e. with
    probability 1 - p up to 2^-32 (torch's float32 ``rand`` resolves 2^-24). Its seed is drawn
    from torch's global generator, so ``torch.manual_seed`` and the resumed RNG state of a
    checkpoint fix every mask as before; the draws differ from ``nn.Dropout``'s. 2.5x faster than
    ``torch.rand(...) >= p`` at the attention size (64 x 196 x 196).
    """
    if device.type != "cpu":
        return torch.rand(tuple(shape), device=device) >= p
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**62, (1,)))
    words = np.random.SFC64(seed).random_raw((n + 1) // 2)
    return torch.from_numpy(words.view(np.uint32)[:n] >= np.uint32(round(p * 2**32))).view(tuple(shape))


class _MaskDropout(torch.autograd.Function):
    """y = x * keep / (1 - p) with ``keep_mask`` kept as a bool mask for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.where(keep, x, 0.0).mul_(ctx.scale)  # where: no float copy of the bool mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None


class Dropout(nn.Dropout):
    """``nn.Dropout`` with its mask drawn by ``keep_mask`` into a bool tensor: the same
    Bernoulli(1 - p) keep distribution and 1 / (1 - p) scale, at about a third of the CPU cost of
    ``bernoulli_`` and a quarter of the mask memory. RNG stream: for a given seed the masks are
    other draws than ``nn.Dropout``'s, so training curves match torch's in distribution, not bit
    for bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return _MaskDropout.apply(x, self.p)


def attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: Dropout,
) -> torch.Tensor:
    """``attn(query, key, value, attn_mask=mask, need_weights=False)[0]`` with ``attn``'s own
    parameters (state dicts unchanged), sequence-first (L, B, d); ``query`` may have batch 1
    (a learned query shared by the batch: projected once, then copied to the batch).

    softmax(q k^T / sqrt(d_h) + mask) on ``mask`` (additive, -inf blocks); attention dropout is
    ``dropout`` (the bool-mask draw); in eval mode the fused ``scaled_dot_product_attention``.
    """
    h, (length, _, d), b = attn.num_heads, query.shape, key.shape[1]
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    if q.shape[1] != b:  # shared queries: projected once, copied to the batch for the products
        q = q.expand(-1, b, -1).contiguous()
    if not (dropout.training and dropout.p > 0.0):  # eval: fused kernel, (B, h, L, d_h) views
        q, k, v = (t.unflatten(-1, (h, d // h)).permute(1, 2, 0, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).permute(2, 0, 1, 3)
    else:  # head-major contiguous copies: MKL's batched products run ~2x faster on them than on
        # torch's strided (B*h, L, d_h) views, for a few cheap copies
        q, k, v = (t.reshape(t.shape[0], b * h, d // h) for t in (q, k, v))
        q = (q * (d // h) ** -0.5).transpose(0, 1).contiguous()  # (B*h, L, d_h)
        k = k.transpose(0, 1).contiguous()  # (B*h, S, d_h)
        v = v.transpose(0, 1).contiguous()  # (B*h, S, d_h)
        scores = torch.bmm(q, k.transpose(1, 2))  # (B*h, L, S)
        if mask is not None:
            scores = scores.add_(mask)  # in place: the product's backward does not need its output
        out = torch.bmm(dropout(scores.softmax(dim=-1)), v).transpose(0, 1)  # (L, B*h, d_h)
    out = out.reshape(length, b, d)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


class PositionEmbeddingLearned(nn.Module):
    """pos(h, w) = concat(col[w], row[h]); tables U(0, 1); returns (H*W, 2 * num_pos_feats)."""

    def __init__(self, feature_size: Sequence[int], num_pos_feats: int = 128) -> None:
        super().__init__()
        self.feature_size = tuple(feature_size)
        self.row_embed = nn.Embedding(feature_size[0], num_pos_feats)
        self.col_embed = nn.Embedding(feature_size[1], num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self) -> torch.Tensor:
        h, w = self.feature_size
        col = self.col_embed.weight[None].expand(h, w, -1)  # (H, W, C/2): col[w]
        row = self.row_embed.weight[:, None].expand(h, w, -1)  # (H, W, C/2): row[h]
        return torch.cat([col, row], dim=-1).flatten(0, 1)


class EncoderLayer(nn.Module):
    """Post-norm: x = LN(x + Drop(MHA(x+pos, x+pos, x))); x = LN(x + Drop(FFN(x)))."""

    def __init__(self, d: int, nhead: int, dim_ff: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.attn_dropout = Dropout(dropout)  # MHA's attention dropout, drawn by ``Dropout``
        self.linear1, self.linear2 = nn.Linear(d, dim_ff), nn.Linear(dim_ff, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout, self.dropout1, self.dropout2 = Dropout(dropout), Dropout(dropout), Dropout(dropout)
        self.activation = _activation(activation)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = k = x + pos
        x = self.norm1(x + self.dropout1(attention(self.self_attn, q, k, x, mask, self.attn_dropout)))
        ff = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm2(x + self.dropout2(ff))


class DecoderLayer(nn.Module):
    """Layer-wise query decoder layer (post-norm), with its own query table q (H*W, d):

    t = LN(q + Drop(MHA(q+pos, M+pos, M)))          encoder_attn (official name ``self_attn``)
    t = LN(t + Drop(MHA(t+pos, out+pos, out)))      out_attn (official name ``multihead_attn``)
    t = LN(t + Drop(FFN(t)))
    """

    def __init__(self, num_queries: int, d: int, nhead: int, dim_ff: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.learned_embed = nn.Embedding(num_queries, d)  # N(0, 1) default init
        self.encoder_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.out_attn = nn.MultiheadAttention(d, nhead, dropout=dropout)
        self.attn_dropout = Dropout(dropout)  # the two MHAs' attention dropout
        self.linear1, self.linear2 = nn.Linear(d, dim_ff), nn.Linear(dim_ff, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.dropout = Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = Dropout(dropout), Dropout(dropout), Dropout(dropout)
        self.activation = _activation(activation)

    def forward(
        self,
        out: torch.Tensor,
        memory: torch.Tensor,
        pos: torch.Tensor,
        mask_memory: torch.Tensor | None,
        mask_out: torch.Tensor | None,
    ) -> torch.Tensor:
        q = self.learned_embed.weight[:, None]  # (L, 1, d): the same queries for every image
        t = attention(self.encoder_attn, q + pos, memory + pos, memory, mask_memory, self.attn_dropout)
        t = self.norm1(q + self.dropout1(t))
        t2 = attention(self.out_attn, t + pos, out + pos, out, mask_out, self.attn_dropout)
        t = self.norm2(t + self.dropout2(t2))
        ff = self.linear2(self.dropout(self.activation(self.linear1(t))))
        return self.norm3(t + self.dropout3(ff))


class Encoder(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)  # no final norm (post-norm encoder)


class Decoder(nn.Module):
    def __init__(self, layers: list[nn.Module], d: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d)  # final decoder norm, present although post-norm


class UniADModel(nn.Module):
    """feature_align (B, C, H, W) -> feature_rec (B, C, H, W); jitter only in training mode."""

    def __init__(
        self,
        in_channels: int = 272,
        feature_size: Sequence[int] = (14, 14),
        hidden_dim: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        neighbor_size: Sequence[int] | None = (7, 7),
        neighbor_mask_in: Sequence[bool] = (True, True, True),
        jitter_scale: float = 20.0,
        jitter_prob: float = 1.0,
    ) -> None:
        super().__init__()
        self.feature_size = tuple(int(s) for s in feature_size)
        self.in_channels = in_channels
        self.jitter_scale, self.jitter_prob = float(jitter_scale), float(jitter_prob)
        num_queries = self.feature_size[0] * self.feature_size[1]
        self.input_proj = nn.Linear(in_channels, hidden_dim)  # "reduce" (paper: 1x1 conv)
        self.output_proj = nn.Linear(hidden_dim, in_channels)  # "expand"
        self.pos_embed = PositionEmbeddingLearned(self.feature_size, hidden_dim // 2)
        self.encoder = Encoder(
            [EncoderLayer(hidden_dim, nhead, dim_feedforward, dropout, activation) for _ in range(num_encoder_layers)]
        )
        self.decoder = Decoder(
            [
                DecoderLayer(num_queries, hidden_dim, nhead, dim_feedforward, dropout, activation)
                for _ in range(num_decoder_layers)
            ],
            hidden_dim,
        )
        self.use_mask = tuple(bool(m) for m in neighbor_mask_in) if neighbor_size else (False, False, False)
        mask = neighbor_mask(self.feature_size, neighbor_size) if neighbor_size else torch.zeros(0)
        if neighbor_size and bool(torch.isinf(mask).all(dim=1).any()):
            raise ValueError(f"neighbor_size={list(neighbor_size)} masks every key of some token on a "
                             f"{list(self.feature_size)} grid (attention would be NaN)")
        self.register_buffer("mask", mask, persistent=False)  # rebuilt, never in a state dict
        _xavier_linears(self)

    def forward(self, feature_align: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feature_align.shape
        if (h, w) != self.feature_size or c != self.in_channels:
            raise ValueError(f"UniAD expects (B, {self.in_channels}, {self.feature_size}), got {tuple(feature_align.shape)}")
        tokens = feature_align.flatten(2).permute(2, 0, 1)  # (L, B, C), token = h * W + w
        if self.training:
            tokens = feature_jitter(tokens, self.jitter_scale, self.jitter_prob)
        x = self.input_proj(tokens)
        pos = self.pos_embed()[:, None]  # (L, 1, d), broadcast over the batch
        mask = self.mask.to(x.dtype) if self.mask.numel() else None
        m_enc, m_dec1, m_dec2 = (mask if use else None for use in self.use_mask)
        for layer in self.encoder.layers:
            x = layer(x, pos, m_enc)
        memory, out = x, x
        for layer in self.decoder.layers:
            out = layer(out, memory, pos, m_dec1, m_dec2)
        rec = self.output_proj(self.decoder.norm(out))  # (L, B, C)
        return rec.permute(1, 2, 0).reshape(b, c, h, w)


class UniADInference(nn.Module):
    """The exportable inference graph: normalised images -> (anomaly_map, pred_score)."""

    def __init__(self, feature_extractor: nn.Module, model: UniADModel, score_kernel: int = 16) -> None:
        super().__init__()
        self.feature_extractor, self.model, self.score_kernel = feature_extractor, model, score_kernel

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_align = align_features(self.feature_extractor(images), self.model.feature_size)
        amap = anomaly_map(self.model(feature_align), feature_align, images.shape[-2:])
        return amap, image_score(amap, self.score_kernel)


def _activation(name: str):
    acts = {"relu": F.relu, "gelu": F.gelu}
    if name not in acts:
        raise ValueError(f"activation '{name}' is not one of {sorted(acts)}")
    return acts[name]


def _xavier_linears(module: nn.Module) -> None:
    """Official ``xavier_uniform`` initializer: every nn.Linear (MHA ``out_proj`` included) gets
    xavier-uniform weights and zero bias; the packed MHA ``in_proj`` keeps torch's default (also
    xavier-uniform, zero bias); embeddings keep theirs."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------- official checkpoints
# (official key pattern, our key pattern), applied in order to keys after the ``module.`` prefix.
# Official source: zhiyuanyou/UniAD models/reconstructions/uniad.py (model built as
# ``backbone`` / ``neck`` / ``reconstruction`` by its ModelHelper, wrapped in DDP -> ``module.``).
OFFICIAL_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^reconstruction\.input_proj\.", "input_proj."),
    (r"^reconstruction\.output_proj\.", "output_proj."),
    (r"^reconstruction\.pos_embed\.(row|col)_embed\.", r"pos_embed.\1_embed."),
    (r"^reconstruction\.transformer\.encoder\.layers\.(\d+)\.", r"encoder.layers.\1."),
    (r"^reconstruction\.transformer\.decoder\.layers\.(\d+)\.self_attn\.", r"decoder.layers.\1.encoder_attn."),
    (r"^reconstruction\.transformer\.decoder\.layers\.(\d+)\.multihead_attn\.", r"decoder.layers.\1.out_attn."),
    (r"^reconstruction\.transformer\.decoder\.layers\.(\d+)\.", r"decoder.layers.\1."),
    (r"^reconstruction\.transformer\.decoder\.norm\.", "decoder.norm."),
)
# the lukemelas EfficientNet-B4 backbone (not timm's layout) and the parameter-free neck
OFFICIAL_IGNORED_PREFIXES = ("backbone.", "neck.")


def official_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an official UniAD state dict onto ``UniADModel``; returns (mapped, ignored keys).
    Raises WeightsError on a key that fits no rule."""
    mapped, ignored, unknown = {}, [], []
    for key, value in state.items():
        k = key.removeprefix("module.")
        if k.startswith(OFFICIAL_IGNORED_PREFIXES):
            ignored.append(key)
            continue
        for pattern, repl in OFFICIAL_KEY_MAP:
            new, n = re.subn(pattern, repl, k)
            if n:
                mapped[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"official UniAD state dict: {len(unknown)} keys fit no mapping rule, e.g. {unknown[:3]}")
    return mapped, ignored


def load_official_checkpoint(model: UniADModel, path: str | Path) -> list[str]:
    """Load the published ``ckpt.pth.tar`` (``{'epoch', 'arch', 'state_dict', 'best_metric',
    'optimizer'}``) into ``model`` safely (``safe_load.safe_torch_load``: ``weights_only=True``
    with ``easydict.EasyDict`` mapped to a stand-in), strictly: every transformer tensor must be present and fit.
    Returns the ignored (backbone) keys; the backbone stays the configured timm one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"method.official_checkpoint='{path}' does not exist")
    # The file also pickles "arch": config.net as easydict.EasyDict objects: a stand-in reads them.
    ckpt = safe_torch_load(path, extra_globals=EASYDICT, what="official UniAD checkpoint")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"'{path}' holds no state dict")
    mapped, ignored = official_to_ours(state)
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as err:
        raise WeightsError(
            f"official UniAD checkpoint '{path}' does not fit this model (in_channels={model.in_channels}, "
            f"grid {model.feature_size}; the official one is 272 channels on 14x14, i.e. "
            f"backbone tf_efficientnet_b4 layers [0,1,2,3] at 224): {err}"
        ) from err
    return ignored
