"""A tiny random CLIP ViT in the OpenAI release key layout, written to disk like the real file.

The architecture is read off the shapes by ``models.anomalyclip.arch_from_state_dict``: vision
4 blocks of width 128 (2 heads), patch 8, native 32 px (4 x 4 grid); text 10 blocks of width 64
(1 head; 10 >= 9 so that compound prompts reach layers 1-8), the real 49,408-token vocabulary
(the prompts are tokenised with open_clip's BPE), embed dim 32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from iad_lightning.models.anomalyclip import build_clip

TINY_ARCH = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"layers": 4, "width": 128, "patch_size": 8, "image_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 10},
}


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """OpenAI layout: open_clip's CLIP names plus the release file's metadata entries, with the
    weight matrices in fp16 as OpenAI ships them; LayerNorms perturbed so that they matter."""
    torch.manual_seed(seed)
    clip = build_clip(TINY_ARCH)
    sd = {}
    for k, v in clip.state_dict().items():
        if "ln" in k:
            v = v + 0.1 * torch.randn_like(v)
        sd[k] = v.half() if v.ndim >= 2 and "embedding" not in k else v
    sd["input_resolution"] = torch.tensor(32)
    sd["context_length"] = torch.tensor(77)
    sd["vocab_size"] = torch.tensor(49408)
    return sd


def write_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A plain (tensors-only) state dict file in the OpenAI layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_state_dict(seed), path)
    return path


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_tiny_torchscript(path: Path, seed: int = 0) -> Path:
    """The same tensors as a TorchScript archive, as the OpenAI release ``.pt`` files are."""
    root = _Holder()
    for key, value in tiny_state_dict(seed).items():
        *mods, name = key.split(".")
        node = root
        for m in mods:
            if not hasattr(node, m):
                node.add_module(m, _Holder())
            node = getattr(node, m)
        node.register_buffer(name, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(root), str(path))
    return path
