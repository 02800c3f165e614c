#!/usr/bin/env python3
"""Make the example images and jobs for `retoucher run examples/jobs.jsonl`.

Takes real photographs bundled with scikit-image (public domain / CC0, see examples/README.md),
scales them to at most 512 px on the long side, paints pure-magenta (255,0,255) "blemishes" into
them (the reference model bundle marks near-magenta pixels as distortions), and writes:

    astronaut-blemished.jpg   JPEG quality 95: three compact blobs
    chelsea-blemished.png     three compact blobs
    coffee-blemished.png      two compact blobs and one thin curved stroke
    rocket.png                no blemish
    blemishes.json            what was painted where (centre, bbox, kind)
    jobs.jsonl                one v1 job per line, image paths relative to this folder

Needs numpy, Pillow and scikit-image (only for its bundled photos; see examples/requirements.txt).
Deterministic: shapes come from a seeded generator.

    python3 examples/make_examples.py
"""

from __future__ import annotations

import importlib.resources
import json
import os
import sys

import numpy as np
from PIL import Image

SEED = 2601_02046
MAX_SIDE = 512
SUPERSAMPLE = 4          # anti-aliasing: about one pixel of soft edge
MAGENTA = np.array([255.0, 0.0, 255.0])
HERE = os.path.dirname(os.path.abspath(__file__))


def source(name: str) -> Image.Image:
    """A photo from scikit-image's bundled data folder (no network)."""
    path = importlib.resources.files("skimage.data") / name
    with importlib.resources.as_file(path) as p:
        im = Image.open(p).convert("RGB")
        im.load()
    if max(im.size) > MAX_SIDE:
        s = MAX_SIDE / max(im.size)
        im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.LANCZOS)
    return im


def supersampled_grid(x0, y0, x1, y1):
    """Sub-pixel sample centres for the pixel box [x0,x1) x [y0,y1)."""
    k = SUPERSAMPLE
    xs = x0 + (np.arange((x1 - x0) * k) + 0.5) / k
    ys = y0 + (np.arange((y1 - y0) * k) + 0.5) / k
    return np.meshgrid(xs, ys)


def coverage(inside: np.ndarray) -> np.ndarray:
    """Average a supersampled boolean grid back to pixels: alpha in [0,1]."""
    k = SUPERSAMPLE
    h, w = inside.shape[0] // k, inside.shape[1] // k
    return inside.reshape(h, k, w, k).mean(axis=(1, 3))


def blob_alpha(shape, cx, cy, radius, rng, wobble=0.08):
    """Irregular, roughly round blob: r(theta) = radius * (1 + low-order harmonics)."""
    h, w = shape
    r_max = radius * (1 + 3 * wobble) + 2
    x0, y0 = max(0, int(cx - r_max)), max(0, int(cy - r_max))
    x1, y1 = min(w, int(cx + r_max) + 1), min(h, int(cy + r_max) + 1)
    xx, yy = supersampled_grid(x0, y0, x1, y1)
    theta = np.arctan2(yy - cy, xx - cx)
    r = np.hypot(xx - cx, yy - cy)
    edge = np.ones_like(theta)
    for harmonic in (2, 3, 5):
        edge += wobble * rng.uniform(0.4, 1.0) * np.sin(harmonic * theta + rng.uniform(0, 2 * np.pi))
    alpha = np.zeros(shape)
    alpha[y0:y1, x0:x1] = coverage(r <= radius * edge)
    return alpha


def stroke_alpha(shape, points, width):
    """A thin curved stroke: cubic Bezier through 4 control points, round caps."""
    h, w = shape
    p = np.asarray(points, float)
    t = np.linspace(0, 1, 600)[:, None]
    curve = ((1 - t) ** 3) * p[0] + 3 * ((1 - t) ** 2) * t * p[1] + 3 * (1 - t) * t ** 2 * p[2] + t ** 3 * p[3]
    x0, y0 = max(0, int(curve[:, 0].min() - width)), max(0, int(curve[:, 1].min() - width))
    x1, y1 = min(w, int(curve[:, 0].max() + width) + 1), min(h, int(curve[:, 1].max() + width) + 1)
    xx, yy = supersampled_grid(x0, y0, x1, y1)
    dist = np.full(xx.shape, np.inf)
    for cxy in curve:  # 600 samples, sub-pixel spacing: distance to the densely sampled curve
        np.minimum(dist, np.hypot(xx - cxy[0], yy - cxy[1]), out=dist)
    alpha = np.zeros(shape)
    alpha[y0:y1, x0:x1] = coverage(dist <= width / 2)
    return alpha


def paint(im: Image.Image, blemishes, rng):
    a = np.asarray(im, np.float64)
    total = np.zeros(a.shape[:2])
    records = []
    for b in blemishes:
        if b["kind"] == "blob":
            alpha = blob_alpha(a.shape[:2], b["cx"], b["cy"], b["radius"], rng)
        else:
            alpha = stroke_alpha(a.shape[:2], b["points"], b["width"])
        total = np.maximum(total, alpha)
        ys, xs = np.nonzero(alpha > 0.5)
        rec = dict(b)
        rec["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        rec["pixels"] = int((alpha > 0.5).sum())
        # what the reference bundle should make of it (classifier rule: mask coverage >= 0.30)
        rec["expected_category"] = "hand" if b["kind"] == "blob" else "object"
        rec["expected_tool"] = "onnx-inpaint" if b["kind"] == "blob" else "patchmatch"
        records.append(rec)
    out = a * (1 - total[..., None]) + MAGENTA * total[..., None]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8)), total, records


def magenta_distance(im: Image.Image) -> np.ndarray:
    a = np.asarray(im, np.float64) / 255
    return np.sqrt((a[..., 0] - 1) ** 2 + a[..., 1] ** 2 + (a[..., 2] - 1) ** 2)


def erode(mask: np.ndarray, n: int) -> np.ndarray:
    m = mask.copy()
    for _ in range(n):
        m = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
    return m


IMAGES = [
    {
        "source": "astronaut.png", "out": "astronaut-blemished.jpg",
        "blemishes": [
            {"kind": "blob", "cx": 92, "cy": 318, "radius": 15},    # on the orange suit
            {"kind": "blob", "cx": 322, "cy": 64, "radius": 12},    # grey studio background
            {"kind": "blob", "cx": 440, "cy": 300, "radius": 18},   # black backdrop, right
        ],
    },
    {
        "source": "chelsea.png", "out": "chelsea-blemished.png",
        "blemishes": [
            {"kind": "blob", "cx": 236, "cy": 52, "radius": 16},    # forehead fur
            {"kind": "blob", "cx": 92, "cy": 222, "radius": 11},    # cheek
            {"kind": "blob", "cx": 398, "cy": 212, "radius": 14},   # blurred background
        ],
    },
    {
        "source": "coffee.png", "out": "coffee-blemished.png",
        "blemishes": [
            {"kind": "blob", "cx": 118, "cy": 262, "radius": 17},   # red saucer
            {"kind": "blob", "cx": 250, "cy": 125, "radius": 13},   # coffee crema
            {"kind": "stroke", "width": 6,                          # scratch across the table
             "points": [[392, 24], [470, 40], [420, 120], [492, 168]]},
        ],
    },
    {"source": "rocket.jpg", "out": "rocket.png", "blemishes": []},
]

JOBS = [
    {"job_id": "example-astronaut", "image": "astronaut-blemished.jpg",
     "prompt": "portrait of an astronaut in an orange spacesuit, the flag behind her, studio light",
     "options": {"max_iterations": 3, "saliency_threshold": 0.5},
     "metadata": {"tenant": "examples", "source": "scikit-image astronaut", "expect": "retouched"}},
    {"job_id": "example-chelsea", "image": "chelsea-blemished.png",
     "prompt": "close up photo of a tabby cat, detailed fur, soft light",
     "options": {"max_iterations": 3},
     "metadata": {"tenant": "examples", "source": "scikit-image chelsea", "expect": "retouched"}},
    {"job_id": "example-coffee", "image": "coffee-blemished.png",
     "prompt": "a cup of coffee on a red saucer on a wooden table, warm light",
     "options": {},
     "metadata": {"tenant": "examples", "source": "scikit-image coffee", "expect": "retouched"}},
    {"job_id": "example-coffee-magenta", "image": "coffee-blemished.png",
     "prompt": "a cup of coffee on a red saucer with magenta sprinkles, on a wooden table",
     "options": {"max_iterations": 3, "saliency_threshold": 0.5},
     "metadata": {"tenant": "examples", "source": "scikit-image coffee", "expect": "clean",
                  "note": "the prompt asks for magenta, so the magenta blemishes are not distortions"}},
    {"job_id": "example-rocket", "image": "rocket.png",
     "prompt": "a rocket on the launch pad at night, cinematic light",
     "options": {"max_iterations": 3, "saliency_threshold": 0.5},
     "metadata": {"tenant": "examples", "source": "scikit-image rocket", "expect": "clean"}},
]


def main() -> int:
    rng = np.random.default_rng(SEED)
    summary = {}
    for spec in IMAGES:
        im = source(spec["source"])
        painted, alpha, records = paint(im, spec["blemishes"], rng)
        path = os.path.join(HERE, spec["out"])
        if spec["out"].endswith(".jpg"):
            painted.save(path, quality=95)
        else:
            painted.save(path, optimize=True)
        # Re-read what was written: the blemish cores must still be near magenta (JPEG included),
        # and nothing else in the photo may be (the reference perception threshold is d < 0.35).
        with Image.open(path) as f:
            back = f.convert("RGB")
        d = magenta_distance(back)
        core = erode(alpha >= 1.0, 2)
        if spec["blemishes"]:
            assert core.any() and d[core].max() < 0.2, f"{spec['out']}: blemish core drifted from magenta ({d[core].max():.3f})"
        far = erode(~(alpha > 0), 3)  # at least 3 px away from any painted pixel
        assert d[far].min() > 0.40, f"{spec['out']}: a natural pixel is near magenta ({d[far].min():.3f})"
        summary[spec["out"]] = {
            "source": f"scikit-image {spec['source']}", "width": back.size[0], "height": back.size[1],
            "blemishes": records,
        }
        core_max = float(d[core].max()) if core.any() else None
        print(f"{spec['out']}: {back.size[0]}x{back.size[1]}, {len(records)} blemishes, "
              f"{os.path.getsize(path)} bytes, core max d {core_max}, min d elsewhere {d[far].min():.3f}")

    with open(os.path.join(HERE, "blemishes.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    with open(os.path.join(HERE, "jobs.jsonl"), "w") as f:
        for job in JOBS:
            f.write(json.dumps(job, separators=(",", ":")) + "\n")
    print(f"wrote {len(JOBS)} jobs to examples/jobs.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
