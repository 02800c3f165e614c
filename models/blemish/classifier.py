"""Trains the region classifier (reasoning, `regions` mode) and writes classifier.onnx.

    python models/blemish/classifier.py [--bench target/quality/bench] [--out models/blemish]

Input as the worker builds it (design §4.7): the region's mask grown by `DILATE` px (square),
its bbox grown by `CONTEXT` x max(w, h) (at least 8 px) on each side, the RGB crop resized to
64 x 64 (antialiased bilinear) and normalised with the bundle's mean/std, plus the grown mask
resized with nearest neighbour as channel 3 (0/1). Output: logits over the defect classes in
`defects.CLASSES` order. Regions are the connected components of the ground-truth masks of the
train split (validation split for the reported accuracy); the dilation and the context are
jittered in training so the classifier tolerates regions cut out of a saliency map.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

import data  # noqa: E402
from graph import F32, Graph, tensor  # noqa: E402

import defects  # noqa: E402  (models/quality, on the path through data)

SIZE = 64
DILATE = 4  # the bundle's reasoning.dilate_pixels
CONTEXT = 0.05  # the bundle's reasoning.context
WIDTHS = (24, 48, 64, 96)
SEED = 12
EPOCHS = 30
BATCH = 64


def crop(img: np.ndarray, mask: np.ndarray, dilate: int, context: float) -> np.ndarray:
    grown = ndimage.binary_dilation(mask, np.ones((2 * dilate + 1,) * 2, bool)) if dilate else mask
    ys, xs = np.nonzero(grown)
    x, y, w, h = xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    grow = max(8, int(np.ceil(context * max(w, h))))
    x0, y0 = max(0, x - grow), max(0, y - grow)
    x1, y1 = min(img.shape[1], x + w + grow), min(img.shape[0], y + h + grow)
    rgb = np.asarray(Image.fromarray(img[y0:y1, x0:x1]).resize((SIZE, SIZE), Image.Resampling.BILINEAR), np.float32)
    m = np.asarray(Image.fromarray(grown[y0:y1, x0:x1].astype(np.uint8) * 255).resize((SIZE, SIZE), Image.Resampling.NEAREST))
    chw = ((rgb / 255.0 - data.MEAN) / data.STD).transpose(2, 0, 1)
    return np.concatenate([chw, (m > 127).astype(np.float32)[None]], axis=0)


def regions(folder: Path, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for line in (json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()):
        if line["class"] not in defects.CLASSES:
            continue
        img = np.asarray(Image.open(folder / line["image"]).convert("RGB"))
        mask = np.asarray(Image.open(folder / line["mask"])) > 127
        labels, n = ndimage.label(mask, np.ones((3, 3)))
        for k in range(1, n + 1):
            comp = labels == k
            if comp.sum() < 16:
                continue
            if rng is None:
                xs.append(crop(img, comp, DILATE, CONTEXT))
            else:
                xs.append(crop(img, comp, int(rng.integers(1, 8)), float(rng.uniform(0.0, 0.3))))
            ys.append(defects.CLASSES.index(line["class"]))
    return np.stack(xs), np.array(ys)


def init(key: jax.Array) -> list[dict]:
    params, cin = [], 4
    keys = jax.random.split(key, len(WIDTHS) + 1)
    for k, c in zip(keys, WIDTHS):
        params.append({"w": jax.random.normal(k, (c, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9)), "b": jnp.zeros(c)})
        cin = c
    params.append({"w": jax.random.normal(keys[-1], (cin, len(defects.CLASSES))) / np.sqrt(cin),
                   "b": jnp.zeros(len(defects.CLASSES))})
    return params


def apply(params: list[dict], x: jax.Array) -> jax.Array:
    for p in params[:-1]:
        x = jax.lax.conv_general_dilated(x, p["w"], (2, 2), [(1, 1), (1, 1)],
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        x = jax.nn.relu(x + p["b"][None, :, None, None])
    return x.mean(axis=(2, 3)) @ params[-1]["w"] + params[-1]["b"]


def export(params: list[dict]) -> onnx.ModelProto:
    g = Graph()
    x = "pixel_values"
    for i, p in enumerate(params[:-1]):
        x = g.op("Conv", [x, g.const(f"c{i}.w", np.asarray(p["w"], np.float32)),
                          g.const(f"c{i}.b", np.asarray(p["b"], np.float32))],
                 kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        x = g.op("Relu", [x])
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    g.op("Gemm", [x, g.const("fc.w", np.asarray(params[-1]["w"], np.float32)),
                  g.const("fc.b", np.asarray(params[-1]["b"], np.float32))], name="logits")
    return g.model([tensor("pixel_values", F32, ["N", 4, SIZE, SIZE])],
                   [tensor("logits", F32, ["N", len(defects.CLASSES)])], "blemish_classifier",
                   "Region classifier over the blemish benchmark's defect classes: " + ", ".join(defects.CLASSES))


def main() -> None:
    ap = argparse.ArgumentParser(description="train the region classifier")
    ap.add_argument("--bench", type=Path, default=data.ROOT / "target/quality/bench")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    t0 = time.time()
    rng = np.random.default_rng(SEED)
    x_train, y_train = regions(args.bench / "train", rng)
    x_val, y_val = regions(args.bench / "val", None)
    print(f"regions: train {len(y_train)}, val {len(y_val)} ({time.time() - t0:.0f}s)", flush=True)
    params = init(jax.random.PRNGKey(SEED))
    opt_m = jax.tree_util.tree_map(jnp.zeros_like, params)
    opt_v = jax.tree_util.tree_map(jnp.zeros_like, params)

    def loss_fn(params, x, y):
        logits = apply(params, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])

    @jax.jit
    def step(params, m, v, t, x, y, lr):
        loss, g = jax.value_and_grad(loss_fn)(params, x, y)
        m = jax.tree_util.tree_map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
        v = jax.tree_util.tree_map(lambda a, b: 0.999 * a + 0.001 * b * b, v, g)
        corr = jnp.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        params = jax.tree_util.tree_map(lambda p, a, b: p - lr * (corr * a / (jnp.sqrt(b) + 1e-8) + 1e-4 * p),
                                        params, m, v)
        return params, m, v, loss

    predict = jax.jit(apply)
    steps = len(y_train) // BATCH
    t = 0
    for epoch in range(EPOCHS):
        order = rng.permutation(len(y_train))
        for i in range(steps):
            idx = order[i * BATCH:(i + 1) * BATCH]
            xb = x_train[idx]
            flip = rng.random(len(idx)) < 0.5
            xb = np.where(flip[:, None, None, None], xb[..., ::-1], xb)
            t += 1
            lr = 3e-3 * 0.5 * (1 + np.cos(np.pi * t / (steps * EPOCHS)))
            params, opt_m, opt_v, loss = step(params, opt_m, opt_v, float(t), jnp.asarray(xb), jnp.asarray(y_train[idx]), lr)
        acc = float((np.asarray(predict(params, jnp.asarray(x_val))).argmax(1) == y_val).mean())
        print(f"epoch {epoch} loss {float(loss):.3f} val accuracy {acc:.3f} ({time.time() - t0:.0f}s)", flush=True)
    m = export(params)
    sess = data.session(m)
    got = sess.run(["logits"], {"pixel_values": x_val[:16]})[0]
    want = np.asarray(predict(params, jnp.asarray(x_val[:16])))
    print(f"onnx vs jax: max |diff| {np.abs(got - want).max():.2e}")
    pred = sess.run(["logits"], {"pixel_values": x_val})[0].argmax(1)
    confusion = np.zeros((len(defects.CLASSES),) * 2, int)
    np.add.at(confusion, (y_val, pred), 1)
    print("val confusion (rows: truth, columns: predicted)", list(defects.CLASSES))
    print(confusion)
    onnx.save(m, args.out / "classifier.onnx")


if __name__ == "__main__":
    main()
