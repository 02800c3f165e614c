"""Pixels in and out of the diffusion reference: minimal PNG files and the worker's resampling.

The resize is a port of src/imaging/resample.rs (the triangle filter with half-pixel centres,
widened by the scale when shrinking; weights computed in f64, stored as f32, renormalised in
f32; rows first, then columns; f32 accumulation in tap order), so the reference sees the same
model input as the Rust tool, and `to_u8` is the worker's rounding (clamp to 0..255, + 0.5,
truncate). PNG: 8-bit grey, grey+alpha, RGB and RGBA, non-interlaced (what the `image` crate and
most tools write); output is 8-bit RGB.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np


def triangle_taps(src: int, dst: int, widen: bool = True) -> list[tuple[int, np.ndarray]]:
    scale = src / dst
    support = max(scale, 1.0) if widen else 1.0
    taps = []
    for i in range(dst):
        centre = (i + 0.5) * scale
        lo = max(math.floor(centre - support), 0)
        hi = min(math.ceil(centre + support), src)
        weights = np.array([max(1.0 - abs((j + 0.5) - centre) / support, 0.0) for j in range(lo, hi)], dtype=np.float32)
        total = np.float32(0.0)
        for w in weights:
            total = np.float32(total + w)
        if total > 0:
            taps.append((lo, (weights / total).astype(np.float32)))
        else:
            taps.append((min(math.floor(centre), src - 1), np.ones(1, np.float32)))
    return taps


def resize_planes(planes: np.ndarray, dst_w: int, dst_h: int, widen: bool = True) -> np.ndarray:
    """CHW f32 planes -> CHW f32 planes of dst_h x dst_w (the worker's resample::resize_planes)."""
    planes = np.asarray(planes, dtype=np.float32)
    c, sh, sw = planes.shape
    if (sw, sh) == (dst_w, dst_h):
        return planes.copy()
    xt = triangle_taps(sw, dst_w, widen)
    yt = triangle_taps(sh, dst_h, widen)
    rows = np.zeros((c, sh, dst_w), np.float32)
    for x, (start, weights) in enumerate(xt):
        acc = np.zeros((c, sh), np.float32)
        for k, w in enumerate(weights):
            acc = acc + w * planes[:, :, start + k]
        rows[:, :, x] = acc
    out = np.zeros((c, dst_h, dst_w), np.float32)
    for y, (start, weights) in enumerate(yt):
        acc = np.zeros((c, dst_w), np.float32)
        for k, w in enumerate(weights):
            acc = acc + w * rows[:, start + k, :]
        out[:, y, :] = acc
    return out


def resize_u8(image: np.ndarray, dst_w: int, dst_h: int) -> np.ndarray:
    """HWC (or HW) u8 -> CHW f32 in 0..255 at dst_h x dst_w (the worker's resample::resize_u8)."""
    if image.ndim == 2:
        image = image[:, :, None]
    return resize_planes(np.transpose(image, (2, 0, 1)).astype(np.float32), dst_w, dst_h)


def to_u8(values: np.ndarray) -> np.ndarray:
    """The worker's rounding: clamp to 0..255, add 0.5, truncate; NaN -> 0."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
    return (np.clip(v, 0.0, 255.0) + np.float32(0.5)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------------------------
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def read_png(path: str) -> np.ndarray:
    """An 8-bit PNG as HWC u8 (HW x 1 for grey), alpha dropped."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise ValueError(f"{path}: no IHDR chunk")
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in _CHANNELS or interlace != 0:
        raise ValueError(f"{path}: only 8-bit non-interlaced grey/RGB(A) PNGs are read (depth {depth}, colour type {colour})")
    ch = _CHANNELS[colour]
    stride = width * ch
    raw = zlib.decompress(b"".join(idat))
    out = np.zeros((height, stride), np.int32)
    prev = np.zeros(stride, np.int32)
    for y in range(height):
        ftype = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        cur = np.zeros(stride, np.int32)
        if ftype == 0:
            cur = line
        elif ftype == 2:
            cur = (line + prev) & 255
        elif ftype in (1, 3, 4):
            for i in range(stride):
                left = cur[i - ch] if i >= ch else 0
                up = prev[i]
                if ftype == 1:
                    pred = left
                elif ftype == 3:
                    pred = (left + up) >> 1
                else:
                    upleft = prev[i - ch] if i >= ch else 0
                    p = left + up - upleft
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
                    pred = left if pa <= pb and pa <= pc else (up if pb <= pc else upleft)
                cur[i] = (line[i] + pred) & 255
        else:
            raise ValueError(f"{path}: bad PNG filter type {ftype}")
        out[y] = cur
        prev = cur
    pixels = out.astype(np.uint8).reshape(height, width, ch)
    if colour in (4, 6):
        pixels = pixels[:, :, :ch - 1]
    return pixels


def write_png(path: str, rgb: np.ndarray) -> None:
    """HWC u8 RGB (or HW grey) as an 8-bit PNG."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    grey = rgb.ndim == 2
    height, width = rgb.shape[:2]
    rows = rgb.reshape(height, -1)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0 if grey else 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
