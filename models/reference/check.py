#!/usr/bin/env python3
"""Check the reference bundle: manifest, hashes, tokenizer and the exact behaviour of each model.

    pip install -r models/requirements.txt
    python3 models/reference/check.py [BUNDLE_DIR]     # default: the folder of this script

Needs numpy, onnxruntime (1.31.1, the version the worker loads) and tokenizers. Exits non-zero
on the first failed assertion. Every model is run at batch sizes 1 and 4.
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore

CATEGORIES = ["hand", "face", "text", "limb", "body", "object", "animal", "architecture",
              "vehicle", "food", "texture", "background"]
RNG = np.random.default_rng(7)


def ok(msg: str) -> None:
    print(f"ok   {msg}")


def session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def check_io(sess, inputs, outputs):
    got_in = [(i.name, i.type, i.shape) for i in sess.get_inputs()]
    got_out = [(o.name, o.type, o.shape) for o in sess.get_outputs()]
    assert got_in == inputs, f"inputs {got_in} != {inputs}"
    assert got_out == outputs, f"outputs {got_out} != {outputs}"


# ---------------------------------------------------------------------------------------------
def check_manifest(root: str) -> dict:
    with open(os.path.join(root, "bundle.toml"), "rb") as f:
        b = tomllib.load(f)
    assert b["schema"] == 1 and b["name"] == "reference" and b["version"] == "1.0.0"
    assert b["taxonomy"]["categories"] == CATEGORIES
    desc = b["taxonomy"]["descriptions"]
    assert "default" in desc and "hand" in desc
    for k, v in desc.items():
        assert k == "default" or k in CATEGORIES, f"description for unknown category {k}"
        v.format(category="hand", score="0.99", area=123)  # only known placeholders
    assert b["defaults"] == {"saliency_threshold": 0.5, "max_iterations": 3}
    p = b["perception"]
    assert (p["model"], p["tokenizer"], p["input_size"], p["max_tokens"]) == ("perception.onnx", "tokenizer.json", 256, 32)
    assert p["mean"] == [0.0] * 3 and p["std"] == [1.0] * 3
    r = b["reasoning"]
    assert (r["mode"], r["classifier"], r["input_size"]) == ("regions", "classifier.onnx", 64)
    assert (r["min_region_pixels"], r["dilate_pixels"], r["feather_pixels"], r["max_regions"], r["context"]) == (16, 4, 2, 16, 0.05)
    a = b["action"]
    assert a["default_tool"] == "patchmatch" and a["routing"] == {"hand": "onnx-inpaint"}
    t = a["tools"]["onnx-inpaint"]
    assert (t["model"], t["input_size"], t["output_range"], t["context"]) == ("inpaint.onnx", 128, [0.0, 255.0], 1.0)
    assert a["tools"]["patchmatch"] == {"patch_size": 7, "iterations": 4}
    assert b["batching"]["perception"] == {"max_batch_size": 8, "max_delay_ms": 5}
    files = b["files"]
    assert sorted(files) == sorted(["perception.onnx", "classifier.onnx", "inpaint.onnx", "tokenizer.json"])
    for name, digest in files.items():
        with open(os.path.join(root, name), "rb") as f:
            got = hashlib.sha256(f.read()).hexdigest()
        assert got == digest, f"sha256 mismatch for {name}: {got} != {digest}"
    ok("bundle.toml: schema, keys and sha256 of every file")
    return b


# ---------------------------------------------------------------------------------------------
def check_tokenizer(root: str, max_tokens: int) -> tuple[Tokenizer, int]:
    tok = Tokenizer.from_file(os.path.join(root, "tokenizer.json"))
    magenta_id = tok.token_to_id("magenta")
    assert magenta_id is not None
    assert tok.token_to_id("[PAD]") == 0 and tok.token_to_id("[UNK]") == 1
    enc = tok.encode("A Magenta sky.")
    assert enc.tokens == ["a", "magenta", "sky", "."], enc.tokens
    assert enc.ids == [6, 53, 78, 2] and magenta_id == 53 and tok.get_vocab_size() == 126, enc.ids
    assert magenta_id in enc.ids
    assert tok.encode("MAGENTA").ids == [magenta_id]
    assert tok.encode("ＭＡＧＥＮＴＡ").ids == [magenta_id]  # NFKC folds full-width letters
    enc = tok.encode("a xyzzy plugh cat")
    assert enc.ids[1:3] == [1, 1] and enc.ids[0] != 1 and enc.ids[3] != 1, enc.ids
    assert tok.encode("magentas").ids == [1]  # whole words only
    assert enc.attention_mask == [1] * 4  # no padding, no special tokens added
    ok(f"tokenizer.json: WordLevel, lowercase, [PAD]=0 [UNK]=1, magenta={magenta_id}")
    return tok, magenta_id


def encode_batch(tok: Tokenizer, prompts, length: int):
    ids = np.zeros((len(prompts), length), np.int64)
    mask = np.zeros((len(prompts), length), np.int64)
    for i, p in enumerate(prompts):
        e = tok.encode(p).ids[:length]
        ids[i, :len(e)] = e
        mask[i, :len(e)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
def perception_ref(px, ids, mask, magenta_id):
    d2 = (px[:, 0] - 1) ** 2 + px[:, 1] ** 2 + (px[:, 2] - 1) ** 2
    s = 1 / (1 + np.exp(np.minimum(-40 * (0.35 ** 2 - d2), 80.0)))
    gate = 1 - ((ids == magenta_id) * mask).max(axis=1)
    return (s * gate[:, None, None])[:, None]


def check_perception(root: str, tok: Tokenizer, magenta_id: int) -> None:
    sess = session(os.path.join(root, "perception.onnx"))
    check_io(sess,
             [("pixel_values", "tensor(float)", ["N", 3, 256, 256]),
              ("input_ids", "tensor(int64)", ["N", "L"]),
              ("attention_mask", "tensor(int64)", ["N", "L"])],
             [("saliency", "tensor(float)", ["N", 1, 256, 256])])

    def scene():
        px = RNG.uniform(0, 1, (3, 256, 256)).astype(np.float32)
        px[:, 128:, :] *= 0.5  # bottom half: every channel <= 0.5, far from magenta
        px[:, 40:80, 40:80] = np.array([1, 0, 1], np.float32)[:, None, None]  # pure magenta
        px[:, 100:110, 100:110] = np.array([1, 0.35, 1], np.float32)[:, None, None]  # d = 0.35
        px[:, 20:30, 200:210] = np.array([0.8, 0.1, 0.85], np.float32)[:, None, None]  # d = 0.269
        return px

    prompts = ["a cat on a table", "A MAGENTA flower.", "portrait of an astronaut", "magenta"]
    for n in (1, 4):
        px = np.stack([scene() for _ in range(n)])
        for length in (32, 7):
            ids, mask = encode_batch(tok, prompts[:n], length)
            (sal,) = sess.run(None, {"pixel_values": px, "input_ids": ids, "attention_mask": mask})
            assert sal.shape == (n, 1, 256, 256) and sal.dtype == np.float32
            assert sal.min() >= 0 and sal.max() <= 1
            np.testing.assert_allclose(sal, perception_ref(px, ids, mask, magenta_id), atol=1e-5)
            for i, p in enumerate(prompts[:n]):
                if "magenta" in p.lower():
                    assert sal[i].max() == 0.0, "prompt mentions magenta: saliency must be all zero"
                else:
                    assert sal[i, 0, 40:80, 40:80].min() > 0.99
                    assert abs(sal[i, 0, 105, 105] - 0.5) < 1e-3
                    assert sal[i, 0, 25, 205] > 0.8
                    assert sal[i, 0, 128:, :].max() < 1e-6  # dark half: nothing near magenta
    # a masked-out magenta token does not gate
    ids = np.array([[magenta_id, 0, 0]], np.int64)
    px = np.ones((1, 3, 256, 256), np.float32) * np.array([1, 0, 1], np.float32)[None, :, None, None]
    (sal,) = sess.run(None, {"pixel_values": px, "input_ids": ids, "attention_mask": np.zeros_like(ids)})
    assert sal.min() > 0.99
    (sal,) = sess.run(None, {"pixel_values": px, "input_ids": ids, "attention_mask": np.array([[1, 0, 0]], np.int64)})
    assert sal.max() == 0.0
    ok("perception.onnx: magenta saliency, 'magenta' gate, attention mask, N in {1,4}, L in {7,32}")


# ---------------------------------------------------------------------------------------------
def classifier_expected(m: float) -> int:
    return 0 if m >= 0.30 else 5


def check_classifier(root: str) -> None:
    sess = session(os.path.join(root, "classifier.onnx"))
    check_io(sess, [("pixel_values", "tensor(float)", ["N", 4, 64, 64])],
             [("logits", "tensor(float)", ["N", 12])])
    total = 64 * 64
    counts = [0, 1, 40, 409, 1000, 1228, 1229, 1300, 2048, 3000, 4095, 4096]  # 1228/4096 < 0.30 <= 1229/4096
    for n in (1, 4):
        for start in range(0, len(counts), n):
            chunk = counts[start:start + n]
            if len(chunk) < n:
                chunk = chunk + counts[:n - len(chunk)]
            x = RNG.uniform(0, 1, (n, 4, 64, 64)).astype(np.float32)
            for i, c in enumerate(chunk):
                flat = np.zeros(total, np.float32)
                flat[RNG.permutation(total)[:c]] = 1.0
                x[i, 3] = flat.reshape(64, 64)
            (logits,) = sess.run(None, {"pixel_values": x})
            assert logits.shape == (n, 12)
            for i, c in enumerate(chunk):
                m = c / total
                assert int(np.argmax(logits[i])) == classifier_expected(m), (c, m, logits[i])
                want = np.full(12, -8.0, np.float32)
                want[0], want[5] = 20 * (m - 0.30), -20 * (m - 0.30)
                np.testing.assert_allclose(logits[i], want, atol=1e-4)
    ok("classifier.onnx: argmax hand iff coverage >= 0.30 else object, logits 20*(m-0.3), N in {1,4}")


# ---------------------------------------------------------------------------------------------
def blob_mask(size: int, frac: float, rng) -> np.ndarray:
    """An irregular hole covering about `frac` of the crop, centred."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-8, 8), size / 2 + rng.uniform(-8, 8)
    ang = np.arctan2(yy - cy, xx - cx)
    r = np.hypot(yy - cy, xx - cx)
    base = np.sqrt(frac * size * size / np.pi)
    wobble = 1 + 0.15 * np.sin(3 * ang + rng.uniform(0, 6.28)) + 0.08 * np.sin(5 * ang + rng.uniform(0, 6.28))
    return (r <= base * wobble).astype(np.float32)


def background(kind: str, rng) -> np.ndarray:
    size = 128
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    if kind == "flat":
        return np.broadcast_to(np.array([0.2, 0.6, 0.3], np.float32)[:, None, None], (3, size, size)).copy()
    if kind == "gradient":
        return np.stack([xx, 0.5 * yy + 0.2, 1 - xx]).astype(np.float32)
    if kind == "noise":  # uniform noise, pixels near magenta pushed away
        img = rng.uniform(0, 1, (3, size, size)).astype(np.float32)
        d2 = (img[0] - 1) ** 2 + img[1] ** 2 + (img[2] - 1) ** 2
        img[1] = np.where(d2 < 0.5 ** 2, 0.6, img[1])
        return img
    if kind == "skin":  # smooth skin-like tones with texture
        base = np.array([0.85, 0.62, 0.52], np.float32)[:, None, None]
        tex = 0.08 * np.sin(9 * xx + 4 * yy)[None] + rng.normal(0, 0.02, (3, size, size)).astype(np.float32)
        return np.clip(base + tex, 0, 1).astype(np.float32)
    if kind == "stripes":  # red / blue stripes (their averages are purple but far from magenta)
        red = np.array([0.9, 0.1, 0.1], np.float32)[:, None, None]
        blue = np.array([0.1, 0.1, 0.9], np.float32)[:, None, None]
        return np.where((np.floor(xx * 16) % 2 == 0)[None], red, blue).astype(np.float32)
    raise ValueError(kind)


def check_inpaint(root: str) -> None:
    sess = session(os.path.join(root, "inpaint.onnx"))
    check_io(sess,
             [("image", "tensor(float)", ["N", 3, 128, 128]), ("mask", "tensor(float)", ["N", 1, 128, 128])],
             [("output", "tensor(float)", ["N", 3, 128, 128])])
    magenta = np.array([1, 0, 1], np.float32)[:, None, None]
    kinds = ["flat", "gradient", "noise", "skin", "stripes"]
    fracs = [0.02, 0.1, 0.3, 0.45, 0.6]
    worst = 9.0
    for n in (1, 4):
        for kind in kinds:
            for frac in fracs:
                bg = np.stack([background(kind, RNG) for _ in range(n)])
                hole = np.stack([blob_mask(128, frac, RNG)[None] for _ in range(n)])
                img = np.where(hole > 0, magenta[None], bg).astype(np.float32)
                (out,) = sess.run(None, {"image": img, "mask": hole})
                assert out.shape == (n, 3, 128, 128) and out.dtype == np.float32
                assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 255
                known = np.broadcast_to(hole == 0, out.shape)
                assert np.array_equal(out[known], (img * np.float32(255))[known]), "known pixels changed"
                o = out / 255.0
                d = np.sqrt((o[:, 0] - 1) ** 2 + o[:, 1] ** 2 + (o[:, 2] - 1) ** 2)
                inside = hole[:, 0] > 0
                worst = min(worst, float(d[inside].min()))
                assert d[inside].min() >= 0.35, f"near-magenta fill ({kind}, {frac}): d={d[inside].min():.3f}"
                if kind == "flat":
                    np.testing.assert_allclose(o, bg, atol=1e-4)
                if kind == "gradient":  # smooth fill: stays close to the underlying gradient
                    err = np.abs(o - bg)[np.broadcast_to(inside[:, None], o.shape)]
                    assert err.mean() < 0.12, (frac, err.mean())
    # a feathered (fractional) mask is fine too, and a hole with no known pixel gives black, not NaN
    img = background("skin", RNG)[None]
    soft = np.clip(blob_mask(128, 0.3, RNG) * 1.2 - 0.1, 0, 1)[None, None].astype(np.float32)
    (out,) = sess.run(None, {"image": img, "mask": soft})
    assert np.isfinite(out).all()
    (out,) = sess.run(None, {"image": img, "mask": np.ones((1, 1, 128, 128), np.float32)})
    assert np.isfinite(out).all() and out.max() == 0.0
    ok(f"inpaint.onnx: known pixels exact, holes up to 60% filled with no near-magenta pixel "
       f"(min d in hole {worst:.3f}), N in {{1,4}}")


def main() -> int:
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    print(f"onnxruntime {ort.__version__}, bundle {root}")
    bundle = check_manifest(root)
    tok, magenta_id = check_tokenizer(root, bundle["perception"]["max_tokens"])
    check_perception(root, tok, magenta_id)
    check_classifier(root)
    check_inpaint(root)
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
