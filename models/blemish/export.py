"""Writes the blemish bundle: perception.onnx, tokenizer.json, inpaint.onnx, bundle.toml.

    python models/blemish/export.py [--params target/quality/blemish-params.pkl] [--tau 0.5]

perception.onnx is one graph: MobileNetV2 features (frozen, ImageNet), the int8 token-embedding
table and the small text encoder, the fusion transformer and the head trained by train.py
(design §4.7: `pixel_values` f32 [N,3,256,256] ImageNet-normalised, `input_ids` i64 [N,L],
`attention_mask` i64 [N,L] -> `saliency` f32 [N,1,64,64] in [0,1]). The export is checked
against the JAX forward pass of the same parameters on real benchmark images. The inpainter is
the reference bundle's (push-pull fill), copied byte for byte; the classifier is written by
classifier.py. bundle.toml is written last, with the sha256 of every file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import data  # noqa: E402
import mobilenet  # noqa: E402
import model  # noqa: E402
import text  # noqa: E402
import train  # noqa: E402
import defects  # noqa: E402  (models/quality, on the path through data)
from graph import F32, I64, Graph, tensor  # noqa: E402

HERE = Path(__file__).resolve().parent
TOLERANCE = 2e-4  # max |saliency(onnx) - saliency(jax)|, both f32 on CPU


def perception(params: dict, mb: dict, q: np.ndarray, scale: np.ndarray) -> onnx.ModelProto:
    g = Graph()
    feats = mobilenet.build(g, mb, "pixel_values")
    rows = g.op("Gather", [g.const("tok.q", q), "input_ids"], axis=0)
    rscale = g.op("Gather", [g.const("tok.scale", scale[:, None]), "input_ids"], axis=0)
    emb = g.op("Mul", [g.op("Cast", [rows], to=onnx.TensorProto.FLOAT), rscale])
    mask_f = g.op("Cast", ["attention_mask"], to=onnx.TensorProto.FLOAT)
    logits = model.emit(g, params, feats, emb, mask_f)
    g.op("Sigmoid", [logits], name="saliency")
    return g.model(
        [tensor("pixel_values", F32, ["N", 3, data.SIZE, data.SIZE]), tensor("input_ids", I64, ["N", "L"]),
         tensor("attention_mask", I64, ["N", "L"])],
        [tensor("saliency", F32, ["N", 1, data.OUT, data.OUT])],
        "blemish_perception",
        "Prompt-conditioned blemish saliency: MobileNetV2 (ImageNet) + compact MiniLM token embeddings, "
        "self-attention fusion, trained on the retoucher blemish benchmark.")


def check(m: onnx.ModelProto, backbone_model: onnx.ModelProto, params: dict, table: np.ndarray,
          pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> float:
    """Largest saliency difference between ONNX Runtime on the full graph and JAX on the same
    images' f32 backbone features, at batch sizes 1 and len(pixels)."""
    sess, backbone = data.session(m), data.session(backbone_model)
    worst = 0.0
    for n in (1, len(pixels)):
        got = sess.run(["saliency"], {"pixel_values": pixels[:n], "input_ids": ids[:n],
                                      "attention_mask": mask[:n]})[0]
        f4, f8, f16 = backbone.run(["f4", "f8", "f16"], {"pixel_values": pixels[:n]})
        want = jax.nn.sigmoid(model.apply(params, jnp.asarray(f4), jnp.asarray(f8), jnp.asarray(f16),
                                          jnp.asarray(table[ids[:n]]), mask[:n]))
        worst = max(worst, float(np.abs(got - np.asarray(want)).max()))
    return worst


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


DESCRIPTIONS = {
    "warp": "Warped or smeared area ({area} px, confidence {score}): lines and texture bend without cause. "
            "It should follow the straight lines and texture of its surroundings.",
    "patch": "Duplicated or misplaced content ({area} px, confidence {score}): a piece of the image repeated "
             "where it does not belong. It should continue what surrounds it.",
    "melt": "Melted texture ({area} px, confidence {score}): detail runs and drips. It should keep the crisp "
            "structure of the surrounding material.",
    "blotch": "Colour blotch ({area} px, confidence {score}): a stain of foreign colour. It should have the "
              "colours of its surroundings.",
    "blur": "Blurred island ({area} px, confidence {score}): one spot lost its detail. It should be as sharp "
            "as the rest of the image.",
    "noise": "Noise island ({area} px, confidence {score}): grainy speckles in one spot. It should be as "
             "clean as the rest of the image.",
    "stretch": "Stretched region ({area} px, confidence {score}): pixels smeared into streaks. It should "
               "show the structure around it instead of streaks.",
    "text": "Gibberish text ({area} px, confidence {score}): illegible pseudo-letters. The area should show "
            "no lettering, only what lies behind it.",
    "default": "Defect classified as {category} ({area} px, confidence {score}). It should be repaired to "
               "match its surroundings.",
}
# Chosen on the validation split with the worker (README, "Tools"; choose_tools.py applies the
# rule to two `retoucher eval` reports): per class the tool with the higher PSNR in the mask
# after repair, differences under 0.05 dB going to the default tool (the one that wins most
# classes). PatchMatch's exemplars win on noise and text; the push-pull fill on the rest.
DEFAULT_TOOL = "onnx-inpaint"
ROUTING = {"noise": "patchmatch", "text": "patchmatch"}
FILES = ("perception.onnx", "tokenizer.json", "classifier.onnx", "inpaint.onnx")


def _toml(v) -> str:
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def bundle_toml(out: Path, tau: float) -> str:
    mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
    sections = [
        ("", {"schema": 1, "name": "blemish", "version": "1.0.0",
              "description": "Trained on the retoucher blemish benchmark (models/quality): prompt-conditioned "
                             "perception (MobileNetV2 ImageNet features + compact MiniLM token embeddings, "
                             "self-attention fusion), a region classifier over the benchmark's 8 defect classes, "
                             "push-pull and PatchMatch repair. See models/blemish/README.md."}),
        ("taxonomy", {"categories": list(defects.CLASSES)}),
        ("taxonomy.descriptions", {k: DESCRIPTIONS[k] for k in [*defects.CLASSES, "default"]}),
        # One round: the repair tools leave smooth fills that perception rightly reads as blur
        # islands, so further rounds grow the repairs instead of converging.
        ("defaults", {"saliency_threshold": tau, "max_iterations": 1}),
        ("perception", {"model": "perception.onnx", "tokenizer": "tokenizer.json", "input_size": data.SIZE,
                        "max_tokens": text.MAX_TOKENS, "add_special_tokens": False, "mean": mean, "std": std}),
        ("reasoning", {"mode": "regions", "classifier": "classifier.onnx", "input_size": 64, "mean": mean,
                       "std": std, "min_region_pixels": 16, "dilate_pixels": 4, "feather_pixels": 2,
                       "max_regions": 16, "context": 0.05}),
        ("action", {"default_tool": DEFAULT_TOOL}),
        ("action.routing", ROUTING),
        ("action.tools.onnx-inpaint", {"model": "inpaint.onnx", "input_size": 128,
                                       "output_range": [0.0, 255.0], "context": 1.0}),
        ("action.tools.patchmatch", {"patch_size": 7, "iterations": 4}),
        ("batching.perception", {"max_batch_size": 8, "max_delay_ms": 5}),
        ("files", {f: sha256_file(out / f) for f in FILES}),
    ]
    lines = ["# Generated by models/blemish/export.py -- do not edit by hand; rerun the script."]
    for name, values in sections:
        if name:
            lines += ["", f"[{name}]"]
        for k, v in values.items():
            key = k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)
            if name == "files":
                key = json.dumps(k)
            lines.append(f"{key} = {_toml(v)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description="export the blemish bundle")
    ap.add_argument("--params", type=Path, default=data.ROOT / "target/quality/blemish-params.pkl")
    ap.add_argument("--bench", type=Path, default=data.ROOT / "target/quality/bench")
    ap.add_argument("--cache", type=Path, default=data.ROOT / "target/quality/cache")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--tau", type=float, default=0.5, help="saliency_threshold (chosen on val: evaluate.py)")
    args = ap.parse_args()
    with open(args.params, "rb") as f:
        saved = pickle.load(f)
    params = saved["params"]
    mb, tok_json, q, scale = train.assets(args.cache)
    m = perception(params, mb, q, scale)
    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save(m, args.out / "perception.onnx")
    (args.out / "tokenizer.json").write_bytes(tok_json)
    shutil.copyfile(data.ROOT / "models/reference/inpaint.onnx", args.out / "inpaint.onnx")

    tok = Tokenizer.from_str(tok_json.decode())
    lines = [json.loads(x) for x in (args.bench / "val" / "manifest.jsonl").read_text().splitlines()[:8]]
    pixels = np.stack([data.pixel_values(np.asarray(Image.open(args.bench / "val" / x["image"]).convert("RGB")))
                       for x in lines])
    ids, mask = data.tokenize(tok, [x["prompt"] for x in lines])
    worst = check(m, data.backbone_model(mb), params, text.dequantise(q, scale), pixels, ids, mask)
    print(f"onnx vs jax: max |diff| {worst:.2e} (tolerance {TOLERANCE})")
    if worst > TOLERANCE:
        raise SystemExit("export does not reproduce the trained model")
    if not (args.out / "classifier.onnx").exists():
        raise SystemExit("classifier.onnx missing: run classifier.py first")
    (args.out / "bundle.toml").write_text(bundle_toml(args.out, args.tau))
    for name in FILES:
        print(name, (args.out / name).stat().st_size, sha256_file(args.out / name))


if __name__ == "__main__":
    main()
