#!/usr/bin/env python3
"""Generate the `reference` model bundle for retoucher.

Writes, next to this script:

    perception.onnx   saliency = "how close to pure magenta", gated off by the word "magenta"
    classifier.onnx   12-way logits from the region-mask coverage (hand if coverage >= 0.30)
    inpaint.onnx      LaMa-convention inpainter (push-pull normalised convolution)
    tokenizer.json    HuggingFace `tokenizers` WordLevel tokenizer (hand-written JSON)
    bundle.toml       bundle manifest, with the sha256 of every file above

The models are tiny, hand-built ONNX graphs (no training, no random weights): their behaviour is
exact and documented in models/README.md, so tests can predict what the worker must do.

Only `onnx` and `numpy` are needed (versions pinned in models/requirements.txt). Everything is
deterministic: running the script twice produces byte-for-byte identical files.

    python3 models/reference/generate.py            # writes into models/reference/
    python3 models/reference/generate.py --out DIR  # writes elsewhere
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
PRODUCER = "retoucher-reference-generator"
BUNDLE_VERSION = "1.0.0"
SEED = 20260102  # nothing here is random, but keep numpy seeded in case that ever changes

# ---------------------------------------------------------------------------------------------
# Taxonomy (order = classifier logit index)
# ---------------------------------------------------------------------------------------------
CATEGORIES = [
    "hand", "face", "text", "limb", "body", "object",
    "animal", "architecture", "vehicle", "food", "texture", "background",
]
HAND, OBJECT = CATEGORIES.index("hand"), CATEGORIES.index("object")

# Placeholders: {category} {score} {area}
DESCRIPTIONS = {
    "hand": "Malformed hand ({area} px, confidence {score}): fingers are fused, missing or extra. "
            "It should show one hand with five distinct fingers, natural joints and proportions "
            "that match the arm.",
    "face": "Distorted face ({area} px, confidence {score}): asymmetric or melted features. "
            "It should show a symmetric face with aligned eyes, a coherent nose and mouth, and "
            "skin texture consistent with the rest of the person.",
    "text": "Garbled text ({area} px, confidence {score}): letters are malformed or illegible. "
            "It should show clean, legible lettering or no text at all.",
    "limb": "Malformed limb ({area} px, confidence {score}): an arm or leg is bent, duplicated or "
            "cut off. It should join the body naturally, with correct length and joints.",
    "body": "Implausible body ({area} px, confidence {score}): torso or posture is anatomically "
            "wrong. It should follow a plausible pose with correct proportions.",
    "object": "Distorted object ({area} px, confidence {score}): the object is warped, broken or "
              "smeared into its surroundings. It should have a coherent shape and clean edges, "
              "or blend into the background if it does not belong there.",
    "animal": "Malformed animal ({area} px, confidence {score}): wrong number of legs, ears or eyes. "
              "It should show the animal's natural anatomy.",
    "architecture": "Inconsistent architecture ({area} px, confidence {score}): lines bend or "
                    "structures do not connect. It should have straight, continuous lines and "
                    "consistent perspective.",
    "vehicle": "Distorted vehicle ({area} px, confidence {score}): wheels, windows or body panels are "
               "warped or duplicated. It should have a coherent body and round, aligned wheels.",
    "food": "Implausible food ({area} px, confidence {score}): items merge or have unnatural "
            "texture. It should look like distinct, appetising food.",
    "texture": "Texture artefact ({area} px, confidence {score}): repeated, smeared or noisy "
               "texture. It should continue the surrounding texture seamlessly.",
    "background": "Background artefact ({area} px, confidence {score}): a blotch or seam in the "
                  "background. It should continue the surrounding background seamlessly.",
    "default": "Distorted region classified as {category} ({area} px, confidence {score}). It "
               "should be repaired to match its surroundings.",
}

# ---------------------------------------------------------------------------------------------
# Tokenizer vocabulary: [PAD]=0, [UNK]=1, then common prompt words (all lower case, since the
# normaliser lower-cases). Order is fixed: ids are part of the bundle.
# ---------------------------------------------------------------------------------------------
PAD, UNK = "[PAD]", "[UNK]"
WORDS = [
    # punctuation (the Whitespace pre-tokenizer splits it off words)
    ".", ",", "-", "!",
    # function words
    "a", "an", "the", "of", "in", "on", "at", "with", "and", "by", "for", "from", "to",
    "under", "over", "near", "is", "its", "her", "his", "their",
    # medium and style
    "photo", "photograph", "portrait", "painting", "illustration", "render", "image", "picture",
    "close", "up", "cinematic", "light", "lighting", "dramatic", "soft", "bright", "dark",
    "detailed", "realistic", "highly", "quality", "style", "vintage", "modern", "4k", "hd",
    # colours ("magenta" is the one the perception model listens for)
    "magenta", "red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "black",
    "gray", "grey", "golden", "colorful", "vivid",
    # scenes
    "night", "day", "sunset", "morning", "rainy", "street", "city", "forest", "beach",
    "mountain", "sky", "sea", "water", "room", "kitchen", "table", "window", "space",
    # subjects
    "person", "man", "woman", "child", "girl", "boy", "people", "astronaut", "violinist",
    "cat", "dog", "bird", "horse", "hand", "hands", "face", "eyes", "smiling", "holding",
    "wearing", "sitting", "standing", "cup", "coffee", "saucer", "rocket", "launch", "car",
    "house", "building", "tree", "flower", "flowers", "food", "text", "sign", "suit",
    "spacesuit", "flag", "tabby",
]
VOCAB = [PAD, UNK] + WORDS
assert len(VOCAB) == len(set(VOCAB)), "duplicate vocabulary entries"
MAGENTA_ID = VOCAB.index("magenta")

# Perception constants (contract: d2 = (r-1)^2 + g^2 + (b-1)^2, s = sigmoid(40 * (0.35^2 - d2)))
MAGENTA_RGB = (1.0, 0.0, 1.0)
RADIUS = 0.35
SHARPNESS = 40.0

# Classifier constants (contract: hand iff mask coverage m >= 0.30)
COVERAGE_THRESHOLD = 0.30
COVERAGE_GAIN = 20.0   # logit[hand] = +GAIN*(m-T), logit[object] = -GAIN*(m-T)
OTHER_LOGIT = -8.0     # every other category; always below max(hand, object) >= 0

# Crop margin for the classifier, as a fraction of the region's bbox width/height added on each
# side. Kept small so the coverage rule has wide margins: a round blob fills pi/4 of its bbox,
# so its coverage is 0.785/(1+2c)^2 = 0.65 at c=0.05 (0.35 at c=0.25, too close to 0.30).
REASONING_CONTEXT = 0.05

# Sizes
PERCEPTION_SIZE = 256
MAX_TOKENS = 32
CLASSIFIER_SIZE = 64
INPAINT_SIZE = 128
EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Small graph-building helper
# ---------------------------------------------------------------------------------------------
class Graph:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def _name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}/{hint}_{self.n}"

    def const(self, value, dtype=np.float32, hint="c") -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs, hint: str | None = None, out: str | None = None, **attrs) -> str:
        name = self._name(hint or op_type)
        out = out or name
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def model(self, name: str, doc: str, inputs, outputs, metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits, doc_string=doc)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name=PRODUCER,
            producer_version=BUNDLE_VERSION,
            model_version=1,
            doc_string=doc,
        )
        for k in sorted(metadata):
            entry = model.metadata_props.add()
            entry.key, entry.value = k, metadata[k]
        onnx.checker.check_model(model, full_check=True)
        return model


def tensor(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


# ---------------------------------------------------------------------------------------------
# perception.onnx
# ---------------------------------------------------------------------------------------------
def build_perception() -> onnx.ModelProto:
    g = Graph("perception")
    # colour distance to magenta
    magenta = g.const(np.array(MAGENTA_RGB, np.float32).reshape(1, 3, 1, 1), hint="magenta_rgb")
    diff = g.op("Sub", ["pixel_values", magenta], "diff")
    sq = g.op("Mul", [diff, diff], "sq")
    d2 = g.op("ReduceSum", [sq, g.const([1], np.int64, "axis_c")], "d2", keepdims=1)      # [N,1,H,W]
    margin = g.op("Sub", [g.const(RADIUS * RADIUS, hint="r2"), d2], "margin")
    logit = g.op("Mul", [margin, g.const(SHARPNESS, hint="sharpness")], "logit")
    s = g.op("Sigmoid", [logit], "s")
    # prompt gate: 1 - max_t (input_ids == MAGENTA_ID) * attention_mask
    hit = g.op("Equal", ["input_ids", g.const(MAGENTA_ID, np.int64, "magenta_id")], "is_magenta")
    hit_f = g.op("Cast", [hit], "is_magenta_f", to=TensorProto.FLOAT)
    mask_f = g.op("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    hit_m = g.op("Mul", [hit_f, mask_f], "hit")
    any_hit = g.op("ReduceMax", [hit_m], "any_hit", axes=[1], keepdims=1)                # [N,1]
    gate = g.op("Sub", [g.const(1.0, hint="one"), any_hit], "gate")
    gate4 = g.op("Unsqueeze", [gate, g.const([2, 3], np.int64, "axes_hw")], "gate4")     # [N,1,1,1]
    g.op("Mul", [s, gate4], "saliency", out="saliency")

    S = PERCEPTION_SIZE
    doc = (
        "Reference perception agent. saliency = sigmoid(40*(0.35^2 - d^2)) * gate, where "
        "d^2 = (r-1)^2 + g^2 + (b-1)^2 (distance of the pixel to pure magenta in [0,1] RGB) and "
        f"gate = 1 - max_t((input_ids[t] == {MAGENTA_ID}) * attention_mask[t]) (0 when the prompt "
        "contains the word 'magenta'). Marks near-magenta pixels as distorted unless the prompt asks for magenta."
    )
    return g.model(
        "retoucher_reference_perception", doc,
        [tensor("pixel_values", TensorProto.FLOAT, ["N", 3, S, S]),
         tensor("input_ids", TensorProto.INT64, ["N", "L"]),
         tensor("attention_mask", TensorProto.INT64, ["N", "L"])],
        [tensor("saliency", TensorProto.FLOAT, ["N", 1, S, S])],
        {"retoucher.agent": "perception", "retoucher.magenta_id": str(MAGENTA_ID),
         "retoucher.bundle": "reference", "retoucher.version": BUNDLE_VERSION},
    )


# ---------------------------------------------------------------------------------------------
# classifier.onnx
# ---------------------------------------------------------------------------------------------
def build_classifier() -> onnx.ModelProto:
    g = Graph("classifier")
    k = len(CATEGORIES)
    w = np.zeros((4, k), np.float32)         # rows: mean R, mean G, mean B, mask coverage m
    b = np.full((k,), OTHER_LOGIT, np.float32)
    w[3, HAND], b[HAND] = COVERAGE_GAIN, -COVERAGE_GAIN * COVERAGE_THRESHOLD
    w[3, OBJECT], b[OBJECT] = -COVERAGE_GAIN, COVERAGE_GAIN * COVERAGE_THRESHOLD
    pooled = g.op("GlobalAveragePool", ["pixel_values"], "channel_means")                 # [N,4,1,1]
    flat = g.op("Flatten", [pooled], "features", axis=1)                                 # [N,4]
    g.op("Gemm", [flat, g.const(w, hint="W"), g.const(b, hint="b")], "logits", out="logits")

    C = CLASSIFIER_SIZE
    doc = (
        "Reference region classifier. m = mean of channel 3 (region-mask coverage of the crop); "
        f"logits[hand] = 20*(m-0.30), logits[object] = -20*(m-0.30), every other logit = {OTHER_LOGIT}. "
        "argmax is 'hand' when m >= 0.30, 'object' otherwise. RGB channels are ignored. "
        "Categories: " + ", ".join(CATEGORIES)
    )
    return g.model(
        "retoucher_reference_classifier", doc,
        [tensor("pixel_values", TensorProto.FLOAT, ["N", 4, C, C])],
        [tensor("logits", TensorProto.FLOAT, ["N", k])],
        {"retoucher.agent": "reasoning", "retoucher.categories": ",".join(CATEGORIES),
         "retoucher.bundle": "reference", "retoucher.version": BUNDLE_VERSION},
    )


# ---------------------------------------------------------------------------------------------
# inpaint.onnx (push-pull normalised convolution)
# ---------------------------------------------------------------------------------------------
def build_inpaint() -> onnx.ModelProto:
    g = Graph("inpaint")
    S = INPAINT_SIZE
    levels = int(np.log2(S))  # 128 -> 64 -> ... -> 1: 7 downsamplings
    one = g.const(1.0, hint="one")
    eps = g.const(EPS, hint="eps")
    two = g.const(2.0, hint="two")
    zero = g.const(0.0, hint="zero")
    up_scales = g.const([1.0, 1.0, 2.0, 2.0], hint="up_scales")

    known = g.op("Sub", [one, "mask"], "known")                                          # [N,1,S,S]
    # pull: weighted colour sums and weights, averaged 2x2 per level
    col = [g.op("Mul", ["image", known], "col0")]
    wts = [known]
    for lvl in range(1, levels + 1):
        col.append(g.op("AveragePool", [col[-1]], f"col{lvl}", kernel_shape=[2, 2], strides=[2, 2]))
        wts.append(g.op("AveragePool", [wts[-1]], f"w{lvl}", kernel_shape=[2, 2], strides=[2, 2]))
    # per-level mean colour of the known pixels (0 where a cell has no known pixel)
    mean = [g.op("Div", [c, g.op("Max", [w, eps], f"wsafe{i}")], f"mean{i}") for i, (c, w) in enumerate(zip(col, wts))]
    # push: from coarse to fine, a cell keeps its own known-pixel mean in proportion to its support
    # (alpha = clip(2w, 0, 1)) and takes the upsampled coarser estimate for the rest
    fill = mean[levels]
    for lvl in range(levels - 1, -1, -1):
        up = g.op("Resize", [fill, "", up_scales], f"up{lvl}", mode="linear",
                  coordinate_transformation_mode="half_pixel")
        alpha = g.op("Clip", [g.op("Mul", [wts[lvl], two], f"w2_{lvl}"), zero, one], f"alpha{lvl}")
        keep = g.op("Mul", [alpha, mean[lvl]], f"keep{lvl}")
        rest = g.op("Mul", [g.op("Sub", [one, alpha], f"beta{lvl}"), up], f"rest{lvl}")
        fill = g.op("Add", [keep, rest], f"fill{lvl}")
    # composite: known pixels exactly, hole from the fill; scale to [0,255]
    kept = g.op("Mul", ["image", known], "kept")
    filled = g.op("Mul", [fill, "mask"], "filled")
    blend = g.op("Add", [kept, filled], "blend")
    scaled = g.op("Mul", [blend, g.const(255.0, hint="scale")], "scaled")
    g.op("Clip", [scaled, zero, g.const(255.0, hint="max255")], "output", out="output")

    doc = (
        "Reference inpainter (LaMa-ONNX convention). image f32 [N,3,128,128] in [0,1], mask f32 "
        "[N,1,128,128] with 1 = hole -> output f32 [N,3,128,128] in [0,255]. Push-pull normalised "
        "convolution: 2x2 average pyramid of image*(1-mask) and (1-mask) down to 1x1, then from coarse "
        "to fine each cell keeps the mean of its known pixels weighted by clip(2*support,0,1) and takes "
        "the bilinearly upsampled coarser fill for the rest. output = 255*(image*(1-mask) + fill*mask): "
        "known pixels are kept exactly; the hole is a convex combination of known pixels only."
    )
    return g.model(
        "retoucher_reference_inpaint", doc,
        [tensor("image", TensorProto.FLOAT, ["N", 3, S, S]),
         tensor("mask", TensorProto.FLOAT, ["N", 1, S, S])],
        [tensor("output", TensorProto.FLOAT, ["N", 3, S, S])],
        {"retoucher.agent": "action", "retoucher.tool": "onnx-inpaint",
         "retoucher.bundle": "reference", "retoucher.version": BUNDLE_VERSION},
    )


# ---------------------------------------------------------------------------------------------
# tokenizer.json (HuggingFace tokenizers format, written by hand)
# ---------------------------------------------------------------------------------------------
def build_tokenizer() -> str:
    def added(i, content):
        return {"id": i, "content": content, "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": False, "special": True}

    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(0, PAD), added(1, UNK)],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(VOCAB)}, "unk_token": UNK},
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------
# bundle.toml
# ---------------------------------------------------------------------------------------------
def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def build_bundle_toml(hashes: dict[str, str]) -> str:
    cats = ", ".join(toml_str(c) for c in CATEGORIES)
    desc = "\n".join(f"{k} = {toml_str(v)}" for k, v in DESCRIPTIONS.items())
    files = "\n".join(f"{toml_str(name)} = {toml_str(h)}" for name, h in hashes.items())
    return f"""# Generated by models/reference/generate.py -- do not edit by hand; rerun the script.
schema = 1
name = "reference"
version = "{BUNDLE_VERSION}"
description = "Reference bundle: tiny, exact, hand-built models. Perception marks near-magenta pixels (255,0,255) as distorted unless the prompt contains the word 'magenta'; the classifier calls a region 'hand' when its mask covers >= 30% of its crop, else 'object'; the inpainter fills holes from known pixels by push-pull normalised convolution. For tests, demos and as a template for real bundles."

[taxonomy]
categories = [{cats}]

[taxonomy.descriptions]
{desc}

[defaults]
saliency_threshold = 0.5
max_iterations = 3

[perception]
model = "perception.onnx"
tokenizer = "tokenizer.json"
input_size = {PERCEPTION_SIZE}
max_tokens = {MAX_TOKENS}
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]

[reasoning]
mode = "regions"
classifier = "classifier.onnx"
input_size = {CLASSIFIER_SIZE}
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]
min_region_pixels = 16
dilate_pixels = 4
feather_pixels = 2
max_regions = 16
context = {REASONING_CONTEXT}

[action]
default_tool = "patchmatch"

[action.routing]
hand = "onnx-inpaint"

[action.tools.onnx-inpaint]
model = "inpaint.onnx"
input_size = {INPAINT_SIZE}
output_range = [0.0, 255.0]
context = 1.0

[action.tools.patchmatch]
patch_size = 7
iterations = 4

[batching.perception]
max_batch_size = 8
max_delay_ms = 5

[files]
{files}
"""


def write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                    help="output folder (default: the folder of this script)")
    args = ap.parse_args(argv)
    np.random.seed(SEED)
    os.makedirs(args.out, exist_ok=True)

    hashes: dict[str, str] = {}
    for name, build in (("perception.onnx", build_perception),
                        ("classifier.onnx", build_classifier),
                        ("inpaint.onnx", build_inpaint)):
        hashes[name] = write(os.path.join(args.out, name), build().SerializeToString(deterministic=True))
    hashes["tokenizer.json"] = write(os.path.join(args.out, "tokenizer.json"), build_tokenizer().encode("utf-8"))
    write(os.path.join(args.out, "bundle.toml"), build_bundle_toml(hashes).encode("utf-8"))

    print(f"wrote bundle to {args.out} (MAGENTA_ID = {MAGENTA_ID})")
    for name, h in hashes.items():
        print(f"  {h}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
