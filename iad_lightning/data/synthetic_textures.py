"""Texture categories of the ``synthetic`` dataset: a woven fabric and a wooden board.

A category samples the parameters of one normal specimen (``sample``) and renders them
deterministically (``render``), so that a defect can be drawn on top of the very same specimen.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from iad_lightning.data.synthetic_draw import F32, Style, grid, local, norm, rgb, smooth_noise, smoothstep


class Fabric:
    """Denim-like 2/1 twill: dark warp threads over light weft, with per-thread irregularities."""

    name = "fabric"
    defects = ("scratch", "hole", "stain")
    style = Style(scratch=(0.86, 0.85, 0.80), hole=(0.03, 0.03, 0.04), rim=(0.80, 0.80, 0.76),
                  stain=(0.42, 0.30, 0.16), stain_mode="mix")

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        return {
            "theta": rng.uniform(-0.05, 0.05),
            "period": rng.uniform(1 / 38, 1 / 34),
            "phase": rng.uniform(0, 1, 2),
            "warp": np.array([0.20, 0.30, 0.52]) + rng.uniform(-0.02, 0.02, 3),
            "weft": np.array([0.80, 0.79, 0.74]) + rng.uniform(-0.02, 0.02),
            "seed": int(rng.integers(2**62)),
        }

    def render(self, p: dict[str, Any], size: int, edit: Any = None) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(p["seed"])
        x, y = grid(size)
        u, v = local(x, y, 0.0, 0.0, p["theta"])
        u, v = u / F32(p["period"]) + F32(p["phase"][0]), v / F32(p["period"]) + F32(p["phase"][1])
        iu, iv = np.floor(u), np.floor(v)
        fu, fv = u - iu, v - iv
        iu, iv = iu.astype(np.int64), iv.astype(np.int64)
        warp_top = ((iu - iv) % 3 != 0).astype(F32)  # 2/1 twill: diagonal ribs
        gain_warp = (1 + 0.10 * rng.standard_normal(512)).astype(F32)
        gain_weft = (1 + 0.07 * rng.standard_normal(512)).astype(F32)
        prof_warp = np.sqrt(np.clip(1 - ((fu - 0.5) / 0.48) ** 2, 0, 1)) * (0.8 + 0.2 * np.sin(np.pi * fv))
        prof_weft = np.sqrt(np.clip(1 - ((fv - 0.5) / 0.48) ** 2, 0, 1)) * (0.8 + 0.2 * np.sin(np.pi * fu))
        prof_warp *= gain_warp[iu & 511]
        prof_weft *= gain_weft[iv & 511]
        shade = prof_weft + warp_top * (prof_warp - prof_weft)
        fibres, mottle = smooth_noise(rng, size, 0.6 / size), smooth_noise(rng, size, 0.15)
        shade = 0.35 + 0.65 * shade + 0.05 * fibres + 0.03 * mottle
        weft = rgb(p["weft"])
        img = shade * (weft + warp_top * (rgb(p["warp"]) - weft))
        return img, np.ones((size, size), F32)


class Wood:
    """A flat-sawn board: curved annual rings with turbulence and fine pores along the grain."""

    name = "wood"
    defects = ("scratch", "hole", "stain")
    style = Style(scratch=(0.95, 0.86, 0.70), hole=(0.10, 0.06, 0.03), rim=(0.35, 0.22, 0.12),
                  stain=(0.45, 0.38, 0.34))

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        return {
            "theta": rng.uniform(-0.07, 0.07),
            "center": (rng.uniform(-0.5, 1.5), -rng.uniform(0.8, 2.0)),
            "freq": rng.uniform(16, 22),
            "light": np.array([0.80, 0.62, 0.42]) * rng.uniform(0.93, 1.07) + rng.uniform(-0.01, 0.01, 3),
            "dark": np.array([0.55, 0.36, 0.20]) * rng.uniform(0.9, 1.1) + rng.uniform(-0.01, 0.01, 3),
            "seed": int(rng.integers(2**62)),
        }

    def render(self, p: dict[str, Any], size: int, edit: Any = None) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(p["seed"])
        x, y = grid(size)
        u, v = local(x, y, 0.5, 0.5, p["theta"])
        cx, cy = p["center"]
        r = norm((u - F32(cx - 0.5)) * F32(0.15), v - F32(cy - 0.5))
        r = r + 0.012 * smooth_noise(rng, size, 0.06) + 0.003 * smooth_noise(rng, size, 0.012)
        g = r * F32(p["freq"])
        g -= np.floor(g)
        band = smoothstep(0.45, 0.92, g) * (1 - smoothstep(0.94, 1.0, g))  # late wood, sharp edge
        pores = smooth_noise(rng, size, 0.04, 0.8 / size)
        shade = 1 + 0.05 * pores + 0.03 * smooth_noise(rng, size, 0.2)
        light = rgb(p["light"])
        img = (light + 0.75 * band * (rgb(p["dark"]) - light)) * shade
        return img, np.ones((size, size), F32)
