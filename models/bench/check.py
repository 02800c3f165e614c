#!/usr/bin/env python3
"""Check a bench bundle written by models/bench/generate.py: manifest, hashes, and every model at
batch sizes 1 and 2 (names, shapes, ranges, and the reference rules when the bundle carries them).

    python3 models/bench/check.py BUNDLE_DIR [--threads 2] [--provider CPUExecutionProvider]

Needs numpy, onnx and onnxruntime 1.31.1. Prints the time of one batch-1 call per model.
A float16 bundle (--fp16) runs on the CPU provider too (ONNX Runtime casts around ops that lack
float16 kernels there), just not faster; it is meant for CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import MAGENTA_ID, sha256_file  # noqa: E402  (the generator's own constants)

RNG = np.random.default_rng(7)


def ok(msg: str) -> None:
    print(f"ok   {msg}", flush=True)


def session(path: str, threads: int, provider: str) -> tuple[ort.InferenceSession, dict]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    t0 = time.time()
    sess = ort.InferenceSession(path, opts, providers=[provider])
    meta = sess.get_modelmeta().custom_metadata_map
    ok(f"{os.path.basename(path)} loaded in {time.time() - t0:.1f}s ({meta.get('retoucher.params')} params, "
       f"~{meta.get('retoucher.gflops_per_item')} GFLOPs/item, {meta.get('retoucher.dtype')})")
    return sess, meta


def timed(sess, feeds, what: str):
    t0 = time.time()
    out = sess.run(None, feeds)[0]
    ok(f"{what}: {time.time() - t0:.2f}s")
    return out


def blob_image(n: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth non-magenta background (channels <= 0.6) with a magenta disc in item 0."""
    yy, xx = np.mgrid[0:s, 0:s] / s
    bg = np.stack([0.2 + 0.4 * xx, 0.3 + 0.3 * yy, 0.25 + 0.2 * xx * yy]).astype(np.float32)
    img = np.repeat(bg[None], n, axis=0)
    disc = (yy - 0.5) ** 2 + (xx - 0.4) ** 2 < 0.1 ** 2
    img[0][:, disc] = np.array([1.0, 0.0, 1.0], np.float32)[:, None]
    return img, disc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--provider", default="CPUExecutionProvider")
    args = ap.parse_args(argv)
    root = args.bundle

    with open(os.path.join(root, "bundle.toml"), "rb") as f:
        b = tomllib.load(f)
    assert b["schema"] == 1 and b["name"] == "bench"
    cats = b["taxonomy"]["categories"]
    k = len(cats)
    for name, want in b["files"].items():
        assert sha256_file(os.path.join(root, name)) == want, f"sha256 mismatch: {name}"
    names = {b["perception"]["model"], b["perception"]["tokenizer"], b["reasoning"]["classifier"],
             b["action"]["tools"]["onnx-inpaint"]["model"]}
    assert names == set(b["files"]), f"[files] {sorted(b['files'])} != files named {sorted(names)}"
    ok(f"manifest: {len(b['files'])} files, hashes match")
    for name in sorted(n for n in names if n.endswith(".onnx")):
        onnx.checker.check_model(os.path.join(root, name))
    ok("onnx.checker.check_model (by path)")

    # --- perception ----------------------------------------------------------------------------
    p = b["perception"]
    S, L = p["input_size"], p["max_tokens"]
    mean = np.array(p["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.array(p["std"], np.float32).reshape(1, 3, 1, 1)
    sess, meta = session(os.path.join(root, p["model"]), args.threads, args.provider)
    rule = meta.get("retoucher.magenta_rule") == "true"
    assert [(i.name, i.type, i.shape) for i in sess.get_inputs()] == [
        ("pixel_values", "tensor(float)", ["N", 3, S, S]),
        ("input_ids", "tensor(int64)", ["N", "L"]),
        ("attention_mask", "tensor(int64)", ["N", "L"])], sess.get_inputs()
    assert [(o.name, o.type) for o in sess.get_outputs()] == [("saliency", "tensor(float)")]
    out_shape = sess.get_outputs()[0].shape
    ids = np.zeros((2, L), np.int64)
    am = np.zeros((2, L), np.int64)
    ids[:, :5] = [6, 30, 12, 88, 2]      # "a portrait of a person ." -- some words
    am[:, :5] = 1
    img, disc = blob_image(2, S)
    pv = (img - mean) / std
    sal1 = timed(sess, {"pixel_values": pv[:1], "input_ids": ids[:1], "attention_mask": am[:1]},
                 "perception batch 1 (first call)")
    sal1 = timed(sess, {"pixel_values": pv[:1], "input_ids": ids[:1], "attention_mask": am[:1]},
                 "perception batch 1")
    sal = timed(sess, {"pixel_values": pv, "input_ids": ids, "attention_mask": am}, "perception batch 2")
    assert sal.shape == (2, 1, S, S) and sal1.shape == (1, 1, S, S), (sal.shape, out_shape)
    assert np.isfinite(sal).all() and sal.min() >= 0 and sal.max() <= 1
    np.testing.assert_allclose(sal[:1], sal1, atol=2e-3)
    rest = sal[1, 0].max() if rule else sal.max()
    assert rest < 0.5, f"random saliency reaches {rest}"
    ok(f"perception: saliency {list(sal.shape)} (declared {out_shape}), non-blemish max {rest:.3f}, "
       f"mean {sal[1].mean():.4f}")
    if rule:
        assert (sal[0, 0][disc] > 0.5).all() and (sal[0, 0][~disc] < 0.5).all()
        ids_m = ids.copy()
        ids_m[0, 3] = MAGENTA_ID
        sal_m = sess.run(None, {"pixel_values": pv, "input_ids": ids_m, "attention_mask": am})[0]
        assert sal_m[0].max() < 0.5
        ids_m[0, 3], ids_m[0, 10] = 88, MAGENTA_ID   # magenta only in the padding: ignored
        sal_p = sess.run(None, {"pixel_values": pv, "input_ids": ids_m, "attention_mask": am})[0]
        assert (sal_p[0, 0][disc] > 0.5).all()
        ok("perception: magenta disc > 0.5 exactly where painted; prompt 'magenta' clears it; padding ignored")
    del sess

    # --- classifier ----------------------------------------------------------------------------
    r = b["reasoning"]
    C = r["input_size"]
    sess, meta = session(os.path.join(root, r["classifier"]), args.threads, args.provider)
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("pixel_values", ["N", 4, C, C])]
    assert [(o.name, o.shape) for o in sess.get_outputs()] == [("logits", ["N", k])]
    x = np.zeros((2, 4, C, C), np.float32)
    x[:, :3] = RNG.standard_normal((2, 3, C, C), dtype=np.float32)
    yy, xx = np.mgrid[0:C, 0:C] / C
    x[0, 3] = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.45 ** 2)   # round blob: coverage ~0.64
    x[1, 3] = np.abs(yy - xx) < 0.05                             # diagonal stroke: coverage ~0.1
    timed(sess, {"pixel_values": x[:1]}, "classifier batch 1 (first call)")
    lo1 = timed(sess, {"pixel_values": x[:1]}, "classifier batch 1")
    lo = timed(sess, {"pixel_values": x}, "classifier batch 2")
    assert lo.shape == (2, k) and lo1.shape == (1, k) and np.isfinite(lo).all()
    np.testing.assert_allclose(lo[:1], lo1, atol=1e-3)
    if meta.get("retoucher.magenta_rule") == "true":
        assert cats[int(lo[0].argmax())] == "hand" and cats[int(lo[1].argmax())] == "object", lo
        ok("classifier: logits [2, %d]; blob -> hand, stroke -> object" % k)
    else:
        ok(f"classifier: logits [2, {k}], range [{lo.min():.3f}, {lo.max():.3f}]")
    del sess

    # --- inpainter -----------------------------------------------------------------------------
    t = b["action"]["tools"]["onnx-inpaint"]
    S2 = t["input_size"]
    assert t["output_range"] == [0.0, 255.0]
    sess, meta = session(os.path.join(root, t["model"]), args.threads, args.provider)
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("image", ["N", 3, S2, S2]), ("mask", ["N", 1, S2, S2])]
    assert [(o.name, o.shape) for o in sess.get_outputs()] == [("output", ["N", 3, S2, S2])]
    img, disc = blob_image(2, S2)
    mask = np.zeros((2, 1, S2, S2), np.float32)
    mask[:, 0][:, disc] = 1.0
    timed(sess, {"image": img[:1], "mask": mask[:1]}, "inpaint batch 1 (first call)")
    out1 = timed(sess, {"image": img[:1], "mask": mask[:1]}, "inpaint batch 1")
    out = timed(sess, {"image": img, "mask": mask}, "inpaint batch 2")
    assert out.shape == (2, 3, S2, S2) and out1.shape == (1, 3, S2, S2)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 255
    np.testing.assert_allclose(out[:1], out1, atol=0.1)
    known = mask[:, 0] == 0
    assert np.array_equal(out.transpose(0, 2, 3, 1)[known], (img * 255).transpose(0, 2, 3, 1)[known]), \
        "known pixels changed"
    hole = out.transpose(0, 2, 3, 1)[~known] / 255
    d = np.sqrt(((hole - np.array([1.0, 0.0, 1.0])) ** 2).sum(-1))
    assert d.min() > 0.35
    ok(f"inpaint: output [2, 3, {S2}, {S2}] in [{out.min():.1f}, {out.max():.1f}]; known pixels kept exactly; "
       f"hole in [{hole.min() * 255:.1f}, {hole.max() * 255:.1f}], nearest to magenta d = {d.min():.2f}")
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
