"""Synthetic defects that imitate text-to-image generation artefacts, each with its soft region.

A defect is drawn as `out = img + alpha * (effect(img) - img)` where `alpha` is an irregular,
soft-edged blob (or, for text, the strokes themselves) and `effect` one of the classes in
`CLASSES`. The ground-truth mask is where the defect is: `alpha > 0.5` (text: the strokes grown
by 2 px). Images are float32 HxWx3 in [0, 1]; every random choice comes from the `rng` passed
in, so a sample is a pure function of its seed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

# Defect classes, in the order of the bundle's taxonomy.
CLASSES = ("warp", "patch", "melt", "blotch", "blur", "noise", "stretch", "text")

# Mean absolute change (0..1, over the mask) below which a drawn defect is invisible and redrawn.
MIN_VISIBLE_CHANGE = 0.035

Effect = Callable[[np.ndarray, np.random.Generator, tuple[int, int, int, int]], np.ndarray]


def blob(rng: np.random.Generator, shape: tuple[int, int], radius: float) -> np.ndarray:
    """A star-shaped irregular region with a soft edge, alpha in [0, 1], somewhere in the image."""
    h, w = shape
    cy = rng.uniform(radius * 0.6, h - radius * 0.6)
    cx = rng.uniform(radius * 0.6, w - radius * 0.6)
    theta0 = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.55, 1.0)
    harmonics = [(rng.uniform(0, 0.32 / k**0.5), k, rng.uniform(0, 2 * np.pi)) for k in range(2, 7)]
    edge = rng.uniform(1.5, 6.0)
    # Only the window that can hold the blob (the harmonics add at most 85% to the radius).
    reach = radius * 1.9 + edge
    y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 1)
    x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta0) + dy * np.sin(theta0)
    v = (-dx * np.sin(theta0) + dy * np.cos(theta0)) / aspect
    d = np.hypot(u, v)
    theta = np.arctan2(v, u)
    r = np.ones_like(d)
    for a, k, phase in harmonics:
        r += a * np.cos(k * theta + phase)
    alpha = np.zeros(shape, np.float32)
    alpha[y0:y1, x0:x1] = np.clip((radius * r - d) / edge + 0.5, 0.0, 1.0)
    return alpha


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return f / (np.abs(f).max() + 1e-6)


def _sample(img: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Bilinear lookup of every channel at (yy, xx), edges reflected."""
    return np.stack([ndimage.map_coordinates(img[..., c], [yy, xx], order=1, mode="reflect")
                     for c in range(img.shape[2])], axis=-1)


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    return yy, xx


def warp(img: np.ndarray, rng: np.random.Generator, _box: tuple[int, int, int, int]) -> np.ndarray:
    """Local smear: a smooth random displacement field of a few pixels."""
    shape = img.shape[:2]
    sigma = rng.uniform(3.0, 8.0)
    amp = rng.uniform(4.0, 10.0)
    yy, xx = _grid(shape)
    return _sample(img, yy + amp * _smooth_field(rng, shape, sigma),
                   xx + amp * _smooth_field(rng, shape, sigma))


def melt(img: np.ndarray, rng: np.random.Generator, _box: tuple[int, int, int, int]) -> np.ndarray:
    """Melted texture: a strong downward drip of the content, then detail washed out."""
    shape = img.shape[:2]
    yy, xx = _grid(shape)
    drip = np.abs(_smooth_field(rng, (1, shape[1]), rng.uniform(2.0, 6.0)))
    dy = rng.uniform(10.0, 26.0) * (0.4 + drip) * np.ones((shape[0], 1), np.float32)
    dx = rng.uniform(2.0, 5.0) * _smooth_field(rng, shape, 6.0)
    out = _sample(img, yy - dy, xx + dx)
    return ndimage.gaussian_filter(out, (rng.uniform(1.0, 2.2), rng.uniform(0.6, 1.5), 0))


def patch(img: np.ndarray, rng: np.random.Generator, box: tuple[int, int, int, int]) -> np.ndarray:
    """Duplicated or misplaced content: the same region copied from elsewhere in the image."""
    h, w = img.shape[:2]
    y0, x0, y1, x1 = box
    size = max(y1 - y0, x1 - x0)
    for _ in range(20):
        oy = int(rng.integers(-h // 2, h // 2))
        ox = int(rng.integers(-w // 2, w // 2))
        if abs(oy) + abs(ox) >= 0.8 * size and 0 <= y0 + oy and y1 + oy <= h and 0 <= x0 + ox and x1 + ox <= w:
            break
    out = np.roll(img, (-oy, -ox), axis=(0, 1))
    if rng.random() < 0.3:
        out = out[:, ::-1] if rng.random() < 0.5 else out[::-1]
        out = np.ascontiguousarray(out)
    return out


def blotch(img: np.ndarray, rng: np.random.Generator, _box: tuple[int, int, int, int]) -> np.ndarray:
    """A colour blotch: a saturated stain of uneven strength."""
    hue = rng.uniform(0, 1)
    rgb = np.array(Image.new("HSV", (1, 1), (int(hue * 255), int(rng.uniform(150, 255)),
                                            int(rng.uniform(120, 255)))).convert("RGB").getpixel((0, 0)),
                   np.float32) / 255.0
    strength = rng.uniform(0.4, 0.85) * (0.75 + 0.25 * _smooth_field(rng, img.shape[:2], 5.0))[..., None]
    if rng.random() < 0.5:
        return img * (1 - strength) + rgb * strength
    return img * (1 - strength) + img * rgb * 1.6 * strength


def blur(img: np.ndarray, rng: np.random.Generator, _box: tuple[int, int, int, int]) -> np.ndarray:
    """A blur island: detail lost in one spot."""
    return ndimage.gaussian_filter(img, (rng.uniform(2.5, 6.0),) * 2 + (0,))


def noise(img: np.ndarray, rng: np.random.Generator, _box: tuple[int, int, int, int]) -> np.ndarray:
    """A noise island: colour or luminance noise, fine or blocky."""
    h, w = img.shape[:2]
    sigma = rng.uniform(0.07, 0.2)
    cell = int(rng.choice([1, 1, 2]))
    chans = 3 if rng.random() < 0.6 else 1
    n = rng.standard_normal((h // cell + 1, w // cell + 1, chans)).astype(np.float32)
    n = np.repeat(np.repeat(n, cell, 0), cell, 1)[:h, :w]
    return img + sigma * n


def stretch(img: np.ndarray, rng: np.random.Generator, box: tuple[int, int, int, int]) -> np.ndarray:
    """A stretched region: a thin band of pixels smeared across the region (streaks)."""
    y0, x0, y1, x1 = box
    yy, xx = _grid(img.shape[:2])
    k = rng.uniform(0.02, 0.2)
    if rng.random() < 0.5:
        anchor = rng.uniform(x0, x1)
        xx = anchor + (xx - anchor) * k
    else:
        anchor = rng.uniform(y0, y1)
        yy = anchor + (yy - anchor) * k
    return _sample(img, yy, xx)


def gibberish(rng: np.random.Generator, shape: tuple[int, int], radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Strokes of pseudo-letters in a few lines: (alpha of the strokes, stroke colour RGB)."""
    h, w = shape
    scale = 3  # drawn large, then reduced: anti-aliased strokes
    layer = Image.new("L", (w * scale, h * scale), 0)
    draw = ImageDraw.Draw(layer)
    glyph = rng.uniform(7, 16)
    lines = int(rng.integers(1, 4))
    width_px = rng.uniform(2.0, 3.2) * radius
    cx, cy = rng.uniform(width_px / 2, w - width_px / 2), rng.uniform(glyph * lines, h - glyph * lines)
    x_start = cx - width_px / 2
    stroke = max(1, int(round(rng.uniform(0.9, 2.2) * scale)))
    for li in range(lines):
        y = cy + (li - lines / 2) * glyph * 1.5
        x = x_start
        while x < x_start + width_px * rng.uniform(0.6, 1.0):
            gw = glyph * rng.uniform(0.5, 0.9)
            for _ in range(int(rng.integers(2, 5))):
                pts = [(x + rng.uniform(0, gw), y + rng.uniform(0, glyph)) for _ in range(int(rng.integers(2, 4)))]
                pts = [(px * scale, py * scale) for px, py in pts]
                if rng.random() < 0.3:
                    (ax, ay), (bx, by) = pts[0], pts[1]
                    box = [min(ax, bx), min(ay, by), max(ax, bx) + scale, max(ay, by) + scale]
                    draw.arc(box, rng.uniform(0, 360), rng.uniform(0, 360) + 120, fill=255, width=stroke)
                else:
                    draw.line(pts, fill=255, width=stroke, joint="curve")
            x += gw + glyph * rng.uniform(0.15, 0.5)
            if rng.random() < 0.15:
                x += glyph * 0.8  # a word gap
    alpha = np.asarray(layer.resize((w, h), Image.Resampling.BOX), np.float32) / 255.0
    dark = rng.random() < 0.6
    colour = rng.uniform(0.0, 0.25, 3) if dark else rng.uniform(0.75, 1.0, 3)
    if rng.random() < 0.3:
        colour = rng.uniform(0, 1, 3)
    return alpha, colour.astype(np.float32)


EFFECTS: dict[str, Effect] = {
    "warp": warp, "patch": patch, "melt": melt, "blotch": blotch,
    "blur": blur, "noise": noise, "stretch": stretch,
}


def _bbox(alpha: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(alpha > 0.01)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def draw(img: np.ndarray, cls: str, rng: np.random.Generator, radius: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """One defect region of class `cls`: (new image, boolean ground-truth mask, visible)."""
    shape = img.shape[:2]
    if cls == "text":
        alpha, colour = gibberish(rng, shape, radius)
        out = img + alpha[..., None] * (colour - img)
        mask = ndimage.binary_dilation(alpha > 0.3, iterations=2)
        core = alpha > 0.5
    else:
        alpha = blob(rng, shape, radius)
        effect = EFFECTS[cls](img, rng, _bbox(alpha))
        out = img + alpha[..., None] * (effect - img)
        mask = alpha > 0.5
        core = mask
    out = np.clip(out, 0.0, 1.0)
    visible = bool(core.any()) and float(np.abs(out - img)[core].mean()) >= MIN_VISIBLE_CHANGE
    return out, mask, visible
