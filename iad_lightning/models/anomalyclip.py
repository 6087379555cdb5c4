"""AnomalyCLIP (Zhou et al., ICLR 2024) in plain torch: a frozen open_clip CLIP, DPAM, prompts.

Spec: ``specs/anomalyclip.md``. Pieces:

- CLIP loading (:func:`load_clip`): ``openai`` through open_clip's hub download, or a local file
  (OpenAI release TorchScript archive, a plain state dict in the OpenAI key layout, or an
  open_clip checkpoint; both layouts use the same key names). The architecture is read off the
  state dict's shapes as ``open_clip.model.build_model_from_openai_state_dict`` does, so a tiny
  state dict gives a tiny model. Only safe loaders: ``torch.jit.load(...).state_dict()``,
  ``torch.load(weights_only=True)`` or safetensors.
- Image tower (:meth:`AnomalyCLIPModel.encode_image`): our own block loop over open_clip's modules
  (no monkeypatching). ``x_ori`` follows open_clip's block maths (:func:`block_forward`; equal to
  its stream to float rounding); from block ``dpam_start`` on a second stream ``x_vv`` adds the
  V-V attention of ``ln_1(x_ori_prev)`` with the block's own qkv / out_proj weights and no FFN
  (spec §3, DPAM), sharing ``ln_1`` and the qkv projection with the original stream.
- Text tower (:meth:`AnomalyCLIPModel.text_features`): the learnable prompt learner
  (:class:`PromptLearner`, 12 + 12 context vectors, 8 compound prompts of (4, width) injected into
  text layers 1-8) and our own text block loop.
- Losses (:func:`focal_loss`, :func:`dice_loss`, :func:`local_loss`) and the inference head.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iad_lightning.errors import ConfigError, WeightsError
from iad_lightning.models.patchcore import gaussian_blur

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
NORMAL_PROMPT = "object."  # the class name is always the literal word "object" (spec §1)
ABNORMAL_PROMPT = "damaged object."


# ----------------------------------------------------------------------------------- weights
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a CLIP weights file, safely: a TorchScript archive (the OpenAI release
    ``ViT-L-14-336px.pt``) through ``torch.jit.load``, a safetensors file, or a pickled state
    dict through ``torch.load(weights_only=True)``. ``state_dict``/``model`` wrappers and a
    ``module.`` prefix (open_clip training checkpoints) are removed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"method.model.clip_weights='{path}' does not exist; give the OpenAI CLIP file "
            "(e.g. ViT-L-14-336px.pt), an open_clip checkpoint, or 'openai' for the hub download"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    elif zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        try:  # TorchScript archive: code + tensors, no arbitrary pickle
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as err:
            raise WeightsError(f"'{path}' looks like a TorchScript archive but does not load: {err}") from err
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle.UnpicklingError for files holding arbitrary objects
            raise WeightsError(
                f"'{path}' is not a TorchScript archive nor a tensors-only checkpoint "
                f"(torch.load(weights_only=True) failed: {err}); re-save it as a plain state dict"
            ) from err
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not sd:
        raise WeightsError(f"'{path}' holds no state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, Tensor)}
    if "visual.proj" not in sd or "visual.conv1.weight" not in sd:
        raise WeightsError(
            f"'{path}' is not a CLIP ViT state dict in the OpenAI/open_clip layout (no 'visual.proj' / "
            "'visual.conv1.weight'); ResNet CLIPs and other towers are not supported"
        )
    return sd


def arch_from_state_dict(sd: dict[str, Tensor], quick_gelu: bool = True) -> dict[str, Any]:
    """The CLIP architecture a state dict in the OpenAI layout describes (the shape reading of
    ``open_clip.model.build_model_from_openai_state_dict``), as plain types."""
    vision_layers = len([k for k in sd if k.startswith("visual.") and k.endswith(".attn.in_proj_weight")])
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    width = sd["ln_final.weight"].shape[0]
    return {
        "embed_dim": int(sd["text_projection"].shape[1]),
        "quick_gelu": bool(quick_gelu),
        "vision_cfg": {
            "layers": vision_layers,
            "width": int(sd["visual.conv1.weight"].shape[0]),
            "patch_size": int(patch),
            "image_size": int(patch * grid),
        },
        "text_cfg": {
            "context_length": int(sd["positional_embedding"].shape[0]),
            "vocab_size": int(sd["token_embedding.weight"].shape[0]),
            "width": int(width),
            "heads": int(width // 64),
            "layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks")}),
        },
    }


def build_clip(arch: dict[str, Any]) -> nn.Module:
    """A randomly initialised fp32 open_clip ``CLIP`` of architecture ``arch``."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(
        arch["embed_dim"],
        vision_cfg=CLIPVisionCfg(**arch["vision_cfg"]),
        text_cfg=CLIPTextCfg(**arch["text_cfg"]),
        quick_gelu=arch.get("quick_gelu", True),
    )


def hub_file(model_name: str) -> str:
    """The local path of open_clip's ``openai`` weights for ``model_name`` (downloads if needed)."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name, "openai")
    if not cfg:
        raise ConfigError(f"open_clip has no 'openai' weights for method.model.model_name='{model_name}'")
    try:
        path = download_pretrained(cfg)
    except Exception as err:  # offline: huggingface_hub / urllib errors of many kinds
        raise WeightsError(
            f"could not download the OpenAI CLIP weights for '{model_name}' ({type(err).__name__}: {err}). "
            f"Offline, download {cfg.get('url')} elsewhere and set method.model.clip_weights=/path/to/"
            f"{Path(cfg.get('url', 'ViT-L-14-336px.pt')).name} (the OpenAI file or an open_clip checkpoint)"
        ) from err
    if not path:
        raise WeightsError(f"open_clip returned no file for '{model_name}' / openai; set method.model.clip_weights=FILE")
    return path


def load_clip(model_name: str, clip_weights: str | None, arch: dict[str, Any] | None,
              quick_gelu: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen fp32 CLIP and its architecture dict.

    clip_weights: ``openai`` (hub), a file, ``random`` (random init of ``model_name``'s config,
    for benchmarks and tests), or None (architecture only: ``arch`` if given, else
    ``model_name``'s config; the weights come from a training checkpoint loaded afterwards).
    """
    from open_clip.factory import get_model_config

    if clip_weights in (None, "random"):
        if arch is None:
            cfg = get_model_config(model_name)
            if cfg is None:
                raise ConfigError(f"method.model.model_name='{model_name}' is not an open_clip model config")
            arch = {"embed_dim": cfg["embed_dim"], "quick_gelu": bool(cfg.get("quick_gelu", quick_gelu)),
                    "vision_cfg": dict(cfg["vision_cfg"]), "text_cfg": dict(cfg["text_cfg"])}
        return build_clip(arch), arch
    path = hub_file(model_name) if clip_weights == "openai" else clip_weights
    sd = read_state_dict(path)
    arch = arch_from_state_dict(sd, quick_gelu)
    clip = build_clip(arch)
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI file metadata
        sd.pop(key, None)
    missing, unexpected = clip.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if k != "attn_mask"]
    if missing or unexpected:
        raise WeightsError(f"'{path}': CLIP keys missing {missing[:5]} / unexpected {unexpected[:5]}")
    return clip, arch


# ----------------------------------------------------------------------------------- prompts
class PromptLearner(nn.Module):
    """Object-agnostic learnable prompts (spec §1): ``[SOT] ctx*12 object. [EOT]`` and
    ``[SOT] ctx*12 damaged object. [EOT]``, plus compound prompts for the deeper text layers."""

    def __init__(self, width: int, tokens: Tensor, n_ctx: int = 12, depth: int = 9, length: int = 4) -> None:
        super().__init__()
        if length > n_ctx:
            raise ConfigError(f"method.model.compound_length={length} must be <= n_ctx={n_ctx}")
        self.n_ctx = n_ctx
        self.ctx_normal = nn.Parameter(torch.empty(n_ctx, width).normal_(std=0.02))
        self.ctx_abnormal = nn.Parameter(torch.empty(n_ctx, width).normal_(std=0.02))
        self.compound = nn.ParameterList(
            [nn.Parameter(torch.empty(length, width).normal_(std=0.02)) for _ in range(depth - 1)]
        )
        self.register_buffer("tokens", tokens, persistent=False)  # (2, 77): normal, abnormal

    def forward(self, token_embedding: nn.Embedding) -> Tensor:
        """(2, 77, width) prompt embeddings: SOT, the 12 context vectors, the rest of the text."""
        emb = token_embedding(self.tokens)  # from the (frozen) CLIP at call time: never stale
        ctx = torch.stack([self.ctx_normal, self.ctx_abnormal]).to(emb.dtype)
        return torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx:]], dim=1)


def tokenize_prompts(n_ctx: int, context_length: int = 77) -> Tensor:
    """open_clip's CLIP BPE of ``"X"*n_ctx + object. / damaged object.``, (2, context_length)."""
    import open_clip

    prefix = " ".join(["X"] * n_ctx)
    tok = open_clip.get_tokenizer("ViT-L-14-336", context_length=context_length)
    return tok([f"{prefix} {NORMAL_PROMPT}", f"{prefix} {ABNORMAL_PROMPT}"]).long()


# ----------------------------------------------------------------------------------- losses
def focal_loss(probs: Tensor, target: Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> Tensor:
    """AnomalyCLIP's focal loss on class probabilities (B, C, H, W) and integer targets (B, H, W):
    one-hot clamped to [smooth, 1 - smooth], ``pt = sum(onehot * p) + smooth``,
    ``-(1 - pt)^gamma log pt`` averaged over pixels (alpha = 1)."""
    c = probs.shape[1]
    p = probs.movedim(1, -1).reshape(-1, c)
    onehot = F.one_hot(target.reshape(-1).long(), c).to(p.dtype).clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (onehot * p).sum(1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(p: Tensor, g: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - mean over the batch of ``(2 sum(pg) + 1) / (sum p + sum g + 1)`` per sample."""
    p, g = p.reshape(p.shape[0], -1), g.reshape(g.shape[0], -1).to(p.dtype)
    return 1 - ((2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)).mean()


def local_loss(maps: Sequence[Tensor], gt: Tensor, lambda_local: float = 4.0) -> Tensor:
    """lambda * sum over layers of Focal(S, gt) + Dice(S_abn, gt) + Dice(S_norm, 1 - gt), on the
    (B, 2, H, W) probability maps ``S`` at input size and the binary mask ``gt`` (B, H, W)."""
    total = sum(focal_loss(s, gt) + dice_loss(s[:, 1], gt) + dice_loss(s[:, 0], 1 - gt) for s in maps)
    return lambda_local * total


# ----------------------------------------------------------------------------------- model
def default_dpam_start(depth: int) -> int:
    """1-indexed first DPAM block: 6 of 24 (the official last 19), proportionally 3 of 12."""
    return (5 * depth) // 24 + 1


class AnomalyCLIPModel(nn.Module):
    """Frozen CLIP + DPAM + learnable prompts; only ``prompt_learner`` has trainable parameters.

    Args:
        model_name: open_clip config (``ViT-L-14-336-quickgelu``; ``ViT-B-16-quickgelu`` cheap).
        clip_weights: ``openai`` | a file | ``random`` | None (see :func:`load_clip`).
        image_size: input side (518 for ViT-L/14: a 37 x 37 grid); a multiple of the patch size.
        features_list: 1-indexed blocks whose V-V stream gives a local map ([24]: the published
            numbers; [6, 12, 18, 24] the paper-described multi-layer mode).
        dpam_start: 1-indexed first block with the V-V path; None = ``default_dpam_start``.
        n_ctx, compound_depth, compound_length: 12, 9 (input + 8 layers), 4.
        temperature: 0.07 for every similarity (not CLIP's logit scale).
        fp16_prompts: round the compound prompts to fp16 before they enter the text layers, as the
            official code does (``.half()``); round-to-nearest-even, the same on CPU and GPU. False:
            full precision (a 1e-5 score, 7e-5 map difference on the official prompts).
        arch: the CLIP architecture (plain dict; written into checkpoints so that test.py rebuilds
            a CLIP read off a file's shapes without the file).
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14-336-quickgelu",
        clip_weights: str | None = "openai",
        image_size: int = 518,
        features_list: Sequence[int] = (24,),
        dpam_start: int | None = None,
        n_ctx: int = 12,
        compound_depth: int = 9,
        compound_length: int = 4,
        temperature: float = 0.07,
        quick_gelu: bool = True,
        arch: dict[str, Any] | None = None,
        fp16_prompts: bool = True,
    ) -> None:
        super().__init__()
        self.clip, self.arch = load_clip(model_name, clip_weights, arch, quick_gelu)
        self.clip.requires_grad_(False).eval()
        self.clip_weights = clip_weights
        visual = self.clip.visual
        if not (visual.transformer.batch_first and self.clip.transformer.batch_first):
            raise ConfigError("open_clip transformers must be batch-first (open_clip >= 2.26)")
        self.depth = len(visual.transformer.resblocks)
        self.patch = visual.conv1.kernel_size[0]
        if image_size % self.patch:
            raise ConfigError(
                f"method.model.image_size={image_size} is not a multiple of the patch size {self.patch} "
                f"(the conv would silently drop pixels); use e.g. {image_size // self.patch * self.patch}"
            )
        self.image_size, self.grid = image_size, image_size // self.patch
        self.native_grid = round((visual.positional_embedding.shape[0] - 1) ** 0.5)  # plain int (tracing)
        self.dpam_start = default_dpam_start(self.depth) if dpam_start is None else int(dpam_start)
        self.features_list = [int(f) for f in features_list]
        if not 1 <= self.dpam_start <= self.depth:
            raise ConfigError(f"method.model.dpam_start={self.dpam_start} must be in [1, {self.depth}]")
        bad = [f for f in self.features_list if not self.dpam_start <= f <= self.depth]
        if bad or not self.features_list:
            raise ConfigError(
                f"method.model.features_list={self.features_list}: every layer must be a DPAM block, "
                f"in [{self.dpam_start}, {self.depth}] (1-indexed)"
            )
        if len(set(self.features_list)) != len(self.features_list):
            raise ConfigError(f"method.model.features_list={self.features_list} repeats a layer")
        if compound_depth - 1 >= len(self.clip.transformer.resblocks):
            raise ConfigError(f"method.model.compound_depth={compound_depth} exceeds the text depth")
        self.temperature = temperature
        self.fp16_prompts = bool(fp16_prompts)
        tokens = tokenize_prompts(n_ctx, self.clip.positional_embedding.shape[0])
        width = self.clip.ln_final.weight.shape[0]
        self.prompt_learner = PromptLearner(width, tokens, n_ctx, compound_depth, compound_length)

    def train(self, mode: bool = True) -> AnomalyCLIPModel:
        super().train(mode)
        self.clip.eval()  # frozen: never in training mode (patch dropout, dropout)
        return self

    # -- text ------------------------------------------------------------------------------
    def text_features(self) -> Tensor:
        """(2, embed_dim) L2-normalised text features: row 0 normal, row 1 abnormal (spec §2)."""
        clip, pl = self.clip, self.prompt_learner
        x = pl(clip.token_embedding) + clip.positional_embedding
        n = pl.compound[0].shape[0] if len(pl.compound) else 0
        for i, block in enumerate(clip.transformer.resblocks):
            if 1 <= i <= len(pl.compound):  # layers 1..8: positions 1..4 <- compound prompt i-1
                deep = pl.compound[i - 1].half() if self.fp16_prompts else pl.compound[i - 1]  # official .half()
                deep = deep.to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], deep, x[:, 1 + n:]], dim=1)
            x = block(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), pl.tokens.argmax(dim=-1)]
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)

    # -- image -----------------------------------------------------------------------------
    def positional_embedding(self) -> Tensor:
        """(1 + grid^2, width): the patch grid resized bilinearly, align_corners False, no
        antialias (the official resize, not open_clip's bicubic+antialias). Recomputed per call
        (one small interpolation) so it always follows the loaded weights."""
        pos = self.clip.visual.positional_embedding
        g0 = self.native_grid
        if g0 == self.grid:
            return pos
        patch = pos[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(self.grid * self.grid, -1)])

    def embed(self, images: Tensor) -> Tensor:
        """conv1 -> CLS -> resized positional embedding -> ln_pre: (B, 1 + grid^2, width)."""
        v = self.clip.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding().to(x.dtype)
        return v.ln_pre(x)

    def encode_image(self, images: Tensor, dpam: bool = True) -> tuple[Tensor, list[Tensor], Tensor]:
        """Global feature (B, E) without ``ln_post`` (official quirk), the local features of
        ``features_list`` (each (B, grid^2, E), CLS dropped, not normalised) and the final
        ``x_ori`` stream (B, 1 + grid^2, width)."""
        v = self.clip.visual
        x_ori = self.embed(images)
        x_vv: Tensor | None = None
        local: dict[int, Tensor] = {}
        for i, block in enumerate(v.transformer.resblocks, start=1):
            with_vv = dpam and i >= self.dpam_start
            x_next, vv = block_forward(block, x_ori, with_vv)  # vv from ln_1 of the ORIGINAL stream
            if vv is not None:
                x_vv = (x_ori if x_vv is None else x_vv) + vv  # out of place: no aliasing between layers
            x_ori = x_next  # open_clip's block maths: x_ori is untouched by DPAM
            if i in self.features_list and x_vv is not None:
                local[i] = (v.ln_post(x_vv) @ v.proj)[:, 1:]
        glob = x_ori[:, 0] @ v.proj
        return glob, [local[f] for f in self.features_list if f in local], x_ori

    # -- heads -----------------------------------------------------------------------------
    def forward(self, images: Tensor, text: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Global logits (B, 2) and per chosen layer the class probabilities (B, 2, H, W),
        bilinearly upsampled to the input size, for the (2, E) text features ``text``."""
        with torch.no_grad():
            glob, local, _ = self.encode_image(images)
        t = 1.0 / self.temperature
        logits = F.normalize(glob, dim=-1) @ text.t() * t
        maps = []
        for feat in local:
            probs = (F.normalize(feat, dim=-1) @ text.t() * t).softmax(-1)  # (B, N, 2)
            s = probs.transpose(1, 2).reshape(probs.shape[0], 2, self.grid, self.grid)
            maps.append(F.interpolate(s, size=images.shape[-2:], mode="bilinear", align_corners=False))
        return logits, maps


def _fusable(block: nn.Module) -> bool:
    """An open_clip ``ResidualAttentionBlock`` with a batch-first self-attention of packed qkv
    weights (CLIP's vision blocks): :func:`block_forward` may compute it with shared ln_1 / qkv."""
    attn = getattr(block, "attn", None)
    return (type(attn) is nn.MultiheadAttention and attn.batch_first and attn._qkv_same_embed_dim
            and attn.bias_k is None and not attn.add_zero_attn and not hasattr(block, "ln_1_kv")
            and all(hasattr(block, n) for n in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")))


def block_forward(block: nn.Module, x: Tensor, with_vv: bool) -> tuple[Tensor, Tensor | None]:
    """One vision block on the original stream ``x`` and, with ``with_vv``, its DPAM V-V path.

    The same maths as open_clip's ``ResidualAttentionBlock.forward`` (``x + ls_1(attn(ln_1(x)))``,
    then ``+ ls_2(mlp(ln_2(.)))``) and :func:`vv_attention`, computed once: ``ln_1(x)`` and the
    packed qkv projection are shared by both attentions (the V-V path reuses ``v``), both run as
    fused ``F.scaled_dot_product_attention``. Blocks of another kind take open_clip's forward and
    :func:`vv_attention` (same values, no sharing). Eval only (no attention dropout)."""
    if not _fusable(block):
        vv = vv_attention(block, x) if with_vv else None
        return block(x), vv
    attn = block.attn
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # each (B, H, N, d)

    def project(o: Tensor) -> Tensor:  # (B, H, N, d) -> out_proj -> LayerScale
        return block.ls_1(F.linear(o.transpose(1, 2).reshape(b, n, c), attn.out_proj.weight, attn.out_proj.bias))

    out = x + project(F.scaled_dot_product_attention(q, k, v))
    out = out + block.ls_2(block.mlp(block.ln_2(out)))
    vv = project(F.scaled_dot_product_attention(v, v, v)) if with_vv else None  # softmax(v v^T d^-1/2) v
    return out, vv


def vv_attention(block: nn.Module, x: Tensor) -> Tensor:
    """The V-V path of one block: ``out_proj(softmax(v v^T / sqrt(d)) v)`` per head, with
    ``v`` from ``ln_1(x)`` and the block's own qkv weights (spec §3); LayerScale ls_1 applied
    (Identity for CLIP)."""
    attn = block.attn
    h = block.ln_1(x)
    c = h.shape[-1]
    v = F.linear(h, attn.in_proj_weight[2 * c:], attn.in_proj_bias[2 * c:] if attn.in_proj_bias is not None else None)
    b, n, _ = v.shape
    heads = attn.num_heads
    v = v.view(b, n, heads, c // heads).transpose(1, 2)  # (B, H, N, d)
    o = F.scaled_dot_product_attention(v, v, v)  # softmax(v v^T d^-1/2) v
    o = F.linear(o.transpose(1, 2).reshape(b, n, c), attn.out_proj.weight, attn.out_proj.bias)
    return block.ls_1(o)


def anomaly_map(maps: Sequence[Tensor], sigma: float = 4.0) -> Tensor:
    """Inference map (B, 1, H, W): the abnormal probability summed over layers (sum, not mean:
    official), Gaussian-smoothed as scipy's gaussian_filter(sigma, reflect, truncate 4)."""
    total = torch.stack([s[:, 1] for s in maps]).sum(0)[:, None]
    return gaussian_blur(total, sigma)


class AnomalyCLIPInference(nn.Module):
    """Exportable ``images -> (anomaly_map (B,1,H,W), pred_score (B,))``: the image tower with
    DPAM in the graph, the trained text features a constant buffer."""

    def __init__(self, model: AnomalyCLIPModel, sigma: float = 4.0) -> None:
        super().__init__()
        self.model, self.sigma = model, sigma
        with torch.no_grad():
            self.register_buffer("text", model.text_features().detach().clone())

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        # nn.MultiheadAttention's eval fast path (aten::_native_multi_head_attention) has no ONNX
        # symbolic: while exporting, the blocks take the composite path (same maths)
        fast = torch.backends.mha.get_fastpath_enabled()
        if torch.onnx.is_in_onnx_export():
            torch.backends.mha.set_fastpath_enabled(False)
        try:
            logits, maps = self.model(images, self.text)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        return anomaly_map(maps, self.sigma), logits.softmax(-1)[:, 1]


# ------------------------------------------------------------------------- official prompts
def load_official_prompts(learner: PromptLearner, path: str | Path) -> list[str]:
    """Load the official ``epoch_15.pth`` (top-level ``prompt_learner``) into ``learner``.

    Key mapping (ours <- official): ``ctx_normal`` <- ``ctx_pos[0, 0]``, ``ctx_abnormal`` <-
    ``ctx_neg[0, 0]``, ``compound.i`` <- ``compound_prompts_text.i``. Ignored: the dead
    ``compound_prompt_projections`` (never used in the official forward) and the token
    prefix/suffix buffers (recomputed from our CLIP); the official ``tokenized_prompts_*`` must
    equal ours. Returns the ignored keys."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"method.prompt_checkpoint='{path}' does not exist (the official epoch_15.pth)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"'{path}' is not a tensors-only checkpoint (weights_only load failed: {err})") from err
    sd = ckpt.get("prompt_learner") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise WeightsError(f"'{path}' has no top-level 'prompt_learner' state dict (keys: {list(ckpt)[:8]})")
    required = ["ctx_pos", "ctx_neg"] + [f"compound_prompts_text.{i}" for i in range(len(learner.compound))]
    missing = [k for k in required if k not in sd]
    if missing:
        raise WeightsError(f"'{path}': prompt_learner lacks {missing}")
    ours = {
        "ctx_normal": sd["ctx_pos"].reshape(-1, sd["ctx_pos"].shape[-1]),
        "ctx_abnormal": sd["ctx_neg"].reshape(-1, sd["ctx_neg"].shape[-1]),
        **{f"compound.{i}": sd[f"compound_prompts_text.{i}"] for i in range(len(learner.compound))},
    }
    own = learner.state_dict()
    for key, value in ours.items():
        if value.shape != own[key].shape:
            raise WeightsError(
                f"'{path}': prompt_learner '{key}' has shape {tuple(value.shape)}, the model expects "
                f"{tuple(own[key].shape)} (wrong CLIP: ViT-L/14 prompts are 768 wide)"
            )
    for name in ("tokenized_prompts_pos", "tokenized_prompts_neg"):
        if name in sd:
            row = 0 if name.endswith("pos") else 1
            if not torch.equal(sd[name].reshape(-1).long(), learner.tokens[row].cpu()):
                warnings.warn(f"'{path}': official {name} differs from our tokenised prompt", stacklevel=2)
    learner.load_state_dict({k: v.float() for k, v in ours.items()}, strict=True)
    used = set(required)
    return sorted(k for k in sd if k not in used)


def official_prompt_state(learner: PromptLearner) -> dict[str, Tensor]:
    """Our prompts in the official ``prompt_learner`` layout (with zero dead projections), for
    tests and for sharing prompts with the official code."""
    width = learner.ctx_normal.shape[1]
    out: dict[str, Tensor] = {
        "ctx_pos": learner.ctx_normal.detach().clone().reshape(1, 1, -1, width),
        "ctx_neg": learner.ctx_abnormal.detach().clone().reshape(1, 1, -1, width),
        "tokenized_prompts_pos": learner.tokens[:1].clone().int().reshape(1, 1, -1),
        "tokenized_prompts_neg": learner.tokens[1:].clone().int().reshape(1, 1, -1),
    }
    for i, p in enumerate(learner.compound):
        out[f"compound_prompts_text.{i}"] = p.detach().clone()
        out[f"compound_prompt_projections.{i}.weight"] = torch.zeros(896, width)
        out[f"compound_prompt_projections.{i}.bias"] = torch.zeros(896)
    return out
