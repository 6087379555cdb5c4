"""Object categories of the ``synthetic`` dataset: a gear, a populated circuit board, a blister pack.

Besides the surface defects they have part defects: ``part_edit`` draws a "missing" or
"misplaced" edit of one part, and ``render(params, size, edit)`` renders the same specimen with
that edit, so the defect-free and defective renders differ only where the part changed. The
static artwork of the board and of the blister card, and each kind of part (a sprite), are
rendered once per size and resampled per image under its pose jitter.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import numpy as np

from iad_lightning.data.synthetic_draw import (
    ANGLE_STEP, F32, Layer, Style, bilinear, cover, grid, local, mix, norm, rgb, sdf_box,
    smooth_noise, smoothstep, text_mask, window,
)

BLACK = (0.0, 0.0, 0.0)


def _rgb(shade: np.ndarray, color: tuple[float, float, float]) -> np.ndarray:
    """A 3×H×W image: a grey ``shade`` map tinted by ``color``."""
    return shade * rgb(color)


class Gear:
    """A turned steel spur gear (hub, recessed web with lightening holes) on a dark tray."""

    name = "gear"
    defects = ("scratch", "hole", "stain", "missing")
    style = Style(scratch=(0.93, 0.94, 0.96), hole=(0.06, 0.06, 0.07), rim=(0.85, 0.85, 0.88),
                  stain=(0.70, 0.45, 0.20))
    TEETH, R_OUT, R_ROOT, R_WEB, R_HUB, R_BORE = 18, 0.40, 0.34, 0.29, 0.13, 0.07
    HOLES, R_HOLES, R_HOLE = 5, 0.215, 0.045
    W_ROOT, W_TIP = 0.55 * np.pi * R_ROOT / TEETH, 0.30 * np.pi * R_OUT / TEETH

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        return {
            "center": tuple(0.5 + rng.uniform(-0.03, 0.03, 2)),
            "rot": rng.uniform(0, 2 * np.pi),
            "scale": rng.uniform(0.985, 1.015),
            "metal": rng.uniform(0.56, 0.64),
            "bg": rng.uniform(0.14, 0.19),
            "light": -2.3 + rng.uniform(-0.15, 0.15),
            "seed": int(rng.integers(2**62)),
        }

    def part_edit(self, kind: str, rng: np.random.Generator, p: dict[str, Any]) -> dict[str, Any]:
        """One (sometimes two adjacent) teeth broken off at a random height with a jagged edge."""
        k = int(rng.integers(self.TEETH))
        teeth = [k, (k + 1) % self.TEETH] if rng.random() < 0.3 else [k]
        height = rng.uniform(0, 0.35) * (self.R_OUT - self.R_ROOT)
        return {"kind": kind, "teeth": teeth, "height": height, "phase": rng.uniform(0, 2 * np.pi)}

    def _sdf(self, dx: np.ndarray, dy: np.ndarray, p: dict[str, Any],
             edit: dict | None) -> tuple[np.ndarray, np.ndarray]:
        """Signed distance to the gear outline (teeth, bore, lightening holes) and the radius."""
        s = F32(p["scale"])
        dx, dy = dx / s, dy / s
        r = norm(dx, dy)
        phi = np.arctan2(dy, dx) - F32(p["rot"])
        pitch = 2 * np.pi / self.TEETH
        k = np.rint(phi / pitch)
        a_loc = phi - k * F32(pitch)
        a, b = r * np.cos(a_loc), r * np.sin(a_loc)  # radial / tangential in the nearest tooth's frame
        slope = (self.W_ROOT - self.W_TIP) / (self.R_OUT - self.R_ROOT)
        w = F32(self.W_ROOT) - F32(slope) * np.clip(a - F32(self.R_ROOT), 0, self.R_OUT - self.R_ROOT)
        top = np.full_like(a, self.R_OUT)
        if edit is not None:
            broken = np.isin(np.mod(k.astype(np.int64), self.TEETH), edit["teeth"])
            jag = F32(0.004) * np.sin(b * 400 + F32(edit["phase"]))
            top = np.where(broken, F32(self.R_ROOT + edit["height"]) + jag, top)
        tooth = np.maximum((np.abs(b) - w) / F32(norm(1, slope)), a - top)
        outer = np.minimum(r - F32(self.R_ROOT), tooth)
        hpitch = 2 * np.pi / self.HOLES
        h_loc = phi - np.rint(phi / hpitch) * F32(hpitch)
        holes = norm(r * np.cos(h_loc) - F32(self.R_HOLES), r * np.sin(h_loc)) - F32(self.R_HOLE)
        sdf = np.maximum(np.maximum(outer, -holes), F32(self.R_BORE) - r) * s
        return sdf, r

    def render(self, p: dict[str, Any], size: int,
               edit: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(p["seed"])
        x, y = grid(size)
        cx, cy = p["center"]
        bg = F32(p["bg"]) * (1 + 0.06 * smooth_noise(rng, size, 0.05))
        sdf, r = self._sdf(x - F32(cx), y - F32(cy), p, edit)
        ox, oy = round(0.012 * size), round(0.018 * size)  # drop shadow: the outline, shifted
        shadow = np.ones_like(sdf)
        shadow[oy:, ox:] = sdf[:size - oy, :size - ox]
        img = _rgb(bg * (1 - 0.6 * cover(shadow, size, 0.012 * size)), (0.97, 1.0, 1.08))
        zone = F32(0.06) * (r < self.R_HUB) - F32(0.05) * ((r >= self.R_HUB) & (r < self.R_WEB))
        steps = np.exp(-(((r - F32(self.R_HUB)) * F32(size / 1.5)) ** 2))
        steps += np.exp(-(((r - F32(self.R_WEB)) * F32(size / 1.5)) ** 2))
        sheen = 0.08 * np.cos(2 * (np.arctan2(y - F32(cy), x - F32(cx)) - F32(p["light"])))
        turning = np.interp(r, np.linspace(0, 0.5, 600), rng.standard_normal(600)).astype(F32)
        bevel = 0.72 + 0.28 * np.clip(-sdf * F32(size / 2.5), 0, 1)
        shade = (F32(p["metal"]) + zone - 0.12 * steps + sheen + 0.02 * turning) * bevel
        alpha = cover(sdf, size)
        mix(img, alpha, _rgb(shade, (0.98, 1.0, 1.04)))
        return img, alpha


# --- circuit board --------------------------------------------------------------------------------

TIN, SILK, GOLD = (0.74, 0.74, 0.71), (0.92, 0.92, 0.88), (0.85, 0.68, 0.30)
BOARD = (0.44, 0.35, 0.03)  # half width, half height, corner radius


def _shadow(dst: np.ndarray, sdf: np.ndarray, size: int, strength: float = 0.45) -> None:
    mix(dst, F32(strength) * cover(sdf, size, 4.0), BLACK)


def _soic(dst: np.ndarray, u: np.ndarray, v: np.ndarray, size: int) -> None:
    _shadow(dst, sdf_box(u - F32(0.005), v - F32(0.008), 0.13, 0.095), size)
    pu = u + F32(0.105)
    i = np.rint(pu / F32(0.03))
    dv = np.abs(v) - F32(0.094)
    pins = np.where((i >= 0) & (i <= 7), sdf_box(pu - i * F32(0.03), dv, 0.0075, 0.019), F32(1))
    mix(dst, cover(pins, size), _rgb(0.6 + 0.25 * smoothstep(-0.019, 0.019, dv), (1, 1, 0.97)))
    body = sdf_box(u, v, 0.13, 0.075, 0.006)
    mix(dst, cover(body, size), _rgb(0.12 + 0.05 * smoothstep(0.0, -0.01, body), (1, 1, 1)))
    mix(dst, cover(norm(u + F32(0.105), v + F32(0.045)) - F32(0.01), size), (0.07, 0.07, 0.07))
    ink = text_mask(u + F32(0.085), v + F32(0.005), 11, 8, 0.02, 0.026) | text_mask(
        u + F32(0.085), v - F32(0.035), 12, 6, 0.02, 0.026)
    mix(dst, ink.astype(F32) * F32(0.8), (0.52, 0.52, 0.52))


def _elcap(dst: np.ndarray, u: np.ndarray, v: np.ndarray, size: int) -> None:
    rad = 0.075
    _shadow(dst, norm(u - F32(0.006), v - F32(0.009)) - F32(rad), size, 0.5)
    r, a = norm(u, v), np.arctan2(v, u)
    shade = 0.62 + 0.16 * (1 - (r / F32(rad)) ** 2) + 0.05 * np.cos(2 * (a + F32(0.8)))
    shade -= 0.2 * smoothstep(0.8 * rad, 0.95 * rad, r)
    col = _rgb(shade, (1, 1, 1.02))
    inner = cover(r - F32(0.8 * rad), size)
    mix(col, np.clip((np.cos(a - F32(np.pi / 2)) - F32(0.72)) * 30, 0, 1) * inner, (0.12, 0.15, 0.30))
    vent = cover(np.minimum(np.abs(u), np.abs(v)) - F32(0.003), size) * cover(r - F32(0.5 * rad), size)
    mix(col, F32(0.7) * vent, (0.45, 0.45, 0.47))
    mix(dst, cover(r - F32(rad), size), col)


def _chip(dst: np.ndarray, u: np.ndarray, v: np.ndarray, size: int, body: tuple, seed: int | None) -> None:
    hw, hh = 0.045, 0.022
    _shadow(dst, sdf_box(u - F32(0.004), v - F32(0.006), hw, hh), size)
    end = np.clip((np.abs(u) - F32(hw - 0.013)) * F32(size) + 0.5, 0, 1)
    col = np.empty((3,) + u.shape, F32)
    col[:] = rgb(body)
    mix(col, end, (0.80, 0.80, 0.78))
    mix(dst, cover(sdf_box(u, v, hw, hh, 0.003), size), col)
    if seed is not None:
        ink = text_mask(u + F32(0.016), v, seed, 3, 0.011, 0.016)
        mix(dst, ink.astype(F32) * F32(0.85), (0.88, 0.88, 0.85))


def _crystal(dst: np.ndarray, u: np.ndarray, v: np.ndarray, size: int) -> None:
    _shadow(dst, sdf_box(u - F32(0.005), v - F32(0.007), 0.09, 0.04, 0.012), size)
    sdf = sdf_box(u, v, 0.09, 0.04, 0.012)
    shade = 0.7 + 0.1 * np.clip(-sdf * F32(size / 3), 0, 1) - 0.6 * (u + v)
    mix(dst, cover(sdf, size), _rgb(shade, (1, 1, 1.02)))
    mix(dst, text_mask(u + F32(0.05), v, 21, 6, 0.016, 0.02).astype(F32) * F32(0.7), (0.3, 0.3, 0.32))


def _header(dst: np.ndarray, u: np.ndarray, v: np.ndarray, size: int) -> None:
    _shadow(dst, sdf_box(u - F32(0.006), v - F32(0.008), 0.11, 0.03), size, 0.5)
    mix(dst, cover(sdf_box(u, v, 0.11, 0.03, 0.004), size), (0.07, 0.07, 0.08))
    i = np.clip(np.rint((u + F32(0.075)) / F32(0.05)), 0, 3)
    du = u + F32(0.075) - i * F32(0.05)
    pyramid = 1 - np.maximum(np.abs(du), np.abs(v)) / F32(0.011)
    mix(dst, cover(sdf_box(du, v, 0.011, 0.011), size), _rgb(0.75 + 0.3 * pyramid, GOLD))


def _led(dst: np.ndarray, u: np.ndarray, v: np.ndarray, size: int) -> None:
    _shadow(dst, sdf_box(u - F32(0.004), v - F32(0.006), 0.03, 0.02), size)
    mix(dst, cover(sdf_box(u, v, 0.03, 0.02, 0.003), size), (0.88, 0.88, 0.84))
    mix(dst, cover(norm(u, v) - F32(0.013), size), (0.85, 0.15, 0.12))
    mix(dst, cover(norm(u + F32(0.004), v + F32(0.004)) - F32(0.003), size), (1.0, 0.85, 0.85))


def _pads(pu: list[float], pv: list[float], hw: float, hh: float, rnd: bool = False) -> list:
    return [(a, b, hw, hh, rnd) for a in pu for b in pv]


# type -> (draw, silkscreen half extents, pads (u, v, hw, hh, round)), in the part's own frame
PARTS: dict[str, tuple[Callable, tuple[float, float], list]] = {
    "soic": (_soic, (0.13, 0.115),
             _pads([-0.105 + 0.03 * i for i in range(8)], [-0.094, 0.094], 0.011, 0.024)),
    "elcap": (_elcap, (0.08, 0.08), _pads([-0.045, 0.045], [0.0], 0.028, 0.022)),
    "resistor": (lambda d, u, v, s: _chip(d, u, v, s, (0.10, 0.10, 0.10), 31), (0.05, 0.026),
                 _pads([-0.04, 0.04], [0.0], 0.017, 0.026)),
    "ceramic": (lambda d, u, v, s: _chip(d, u, v, s, (0.72, 0.60, 0.42), None), (0.05, 0.026),
                _pads([-0.04, 0.04], [0.0], 0.017, 0.026)),
    "crystal": (_crystal, (0.09, 0.04), _pads([-0.065, 0.065], [0.0], 0.025, 0.03)),
    "header": (_header, (0.11, 0.03),
               _pads([-0.075 + 0.05 * i for i in range(4)], [0.0], 0.02, 0.02, True)),
    "led": (_led, (0.03, 0.02), _pads([-0.027, 0.027], [0.0], 0.012, 0.018)),
}
# (label, type, u, v, angle) on the board, relative to its centre (normalised image units)
COMPONENTS = (
    ("U1", "soic", -0.12, -0.02, 0.0), ("C1", "elcap", 0.25, -0.15, 0.0),
    ("R1", "resistor", 0.14, 0.10, 0.0), ("R2", "resistor", 0.14, 0.19, 0.0),
    ("R3", "resistor", 0.34, 0.13, np.pi / 2), ("C2", "ceramic", -0.28, 0.21, 0.0),
    ("C3", "ceramic", -0.10, 0.21, 0.0), ("Y1", "crystal", -0.12, -0.235, 0.0),
    ("J1", "header", -0.365, -0.04, np.pi / 2), ("D1", "led", 0.33, 0.02, 0.0),
)
TRACES = (
    ((-0.195, -0.11), (-0.195, -0.16), (-0.18, -0.175), (-0.18, -0.22)),
    ((-0.045, -0.11), (-0.045, -0.16), (-0.06, -0.175), (-0.06, -0.22)),
    ((-0.015, -0.11), (-0.015, -0.14), (0.03, -0.185), (0.2, -0.185)),
    ((-0.225, -0.11), (-0.225, -0.13), (-0.255, -0.16), (-0.30, -0.16), (-0.30, -0.115), (-0.365, -0.115)),
    ((-0.225, 0.11), (-0.225, 0.14), (-0.31, 0.14), (-0.365, 0.085), (-0.365, 0.035)),
    ((-0.135, 0.11), (-0.135, 0.21)), ((-0.315, 0.21), (-0.40, 0.21), (-0.40, 0.30)),
    ((-0.015, 0.11), (-0.015, 0.15), (0.03, 0.19), (0.10, 0.19)), ((0.18, 0.10), (0.27, 0.10), (0.34, 0.17)),
    ((0.18, 0.19), (0.25, 0.19), (0.30, 0.24), (0.40, 0.24)), ((0.295, -0.15), (0.36, -0.085), (0.36, 0.02)),
    ((0.303, 0.02), (0.26, 0.02), (0.22, -0.02), (0.10, -0.02), (0.02, -0.06)),
)
VIAS = ((0.10, 0.19), (0.40, 0.24), (-0.40, 0.30), (0.02, -0.06), (0.27, 0.10), (-0.365, 0.035))


@lru_cache(maxsize=4)
def _board_static(size: int) -> Layer:
    """Bare board in canonical pose: solder mask, traces, vias, pads, silkscreen, mounting holes."""
    rng = np.random.default_rng(1234)
    margin = int(np.ceil(0.08 * size))
    n = size + 2 * margin
    x, y = grid(size, margin)
    bu, bv = x - F32(0.5), y - F32(0.5)
    img = _rgb(0.12 * (1 + 0.05 * smooth_noise(rng, size, 0.03, n=n)), (1, 1, 1.06))
    board = cover(sdf_box(bu, bv, *BOARD), size)
    weave = 0.015 * np.sin(bu * F32(2 * np.pi * 90)) * np.sin(bv * F32(2 * np.pi * 90))
    mix(img, board, _rgb(1 + weave + 0.04 * smooth_noise(rng, size, 0.01, n=n), (0.08, 0.34, 0.19)))
    trace = np.full_like(bu, 1.0)
    for line in TRACES:
        for (ax, ay), (bx, by) in zip(line[:-1], line[1:]):
            px, py, ex, ey = bu - F32(ax), bv - F32(ay), F32(bx - ax), F32(by - ay)
            t = np.clip((px * ex + py * ey) / (ex * ex + ey * ey), 0, 1)
            trace = np.minimum(trace, norm(px - t * ex, py - t * ey))
    mix(img, cover(trace - F32(0.006), size), (0.12, 0.45, 0.25))
    holes = [(sx * 0.39, sy * 0.29, 0.035, 0.02) for sx in (-1, 1) for sy in (-1, 1)]
    for hx, hy, ring, drill in holes + [(a, b, 0.011, 0.005) for a, b in VIAS]:
        r = norm(bu - F32(hx), bv - F32(hy))
        mix(img, cover(r - F32(ring), size), TIN)
        mix(img, cover(r - F32(drill), size), (0.04, 0.04, 0.05))
    for k, (label, kind, cu, cv, ang) in enumerate(COMPONENTS):
        _, (hw, hh), pads = PARTS[kind]
        u, v = local(bu, bv, cu, cv, ang)
        for pu, pv, phw, phh, rnd in pads:
            if rnd:
                r = norm(u - F32(pu), v - F32(pv))
                mix(img, cover(r - F32(phw), size), TIN)
                mix(img, cover(r - F32(0.4 * phw), size), (0.04, 0.04, 0.05))
            else:
                mix(img, cover(sdf_box(u - F32(pu), v - F32(pv), phw, phh, 0.002), size), TIN)
        outline = np.abs(sdf_box(u, v, hw + 0.014, hh + 0.014, 0.004)) - F32(0.0022)
        mix(img, cover(outline, size), SILK)
        ext_u = abs(np.cos(ang)) * hw + abs(np.sin(ang)) * hh  # extents along the board axes
        ext_v = abs(np.sin(ang)) * hw + abs(np.cos(ang)) * hh
        lu, lv = local(bu, bv, cu - ext_u - 0.014, cv - ext_v - 0.034, 0.0)
        mix(img, text_mask(lu, lv, 100 + k, len(label), 0.02, 0.022).astype(F32), SILK)
    return Layer(img, size, margin)


def _posed_box(p: dict[str, Any], size: int, hw: float, hh: float, r: float) -> np.ndarray:
    """Coverage of the posed board/card outline: where surface defects may land."""
    x, y = grid(size)
    return cover(sdf_box(*local(x, y, 0.5 + p["dx"], 0.5 + p["dy"], p["theta"]), hw, hh, r), size)


def _place(p: dict[str, Any], u: float, v: float) -> tuple[float, float]:
    """Image position of a point given in the coordinates of the posed board/card."""
    c, s = np.cos(p["theta"]), np.sin(p["theta"])
    return 0.5 + p["dx"] + c * u - s * v, 0.5 + p["dy"] + s * u + c * v


def _sample_pose(rng: np.random.Generator, n: int, shift: float, tilt: float) -> dict[str, Any]:
    """Pose of the board/card plus small placement tolerances (du, dv, dtheta) of its n parts."""
    jitter = np.stack([rng.uniform(-shift, shift, n), rng.uniform(-shift, shift, n),
                       rng.uniform(-tilt, tilt, n)], 1)
    theta = ANGLE_STEP * int(rng.integers(-4, 5))  # whole steps: the static layer is pre-rotated
    return {"dx": rng.uniform(-0.02, 0.02), "dy": rng.uniform(-0.02, 0.02), "theta": theta,
            "jitter": jitter, "seed": int(rng.integers(2**62))}


def _misplace(rng: np.random.Generator, kind: str, n: int, flip: bool) -> dict[str, Any]:
    """Missing: one part left out. Misplaced: one part shifted, turned, or (if allowed) reversed."""
    part, mode = int(rng.integers(n)), rng.random()
    du = dv = dtheta = 0.0
    if mode < 0.35:
        ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.025, 0.045)
        du, dv = dist * np.cos(ang), dist * np.sin(ang)
    elif mode < 0.7 or not flip:
        dtheta = rng.choice([-1, 1]) * rng.uniform(0.3, 0.9)
        du, dv = rng.uniform(-0.008, 0.008, 2)
    else:
        dtheta = np.pi + rng.uniform(-0.1, 0.1)
    return {"kind": kind, "part": part, "du": du, "dv": dv, "dtheta": dtheta}


@lru_cache(maxsize=64)
def _sprite(draw: Callable, hw: float, hh: float, size: int) -> np.ndarray:
    """A part (half extents hw × hh) drawn once in its own frame: premultiplied colour and opacity
    (4×h×w). Every drawing step mixes toward a colour, so a render is ``background * (1 - opacity)
    + colour``: drawing over black and over white gives both terms."""
    ends = [np.ceil(h * size + 0.012 * size + 6) for h in (hw, hh)]  # + shadow and a clear border
    u, v = np.meshgrid(*(np.arange(-e, e + 1, dtype=F32) / F32(size) for e in ends))
    black, white = np.zeros((3,) + u.shape, F32), np.ones((3,) + u.shape, F32)
    draw(black, u, v, size)
    draw(white, u, v, size)
    return np.concatenate([black, 1 - (white - black).mean(0, keepdims=True)])


def _draw_parts(img: np.ndarray, p: dict, size: int, edit: dict | None,
                parts: list[tuple[Callable, float, float, float, float, float]]) -> None:
    """Paste each part (draw, u, v, angle, hw, hh) at its posed place, applying the edit."""
    for k, (draw, cu, cv, ang, hw, hh) in enumerate(parts):
        du, dv, dtheta = p["jitter"][k]
        if edit is not None and edit["part"] == k:
            if edit["kind"] == "missing":
                continue
            du, dv, dtheta = du + edit["du"], dv + edit["dv"], dtheta + edit["dtheta"]
        sprite = _sprite(draw, hw, hh, size)
        half_h, half_w = (sprite.shape[1] - 1) / 2, (sprite.shape[2] - 1) / 2
        cx, cy = _place(p, cu + du, cv + dv)
        theta = p["theta"] + ang + dtheta
        c, s = abs(np.cos(theta)), abs(np.sin(theta))  # bounding box of the turned sprite
        win = window(size, cx, cy, (c * half_w + s * half_h) / size, (s * half_w + c * half_h) / size)
        u, v = local(win.x, win.y, cx, cy, theta)
        pasted = bilinear(sprite, u * F32(size) + half_w, v * F32(size) + half_h)
        dst = img[:, win.ys, win.xs]
        dst *= 1 - pasted[3]
        dst += pasted[:3]


class Pcb:
    """A populated circuit board (IC, capacitors, resistors, crystal, header, LED) on a conveyor."""

    name = "pcb"
    defects = ("scratch", "stain", "missing", "misplaced")
    style = Style(scratch=(0.85, 0.55, 0.30), hole=(0.05, 0.05, 0.05), rim=(0.6, 0.6, 0.5),
                  stain=(0.55, 0.45, 0.18), stain_mode="mix")

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        return _sample_pose(rng, len(COMPONENTS), 0.003, 0.02)

    def part_edit(self, kind: str, rng: np.random.Generator, p: dict[str, Any]) -> dict[str, Any]:
        edit = _misplace(rng, kind, len(COMPONENTS), flip=False)
        round_can = COMPONENTS[edit["part"]][1] == "elcap"
        if kind == "misplaced" and round_can and edit["du"] ** 2 + edit["dv"] ** 2 < 4e-4:
            edit["du"] += 0.03  # a round can turned in place would hardly change
        return edit

    def render(self, p: dict[str, Any], size: int,
               edit: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        static = _board_static(size)
        img = static.posed(p["dx"], p["dy"], p["theta"])
        surface = _posed_box(p, size, *BOARD)
        img *= (1 + 0.02 * smooth_noise(np.random.default_rng(p["seed"]), size, 0.1))
        parts = [(PARTS[kind][0], cu, cv, ang, *PARTS[kind][1]) for _, kind, cu, cv, ang in COMPONENTS]
        _draw_parts(img, p, size, edit, parts)
        return img, surface


# --- blister pack ---------------------------------------------------------------------------------

CARD = (0.45, 0.30, 0.02)
CAPSULE = (0.052, 0.023)  # half length, radius
POCKETS = tuple((-0.32 + 0.16 * j, v) for v in (-0.13, 0.13) for j in range(5))


@lru_cache(maxsize=4)
def _card_static(size: int) -> Layer:
    """Empty blister card in canonical pose: brushed foil, print, perforation, clear pockets."""
    rng = np.random.default_rng(4321)
    margin = int(np.ceil(0.08 * size))
    n = size + 2 * margin
    x, y = grid(size, margin)
    bu, bv = x - F32(0.5), y - F32(0.5)
    img = _rgb(0.22 * (1 + 0.05 * smooth_noise(rng, size, 0.03, n=n)), (0.92, 1.0, 1.16))
    card = cover(sdf_box(bu, bv, *CARD), size)
    foil = 0.8 + 0.03 * smooth_noise(rng, size, 0.05, 0.6 / size, n=n)  # brushed along x
    foil += 0.02 * smooth_noise(rng, size, 0.02, n=n)
    mix(img, card, _rgb(foil, (0.99, 1.0, 1.02)))
    ink = text_mask(bu + F32(0.38), bv - F32(0.255), 7, 19, 0.04, 0.03)
    ink |= text_mask(bu + F32(0.38), bv + F32(0.255), 8, 19, 0.04, 0.03)
    mix(img, ink.astype(F32) * F32(0.85) * card, (0.12, 0.18, 0.45))
    perforation = (np.abs(bv) < 0.003) & (np.mod(bu * 50, 1) < 0.5) & (np.abs(bu) < 0.43)
    mix(img, perforation.astype(F32) * F32(0.6), (0.35, 0.35, 0.37))
    j = np.clip(np.rint((bu + F32(0.32)) / F32(0.16)), 0, 4)
    pu, pv = bu + F32(0.32) - j * F32(0.16), bv - np.where(bv > 0, F32(0.13), F32(-0.13))
    pocket = sdf_box(pu, pv, 0.068, 0.045, 0.045)
    floor = 0.66 + 0.08 * np.clip(1 - norm(pu / 0.068, pv / 0.045), 0, 1)
    floor += 0.015 * smooth_noise(rng, size, 0.01, n=n)
    mix(img, cover(pocket, size), _rgb(floor, (1.0, 1.03, 1.08)))
    rim = F32(0.8) * np.exp(-((pocket * F32(size / 1.6)) ** 2))
    facing = np.cos(np.arctan2(pv, pu) + F32(3 * np.pi / 4))  # light from the top left
    mix(img, rim, _rgb(0.6 + 0.4 * facing, (1, 1, 1)))
    return Layer(img, size, margin)


def _capsule(dst: np.ndarray, u: np.ndarray, v: np.ndarray, size: int) -> None:
    hw, hh = CAPSULE
    _shadow(dst, sdf_box(u - F32(0.004), v - F32(0.006), hw, hh, hh), size, 0.35)
    shade = 0.68 + 0.3 * np.sqrt(np.clip(1 - (v / F32(hh)) ** 2, 0, 1))
    spec = 0.25 * np.exp(-(((v + F32(0.4 * hh)) / F32(0.2 * hh)) ** 2))
    col = np.empty((3,) + u.shape, F32)
    col[:] = rgb((0.93, 0.93, 0.90))
    mix(col, np.clip(0.5 - u * F32(size), 0, 1), (0.88, 0.42, 0.10))  # the cap half
    col = col * shade + spec
    col *= 1 - 0.35 * cover(np.abs(u) - F32(0.0015), size)
    mix(dst, cover(sdf_box(u, v, hw, hh, hh), size), col)


class Blister:
    """A blister card of ten two-tone capsules in clear pockets on printed aluminium foil."""

    name = "blister"
    defects = ("hole", "stain", "missing", "misplaced")
    style = Style(scratch=(0.35, 0.35, 0.37), hole=(0.06, 0.06, 0.07), rim=(0.95, 0.95, 0.97),
                  stain=(0.45, 0.32, 0.18), stain_mode="mix")

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        return _sample_pose(rng, len(POCKETS), 0.006, 0.06)

    def part_edit(self, kind: str, rng: np.random.Generator, p: dict[str, Any]) -> dict[str, Any]:
        return _misplace(rng, kind, len(POCKETS), flip=True)

    def render(self, p: dict[str, Any], size: int,
               edit: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        static = _card_static(size)
        img = static.posed(p["dx"], p["dy"], p["theta"])
        surface = _posed_box(p, size, *CARD)
        img *= (1 + 0.015 * smooth_noise(np.random.default_rng(p["seed"]), size, 0.08))
        _draw_parts(img, p, size, edit, [(_capsule, u, v, 0.0, CAPSULE[0], CAPSULE[1]) for u, v in POCKETS])
        return img, surface
