#!/usr/bin/env python3
"""Generate the `bench` model bundle for retoucher: the reference bundle's contracts at realistic sizes.

    python3 models/bench/generate.py OUT_DIR [--image-size 512] [--fp16] [--seed 0]

Writes into OUT_DIR:

    perception.onnx   ViT-B/16 image encoder + T5-base-sized text encoder + 2 fusion layers + a
                      per-patch saliency head (~211M parameters; 845 MB fp32, 423 MB fp16)
    classifier.onnx   ResNet-18 over a 4-channel crop (RGB + region mask) -> 12 logits (~11M)
    inpaint.onnx      LaMa-sized conv encoder-decoder, 9 residual blocks at 1/8 resolution (~46M)
    tokenizer.json    copied from models/reference/ (the same WordLevel tokenizer)
    bundle.toml       schema-1 manifest, same keys as the reference, with the sha256 of every file

All weights are seeded random numbers: the bundle is for measuring speed, never for quality.
By default the models also carry the reference bundle's exact rules as a cheap side branch, so a
benchmark run *behaves* like the reference (magenta blemishes are found, classified by mask
coverage, routed and repaired; clean images stay clean) while paying the compute of real models.
See models/bench/README.md. `--no-magenta` drops those branches (pure random networks: every
image comes back clean after one perception call).

Only numpy and onnx are needed (models/requirements.txt). Deterministic for a given seed and
flags: two runs give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
PRODUCER = "retoucher-bench-generator"
BUNDLE_VERSION = "1.0.0"
HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(os.path.dirname(HERE), "reference")

CATEGORIES = [
    "hand", "face", "text", "limb", "body", "object",
    "animal", "architecture", "vehicle", "food", "texture", "background",
]
HAND, OBJECT = CATEGORIES.index("hand"), CATEGORIES.index("object")
MAGENTA_ID = 53  # id of "magenta" in models/reference/tokenizer.json (checked at run time)

# Normalisation declared in bundle.toml (the worker applies it; the graphs undo it where the
# reference rules need raw [0,1] RGB).
PERCEPTION_MEAN, PERCEPTION_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]            # ViT style
CLASSIFIER_MEAN, CLASSIFIER_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet
MAX_TOKENS = 32

# Architecture sizes
D = 768            # model width (ViT-B, T5-base, fusion)
HEADS = 12
PATCH = 16
VIT_LAYERS, VIT_MLP = 12, 3072
T5_LAYERS, T5_MLP, T5_VOCAB, T5_MAX_POS = 12, 3072, 32128, 512
FUSION_LAYERS, FUSION_MLP = 2, 3072
SALIENCY_HEAD_BIAS = -4.0   # sigmoid(-4) = 0.018: the random map sits far below tau = 0.5
RANDOM_SALIENCY_CAP = 0.45  # with the magenta rule on, the random map is scaled into [0, 0.45]
CLASSIFIER_RANDOM_SCALE = 1e-3  # with the coverage rule on: logits = rule + 1e-3 * tanh(net)
INPAINT_CH = [64, 128, 256, 512]
INPAINT_RESBLOCKS = 9
CLASSIFIER_CH = [64, 128, 256, 512]


def use_tiny_sizes() -> None:
    """`--tiny`: the same inputs, outputs, image sizes and reference rules with networks a few
    thousand times cheaper, so a machine without a GPU can measure what the worker costs around
    the models (decode, resizing, regions, encode, store) at the benchmark bundle's sizes."""
    global D, HEADS, VIT_LAYERS, VIT_MLP, T5_LAYERS, T5_MLP, FUSION_LAYERS, FUSION_MLP
    global INPAINT_CH, INPAINT_RESBLOCKS, CLASSIFIER_CH
    D, HEADS = 32, 2
    VIT_LAYERS, VIT_MLP = 1, 64
    T5_LAYERS, T5_MLP = 1, 64
    FUSION_LAYERS, FUSION_MLP = 1, 64
    INPAINT_CH, INPAINT_RESBLOCKS = [2, 4, 4, 4], 1
    CLASSIFIER_CH = [8, 8, 8, 8]

# Reference rules (models/README.md)
RADIUS, SHARPNESS = 0.35, 40.0
COVERAGE_THRESHOLD, COVERAGE_GAIN, OTHER_LOGIT = 0.30, 20.0, -8.0


# ---------------------------------------------------------------------------------------------
# Graph builder: weights in `wdt` (f32 or f16), a MAC counter per image
# ---------------------------------------------------------------------------------------------
class Graph:
    def __init__(self, prefix: str, rng: np.random.Generator, fp16: bool):
        self.prefix = prefix
        self.rng = rng
        self.fp16 = fp16
        self.np_dt = np.float16 if fp16 else np.float32
        self.onnx_dt = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.params = 0
        self.macs = 0  # multiply-accumulates per image (batch item)
        self.n = 0

    def _name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}/{hint}_{self.n}"

    # constants ------------------------------------------------------------------------------
    def const(self, value, dtype=None, hint="c") -> str:
        """A small constant; `dtype=None` means the compute dtype (f16 or f32)."""
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype or self.np_dt), name))
        return name

    def weight(self, shape, std: float, hint="w", mean: float = 0.0) -> str:
        """A seeded N(mean, std^2) parameter, stored in the compute dtype."""
        w = self.rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(std)
        if mean:
            w += np.float32(mean)
        self.params += w.size
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(w.astype(self.np_dt, copy=False), name))
        return name

    def filled(self, shape, value: float, hint="b") -> str:
        w = np.full(shape, value, dtype=self.np_dt)
        self.params += w.size
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(w, name))
        return name

    def op(self, op_type: str, inputs, hint: str | None = None, out: str | None = None, **attrs) -> str:
        name = self._name(hint or op_type)
        out = out or name
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    # layers -----------------------------------------------------------------------------------
    def linear(self, x: str, din: int, dout: int, tokens: int, bias=True, std=0.02, bias_value=0.0,
               hint="fc") -> str:
        y = self.op("MatMul", [x, self.weight((din, dout), std, f"{hint}_w")], f"{hint}_mm")
        self.macs += tokens * din * dout
        if bias:
            y = self.op("Add", [y, self.filled((dout,), bias_value, f"{hint}_b")], f"{hint}_add")
        return y

    def layer_norm(self, x: str, hint="ln") -> str:
        return self.op("LayerNormalization",
                       [x, self.filled((D,), 1.0, f"{hint}_g"), self.filled((D,), 0.0, f"{hint}_b")],
                       hint, axis=-1, epsilon=1e-6)

    def rms_norm(self, x: str, hint="rms") -> str:
        # T5LayerNorm: x * 1/sqrt(mean(x^2) + eps) * w (no mean subtraction, no bias), in the node
        # pattern of the PyTorch export, which ORT's transformer optimizer fuses into
        # SimplifiedLayerNormalization
        sq = self.op("Pow", [x, self.const(2.0, hint="two")], f"{hint}_sq")
        ms = self.op("ReduceMean", [sq], f"{hint}_ms", axes=[-1], keepdims=1)
        rms = self.op("Sqrt", [self.op("Add", [ms, self.const(1e-6, hint="eps")], f"{hint}_eps")], f"{hint}_rms")
        inv = self.op("Reciprocal", [rms], f"{hint}_inv")
        return self.op("Mul", [self.op("Mul", [x, inv], f"{hint}_norm"), self.filled((D,), 1.0, f"{hint}_w")], hint)

    def gelu(self, x: str, hint="gelu") -> str:
        # x * 0.5 * (1 + erf(x / sqrt 2)): the pattern ORT's transformer optimizer fuses into Gelu
        e = self.op("Erf", [self.op("Div", [x, self.const(math.sqrt(2.0), hint="sqrt2")], f"{hint}_div")], f"{hint}_erf")
        h = self.op("Mul", [x, self.op("Add", [e, self.const(1.0, hint="one")], f"{hint}_add")], f"{hint}_mul")
        return self.op("Mul", [h, self.const(0.5, hint="half")], hint)

    def attention(self, x: str, tokens: int, key_bias: str | None, bias: bool, hint="attn") -> str:
        """Multi-head self-attention, x [N,T,D] -> [N,T,D]; key_bias [N,1,1,T] (0 / -1e4) or None."""
        dh = D // HEADS
        split = self.const([0, -1, HEADS, dh], np.int64, "split_heads")
        q = self.op("Transpose", [self.op("Reshape", [self.linear(x, D, D, tokens, bias, hint=f"{hint}_q"), split])],
                    f"{hint}_qt", perm=[0, 2, 1, 3])                         # [N,H,T,dh]
        k = self.op("Transpose", [self.op("Reshape", [self.linear(x, D, D, tokens, bias, hint=f"{hint}_k"), split])],
                    f"{hint}_kt", perm=[0, 2, 3, 1])                         # [N,H,dh,T]
        v = self.op("Transpose", [self.op("Reshape", [self.linear(x, D, D, tokens, bias, hint=f"{hint}_v"), split])],
                    f"{hint}_vt", perm=[0, 2, 1, 3])                         # [N,H,T,dh]
        s = self.op("Div", [self.op("MatMul", [q, k], f"{hint}_qk"), self.const(math.sqrt(dh), hint="sqrt_dh")],
                    f"{hint}_scaled")
        if key_bias is not None:
            s = self.op("Add", [s, key_bias], f"{hint}_masked")
        p = self.op("Softmax", [s], f"{hint}_softmax", axis=-1)
        o = self.op("MatMul", [p, v], f"{hint}_pv")                          # [N,H,T,dh]
        self.macs += 2 * tokens * tokens * D
        o = self.op("Reshape", [self.op("Transpose", [o], f"{hint}_ot", perm=[0, 2, 1, 3]),
                                self.const([0, -1, D], np.int64, "merge_heads")], f"{hint}_merge")
        return self.linear(o, D, D, tokens, bias, hint=f"{hint}_o")

    def vit_block(self, x: str, tokens: int, key_bias: str | None, mlp: int, hint: str) -> str:
        """Pre-LN transformer block (ViT/BERT style, biases, GELU)."""
        x = self.op("Add", [x, self.attention(self.layer_norm(x, f"{hint}_ln1"), tokens, key_bias, True, f"{hint}_attn")],
                    f"{hint}_res1")
        h = self.gelu(self.linear(self.layer_norm(x, f"{hint}_ln2"), D, mlp, tokens, hint=f"{hint}_fc1"), f"{hint}_gelu")
        return self.op("Add", [x, self.linear(h, mlp, D, tokens, hint=f"{hint}_fc2")], f"{hint}_res2")

    def t5_block(self, x: str, tokens: int, key_bias: str, hint: str) -> str:
        """T5 encoder block: RMSNorm, attention without biases, ReLU MLP without biases."""
        x = self.op("Add", [x, self.attention(self.rms_norm(x, f"{hint}_rms1"), tokens, key_bias, False, f"{hint}_attn")],
                    f"{hint}_res1")
        h = self.op("Relu", [self.linear(self.rms_norm(x, f"{hint}_rms2"), D, T5_MLP, tokens, bias=False, hint=f"{hint}_wi")],
                    f"{hint}_relu")
        return self.op("Add", [x, self.linear(h, T5_MLP, D, tokens, bias=False, hint=f"{hint}_wo")], f"{hint}_res2")

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, out_hw: int, gain=1.0, relu=True,
             hint="conv") -> str:
        """k x k convolution with bias (BatchNorm folded), He-initialised (x gain), optional ReLU."""
        std = gain * math.sqrt(2.0 / (cin * k * k))
        y = self.op("Conv", [x, self.weight((cout, cin, k, k), std, f"{hint}_w"), self.filled((cout,), 0.0, f"{hint}_b")],
                    hint, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
        self.macs += out_hw * out_hw * cin * cout * k * k
        return self.op("Relu", [y], f"{hint}_relu") if relu else y

    def to_compute(self, x: str, hint="cast_in") -> str:
        return self.op("Cast", [x], hint, to=self.onnx_dt) if self.fp16 else x

    def to_f32(self, x: str, hint="cast_out") -> str:
        return self.op("Cast", [x], hint, to=TensorProto.FLOAT) if self.fp16 else x

    def model(self, name: str, doc: str, inputs, outputs, metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits, doc_string=doc)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                                  producer_name=PRODUCER, producer_version=BUNDLE_VERSION, model_version=1,
                                  doc_string=doc)
        metadata = dict(metadata, **{"retoucher.bundle": "bench", "retoucher.version": BUNDLE_VERSION,
                                     "retoucher.params": str(self.params),
                                     "retoucher.gflops_per_item": f"{2 * self.macs / 1e9:.1f}",
                                     "retoucher.dtype": "float16" if self.fp16 else "float32"})
        for k in sorted(metadata):
            entry = model.metadata_props.add()
            entry.key, entry.value = k, metadata[k]
        del graph
        self.inits = []  # the model holds its own copy; keep peak memory at ~2x the weights
        return model


def tensor(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


# ---------------------------------------------------------------------------------------------
# perception.onnx
# ---------------------------------------------------------------------------------------------
def key_bias(g: Graph, mask: str, hint: str) -> str:
    """int64 mask [N,T] (1 = attend) -> additive bias [N,1,1,T]: (1 - mask) * -1e4, in the node
    pattern of BERT exports (Unsqueeze, Unsqueeze, Cast, Sub, Mul) that ORT's attention fusion knows."""
    m = g.op("Unsqueeze", [mask, g.const([1], np.int64, "axis1")], f"{hint}_mask_u1")
    m = g.op("Unsqueeze", [m, g.const([2], np.int64, "axis2")], f"{hint}_mask_u2")
    m = g.op("Cast", [m], f"{hint}_mask_c", to=g.onnx_dt)
    m = g.op("Sub", [g.const(1.0, hint="one"), m], f"{hint}_mask_inv")
    return g.op("Mul", [m, g.const(-10000.0, hint="neg")], f"{hint}_key_bias")


def build_perception(rng, S: int, fp16: bool, magenta: bool) -> tuple[onnx.ModelProto, Graph]:
    assert S % PATCH == 0, f"--image-size must be a multiple of {PATCH}"
    g = Graph("perception", rng, fp16)
    G = S // PATCH
    P = G * G                 # image tokens
    L = MAX_TOKENS            # for the MAC count only; L is dynamic in the graph
    i64 = np.int64

    # --- image encoder: ViT-B/16 ---------------------------------------------------------------
    pix = g.to_compute("pixel_values", "pixel_values_c")
    patches = g.op("Conv", [pix, g.weight((D, 3, PATCH, PATCH), 0.02, "patch_w"), g.filled((D,), 0.0, "patch_b")],
                   "patch_embed", kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])      # [N,D,G,G]
    g.macs += P * 3 * PATCH * PATCH * D
    img = g.op("Reshape", [patches, g.const([0, D, -1], i64, "flatten_hw")], "patch_flat")  # [N,D,P]
    # position embedding added before the transpose, so the first LayerNorm is not fused with it
    # (that would hide the first attention from ORT's attention fusion)
    img = g.op("Add", [img, g.weight((1, D, P), 0.02, "vit_pos")], "vit_pos_add")
    img = g.op("Transpose", [img], "patch_tokens", perm=[0, 2, 1])                             # [N,P,D]
    for i in range(VIT_LAYERS):
        img = g.vit_block(img, P, None, VIT_MLP, f"vit{i}")
    img = g.layer_norm(img, "vit_ln_f")

    # --- text encoder: T5-base-sized (absolute learned positions instead of relative buckets) ---
    txt = g.op("Gather", [g.weight((T5_VOCAB, D), 0.02, "t5_embed"), "input_ids"], "t5_tokens", axis=0)  # [N,L,D]
    ids_shape = g.op("Shape", ["input_ids"], "ids_shape")
    seq_len = g.op("Slice", [ids_shape, g.const([1], i64, "one_i"), g.const([2], i64, "two_i")], "seq_len")
    pos = g.op("Slice", [g.weight((T5_MAX_POS, D), 0.02, "t5_pos"), g.const([0], i64, "zero_i"), seq_len,
                         g.const([0], i64, "axis0")], "t5_pos_l")                           # [L,D]
    txt = g.op("Add", [txt, pos], "t5_pos_add")
    text_bias = key_bias(g, "attention_mask", "text")                                        # [N,1,1,L]
    for i in range(T5_LAYERS):
        txt = g.t5_block(txt, L, text_bias, f"t5_{i}")
    txt = g.rms_norm(txt, "t5_final_rms")

    # --- fusion: self-attention over [image tokens ; text tokens] --------------------------------
    batch = g.op("Slice", [ids_shape, g.const([0], i64, "zero_i"), g.const([1], i64, "one_i")], "batch")
    img_mask = g.op("ConstantOfShape", [g.op("Concat", [batch, g.const([P], i64, "p_dim")], "img_mask_shape", axis=0)],
                    "img_mask", value=numpy_helper.from_array(np.ones(1, np.int64)))          # [N,P] of 1
    fused_mask = g.op("Concat", [img_mask, "attention_mask"], "fused_mask", axis=1)         # [N,P+L]
    fused_bias = key_bias(g, fused_mask, "fused")                                            # [N,1,1,P+L]
    x = g.op("Concat", [img, txt], "fused_tokens", axis=1)                                  # [N,P+L,D]
    for i in range(FUSION_LAYERS):
        x = g.vit_block(x, P + L, fused_bias, FUSION_MLP, f"fusion{i}")
    x = g.layer_norm(x, "fusion_ln_f")

    # --- head: each image token -> its 16x16 saliency patch -------------------------------------
    x = g.op("Slice", [x, g.const([0], i64, "zero_i"), g.const([P], i64, "p_end"), g.const([1], i64, "axis1")],
             "image_tokens")                                                                 # [N,P,D]
    y = g.linear(x, D, PATCH * PATCH, P, bias_value=SALIENCY_HEAD_BIAS, hint="head")        # [N,P,256]
    y = g.op("Reshape", [g.op("Transpose", [y], "head_t", perm=[0, 2, 1]), g.const([0, PATCH * PATCH, G, G], i64, "grid")],
             "head_grid")                                                                    # [N,256,G,G]
    y = g.op("DepthToSpace", [y], "head_d2s", blocksize=PATCH, mode="DCR")                   # [N,1,S,S]
    sal = g.to_f32(g.op("Sigmoid", [y], "head_sigmoid"), "saliency_f32")

    if magenta:
        # The reference rule on the raw RGB, in f32 (models/README.md):
        #   s = sigmoid(40 (0.35^2 - |rgb - magenta|^2)) * (1 - any unmasked token == 53)
        # saliency = max(0.45 * random_map, s): above 0.5 exactly where the reference's map is.
        sal = g.op("Mul", [sal, g.const(RANDOM_SALIENCY_CAP, np.float32, "cap")], "random_capped")
        rgb = g.op("Add", [g.op("Mul", ["pixel_values", g.const(np.reshape(PERCEPTION_STD, (1, 3, 1, 1)), np.float32, "std")],
                                "unstd"), g.const(np.reshape(PERCEPTION_MEAN, (1, 3, 1, 1)), np.float32, "mean")], "rgb")
        diff = g.op("Sub", [rgb, g.const(np.reshape([1.0, 0.0, 1.0], (1, 3, 1, 1)), np.float32, "magenta_rgb")], "diff")
        d2 = g.op("ReduceSum", [g.op("Mul", [diff, diff], "sq"), g.const([1], i64, "axis_c")], "d2", keepdims=1)
        s = g.op("Sigmoid", [g.op("Mul", [g.op("Sub", [g.const(RADIUS * RADIUS, np.float32, "r2"), d2], "margin"),
                                          g.const(SHARPNESS, np.float32, "sharpness")], "logit")], "magenta_s")
        hit = g.op("Mul", [g.op("Cast", [g.op("Equal", ["input_ids", g.const(MAGENTA_ID, i64, "magenta_id")], "is_magenta")],
                                "is_magenta_f", to=TensorProto.FLOAT),
                           g.op("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)], "hit")
        gate = g.op("Sub", [g.const(1.0, np.float32, "one_f"), g.op("ReduceMax", [hit], "any_hit", axes=[1], keepdims=1)], "gate")
        s = g.op("Mul", [s, g.op("Unsqueeze", [gate, g.const([2, 3], i64, "axes_hw")], "gate4")], "magenta_gated")
        g.op("Max", [sal, s], "saliency", out="saliency")
    else:
        g.op("Identity", [sal], "saliency", out="saliency")

    doc = (f"Bench perception agent (random weights, for speed measurements only). ViT/16 image encoder "
           f"({VIT_LAYERS} layers, d={D}) over {G}x{G} patches of a {S}x{S} image, T5-base-sized text encoder ({T5_LAYERS} layers, d={D}, vocab {T5_VOCAB}, learned "
           f"absolute positions), {FUSION_LAYERS} fusion self-attention layers over the concatenated tokens, and a "
           f"Linear {D}->256 head per image token rearranged (DepthToSpace 16) into a full-resolution {S}x{S} map, "
           f"sigmoid(head - 4)." +
           (" Plus the reference rule: saliency = max(0.45 * that map, sigmoid(40*(0.35^2 - d^2)) * gate), d = distance "
            "of the raw RGB to magenta, gate = 0 when an unmasked input id is 53 ('magenta')." if magenta else ""))
    model = g.model("retoucher_bench_perception", doc,
                    [tensor("pixel_values", TensorProto.FLOAT, ["N", 3, S, S]),
                     tensor("input_ids", TensorProto.INT64, ["N", "L"]),
                     tensor("attention_mask", TensorProto.INT64, ["N", "L"])],
                    [tensor("saliency", TensorProto.FLOAT, ["N", 1, S, S])],
                    {"retoucher.agent": "perception", "retoucher.magenta_rule": str(magenta).lower()})
    return model, g


# ---------------------------------------------------------------------------------------------
# classifier.onnx: ResNet-18, 4 input channels
# ---------------------------------------------------------------------------------------------
def build_classifier(rng, C: int, fp16: bool, magenta: bool) -> tuple[onnx.ModelProto, Graph]:
    assert C % 32 == 0, "--classifier-size must be a multiple of 32"
    g = Graph("classifier", rng, fp16)
    k = len(CATEGORIES)
    hw = C // 2
    x = g.conv(g.to_compute("pixel_values", "pixel_values_c"), 4, CLASSIFIER_CH[0], 7, 2, hw, hint="conv1")
    hw //= 2
    x = g.op("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = CLASSIFIER_CH[0]
    for stage, cout in enumerate(CLASSIFIER_CH):
        for blk in range(2):
            stride = 2 if (stage > 0 and blk == 0) else 1
            hw_out = hw // stride
            h = g.conv(x, cin, cout, 3, stride, hw_out, hint=f"l{stage + 1}.{blk}.conv1")
            h = g.conv(h, cout, cout, 3, 1, hw_out, gain=0.5, relu=False, hint=f"l{stage + 1}.{blk}.conv2")
            short = x if stride == 1 and cin == cout else \
                g.conv(x, cin, cout, 1, stride, hw_out, relu=False, hint=f"l{stage + 1}.{blk}.down")
            x = g.op("Relu", [g.op("Add", [h, short], f"l{stage + 1}.{blk}.add")], f"l{stage + 1}.{blk}.relu")
            cin, hw = cout, hw_out
    feat = g.op("Flatten", [g.op("GlobalAveragePool", [x], "gap")], "features", axis=1)    # [N,cin]
    net = g.op("Gemm", [feat, g.weight((cin, k), 0.02, "fc_w"), g.filled((k,), 0.0, "fc_b")], "fc")
    g.macs += cin * k
    net = g.to_f32(net, "fc_f32")

    if magenta:
        # Reference rule on m = mean of channel 3 (the region mask; the worker does not normalise it):
        # logits[hand] = 20 (m - 0.3), logits[object] = -20 (m - 0.3), others -8; plus 1e-3 tanh(net).
        w = np.zeros((4, k), np.float32)
        b = np.full((k,), OTHER_LOGIT, np.float32)
        w[3, HAND], b[HAND] = COVERAGE_GAIN, -COVERAGE_GAIN * COVERAGE_THRESHOLD
        w[3, OBJECT], b[OBJECT] = -COVERAGE_GAIN, COVERAGE_GAIN * COVERAGE_THRESHOLD
        means = g.op("Flatten", [g.op("GlobalAveragePool", ["pixel_values"], "channel_means")], "channel_means_flat", axis=1)
        rule = g.op("Gemm", [means, g.const(w, np.float32, "rule_w"), g.const(b, np.float32, "rule_b")], "rule")
        jitter = g.op("Mul", [g.op("Tanh", [net], "fc_tanh"), g.const(CLASSIFIER_RANDOM_SCALE, np.float32, "jitter")], "jitter")
        g.op("Add", [rule, jitter], "logits", out="logits")
    else:
        g.op("Identity", [net], "logits", out="logits")

    doc = (f"Bench region classifier (random weights, for speed measurements only): ResNet-18 (BatchNorm folded) over a "
           f"4-channel {C}x{C} crop (RGB + region mask) -> {k} logits in taxonomy order." +
           (" Plus the reference rule on the mask coverage m (hand iff m >= 0.30), which dominates: "
            "logits = rule + 1e-3 * tanh(resnet)." if magenta else ""))
    model = g.model("retoucher_bench_classifier", doc,
                    [tensor("pixel_values", TensorProto.FLOAT, ["N", 4, C, C])],
                    [tensor("logits", TensorProto.FLOAT, ["N", k])],
                    {"retoucher.agent": "reasoning", "retoucher.categories": ",".join(CATEGORIES),
                     "retoucher.magenta_rule": str(magenta).lower()})
    return model, g


# ---------------------------------------------------------------------------------------------
# inpaint.onnx: LaMa-sized encoder-decoder
# ---------------------------------------------------------------------------------------------
def build_inpaint(rng, S: int, fp16: bool) -> tuple[onnx.ModelProto, Graph]:
    assert S % 8 == 0, "--inpaint-size must be a multiple of 8"
    g = Graph("inpaint", rng, fp16)
    one = g.const(1.0, np.float32, "one_f")
    known = g.op("Sub", [one, "mask"], "known")                                            # f32 [N,1,S,S]
    masked = g.op("Mul", ["image", known], "masked_image")
    x = g.to_compute(g.op("Concat", [masked, "mask"], "net_in", axis=1), "net_in_c")       # [N,4,S,S]
    c0, c1, c2, c3 = INPAINT_CH
    hw = S
    x = g.conv(x, 4, c0, 7, 1, hw, hint="enc0")
    for i, (ci, co) in enumerate([(c0, c1), (c1, c2), (c2, c3)]):
        hw //= 2
        x = g.conv(x, ci, co, 3, 2, hw, hint=f"down{i}")
    for i in range(INPAINT_RESBLOCKS):
        h = g.conv(x, c3, c3, 3, 1, hw, hint=f"res{i}.conv1")
        h = g.conv(h, c3, c3, 3, 1, hw, gain=0.3, relu=False, hint=f"res{i}.conv2")
        x = g.op("Add", [x, h], f"res{i}.add")
    up = g.const([1.0, 1.0, 2.0, 2.0], np.float32, "up2")
    for i, (ci, co) in enumerate([(c3, c2), (c2, c1), (c1, c0)]):
        hw *= 2
        x = g.op("Resize", [x, "", up], f"up{i}", mode="nearest")
        x = g.conv(x, ci, co, 3, 1, hw, hint=f"upconv{i}")
    x = g.conv(x, c0, 3, 7, 1, hw, gain=0.1, relu=False, hint="out_conv")
    # pred in [0.25, 0.75] * 255: never near magenta, so a repaired blemish is not found again
    pred = g.op("Sigmoid", [g.to_f32(x, "out_f32")], "out_sigmoid")
    pred = g.op("Mul", [g.op("Add", [g.op("Mul", [pred, g.const(0.5, np.float32, "half")], "pred_half"),
                                      g.const(0.25, np.float32, "quarter")], "pred_band"),
                        g.const(255.0, np.float32, "s255")], "pred255")
    kept = g.op("Mul", [g.op("Mul", ["image", g.const(255.0, np.float32, "s255b")], "image255"), known], "kept")
    blend = g.op("Add", [kept, g.op("Mul", [pred, "mask"], "filled")], "blend")
    g.op("Clip", [blend, g.const(0.0, np.float32, "zero_f"), g.const(255.0, np.float32, "max255")], "output", out="output")

    doc = (f"Bench inpainter (random weights, for speed measurements only; LaMa-ONNX convention). image f32 [N,3,{S},{S}] "
           f"in [0,1], mask f32 [N,1,{S},{S}] with 1 = hole -> output f32 [N,3,{S},{S}] in [0,255]. Conv encoder "
           f"(7x7 to 64, three stride-2 3x3 convs to 512), {INPAINT_RESBLOCKS} residual blocks of two 3x3 convs at 1/8 "
           f"resolution, nearest Resize x2 + 3x3 conv back up, 7x7 to RGB, pred = 255 * (0.25 + 0.5 * sigmoid). "
           f"output = clip(255 * image * (1 - mask) + pred * mask, 0, 255): known pixels are kept.")
    model = g.model("retoucher_bench_inpaint", doc,
                    [tensor("image", TensorProto.FLOAT, ["N", 3, S, S]),
                     tensor("mask", TensorProto.FLOAT, ["N", 1, S, S])],
                    [tensor("output", TensorProto.FLOAT, ["N", 3, S, S])],
                    {"retoucher.agent": "action", "retoucher.tool": "onnx-inpaint"})
    return model, g


# ---------------------------------------------------------------------------------------------
# bundle.toml
# ---------------------------------------------------------------------------------------------
def toml_str(s: str) -> str:
    import json
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def toml_floats(v) -> str:
    return "[" + ", ".join(repr(float(x)) for x in v) + "]"


def reference_descriptions() -> str:
    """The [taxonomy.descriptions] table of the reference bundle, verbatim."""
    lines, inside = [], False
    with open(os.path.join(REFERENCE, "bundle.toml"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("["):
                inside = line.strip() == "[taxonomy.descriptions]"
                continue
            if inside and line.strip():
                lines.append(line.rstrip("\n"))
    assert any(l.startswith("default = ") for l in lines), "reference bundle.toml has no default description"
    return "\n".join(lines)


def build_bundle_toml(args, hashes: dict[str, str], summary: str) -> str:
    cats = ", ".join(toml_str(c) for c in CATEGORIES)
    files = "\n".join(f"{toml_str(name)} = {toml_str(h)}" for name, h in hashes.items())
    flags = f"--image-size {args.image_size} --classifier-size {args.classifier_size} --inpaint-size {args.inpaint_size} " \
            f"--seed {args.seed}" + (" --fp16" if args.fp16 else "") + (" --tiny" if args.tiny else "") + ("" if args.magenta else " --no-magenta")
    rule = ("Each model also carries the reference bundle's rule as a cheap side branch, so runs behave like the "
            "reference: magenta blemishes are found, blobs are 'hand' (onnx-inpaint), strokes 'object' (patchmatch), "
            "and the inpainter never paints magenta back." if args.magenta else
            "No reference rule: saliency stays far below 0.5, so every image comes back clean after one perception call.")
    description = ("Benchmark bundle: the reference bundle's contracts at realistic model sizes with seeded RANDOM "
                   f"weights, for speed measurements only. {summary} {rule}")
    return f"""# Generated by models/bench/generate.py {flags} -- do not edit by hand; rerun the script.
schema = 1
name = "bench"
version = "{BUNDLE_VERSION}"
description = {toml_str(description)}

[taxonomy]
categories = [{cats}]

[taxonomy.descriptions]
{reference_descriptions()}

[defaults]
saliency_threshold = 0.5
max_iterations = 3

[perception]
model = "perception.onnx"
tokenizer = "tokenizer.json"
input_size = {args.image_size}
max_tokens = {MAX_TOKENS}
mean = {toml_floats(PERCEPTION_MEAN)}
std = {toml_floats(PERCEPTION_STD)}

[reasoning]
mode = "regions"
classifier = "classifier.onnx"
input_size = {args.classifier_size}
mean = {toml_floats(CLASSIFIER_MEAN)}
std = {toml_floats(CLASSIFIER_STD)}
min_region_pixels = 16
dilate_pixels = 4
feather_pixels = 2
max_regions = 16
context = 0.05

[action]
default_tool = "patchmatch"

[action.routing]
hand = "onnx-inpaint"

[action.tools.onnx-inpaint]
model = "inpaint.onnx"
input_size = {args.inpaint_size}
output_range = [0.0, 255.0]
context = 1.0

[action.tools.patchmatch]
patch_size = 7
iterations = 4

[batching.perception]
max_batch_size = 32
max_delay_ms = 10

[batching.classifier]
max_batch_size = 32
max_delay_ms = 5

[batching.inpaint]
max_batch_size = 16
max_delay_ms = 10

[files]
{files}
"""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def check_tokenizer_magenta_id(path: str) -> None:
    import json
    with open(path, encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    assert vocab.get("magenta") == MAGENTA_ID, f"'magenta' is {vocab.get('magenta')} in {path}, expected {MAGENTA_ID}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="output folder (created if missing; existing bundle files are overwritten)")
    ap.add_argument("--image-size", type=int, default=512, help="perception input S (multiple of 16; default 512)")
    ap.add_argument("--classifier-size", type=int, default=224, help="classifier crop size C (default 224)")
    ap.add_argument("--inpaint-size", type=int, default=None, help="inpainter size (default: --image-size)")
    ap.add_argument("--fp16", action="store_true",
                    help="float16 weights and compute (inputs/outputs stay float32). Meant for GPUs; ONNX Runtime's "
                         "CPU provider runs it too, casting to float32 around ops without float16 kernels")
    ap.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    ap.add_argument("--no-magenta", dest="magenta", action="store_false",
                    help="pure random networks, without the reference rules (every image comes back clean)")
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip onnx.checker.check_model")
    ap.add_argument("--tiny", action="store_true",
                    help="same contracts, sizes and rules with tiny networks (width 32, one layer each): measures "
                         "the worker's own cost at the benchmark sizes on a machine without a GPU")
    args = ap.parse_args(argv)
    if args.tiny:
        use_tiny_sizes()
    if args.inpaint_size is None:
        args.inpaint_size = args.image_size
    os.makedirs(args.out_dir, exist_ok=True)
    tok_src = os.path.join(REFERENCE, "tokenizer.json")
    check_tokenizer_magenta_id(tok_src)

    t0 = time.time()
    hashes: dict[str, str] = {}
    lines: list[str] = []
    # one independent stream per model, so changing one model's size does not change the others
    seeds = np.random.SeedSequence(args.seed).spawn(3)
    builds = (("perception.onnx", lambda r: build_perception(r, args.image_size, args.fp16, args.magenta)),
              ("classifier.onnx", lambda r: build_classifier(r, args.classifier_size, args.fp16, args.magenta)),
              ("inpaint.onnx", lambda r: build_inpaint(r, args.inpaint_size, args.fp16)))
    summary = []
    for (name, build), seed in zip(builds, seeds):
        model, g = build(np.random.default_rng(seed))
        path = os.path.join(args.out_dir, name)
        data = model.SerializeToString(deterministic=True)
        del model
        with open(path, "wb") as f:
            f.write(data)
        hashes[name] = hashlib.sha256(data).hexdigest()
        del data
        if args.check:
            onnx.checker.check_model(path, full_check=False)  # by path: works for models of any size
        size = os.path.getsize(path)
        gflops = 2 * g.macs / 1e9
        summary.append(f"{name.split('.')[0]}: {g.params / 1e6:.1f}M params, ~{gflops:.0f} GFLOPs per item")
        lines.append(f"  {name:16s} {size / 1e6:8.1f} MB  {g.params / 1e6:6.1f}M params  ~{gflops:6.1f} GFLOPs/item  "
                     f"({time.time() - t0:.0f}s)")
        print(lines[-1], flush=True)
    shutil.copyfile(tok_src, os.path.join(args.out_dir, "tokenizer.json"))
    hashes["tokenizer.json"] = sha256_file(os.path.join(args.out_dir, "tokenizer.json"))
    with open(os.path.join(args.out_dir, "bundle.toml"), "w", encoding="utf-8") as f:
        f.write(build_bundle_toml(args, hashes, "; ".join(summary) + "."))

    print(f"wrote bench bundle to {args.out_dir} in {time.time() - t0:.0f}s "
          f"({'float16' if args.fp16 else 'float32'}, seed {args.seed}, reference rules {'on' if args.magenta else 'off'})")
    for name, h in hashes.items():
        print(f"  {h}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
