"""Drawing primitives and surface defects for the procedural ``synthetic`` dataset.

Everything is vectorised numpy on channel-first float32 images (3×H×W, values in [0, 1]: numpy
broadcasts a colour over a leading axis far faster than over a trailing axis of length 3), with
coordinates normalised to the image side (x, y in [0, 1), pixel centres at (i + 0.5) / size), so
that one scene description renders at any resolution. Shapes are signed distance functions (SDF,
negative inside) turned into anti-aliased coverage; small shapes are evaluated only inside their
bounding window.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Protocol

import numpy as np

F32 = np.float32
RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Style:
    """Colours of the surface defects of one category (stain: multiply by or mix toward a colour)."""

    scratch: RGB
    hole: RGB
    rim: RGB
    stain: RGB
    stain_mode: Literal["mul", "mix"] = "mul"


class Category(Protocol):
    """A category of the synthetic set (see ``synthetic_textures`` and ``synthetic_objects``).

    ``sample`` draws the parameters of one normal specimen; ``render`` turns them into a scene
    (3×H×W float) and the surface where defects may land (H×W coverage). Objects also have
    ``part_edit(kind, rng, params)``, a "missing"/"misplaced" edit that ``render`` applies.
    """

    name: str
    defects: tuple[str, ...]
    style: Style

    def sample(self, rng: np.random.Generator) -> dict[str, Any]: ...

    def render(self, p: dict[str, Any], size: int, edit: Any = None) -> tuple[np.ndarray, np.ndarray]: ...


def white(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance noise: the sum of two uniform random bytes (a triangular law, close
    enough to Gaussian here), several times faster than ``standard_normal``."""
    n = int(np.prod(shape))
    pairs = np.frombuffer(rng.bytes(2 * n), np.uint8).reshape(2, n)
    return ((pairs[0].astype(F32) + pairs[1] - F32(255)) * F32(1 / 104.52)).reshape(shape)


def norm(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sqrt(x² + y²); float32 ``np.hypot`` is an order of magnitude slower."""
    return np.sqrt(x * x + y * y)


@lru_cache(maxsize=8)
def grid(size: int, margin: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Read-only normalised pixel-centre coordinates (X along columns, Y along rows) of an image,
    or of a canvas ``margin`` pixels larger on each side."""
    c = (np.arange(-margin, size + margin, dtype=F32) + 0.5) / size
    x, y = np.meshgrid(c, c)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@dataclass(frozen=True)
class Window:
    """A rectangular slice of the image and its coordinates, where a small shape is evaluated."""

    ys: slice
    xs: slice
    x: np.ndarray
    y: np.ndarray


def window(size: int, cx: float, cy: float, rx: float, ry: float | None = None) -> Window:
    """The image pixels within ``rx`` along x and ``ry`` (default ``rx``) along y of (cx, cy)."""
    ry = rx if ry is None else ry
    x0, x1 = max(int((cx - rx) * size), 0), min(int(np.ceil((cx + rx) * size)) + 1, size)
    y0, y1 = max(int((cy - ry) * size), 0), min(int(np.ceil((cy + ry) * size)) + 1, size)
    gx, gy = grid(size)
    return Window(slice(y0, y1), slice(x0, x1), gx[y0:y1, x0:x1], gy[y0:y1, x0:x1])


def local(x: np.ndarray, y: np.ndarray, cx: float, cy: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a frame centred at (cx, cy) and rotated by ``theta`` (radians)."""
    c, s = np.cos(theta), np.sin(theta)
    dx, dy = x - F32(cx), y - F32(cy)
    return F32(c) * dx + F32(s) * dy, F32(-s) * dx + F32(c) * dy


def sdf_box(u: np.ndarray, v: np.ndarray, hw: float, hh: float, r: float = 0.0) -> np.ndarray:
    """Signed distance to a rectangle of half sizes (hw, hh) with corner radius r."""
    qx, qy = np.abs(u) - F32(hw - r), np.abs(v) - F32(hh - r)
    outside = norm(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0) - F32(r)


def cover(sdf: np.ndarray, size: int, soft: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage of the inside of an SDF; ``soft`` widens the edge (in pixels)."""
    return np.clip(0.5 - sdf * F32(size / soft), 0.0, 1.0)


def rgb(color: RGB | np.ndarray) -> np.ndarray:
    """An RGB triple as a 3×1×1 array that broadcasts over a 3×H×W image."""
    return np.asarray(color, dtype=F32).reshape(3, 1, 1)


def mix(dst: np.ndarray, alpha: np.ndarray, color: RGB | np.ndarray) -> None:
    """In place: ``dst = dst + alpha * (color - dst)`` (color an RGB triple or a 3×H×W image)."""
    col = rgb(color) if np.size(color) == 3 else color
    dst += alpha * (col - dst)


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    """0 below e0, 1 above e1, a smooth cubic between (e0 > e1 gives the falling edge)."""
    t = np.clip((x - F32(e0)) / F32(e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _blur_axis(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """Periodic Gaussian blur along one axis (a few shifted adds: sigma is small here)."""
    if sigma < 0.7:  # a sub-pixel blur is not worth its cost
        return a
    r = int(np.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(F32)
    n = a.shape[axis]
    padded = np.concatenate([a.take(range(n - r, n), axis), a, a.take(range(r), axis)], axis)
    out = np.zeros_like(a)
    for i, w in enumerate(taps):
        out += w * (padded[i:i + n] if axis == 0 else padded[:, i:i + n])
    return out


@lru_cache(maxsize=64)
def _lerp_weights(n: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights that linearly interpolate a lattice of spacing ``factor`` px onto n px."""
    pos = np.arange(n) / factor + 1.0  # lattice point j sits at pixel (j - 1) * factor
    index = np.floor(pos).astype(np.intp)
    return index, (pos - index).astype(F32)


def smooth_noise(rng: np.random.Generator, size: int, sx: float, sy: float | None = None,
                 n: int | None = None) -> np.ndarray:
    """Gaussian-filtered white noise (std ``sx`` along x, ``sy`` along y, in units of the image side
    ``size``) on an n×n canvas (default: the image), unit variance.

    Blurred on a lattice coarse enough that the blur is 1.5-3 cells wide, then interpolated
    linearly: the cost hardly depends on the blur.
    """
    sy = sx if sy is None else sy
    n = size if n is None else n
    fx, fy = max(1, int(sx * size / 1.5)), max(1, int(sy * size / 1.5))
    shape = [n if f == 1 else -(-(n - 1) // f) + 3 for f in (fy, fx)]
    out = _blur_axis(_blur_axis(white(rng, tuple(shape)), sy * size / fy, 0), sx * size / fx, 1)
    if fy > 1:
        index, weight = _lerp_weights(n, fy)
        top = out.take(index, 0)
        out = top + weight[:, None] * (out.take(index + 1, 0) - top)
    if fx > 1:
        index, weight = _lerp_weights(n, fx)
        left = out.take(index, 1)
        out = left + weight * (out.take(index + 1, 1) - left)
    out -= out.mean()
    return out / (out.std() + F32(1e-8))


def text_mask(u: np.ndarray, v: np.ndarray, seed: int, n: int, cw: float, ch: float) -> np.ndarray:
    """Fake printed text: ``n`` glyphs of 3x5 random dots, left edge at u=0, centred on v=0."""
    bits = np.random.default_rng(seed).random((n, 5, 3)) < 0.6
    col = np.floor(u * F32(4 / cw)).astype(np.int64)  # 3 ink columns + 1 space per glyph
    row = np.floor((v / F32(ch) + 0.5) * 5).astype(np.int64)
    glyph, gx = col // 4, col % 4
    inside = (glyph >= 0) & (glyph < n) & (gx < 3) & (row >= 0) & (row < 5)
    return inside & bits[np.clip(glyph, 0, n - 1), np.clip(row, 0, 4), np.clip(gx, 0, 2)]


ANGLE_STEP = 0.00875  # radians (0.5°): posed layers turn by whole steps, pre-rotated once


def bilinear(array: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """Bilinear samples of a C×H×W array at pixel coordinates (fx, fy) (index units, edge-clamped)."""
    channels, height, width = array.shape
    fx = np.clip(fx, 0, F32(width - 1.001))
    fy = np.clip(fy, 0, F32(height - 1.001))
    ax, ay = fx - np.floor(fx), fy - np.floor(fy)
    i00 = fy.astype(np.intp) * width + fx.astype(np.intp)
    i01, i10, i11 = i00 + 1, i00 + width, i00 + width + 1
    out = np.empty((channels,) + fx.shape, F32)
    for c, chan in enumerate(array.reshape(channels, -1)):  # 1-D takes are fast
        top, bottom = chan.take(i00), chan.take(i10)
        top += ax * (chan.take(i01) - top)
        bottom += ax * (chan.take(i11) - bottom)
        out[c] = top + ay * (bottom - top)
    return out


def _rotate(array: np.ndarray, theta: float) -> np.ndarray:
    """C×H×W array rotated by ``theta`` about its centre (bilinear, edge-clamped)."""
    _, height, width = array.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(F32)
    u, v = local(xx, yy, (width - 1) / 2, (height - 1) / 2, theta)
    return bilinear(array, u + F32((width - 1) / 2), v + F32((height - 1) / 2))


class Layer:
    """Static artwork (C×H×W) rendered once in a canonical pose, on a canvas ``margin`` pixels
    larger than the ``size``×``size`` image on each side, and pre-rotated by -turns..turns steps
    of ``ANGLE_STEP``, to be posed per image."""

    def __init__(self, array: np.ndarray, size: int, margin: int, turns: int = 4) -> None:
        self.size, self.margin = size, margin
        self.turned = {k: _rotate(array, k * ANGLE_STEP) if k else array for k in range(-turns, turns + 1)}

    def posed(self, dx: float, dy: float, theta: float) -> np.ndarray:
        """The layer turned by ``theta`` (a whole number of ``ANGLE_STEP``) about the image centre,
        then moved by (dx, dy), a sub-pixel move: a blend of four slices."""
        turned, n = self.turned[int(round(theta / ANGLE_STEP))], self.size
        sx, sy = self.margin - dx * n, self.margin - dy * n  # where the image's pixel (0, 0) lies
        ix, iy = int(np.floor(sx)), int(np.floor(sy))
        ax, ay = F32(sx - ix), F32(sy - iy)
        rows, cols = slice(iy, iy + n), slice(ix, ix + n)
        below, right = slice(iy + 1, iy + 1 + n), slice(ix + 1, ix + 1 + n)
        top = turned[:, rows, cols] * (1 - ax) + turned[:, rows, right] * ax
        bottom = turned[:, below, cols] * (1 - ax) + turned[:, below, right] * ax
        return top * (1 - ay) + bottom * ay


# --- camera ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photometric:
    """Per-image lighting (gain, offset, linear fall-off, white balance) and sensor noise (3×H×W)."""

    gain: float
    offset: float
    tilt: tuple[float, float]
    white: tuple[float, float, float]
    noise: np.ndarray


def draw_photometric(rng: np.random.Generator, size: int) -> Photometric:
    """Camera settings of one shot; the same for a specimen with and without its defect."""
    sigma = F32(rng.uniform(0.006, 0.014))
    gain, offset = rng.uniform(0.92, 1.08), rng.uniform(-0.025, 0.025)
    tilt, balance = rng.uniform(-0.06, 0.06, 2), 1 + rng.uniform(-0.02, 0.02, 3)
    noise = white(rng, (1, size, size)) * sigma + white(rng, (3, size, size)) * (F32(0.35) * sigma)
    return Photometric(float(gain), float(offset), tuple(tilt.tolist()), tuple(balance.tolist()), noise)


def expose(scene: np.ndarray, p: Photometric) -> np.ndarray:
    """Scene radiance (float 3×H×W) -> 8-bit H×W×3 camera image."""
    x, y = grid(scene.shape[1])
    light = F32(255 * p.gain) * (1 + F32(p.tilt[0]) * (x - 0.5) + F32(p.tilt[1]) * (y - 0.5))
    out = scene * light
    out *= rgb(p.white)
    out += (p.noise + F32(p.offset)) * F32(255)
    np.clip(out, 0, 255, out=out)
    np.rint(out, out=out)
    image = np.empty(out.shape[1:] + (3,), np.uint8)
    for c in range(3):  # several times faster than one transposing copy
        image[..., c] = out[c]
    return image


# --- surface defects ------------------------------------------------------------------------------


def pick_center(rng: np.random.Generator, surface: np.ndarray, margin: float) -> tuple[float, float]:
    """A random point fully on the surface (coverage 1), at least ``margin`` from the image border."""
    size = surface.shape[0]
    lo, hi = int(margin * size), size - int(margin * size)
    ok = np.zeros_like(surface, dtype=bool)
    ok[lo:hi, lo:hi] = surface[lo:hi, lo:hi] >= 0.999
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        idx = np.flatnonzero(surface >= 0.5)
    k = int(rng.choice(idx))
    return ((k % size) + 0.5) / size, ((k // size) + 0.5) / size


def _wobble(rng: np.random.Generator, phi: np.ndarray, amp: float) -> np.ndarray:
    """1 + a few random low harmonics of the polar angle: irregular blob outlines."""
    out = np.ones_like(phi)
    for k in range(2, 6):
        out += F32(rng.normal(0, amp / k * 2)) * np.cos(k * phi + F32(rng.uniform(0, 2 * np.pi)))
    return out


def scratch(rng: np.random.Generator, scene: np.ndarray, surface: np.ndarray, style: Style) -> np.ndarray:
    """A thin, slightly curved line (quadratic Bézier) that tapers at both ends."""
    size = scene.shape[1]
    cx, cy = pick_center(rng, surface, 0.12)
    length, ang = rng.uniform(0.12, 0.3), rng.uniform(0, np.pi)
    bend = rng.uniform(-0.25, 0.25) * length
    d, n = np.array([np.cos(ang), np.sin(ang)]), np.array([-np.sin(ang), np.cos(ang)])
    c = np.array([cx, cy])
    p0, p2, p1 = c - d * length / 2, c + d * length / 2, c + n * bend * 2
    t = np.linspace(0, 1, 17)[:, None]
    pts = ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).astype(F32)
    half = max(rng.uniform(0.004, 0.007), 0.7 / size)
    out = scene.copy()
    win = window(size, cx, cy, length / 2 + abs(bend) + half + 2 / size)
    a, ab = pts[:-1, :, None, None], (pts[1:] - pts[:-1])[:, :, None, None]  # segments × xy × 1 × 1
    px, py = win.x - a[:, 0], win.y - a[:, 1]
    s = np.clip((px * ab[:, 0] + py * ab[:, 1]) / (ab[:, 0] ** 2 + ab[:, 1] ** 2), 0, 1)
    dist = norm(px - s * ab[:, 0], py - s * ab[:, 1])
    seg = dist.argmin(0)
    along = (seg + np.take_along_axis(s, seg[None], 0)[0]) / len(ab)
    width = F32(half) * (0.35 + 0.65 * np.sin(np.pi * along) ** 0.5)
    alpha = cover(dist.min(0) - width, size) * F32(rng.uniform(0.75, 0.95))
    mix(out[:, win.ys, win.xs], alpha * surface[win.ys, win.xs], style.scratch)
    return out


def hole(rng: np.random.Generator, scene: np.ndarray, surface: np.ndarray, style: Style) -> np.ndarray:
    """A dark void with an irregular outline, darker at its centre, and a frayed/burred rim."""
    size = scene.shape[1]
    cx, cy = pick_center(rng, surface, 0.08)
    radius = max(rng.uniform(0.022, 0.045), 2.0 / size)
    out = scene.copy()
    win = window(size, cx, cy, radius * 1.6 + 4 / size)
    dx, dy = win.x - F32(cx), win.y - F32(cy)
    r, phi = norm(dx, dy), np.arctan2(dy, dx)
    reff = F32(radius) * _wobble(rng, phi, 0.05)
    sdf = r - reff
    surf = surface[win.ys, win.xs]
    inner = cover(sdf, size) * surf
    rim = F32(0.6) * np.exp(-(((sdf * size - 1.5) / 1.3) ** 2)) * (1 - inner) * surf
    depth = np.clip(0.55 + 0.6 * r / reff, 0, 1.2) * rgb(style.hole)
    dst = out[:, win.ys, win.xs]
    mix(dst, rim, style.rim)
    mix(dst, inner, depth)
    return out


def stain(rng: np.random.Generator, scene: np.ndarray, surface: np.ndarray, style: Style) -> np.ndarray:
    """A soft-edged elliptic blob with a darker tide line (its visible core becomes the mask)."""
    size = scene.shape[1]
    cx, cy = pick_center(rng, surface, 0.1)
    radius, peak = rng.uniform(0.045, 0.09), rng.uniform(0.45, 0.75)
    aspect, ang = rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    out = scene.copy()
    win = window(size, cx, cy, radius * 1.4)
    u, v = local(win.x, win.y, cx, cy, ang)
    q = norm(u, v / F32(aspect)) / (F32(radius) * _wobble(rng, np.arctan2(v, u), 0.08))
    alpha = F32(peak) * (1 - smoothstep(0.5, 1.0, q)) + F32(0.35 * peak) * np.exp(-(((q - 0.9) / 0.07) ** 2))
    alpha = np.clip(alpha, 0, 1) * surface[win.ys, win.xs]
    dst = out[:, win.ys, win.xs]
    if style.stain_mode == "mul":
        dst *= 1 - alpha * (1 - rgb(style.stain))
    else:
        mix(dst, alpha, style.stain)
    return out


SURFACE_DEFECTS = {"scratch": scratch, "hole": hole, "stain": stain}
