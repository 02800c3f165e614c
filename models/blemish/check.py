"""Checks the blemish bundle the way the worker loads it (onnxruntime 1.31.1, CPU).

    .tools/py/bin/python models/blemish/check.py [--bundle models/blemish]

Needs only the project's model-tools environment (models/requirements.txt: onnx, onnxruntime,
numpy, tokenizers). Asserts: every file's sha256 matches bundle.toml; the graphs use opset <= 21
and the tensor names, types and shapes of design §4.7 with a dynamic batch; results at batch 4
equal those at batch 1; saliency lies in [0, 1]; the tokenizer adds no special tokens even when
asked to; and, on a synthetic photograph-like image, that a noise island is flagged under an
ordinary prompt and much less so when the prompt asks for film grain.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent


def fail(msg: str) -> None:
    print(f"FAIL: {msg}")
    sys.exit(1)


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def io_spec(model: onnx.ModelProto) -> dict[str, tuple[int, list]]:
    out = {}
    for v in list(model.graph.input) + list(model.graph.output):
        t = v.type.tensor_type
        out[v.name] = (t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim])
    return out


def tokens(tok: Tokenizer, prompt: str, length: int) -> tuple[np.ndarray, np.ndarray]:
    got = tok.encode(prompt, add_special_tokens=False).ids[:length]
    ids = np.zeros((1, length), np.int64)
    mask = np.zeros_like(ids)
    ids[0, : len(got)], mask[0, : len(got)] = got, 1
    return ids, mask


def scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth, lightly textured image and the same with a noise island (disc, radius 32)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([0.35 + 0.4 * xx, 0.45 + 0.25 * yy, 0.6 - 0.3 * xx * yy], axis=-1)
    base += 0.02 * np.sin(40 * xx)[..., None] * np.cos(30 * yy)[..., None]
    disc = (yy * size - 150) ** 2 + (xx * size - 100) ** 2 < 32 ** 2
    noisy = base + disc[..., None] * rng.normal(0, 0.15, base.shape).astype(np.float32)
    return np.clip(noisy, 0, 1), disc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=HERE)
    args = ap.parse_args()
    b = args.bundle
    spec = tomllib.loads((b / "bundle.toml").read_text())
    for name, digest in spec["files"].items():
        if hashlib.sha256((b / name).read_bytes()).hexdigest() != digest:
            fail(f"{name}: sha256 differs from bundle.toml")
    print(f"files: {len(spec['files'])} sha256 match")

    p = spec["perception"]
    size, length = p["input_size"], p["max_tokens"]
    model = onnx.load(str(b / p["model"]))
    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) > 21:
        fail("perception opset > 21")
    want = {"pixel_values": (1, ["N", 3, size, size]), "input_ids": (7, ["N", "L"]),
            "attention_mask": (7, ["N", "L"]), "saliency": (1, ["N", 1, 64, 64])}
    if io_spec(model) != want:
        fail(f"perception inputs/outputs {io_spec(model)}")
    tok = Tokenizer.from_file(str(b / p["tokenizer"]))
    for prompt in ("a cat on a sofa", "Glitch art stripes!"):
        if tok.encode(prompt, add_special_tokens=True).ids != tok.encode(prompt, add_special_tokens=False).ids:
            fail("the tokenizer adds special tokens")
    perception = session(b / p["model"])
    mean, std = np.array(p["mean"], np.float32), np.array(p["std"], np.float32)
    rng = np.random.default_rng(0)

    def pixels(img: np.ndarray) -> np.ndarray:
        return ((img - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)

    prompts = ["a cat on a sofa", "glitch art stripes", "a mountain valley, heavy film grain", "x"]
    batch = np.concatenate([pixels(rng.random((size, size, 3), np.float32)) for _ in prompts])
    ids, mask = zip(*(tokens(tok, q, length) for q in prompts))
    ids, mask = np.concatenate(ids), np.concatenate(mask)
    full = perception.run(["saliency"], {"pixel_values": batch, "input_ids": ids, "attention_mask": mask})[0]
    if full.shape != (4, 1, 64, 64) or full.min() < 0 or full.max() > 1:
        fail(f"saliency shape {full.shape} range [{full.min()}, {full.max()}]")
    for i in range(4):
        one = perception.run(["saliency"], {"pixel_values": batch[i:i + 1], "input_ids": ids[i:i + 1],
                                            "attention_mask": mask[i:i + 1]})[0]
        if np.abs(one - full[i:i + 1]).max() > 1e-4:
            fail("batch of 4 differs from batch of 1")
    short = perception.run(["saliency"], {"pixel_values": batch[:1], "input_ids": ids[:1, :8],
                                          "attention_mask": mask[:1, :8]})[0]
    if np.abs(short - full[:1]).max() > 1e-4:
        fail("a shorter L with the same tokens changes the saliency")
    print("perception: contract, batch 1 = batch 4, L free")

    img, disc = scene(np.random.default_rng(1), size)
    cell = disc.reshape(64, size // 64, 64, size // 64).mean(axis=(1, 3))
    inside, outside = cell > 0.9, cell == 0
    flagged = {}
    for prompt in ("a calm blue and green gradient, photograph", "a calm blue and green gradient, heavy film grain"):
        i, m = tokens(tok, prompt, length)
        s = perception.run(["saliency"], {"pixel_values": pixels(img), "input_ids": i, "attention_mask": m})[0][0, 0]
        flagged[prompt] = (float(s[inside].mean()), float(s[outside].mean()))
        print(f"noise island, {prompt!r}: saliency inside {flagged[prompt][0]:.3f}, outside {flagged[prompt][1]:.3f}")
    plain, grain = flagged.values()
    if not (plain[0] > 0.5 and plain[0] > 5 * plain[1]):
        fail("the noise island is not flagged under an ordinary prompt")
    if not grain[0] < 0.5 * plain[0]:
        fail("asking for film grain does not lower the island's saliency")

    r = spec["reasoning"]
    classifier = onnx.load(str(b / r["classifier"]))
    k = len(spec["taxonomy"]["categories"])
    if io_spec(classifier) != {"pixel_values": (1, ["N", 4, r["input_size"], r["input_size"]]), "logits": (1, ["N", k])}:
        fail(f"classifier inputs/outputs {io_spec(classifier)}")
    c = session(b / r["classifier"])
    x = rng.random((4, 4, r["input_size"], r["input_size"]), np.float32)
    full = c.run(["logits"], {"pixel_values": x})[0]
    if np.abs(c.run(["logits"], {"pixel_values": x[2:3]})[0] - full[2:3]).max() > 1e-4:
        fail("classifier batch of 4 differs from batch of 1")
    print(f"classifier: [N,4,{r['input_size']},{r['input_size']}] -> [N,{k}]")
    print("OK")


if __name__ == "__main__":
    main()
