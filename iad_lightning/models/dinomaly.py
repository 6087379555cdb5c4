"""Dinomaly (Guo et al., CVPR 2025) in plain torch: frozen DINOv2-reg encoder, noisy bottleneck,
linear-attention decoder, loose hard-mined cosine loss, and the official map and score.

Spec: ``specs/dinomaly.md`` (written from the official ``guojiajeremy/Dinomaly`` code). Pieces:

- :func:`build_encoder` / :class:`DinomalyEncoder`: a timm ``vit_*_patch14_reg4_dinov2`` built at
  its native size, weights from the hub, a file (Meta's ``dinov2_vit*14_reg4_pretrain.pth``,
  converted by timm's own ``checkpoint_filter_fn`` on a copy, or a timm file), or random; the
  position table is then resampled ONCE for the crop with the official bicubic scale factor
  ``(grid + 0.1) / native`` and no antialias (:func:`official_pos_resample`, spec §3.3). Raw block
  outputs, CLS and registers kept, no final norm.
- :class:`Bottleneck` (one dropout used three times), :class:`LinearAttention` (elu + 1, no
  scale), :class:`DecoderBlock` (pre-norm, LayerNorm eps 1e-8, no LayerScale).
- :class:`DinomalyModel`: mean of the taken layers -> bottleneck -> 8 decoder blocks -> outputs
  REVERSED -> groups (shallow encoder group vs the LAST four decoder blocks) -> strip the prefix
  tokens -> (B, C, h, w). Module names are the official ones, so an official ``model.pth`` maps
  key for key (:func:`read_official_checkpoint`).
- :func:`hard_mining_cosine_loss` (``global_cosine_hm_percent``), :func:`anomaly_map`,
  :func:`smooth_and_score` (5 x 5 zero-padded Gaussian, top-1 % mean on the 256 map),
  :class:`StableAdamW` and :func:`warm_cosine_lr`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iad_lightning.errors import ConfigError, WeightsError
from iad_lightning.safe_load import safe_torch_load

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
META_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{s}14_reg4/dinov2_vit{s}14_reg4_pretrain.pth"
_SIZE_LETTER = {"small": "s", "base": "b", "large": "l", "giant": "g"}
PREFIX_KEYS = ("cls_token", "reg_token", "register_tokens", "pos_embed", "mask_token")


# ------------------------------------------------------------------------------- encoder weights
def read_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """Tensors of a weights file, safely (safetensors or ``torch.load(weights_only=True)``)."""
    p = Path(path).expanduser()
    if p.suffix == ".safetensors":
        if not p.is_file():
            raise WeightsError(f"{what} '{p}' does not exist")
        from safetensors.torch import load_file

        sd: Any = load_file(str(p))
    else:
        sd = safe_torch_load(p, what=what)
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"{what} '{p}' holds no state dict")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, Tensor)}


def encoder_arch(sd: dict[str, Tensor], origin: str) -> dict[str, Any]:
    """The timm keyword arguments a DINOv2-reg state dict describes (Meta's or timm's layout):
    width = cls_token width, heads = width / 64, depth = number of blocks, registers, patch,
    native grid = sqrt(position rows (- 1 CLS row in Meta's layout)) (spec §3.4)."""
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [k for k in need if k not in sd]
    if missing or ("register_tokens" not in sd and "reg_token" not in sd):
        raise WeightsError(f"{origin} is not a DINOv2-with-registers ViT state dict (missing "
                           f"{missing or ['register_tokens / reg_token']}); give Meta's "
                           "dinov2_vit*14_reg4_pretrain.pth or a timm vit_*_patch14_reg4_dinov2 file")
    width = int(sd["cls_token"].shape[-1])
    meta = "register_tokens" in sd
    rows = int(sd["pos_embed"].shape[1]) - (1 if meta else 0)
    grid = math.isqrt(rows)
    if grid * grid != rows:
        raise WeightsError(f"{origin}: pos_embed has {rows} grid rows, not a square")
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    return {
        "embed_dim": width,
        "depth": len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}),
        "num_heads": max(1, width // 64),
        "reg_tokens": int(sd["register_tokens" if meta else "reg_token"].shape[1]),
        "patch_size": patch,
        "img_size": patch * grid,
        "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
    }


def _create(name: str, arch: dict[str, Any] | None, pretrained: bool = False) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **(arch or {}))
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ConfigError(f"method.model.encoder='{name}' is not a timm model; use "
                              "vit_{small,base,large}_patch14_reg4_dinov2") from err
        raise


def build_encoder(name: str, weights: str | None, arch: dict[str, Any] | None = None,
                  state: dict[str, Tensor] | None = None, origin: str = "") -> tuple[nn.Module, dict[str, Any]]:
    """(timm ViT at its native size, its architecture as timm kwargs).

    ``weights``: ``hub`` (timm's download), a file path, ``random`` / None (random init of
    ``arch`` or of ``name``'s defaults; None = weights loaded afterwards from a checkpoint).
    ``state``: an encoder state dict already read (from an official Dinomaly ``model.pth``).
    """
    if state is None and weights not in (None, "random", "hub"):
        origin = f"method.model.encoder_weights='{weights}'"
        state = read_state_dict(weights, "DINOv2 encoder weights file")
    if state is not None:
        arch = encoder_arch(state, origin)
        vit = _create(name, arch)
        if "mask_token" in state or "register_tokens" in state:  # Meta's layout -> timm's (spec §3.4)
            from timm.models.vision_transformer import checkpoint_filter_fn

            state = checkpoint_filter_fn(dict(state), vit)  # it pops keys: a copy
        try:
            vit.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise WeightsError(f"{origin} does not fit timm '{name}' with {arch}: {str(err).splitlines()[0]}") from err
        return vit, arch
    if weights == "hub":
        try:
            vit = _create(name, arch, pretrained=True)
        except ConfigError:
            raise
        except Exception as err:  # offline: many error types (OSError, HF hub errors, ...)
            letter = next((v for k, v in _SIZE_LETTER.items() if f"_{k}_" in name), "b")
            raise WeightsError(
                f"could not download the DINOv2 weights of '{name}' ({type(err).__name__}); offline, pass "
                f"method.model.encoder_weights=/path/to/{Path(META_URL.format(s=letter)).name} (Meta's file, "
                f"{META_URL.format(s=letter)}) or a timm .safetensors file, or "
                "method.official_checkpoint=/path/to/model.pth (a published Dinomaly model)") from None
    else:
        vit = _create(name, arch)
    native = vit.patch_embed.img_size[0]
    arch = {"embed_dim": vit.embed_dim, "depth": len(vit.blocks), "num_heads": vit.blocks[0].attn.num_heads,
            "reg_tokens": vit.num_reg_tokens, "patch_size": vit.patch_embed.patch_size[0], "img_size": native,
            "mlp_ratio": vit.blocks[0].mlp.fc1.out_features / vit.embed_dim}
    return vit, arch


def official_pos_resample(grid_table: Tensor, new_grid: int, offset: float = 0.1) -> Tensor:
    """DINOv2's ``interpolate_pos_encoding`` of a (1, G*G, C) grid table to (1, n*n, C): bicubic
    with ``scale_factor = (n + offset) / G`` (so coordinates map with G / (n + 0.1), not G / n),
    ``align_corners=False``, no antialias; unchanged when n == G (the official short cut)."""
    _, rows, c = grid_table.shape
    g = math.isqrt(rows)
    if new_grid == g:
        return grid_table
    grid = grid_table.reshape(1, g, g, c).permute(0, 3, 1, 2)
    scale = float(new_grid + offset) / g
    out = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if tuple(out.shape[-2:]) != (new_grid, new_grid):
        raise ConfigError(f"position resampling gave {tuple(out.shape[-2:])}, expected {new_grid}x{new_grid}")
    return out.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, c)


class DinomalyEncoder(nn.Module):
    """A frozen timm DINOv2-reg ViT at input ``crop`` x ``crop`` that returns the raw residual
    stream (B, 1 + R + h*w, C) after each of ``layers`` (0-based blocks), tokens ordered
    ``[CLS, reg_1..reg_R, patches row-major]`` as the official ``prepare_tokens``."""

    def __init__(self, vit: nn.Module, crop: int) -> None:
        super().__init__()
        patch = vit.patch_embed.patch_size[0]
        if crop % patch:
            raise ConfigError(f"method.model.crop={crop} must be a multiple of the patch size {patch}")
        native_table = vit.pos_embed.detach().clone()  # (1, G*G, C) at the native size
        vit.set_input_size(img_size=crop)  # timm's own resampling (antialiased), overwritten next
        with torch.no_grad():
            vit.pos_embed.copy_(official_pos_resample(native_table, crop // patch))
        self.vit = vit.requires_grad_(False).eval()
        self.crop, self.grid, self.num_prefix = crop, crop // patch, 1 + vit.num_reg_tokens

    def train(self, mode: bool = True) -> DinomalyEncoder:
        return super().train(False)  # frozen; drop-path and dropout are 0 anyway (spec §3.1)

    def forward(self, images: Tensor, layers: Sequence[int]) -> list[Tensor]:
        if tuple(images.shape[-2:]) != (self.crop, self.crop):
            raise ConfigError(f"Dinomaly expects {self.crop}x{self.crop} inputs (method.model.crop), got "
                              f"{tuple(images.shape[-2:])}")
        v = self.vit
        with torch.no_grad():
            x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(images))))
            out = {}
            for i in range(max(layers) + 1):  # later blocks and the final norm are never used
                x = v.blocks[i](x)
                out[i] = x
        return [out[i] for i in layers]


# ------------------------------------------------------------------------------- bottleneck, decoder
class Bottleneck(nn.Module):
    """``bMlp(C, 4C, C, drop)``: one dropout applied to the input, the hidden layer and the output."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.2) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.drop = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.drop(x))))))


class LinearAttention(nn.Module):
    """``LinearAttention2``: phi = elu + 1, ``out_s = phi(q_s) (phi(K)^T V) / (phi(q_s) . sum_t
    phi(k_t))`` per head; no 1/sqrt(d) scale, no eps, no attention dropout."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        kv = k.transpose(-2, -1) @ v  # (B, H, d, d) over all N tokens
        z = 1.0 / (q @ k.sum(dim=-2).unsqueeze(-1))  # (B, H, N, 1)
        return self.proj(((q @ kv) * z).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DecoderBlock(nn.Module):
    """Pre-norm block, LayerNorm eps 1e-8, linear attention, no LayerScale / drop-path / dropout."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-8), LinearAttention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-8), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def default_layers(depth: int) -> list[int]:
    """The official taken blocks: [2..9] for 12 blocks (S, B), [4, 6, ..., 18] for 24 (L)."""
    if depth == 12:
        return list(range(2, 10))
    if depth == 24:
        return list(range(4, 19, 2))
    raise ConfigError(f"no official layer choice for a {depth}-block encoder; set method.model.target_layers "
                      "(8 0-based block indices)")


# ------------------------------------------------------------------------------- the model
class DinomalyModel(nn.Module):
    """Encoder (frozen) + bottleneck + decoder; paper defaults in ``conf/method/dinomaly.yaml``.

    Args:
        encoder: timm name (``vit_{small,base,large}_patch14_reg4_dinov2``).
        encoder_weights: ``hub`` | a file (Meta's ``.pth`` or a timm file) | ``random`` | None.
        crop: input side (392: a 28 x 28 patch grid).
        target_layers: 0-based blocks taken (None: [2..9], ViT-L [4, 6, ..., 18]).
        fuse_groups: indices into the taken layers / reversed decoder outputs per group.
        decoder_depth, bottleneck_dropout: 8, 0.2 (Real-IAD unified: 0.4, set by the method).
        map_size, max_ratio: the score's map side (256) and top fraction (0.01).
        official_checkpoint: an official ``model.pth``; the architecture is read off its shapes.
        arch: encoder timm kwargs (written into checkpoints; rebuilds without any weights file).
    """

    def __init__(
        self,
        encoder: str = "vit_base_patch14_reg4_dinov2",
        encoder_weights: str | None = "hub",
        crop: int = 392,
        target_layers: Sequence[int] | None = None,
        fuse_groups: Sequence[Sequence[int]] = ((0, 1, 2, 3), (4, 5, 6, 7)),
        decoder_depth: int = 8,
        bottleneck_dropout: float = 0.2,
        map_size: int = 256,
        max_ratio: float = 0.01,
        official_checkpoint: str | None = None,
        arch: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        official = read_official_checkpoint(official_checkpoint) if official_checkpoint else None
        if official is not None:
            vit, self.arch = build_encoder(encoder, None, state=official["encoder"],
                                           origin=f"method.official_checkpoint='{official_checkpoint}'")
            decoder_depth = official["decoder_depth"]
        else:
            vit, self.arch = build_encoder(encoder, encoder_weights, arch)
        self.encoder = DinomalyEncoder(vit, crop)
        dim, heads, depth = self.arch["embed_dim"], self.arch["num_heads"], self.arch["depth"]
        self.target_layers = [int(i) for i in (target_layers if target_layers is not None else default_layers(depth))]
        self.fuse_groups = [[int(i) for i in g] for g in fuse_groups]
        if not self.target_layers or max(self.target_layers) >= depth or min(self.target_layers) < 0:
            raise ConfigError(f"method.model.target_layers={self.target_layers} must be blocks of the {depth}-block encoder")
        if any(i >= min(len(self.target_layers), decoder_depth) for g in self.fuse_groups for i in g):
            raise ConfigError(f"method.model.fuse_groups={self.fuse_groups} index past the {len(self.target_layers)} "
                              f"taken layers or the {decoder_depth} decoder blocks")
        self.crop, self.map_size, self.max_ratio = int(crop), int(map_size), float(max_ratio)
        self.bottleneck = nn.ModuleList([Bottleneck(dim, dim * 4, bottleneck_dropout)])
        self.decoder = nn.ModuleList([DecoderBlock(dim, heads, 4.0) for _ in range(decoder_depth)])
        self.bottleneck.apply(_init_trainable)
        self.decoder.apply(_init_trainable)
        self.register_buffer("blur_kernel", gaussian_kernel(5, 4.0), persistent=False)
        if official is not None:
            self.bottleneck.load_state_dict(official["bottleneck"], strict=True)
            self.decoder.load_state_dict(official["decoder"], strict=True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.bottleneck.parameters(), *self.decoder.parameters()]

    def intermediates(self, images: Tensor) -> dict[str, Any]:
        """Everything the forward computes: ``layers`` (taken encoder outputs, all tokens),
        ``fused``, ``bottleneck``, ``decoder`` (block outputs REVERSED: [0] = last block),
        ``en_groups`` / ``de_groups`` (B, C, h, w)."""
        layers = self.encoder(images, self.target_layers)
        fused = torch.stack(layers, dim=1).mean(dim=1)
        x = fused
        for blk in self.bottleneck:
            x = blk(x)
        bottleneck, outs = x, []
        for blk in self.decoder:
            x = blk(x)
            outs.append(x)
        outs = outs[::-1]
        p, g = self.encoder.num_prefix, self.encoder.grid

        def group(seq: list[Tensor], idx: list[int]) -> Tensor:
            t = torch.stack([seq[i] for i in idx], dim=1).mean(dim=1)[:, p:, :]  # drop CLS + registers
            return t.permute(0, 2, 1).reshape(t.shape[0], -1, g, g).contiguous()

        return {"layers": layers, "fused": fused, "bottleneck": bottleneck, "decoder": outs,
                "en_groups": [group(layers, i) for i in self.fuse_groups],
                "de_groups": [group(outs, i) for i in self.fuse_groups]}

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        out = self.intermediates(images)
        return out["en_groups"], out["de_groups"]

    def maps(self, images: Tensor) -> dict[str, Tensor]:
        """The official evaluation maps: ``map_full`` (at the input size), ``map_small`` (at
        ``map_size``, before smoothing), ``map_smooth`` (after) and ``score`` (spec §8)."""
        en, de = self(images)
        full = anomaly_map(en, de, images.shape[-1])
        small = F.interpolate(full, size=self.map_size, mode="bilinear", align_corners=False)
        smooth = F.conv2d(small, self.blur_kernel, padding=self.blur_kernel.shape[-1] // 2)
        return {"map_full": full, "map_small": small, "map_smooth": smooth,
                "score": top_ratio_score(smooth, self.max_ratio)}


def _init_trainable(m: nn.Module) -> None:
    """Official init: Linear weights trunc_normal(std 0.01, absolute bounds +-0.03), biases 0;
    LayerNorm 1 / 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class DinomalyInference(nn.Module):
    """Export graph ``images -> (map at the input size, score)``: the smoothed ``map_size`` map
    upsampled bilinearly (what the evaluation path does) and the official top-1 % score."""

    def __init__(self, model: DinomalyModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model.maps(images)
        amap = F.interpolate(out["map_smooth"], size=images.shape[-2:], mode="bilinear", align_corners=False)
        return amap, out["score"]


# ------------------------------------------------------------------------------- maps and score
def anomaly_map(en: Sequence[Tensor], de: Sequence[Tensor], size: int) -> Tensor:
    """``cal_anomaly_maps``: per group 1 - cos over channels, bilinear to ``size`` with
    ``align_corners=True``, mean over groups: (B, 1, size, size)."""
    maps = [F.interpolate((1 - F.cosine_similarity(e, d, dim=1)).unsqueeze(1), size=size, mode="bilinear",
                          align_corners=True) for e, d in zip(en, de)]
    return torch.cat(maps, dim=1).mean(dim=1, keepdim=True)


def gaussian_kernel(size: int = 5, sigma: float = 4.0) -> Tensor:
    """``get_gaussian_kernel``: (1, 1, size, size), normalised to sum 1 (used with zero padding)."""
    coords = torch.arange(size, dtype=torch.float32)
    mean = (size - 1) / 2.0
    d2 = (coords[None, :] - mean) ** 2 + (coords[:, None] - mean) ** 2
    k = torch.exp(-d2 / (2 * sigma**2)) / (2 * math.pi * sigma**2)
    return (k / k.sum())[None, None]


def smooth(amap: Tensor, kernel: Tensor | None = None) -> Tensor:
    """The official 5 x 5, sigma 4 Gaussian with zero padding 2 (darkens the border)."""
    kernel = gaussian_kernel() if kernel is None else kernel
    return F.conv2d(amap, kernel.to(amap), padding=kernel.shape[-1] // 2)


def top_ratio_score(amap: Tensor, ratio: float = 0.01) -> Tensor:
    """Mean of the top ``int(H*W*ratio)`` values per image (ratio 0: the max)."""
    flat = amap.flatten(1)
    k = int(flat.shape[1] * ratio)
    if k < 1:
        return flat.max(dim=1).values
    return flat.topk(k, dim=1).values.mean(dim=1)


# ------------------------------------------------------------------------------- loss
class _ScaleEasyGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` where ``easy`` (the
    official ``modify_grad`` hook on the decoder group, as a function)."""

    @staticmethod
    def forward(ctx, b: Tensor, easy: Tensor, factor: float) -> Tensor:
        ctx.save_for_backward(easy)
        ctx.factor = factor
        return b.view_as(b)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (easy,) = ctx.saved_tensors
        return torch.where(easy, grad * ctx.factor, grad), None, None


def hard_mining_cosine_loss(en: Sequence[Tensor], de: Sequence[Tensor], p: float, factor: float = 0.1,
                            gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``global_cosine_hm_percent``: per group, the mean over images of 1 - cos(a_b, b_b) over
    all C*h*w values (a = encoder group, detached); the gradient of the decoder group is scaled
    by ``factor`` at the points whose 1 - cos over channels is below the k-th largest over the
    whole batch, k = int(numel * (1 - p)). ``gather`` collects that distance map from every
    rank (DDP), so the threshold stays a quantile of the global batch."""
    loss = 0.0
    for a, b in zip(en, de):
        a = a.detach()
        with torch.no_grad():
            d = 1 - F.cosine_similarity(a, b, dim=1).unsqueeze(1)  # (B, 1, h, w)
            pool = (gather(d) if gather is not None else d).reshape(-1)
            k = max(1, int(pool.numel() * (1 - p)))
            thresh = pool.topk(k).values[-1]
        if b.requires_grad:  # the hook: the loss value does not depend on p, only the gradient
            b = _ScaleEasyGrad.apply(b, d < thresh, factor)
        loss = loss + (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)).mean()
    return loss / len(en)


def hard_mining_p(it: int, p_final: float = 0.9, ramp: int = 1000) -> float:
    """p(it) = min(p_final * it / ramp, p_final)."""
    return min(p_final * it / ramp, p_final)


# ------------------------------------------------------------------------------- optimiser
def warm_cosine_lr(it: int, base: float, final: float, total: int, warmup: int) -> float:
    """``WarmCosineScheduler``: linspace(0, base, warmup) then a cosine to ``final`` over
    ``total - warmup`` iterations, ``final`` afterwards. Iteration 0 runs at LR 0."""
    if it < warmup:
        return base * it / (warmup - 1) if warmup > 1 else base
    if it < total:
        return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (it - warmup) / (total - warmup)))
    return final


class StableAdamW(torch.optim.Optimizer):
    """The official ``optimizers/StableAdamW.py`` (spec §7): decoupled decay ``p *= 1 - lr*wd``
    on every tensor first; AMSGrad second moment; the step divided by
    ``max(1, RMS(g / denom))`` (update clipping on the current gradient)."""

    def __init__(self, params, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-10,
                 weight_decay: float = 1e-4, amsgrad: bool = True, clip_threshold: float = 1.0) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, clip_threshold=clip_threshold))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                p.mul_(1 - lr * wd)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
                    v = state["max_exp_avg_sq"]
                denom = v.sqrt() / math.sqrt(1 - b2**t) + eps
                rms = (g / denom).pow(2).mean().sqrt()
                scale = torch.clamp(rms / group["clip_threshold"], min=1.0)
                p.addcdiv_(m, denom * scale, value=-lr / (1 - b1**t))
        return loss


# ------------------------------------------------------------------------------- official weights
def read_official_checkpoint(path: str | Path) -> dict[str, Any]:
    """An official Dinomaly ``model.pth`` (``ViTill.state_dict()``), safely: ``encoder.*`` in
    Meta's DINOv2 layout, ``bottleneck.0.*``, ``decoder.i.*``. Returns the three parts (prefixes
    removed) and the decoder depth."""
    sd = read_state_dict(path, "official Dinomaly checkpoint")
    parts: dict[str, dict[str, Tensor]] = {"encoder": {}, "bottleneck": {}, "decoder": {}}
    other = []
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        (parts[head].__setitem__(rest, value) if head in parts and rest else other.append(key))
    if other or not all(parts.values()):
        raise WeightsError(f"official Dinomaly checkpoint '{path}' is not a ViTill state dict (expected only "
                           f"encoder.*, bottleneck.*, decoder.*; unexpected {other[:3]}, empty "
                           f"{[k for k, v in parts.items() if not v]})")
    depth = len({int(k.split(".")[0]) for k in parts["decoder"]})
    return {**parts, "decoder_depth": depth}


def official_state_dict(model: DinomalyModel) -> dict[str, Tensor]:
    """The trainable part in the official key layout (``bottleneck.0.*``, ``decoder.i.*``)."""
    return {**{f"bottleneck.{k}": v for k, v in model.bottleneck.state_dict().items()},
            **{f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
