"""Small collective helpers that work with and without torch.distributed (gloo or nccl)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(tensor: torch.Tensor, device: torch.device, chunk_bytes: int = 256 * 2**20) -> torch.Tensor:
    """Concatenate a CPU tensor's rows from all ranks (rank order), on the CPU.

    Rows travel in chunks of about ``chunk_bytes`` through ``device`` (the process group's
    device: CPU for gloo, the rank's GPU for nccl), so the GPU never holds more than one chunk
    per rank. Ranks may hold different numbers of rows.
    """
    if not is_distributed():
        return tensor
    world = dist.get_world_size()
    sizes = [int(n) for n in gather_objects(tensor.shape[0])]
    row_bytes = max(1, tensor.element_size() * int(torch.tensor(tensor.shape[1:]).prod()))  # same on every rank
    chunk_rows = max(1, chunk_bytes // row_bytes)
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, max(sizes), chunk_rows):
        stop = start + chunk_rows
        local = tensor[start:stop].to(device)
        pad = torch.zeros((min(stop, max(sizes)) - start, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
        pad[: local.shape[0]] = local
        bufs = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(bufs, pad)
        for r, buf in enumerate(bufs):
            keep = max(0, min(sizes[r] - start, buf.shape[0]))
            parts[r].append(buf[:keep].cpu())
    return torch.cat([t for rank_parts in parts for t in rank_parts])
