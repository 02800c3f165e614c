"""The initial latent noise of a diffusion repair: a counter-based generator keyed by the job.

A redelivered job must write the same pixels, and the Python reference must draw the same noise
as the Rust tool, so the noise is a pure function of `(job_id, iteration, region)`:

    key      = u64 little-endian from the first 8 bytes of sha256(f"{job_id}:{iteration}:{region}")
    u64[n]   = mix64(key + (n + 1) * 0x9E3779B97F4A7C15)          (wrapping; n = 0, 1, 2, ...)
    mix64(z) : z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
               z = (z ^ (z >> 27)) * 0x94D049BB133111EB
               return z ^ (z >> 31)                                 (SplitMix64's finaliser)
    pair k   : a = u64[2k], b = u64[2k+1]
               u1 = ((a >> 11) + 1) * 2^-53   in (0, 1]
               u2 = (b >> 11) * 2^-53         in [0, 1)
               r  = sqrt(-2 ln u1)
               normal[2k] = r cos(2 pi u2),  normal[2k+1] = r sin(2 pi u2)   (f64, then cast to f32)

The normals fill the latent tensor [1, 4, h, w] in C order; an odd element count drops the last
sine. `iteration` and `region` are written as decimal integers ("job-7:0:2").

    python3 noise.py            # prints the known-answer vectors of models/README.md
"""

from __future__ import annotations

import hashlib
import math
import sys

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN_GAMMA = 0x9E3779B97F4A7C15
TWO_POW_M53 = 2.0 ** -53


def noise_key(job_id: str, iteration: int, region: int) -> int:
    """The generator's key for one region repair."""
    digest = hashlib.sha256(f"{job_id}:{int(iteration)}:{int(region)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def u64_stream(key: int, count: int) -> list[int]:
    """u64 numbers 0 .. count-1 of the stream of `key`."""
    return [mix64((key + (n + 1) * GOLDEN_GAMMA) & MASK64) for n in range(count)]


def normals(key: int, count: int) -> np.ndarray:
    """The first `count` standard normals of the stream of `key`, as f32."""
    pairs = (count + 1) // 2
    words = u64_stream(key, 2 * pairs)
    out = np.empty(2 * pairs, dtype=np.float32)
    for k in range(pairs):
        a, b = words[2 * k], words[2 * k + 1]
        u1 = ((a >> 11) + 1) * TWO_POW_M53
        u2 = (b >> 11) * TWO_POW_M53
        r = math.sqrt(-2.0 * math.log(u1))
        out[2 * k] = r * math.cos(2.0 * math.pi * u2)
        out[2 * k + 1] = r * math.sin(2.0 * math.pi * u2)
    return out[:count]


def region_noise(job_id: str, iteration: int, region: int, shape: tuple[int, ...]) -> np.ndarray:
    """The initial noise of one region repair, an f32 tensor of `shape` (e.g. (1, 4, h, w))."""
    count = int(np.prod(shape))
    return normals(noise_key(job_id, iteration, region), count).reshape(shape)


def main() -> int:
    key = noise_key("job-7", 0, 2)
    print(f'key("job-7:0:2") = {key} = 0x{key:016x}')
    for n, word in enumerate(u64_stream(key, 4)):
        print(f"u64[{n}] = 0x{word:016x}")
    values = normals(key, 8)
    print("normals[0..8] =", ", ".join(f"{float(v):.9g}" for v in values))
    key0 = noise_key("a", 1, 0)
    print(f'key("a:1:0") = 0x{key0:016x}; normals[0..3] =',
          ", ".join(f"{float(v):.9g}" for v in normals(key0, 3)))
    print(f"key(0): u64[0] = 0x{u64_stream(0, 1)[0]:016x} (SplitMix64 seeded with 0: first output)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
