#!/usr/bin/env python3
"""Convert a retoucher model bundle to float16, optionally with ONNX Runtime's transformer fusions.

    python models/export/fp16.py SRC_BUNDLE OUT_BUNDLE [--io f32|f16] [--fuse auto|force|none]
        [--only ROLE,...] [--keep-fp32 OP,...] [--report FILE.json] [--batch 2] [--threads 2]

Reads SRC_BUNDLE/bundle.toml, converts every ONNX model it names to float16 with ONNX Runtime's
own converter (`onnxruntime.transformers.float16.convert_float_to_float16`), copies every other
file of `[files]` unchanged, and writes OUT_BUNDLE/bundle.toml: the source manifest with a header
line and a sentence in `description` saying how it was converted, and the new sha256 of each
converted file in `[files]`, formatted as `retoucher bundle lock` writes them (file names do not
change). Roles (for `--only`): perception, classifier, inpaint (tool onnx-inpaint),
diffusion/<part> (text_encoder, unet, vae_encoder, vae_decoder of a diffusers export), vlm/<key>
(vision_encoder, embed_tokens, decoder); `--only diffusion` or `--only vlm` selects all parts.
Models not selected are copied unchanged.

Precision (models/README.md, "fp16 bundles and fused attention"):
- `--io f32` (default, `keep_io_types=True`): the graph still takes and returns float32, so the
  worker and the bundle contract see no difference; `--io f16` keeps float16 at the edges too.
- Only the part of a graph between learned weights is converted. Nodes that no weight (a float
  initializer of more than 64 values) precedes (pre-processing, side branches on the raw inputs
  such as the bench bundle's reference rules, attention-mask arithmetic) and nodes that no heavy
  op (MatMul, Gemm, Conv, attention) follows (post-processing: bias, sigmoid, scaling to 0..255,
  the inpainter's known-pixel composite, a noise-schedule lookup) stay float32: they cost almost
  nothing, and in float16 they would move thresholds (a sigmoid of 40 * (r^2 - d^2)), round kept
  pixels (255 * x has a step of 0.125 in float16) or cancel (1 - alphas_cumprod[t] near 1).
  A model with no node in that span (an analytic inpainter) is copied unchanged. A Gather from a
  table of 65536 values or more counts as a heavy op (an embedding, kept in float16).
- Blocked op types: ONNX Runtime's DEFAULT_OP_BLOCK_LIST (Max, Min, Range, CumSum, TopK, Upsample,
  ...) plus `--keep-fp32`. Blocked nodes: the statistics of an unfused RMSNorm / decomposed
  LayerNorm (Pow(x, 2) or Mul(x, x) -> ReduceMean -> Add(eps) -> Sqrt [-> Reciprocal]), because x^2
  overflows float16 once |x| > 256 (T5 activations get there) and the mean of squares beyond
  65504 becomes inf. Fused (Skip)(Simplified)LayerNormalization kernels accumulate in float32.

Fusion (`--fuse auto`, default): runs `onnxruntime.transformers.optimizer.optimize_model`
(opt_level 0: its Python fusions only, no provider-specific rewrites) with the model types that
fit the role (perception: bert, vit, t5; diffusion text_encoder: clip, unet: unet, vae_*: vae;
classifier and inpaint only when they contain Softmax / LayerNormalization / Erf), on the float32
graph, then converts. A fused graph is kept only when (1) the fused float32 graph runs on the CPU
provider and matches the original within 1e-4 x max(1, max|y|) on each output and on every float
tensor both graphs still have (an output alone can hide a wrong fusion: `vit` fuses attention
with NoMask, dropping a padding mask, which the saliency barely shows), and (2) its float16 conversion
runs on the CPU and is no worse than twice the unfused float16 graph's max difference + 1e-3 x
max(1, max|y|). Fused ops with no CPU kernel in this onnxruntime (e.g. GroupNorm, NhwcConv,
BiasSplitGelu of the unet/vae fusions: CUDA kernels only) cannot be checked here; they are reported
and the fusion is dropped, unless `--fuse force` keeps it unchecked. VLM graphs are converted but
not fused (decoder with a KV cache: use the exporter's own optimised files). Needs sympy
(models/export/requirements-fp16.txt); without it `--fuse auto` reports that and converts unfused.

Report (stdout, and `--report FILE` as JSON): per model, nodes before/after, fused op counts,
nodes kept in float32, size in MB before/after, whether it runs on the CPU, and max/mean absolute
difference of its output vs the float32 model on a deterministic input on the CPU provider
(batch `--batch`, seeded synthetic pictures with a magenta disk and the bundle's tokenizer for
prompts; the real-photo parity check is fp16_check.py).

Deterministic: the same SRC and flags give byte-identical files (the script re-executes itself
with PYTHONHASHSEED=0 so the optimizer's set iteration is stable). Python >= 3.11, the pins of
models/requirements.txt (onnx 1.23.2, onnxruntime 1.31.1, numpy 2.4.6, tokenizers) + sympy.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time
import tomllib

os.environ.setdefault("TQDM_DISABLE", "1")     # the unet fusion's progress bars
if os.environ.get("PYTHONHASHSEED") != "0" and __name__ == "__main__":
    # The transformer optimizer iterates over sets of names in places: fix the hash seed so the
    # fused graph (node order and names) is the same on every run.
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

import onnxruntime as ort
from onnxruntime.transformers import float16 as ort_float16

from write_bundle import external_files, sha256_file  # same folder: the bundle writers share them

MANIFEST = "bundle.toml"
TWO_GB = 2**31 - 2**26            # save with external data beyond this (protobuf's 2 GB limit, with margin)
WEIGHT_MIN_VALUES = 64            # a float initializer with more values than this is a learned weight
EMBEDDING_MIN_VALUES = 1 << 16    # a Gather from a table this large is an embedding (heavy); smaller: a lookup table
FUSED_OPS = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "SkipLayerNormalization",
             "LayerNormalization", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
             "EmbedLayerNormalization", "Gelu", "BiasGelu", "FastGelu", "QuickGelu", "BiasSplitGelu",
             "BiasAdd", "GroupNorm", "SkipGroupNorm", "NhwcConv", "RotaryEmbedding")
FUSE_TOL = 1e-4                   # fused f32 vs f32, on the outputs and on every float tensor both graphs still
                                  # have: max|diff| <= FUSE_TOL * max(1, max|y|) for each
FP16_SLACK = 1e-3                 # fused f16 vs f32 may exceed the unfused f16's diff by 2x + this * scale
CONVENTIONAL_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<PAD>")   # src/agents/text.rs
PROMPTS = ("a red coffee cup on a wooden table, award-winning photo", "a magenta sky over the sea")

log = logging.getLogger("fp16")


# ---------------------------------------------------------------------------------------------
# The bundle: which files are models, and of which role
# ---------------------------------------------------------------------------------------------
def model_roles(manifest: dict, root: str) -> list[tuple[str, str]]:
    """(role, path relative to the bundle) of every ONNX model the manifest uses, in manifest order."""
    found: list[tuple[str, str]] = []

    def add(role: str, rel: str | None) -> None:
        if rel and rel.endswith(".onnx") and rel not in [p for _, p in found]:
            found.append((role, rel))

    add("perception", manifest.get("perception", {}).get("model"))
    reasoning = manifest.get("reasoning", {})
    if reasoning.get("mode", "regions") == "regions":
        add("classifier", reasoning.get("classifier"))
    vlm = reasoning.get("vlm", {})
    for key in ("vision_encoder", "embed_tokens", "decoder"):
        add(f"vlm/{key}", vlm.get(key))
    for name, tool in manifest.get("action", {}).get("tools", {}).items():
        if not isinstance(tool, dict):
            continue
        add("inpaint" if name == "onnx-inpaint" else f"tool/{name}", tool.get("model"))
        export = tool.get("export")
        if isinstance(export, str) and os.path.isdir(os.path.join(root, export)):
            for part in sorted(os.listdir(os.path.join(root, export))):
                rel = f"{export}/{part}/model.onnx"
                if os.path.isfile(os.path.join(root, rel)):
                    add(f"diffusion/{part}", rel)
    return found


def selected(role: str, only: list[str] | None) -> bool:
    return only is None or role in only or role.split("/")[0] in only


# ---------------------------------------------------------------------------------------------
# Deterministic validation inputs
# ---------------------------------------------------------------------------------------------
def encode_prompt(tokenizer_path: str, prompt: str, max_tokens: int, add_special: bool,
                  pad_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The prompt as src/agents/text.rs encodes it: truncation to max_tokens inside the tokenizer
    (special tokens kept), then right padding with the encoder's pad id."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        # no `tokenizers` (a bare GPU machine): seeded ids below the vocabulary size, half padded
        with open(tokenizer_path, encoding="utf-8") as f:
            vocab = len(json.load(f).get("model", {}).get("vocab", {})) or 100
        n = max(1, max_tokens // 2)
        rng = np.random.default_rng(len(prompt))
        ids = list(rng.integers(1, vocab, n)) + [pad_id or 0] * (max_tokens - n)
        return np.asarray(ids, np.int64), np.asarray([1] * n + [0] * (max_tokens - n), np.int64)
    tok = Tokenizer.from_file(tokenizer_path)
    if pad_id is None:
        pad_id = tok.padding["pad_id"] if tok.padding else None
    if pad_id is None:
        pad_id = next((tok.token_to_id(t) for t in CONVENTIONAL_PAD_TOKENS if tok.token_to_id(t) is not None), None)
    if pad_id is None:
        raise ValueError(f"{tokenizer_path} names no pad token; set pad_id in the bundle")
    tok.enable_truncation(max_length=max_tokens, strategy="longest_first", direction="right", stride=0)
    tok.no_padding()
    ids = tok.encode(prompt, add_special_tokens=add_special).ids[:max_tokens]
    mask = [1] * len(ids) + [0] * (max_tokens - len(ids))
    ids = ids + [pad_id] * (max_tokens - len(ids))
    return np.asarray(ids, np.int64), np.asarray(mask, np.int64)


def synthetic_rgb(rng: np.random.Generator, size: int, disk: bool) -> np.ndarray:
    """A smooth picture-like HxWx3 float image in [0,1] (low-frequency noise), optionally with a
    magenta disk (the bench/reference bundles' blemish)."""
    coarse = rng.random((3, 9, 9))
    yy = np.linspace(0, 8, size)
    # separable linear interpolation of the 9x9 grid
    i0 = np.clip(np.floor(yy).astype(int), 0, 7)
    t = (yy - i0)[None, :]
    rows = coarse[:, i0, :] * (1 - t[..., None]) + coarse[:, i0 + 1, :] * t[..., None]      # [3,S,9]
    img = rows[:, :, i0] * (1 - t[None]) + rows[:, :, i0 + 1] * t[None]                       # [3,S,S]
    img = np.clip(img + 0.05 * rng.standard_normal(img.shape), 0, 1).transpose(1, 2, 0)
    if disk:
        cy, cx, r = size * 0.4, size * 0.55, size * 0.12
        y, x = np.ogrid[:size, :size]
        img[(y - cy) ** 2 + (x - cx) ** 2 <= r * r] = (1.0, 0.0, 1.0)
    return img.astype(np.float32)


def disk_mask(size: int, frac: float = 0.25) -> np.ndarray:
    y, x = np.ogrid[:size, :size]
    return (((y - size / 2) ** 2 + (x - size / 2) ** 2) <= (frac * size) ** 2).astype(np.float32)


def dim_values(value_info, fallback: dict[str, int]) -> list[int]:
    dims = []
    for i, d in enumerate(value_info.type.tensor_type.shape.dim):
        dims.append(d.dim_value if d.dim_value > 0 else fallback.get(d.dim_param, 1 if i == 0 else 8))
    return dims


def make_inputs(role: str, model: onnx.ModelProto, manifest: dict, root: str, batch: int) -> dict[str, np.ndarray]:
    """Seeded inputs for the model's graph inputs, following the bundle's contract where known."""
    rng = np.random.default_rng(20240613)
    names = {i.name for i in model.graph.input}
    if role == "perception" and {"pixel_values", "input_ids", "attention_mask"} <= names:
        spec = manifest["perception"]
        s = int(spec["input_size"])
        mean = np.asarray(spec.get("mean", [0, 0, 0]), np.float32).reshape(3, 1, 1)
        std = np.asarray(spec.get("std", [1, 1, 1]), np.float32).reshape(3, 1, 1)
        pix = [((synthetic_rgb(rng, s, disk=(b % 2 == 0)).transpose(2, 0, 1) - mean) / std) for b in range(batch)]
        toks = [encode_prompt(os.path.join(root, spec["tokenizer"]), PROMPTS[b % len(PROMPTS)], int(spec["max_tokens"]),
                              bool(spec.get("add_special_tokens", True)), spec.get("pad_id")) for b in range(batch)]
        return {"pixel_values": np.stack(pix).astype(np.float32), "input_ids": np.stack([t[0] for t in toks]),
                "attention_mask": np.stack([t[1] for t in toks])}
    if role == "classifier" and names == {"pixel_values"}:
        spec = manifest["reasoning"]
        c = int(spec["input_size"])
        mean = np.asarray(spec.get("mean", [0, 0, 0]), np.float32).reshape(3, 1, 1)
        std = np.asarray(spec.get("std", [1, 1, 1]), np.float32).reshape(3, 1, 1)
        items = []
        for b in range(batch):
            rgb = (synthetic_rgb(rng, c, disk=True).transpose(2, 0, 1) - mean) / std
            items.append(np.concatenate([rgb, disk_mask(c, 0.2 + 0.15 * b)[None]]))
        return {"pixel_values": np.stack(items).astype(np.float32)}
    if role == "inpaint" and names == {"image", "mask"}:
        s = int(manifest["action"]["tools"]["onnx-inpaint"]["input_size"])
        image = np.stack([synthetic_rgb(rng, s, disk=True).transpose(2, 0, 1) for _ in range(batch)])
        mask = np.stack([disk_mask(s, 0.15 + 0.1 * b)[None] for b in range(batch)])
        return {"image": image.astype(np.float32), "mask": mask}
    # Generic: dynamic dims -> batch for the first, 8 otherwise; floats N(0,1), ints small.
    feeds = {}
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = dim_values(vi, {})
        if shape:
            shape[0] = batch if not vi.type.tensor_type.shape.dim[0].dim_value else shape[0]
        elem = vi.type.tensor_type.elem_type
        if elem in (TensorProto.FLOAT, TensorProto.FLOAT16):
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32 if elem == TensorProto.FLOAT else np.float16)
        elif elem in (TensorProto.INT64, TensorProto.INT32):
            feeds[vi.name] = rng.integers(0, 8, shape).astype(np.int64 if elem == TensorProto.INT64 else np.int32)
        elif elem == TensorProto.BOOL:
            feeds[vi.name] = np.ones(shape, bool)
        else:
            raise ValueError(f"no synthetic input for {vi.name} (element type {elem})")
    return feeds


# ---------------------------------------------------------------------------------------------
# Running on the CPU provider
# ---------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, threads: int):
        self.threads = threads

    def run(self, model: onnx.ModelProto, feeds: dict[str, np.ndarray], tmpdir: str) -> tuple[list[np.ndarray] | None, str | None]:
        """Outputs, or None and why the CPU provider could not build or run the graph."""
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            if model.ByteSize() > TWO_GB:
                path = os.path.join(tmpdir, "validate.onnx")
                onnx.save_model(model, path, save_as_external_data=True, location="validate.onnx.data")
                sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            else:
                sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            names = {i.name for i in sess.get_inputs()}
            typed = {}
            for i in sess.get_inputs():
                v = feeds[i.name]
                if i.type == "tensor(float16)":
                    v = v.astype(np.float16)
                elif i.type == "tensor(float)":
                    v = v.astype(np.float32)
                typed[i.name] = v
            assert names == set(typed)
            return [np.asarray(o) for o in sess.run(None, typed)], None
        except Exception as e:  # noqa: BLE001 - reported, never fatal
            return None, " ".join(str(e).split())[:400]


def float_tensors(model: onnx.ModelProto) -> dict[str, int]:
    """Node outputs whose inferred type is float32 (ONNX shape inference; {} past 2 GB)."""
    if model.ByteSize() > TWO_GB:
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001
        return {}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    produced = [o for n in model.graph.node for o in n.output if o]
    return {o: types[o] for o in produced if types.get(o) == TensorProto.FLOAT}


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model that also returns the named float tensors."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in copy.graph.output}
    for name in names:
        if name not in have:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return copy


def worst_relative(ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> tuple[float, str]:
    """max over tensors of max|a - b| / max(1, max|a|), and the tensor where it is reached."""
    worst, where = 0.0, ""
    for name, a in ref.items():
        b = out.get(name)
        if b is None or a.shape != b.shape:
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        rel = float(np.abs(a64 - b64).max()) / max(1.0, float(np.abs(a64).max())) if a.size else 0.0
        if not np.isfinite(rel) or rel > worst:
            worst, where = (rel if np.isfinite(rel) else float("inf")), name
    return worst, where


def cpu_kernels() -> dict[tuple[str, str], set[str]]:
    """(domain, op) -> the element types this onnxruntime's CPU provider has kernels for."""
    from onnxruntime.capi import _pybind_state as C
    table: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for k in C.get_all_opkernel_def():
        if k.provider == "CPUExecutionProvider":
            for types in k.type_constraints.values():
                table[(k.domain or "", k.op_name)].update(types)
    return table


def missing_cpu_kernels(model: onnx.ModelProto, kernels) -> list[str]:
    """Contrib ops of the graph with no CPU kernel at all (CUDA-only fusions)."""
    out = set()
    for n in model.graph.node:
        if n.domain in ("com.microsoft",) and (n.domain, n.op_type) not in kernels:
            out.add(n.op_type)
    return sorted(out)


def diff(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    worst, total, count, scale, finite = 0.0, 0.0, 0, 1.0, True
    for x, y in zip(a, b):
        x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
        finite &= bool(np.isfinite(y64).all())
        d = np.abs(x64 - y64)
        worst = max(worst, float(np.nanmax(d)) if d.size else 0.0)
        total += float(np.nansum(d))
        count += d.size
        scale = max(scale, float(np.abs(x64).max()) if x64.size else 0.0)
    return {"max_abs": worst, "mean_abs": total / max(count, 1), "scale": scale, "finite": finite}


# ---------------------------------------------------------------------------------------------
# Graph analysis: which nodes stay float32
# ---------------------------------------------------------------------------------------------
def weight_names(model: onnx.ModelProto) -> set[str]:
    names = set()
    for t in model.graph.initializer:
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            size = int(np.prod(t.dims)) if t.dims else 1
            if size > WEIGHT_MIN_VALUES:
                names.add(t.name)
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) \
                        and (int(np.prod(a.t.dims)) if a.t.dims else 1) > WEIGHT_MIN_VALUES:
                    names.update(n.output)
    return names


HEAVY_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention", "MultiHeadAttention",
             "GroupQueryAttention", "LSTM", "GRU", "RNN", "FusedMatMul", "NhwcConv", "MatMulNBits"}


def edge_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes outside the span between learned weights: no weight upstream, or no heavy op
    (matrix product, convolution, attention) downstream. A lookup table read at the end (a
    Gather of a noise schedule) therefore stays float32, and so does everything after the last
    matrix product (bias, activation, scaling, composites)."""
    weights = weight_names(model)
    sizes = {t.name: int(np.prod(t.dims)) if t.dims else 1 for t in model.graph.initializer}
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    consumers: dict[str, list[int]] = collections.defaultdict(list)
    for i, n in enumerate(nodes):
        for x in n.input:
            consumers[x].append(i)
    uses_weight = [any(x in weights for x in n.input) for n in nodes]

    def closure(start: list[int], step) -> set[int]:
        seen, stack = set(start), list(start)
        while stack:
            for j in step(stack.pop()):
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        return seen

    seeds = [i for i, u in enumerate(uses_weight) if u]
    after = closure(seeds, lambda i: [j for o in nodes[i].output for j in consumers.get(o, [])])
    heavy = [i for i in after if nodes[i].op_type in HEAVY_OPS or (nodes[i].op_type == "Gather" and
             sizes.get(nodes[i].input[0], 0) >= EMBEDDING_MIN_VALUES)]
    before = closure(heavy, lambda i: [producer[x] for x in nodes[i].input if x in producer])
    return [n.name for i, n in enumerate(nodes) if not (i in after and i in before)]


def norm_statistics_nodes(model: onnx.ModelProto) -> list[str]:
    """Pow(x, 2) | Mul(x, x) -> ReduceMean -> Add -> Sqrt [-> Reciprocal]: an unfused RMSNorm or
    LayerNorm's variance, which overflows in float16."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if not t.dims or np.prod(t.dims) == 1}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and (not a.t.dims or np.prod(a.t.dims) == 1):
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in model.graph.node:
        for x in n.input:
            consumers[x].append(n)
    blocked = []
    for n in model.graph.node:
        square = (n.op_type == "Pow" and len(n.input) == 2 and n.input[1] in consts
                  and float(np.asarray(consts[n.input[1]]).reshape(-1)[0]) == 2.0) or \
                 (n.op_type == "Mul" and len(n.input) == 2 and n.input[0] == n.input[1])
        if not square:
            continue
        chain, cur = [n], n
        for op in ("ReduceMean", "Add", "Sqrt", "Reciprocal"):
            nxt = [c for c in consumers.get(cur.output[0], []) if c.op_type == op]
            if len(nxt) != 1:
                break
            chain.append(nxt[0])
            cur = nxt[0]
        if len(chain) >= 4:       # at least square, mean, +eps, sqrt
            blocked.extend(c.name for c in chain if c.name)
    return blocked


def ensure_node_names(model: onnx.ModelProto) -> None:
    """The converter's node block list is by name: give unnamed nodes stable names."""
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_fp16tool_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)


def to_float16(model: onnx.ModelProto, io16: bool, extra_ops: list[str]) -> tuple[onnx.ModelProto, dict]:
    """ORT's converter with our block lists. Graphs with com.microsoft ops get their value types
    from ORT's symbolic shape inference first (ONNX's does not know those ops)."""
    model = onnx.ModelProto.FromString(model.SerializeToString()) if model.ByteSize() <= TWO_GB else model
    ensure_node_names(model)
    edges = edge_nodes(model)
    norms = norm_statistics_nodes(model)
    node_block = sorted(set(edges) | set(norms))
    op_block = list(ort_float16.DEFAULT_OP_BLOCK_LIST) + [o for o in extra_ops if o not in ort_float16.DEFAULT_OP_BLOCK_LIST]
    kwargs = dict(keep_io_types=not io16, op_block_list=op_block, node_block_list=node_block)
    if any(n.domain == "com.microsoft" for n in model.graph.node):
        from onnxruntime.transformers.onnx_model import OnnxModel
        om = OnnxModel(model)
        om.convert_float_to_float16(use_symbolic_shape_infer=True, **kwargs)
        out = om.model
    else:
        out = ort_float16.convert_float_to_float16(model, **kwargs)
    blocked_ops = sum(1 for n in model.graph.node if n.op_type in op_block and n.name not in node_block)
    removed = repair(out)
    return out, {"cast_round_trips_removed": removed, "edge_nodes_fp32": len(edges), "norm_statistics_fp32": len(norms), "blocked_op_nodes_fp32": blocked_ops}


def repair(model: onnx.ModelProto) -> int:
    """Fixes what the converter leaves: (1) it types every float tensor float16 and wraps each
    blocked node in Casts, so a chain of float32 nodes (and a float32 graph input feeding them)
    is rounded to float16 between nodes: Cast(f32 -> f16) -> Cast(f16 -> f32) round trips are
    replaced by the float32 tensor itself; (2) a tensor consumed twice by blocked nodes gets two
    identical Cast nodes (same name and output): duplicates are dropped. Returns the number of
    round trips removed."""
    g = model.graph
    seen, unique = set(), []
    for n in g.node:
        key = n.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            unique.append(n)
    if len(unique) != len(g.node):
        kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in unique]
        del g.node[:]
        g.node.extend(kept)
    dtype = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.value_info) + list(g.output)}
    dtype.update({t.name: t.data_type for t in g.initializer})
    producer = {o: n for n in g.node for o in n.output}

    def cast_to(n) -> int | None:
        return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None

    rename: dict[str, str] = {}
    outputs = {o.name for o in g.output}
    at_output = 0
    for n in g.node:
        if cast_to(n) != TensorProto.FLOAT:
            continue
        p = producer.get(n.input[0])
        if p is not None and cast_to(p) == TensorProto.FLOAT16 and dtype.get(p.input[0]) == TensorProto.FLOAT:
            if n.output[0] in outputs:
                # the graph output itself: an Identity of the float32 tensor
                n.op_type, n.input[0] = "Identity", p.input[0]
                del n.attribute[:]
                at_output += 1
            else:
                rename[n.output[0]] = p.input[0]
    if not rename and not at_output:
        return 0
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in rename:
                n.input[i] = rename[x]
    # drop nodes whose outputs nobody uses any more (the bypassed Casts)
    while True:
        used = {x for n in g.node for x in n.input} | outputs
        dead = [i for i, n in enumerate(g.node) if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            break
        for i in reversed(dead):
            del g.node[i]
    names = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    keep = [vi for vi in g.value_info if vi.name in names]
    del g.value_info[:]
    g.value_info.extend(keep)
    return len(rename) + at_output


# ---------------------------------------------------------------------------------------------
# Fusion
# ---------------------------------------------------------------------------------------------
def fusion_candidates(role: str, model: onnx.ModelProto) -> list[str]:
    ops = {n.op_type for n in model.graph.node}
    if role.startswith("vlm/"):
        return []
    if role == "perception":
        return ["bert", "vit", "t5"]     # bert first: it keeps attention masks (vit fuses with NoMask)
    if role.startswith("diffusion/"):
        part = role.split("/", 1)[1]
        return {"text_encoder": ["clip"], "unet": ["unet"], "vae_encoder": ["vae"], "vae_decoder": ["vae"]}.get(part, [])
    if ops & {"Softmax", "LayerNormalization", "Erf"}:
        return ["bert"]
    return []


def fused_counts(model: onnx.ModelProto) -> dict[str, int]:
    c = collections.Counter(n.op_type for n in model.graph.node)
    return {op: c[op] for op in FUSED_OPS if c[op]}


def optimize(model: onnx.ModelProto, model_type: str) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model
    level = logging.getLogger("onnxruntime.transformers").level
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)   # producer-name warnings
    try:
        copy = onnx.ModelProto.FromString(model.SerializeToString())
        opt = optimize_model(copy, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0)
        opt.topological_sort()
        return opt.model
    finally:
        logging.getLogger("onnxruntime.transformers").setLevel(level)


def heads_of(model: onnx.ModelProto) -> list[int]:
    heads = set()
    for n in model.graph.node:
        if n.op_type in ("Attention", "MultiHeadAttention"):
            for a in n.attribute:
                if a.name == "num_heads":
                    heads.add(a.i)
    return sorted(heads)


# ---------------------------------------------------------------------------------------------
# Converting one model
# ---------------------------------------------------------------------------------------------
def convert_model(role: str, src_path: str, manifest: dict, root: str, args, runner: Runner, kernels, tmpdir: str) -> tuple[onnx.ModelProto, dict]:
    t0 = time.time()
    model = onnx.load(src_path)
    rep: dict = {"role": role, "nodes_before": len(model.graph.node),
                 "size_mb_before": round(os.path.getsize(src_path) / 1e6 + sum(
                     os.path.getsize(os.path.join(os.path.dirname(src_path), f)) for f in external_files(src_path)) / 1e6, 3),
                 "fused_ops_before": fused_counts(model)}
    f32_inits = sum(1 for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)
    if f32_inits == 0 and not any(i.type.tensor_type.elem_type == TensorProto.FLOAT for i in model.graph.input):
        rep["note"] = "no float32 tensors: copied unchanged"
        rep.update(nodes_after=rep["nodes_before"], size_mb_after=rep["size_mb_before"], fusion="none", copied=True,
                   seconds=round(time.time() - t0, 1))
        return model, rep

    named = onnx.ModelProto.FromString(model.SerializeToString()) if model.ByteSize() <= TWO_GB else model
    ensure_node_names(named)
    if len(edge_nodes(named)) == len(named.graph.node):
        rep["note"] = (f"no node lies between learned weights (float initializers of more than {WEIGHT_MIN_VALUES} "
                       "values) and a heavy op (MatMul, Conv, attention, embedding Gather): nothing to gain in "
                       "float16, copied unchanged")
        rep.update(nodes_after=rep["nodes_before"], size_mb_after=rep["size_mb_before"], fusion="none", copied=True,
                   seconds=round(time.time() - t0, 1))
        return model, rep
    try:
        feeds = make_inputs(role, model, manifest, root, args.batch)
    except Exception as e:  # noqa: BLE001
        feeds, rep["inputs_error"] = None, str(e)
    ref = None
    if feeds is not None:
        ref, err = runner.run(model, feeds, tmpdir)
        if ref is None:
            rep["fp32_error"] = err
    scale = diff(ref, ref)["scale"] if ref is not None else 1.0

    # --- fusion candidates -------------------------------------------------------------------
    chosen_type, fusion_log = None, []
    candidates = [] if args.fuse == "none" else fusion_candidates(role, model)
    if candidates and not HAVE_SYMPY:
        fusion_log.append({"skipped": "sympy is not installed (models/export/requirements-fp16.txt)"})
        candidates = []
    best = None
    inner_all = list(float_tensors(model)) if candidates and ref is not None else []
    if len(inner_all) > 400:      # evenly spaced, the last ones always in
        step = len(inner_all) / 400
        inner_all = sorted({inner_all[int(i * step)] for i in range(400)} | set(inner_all[-8:]), key=inner_all.index)
    out_names_ref = [o.name for o in model.graph.output] + [t for t in inner_all if t not in {o.name for o in model.graph.output}]
    inner_ref = None
    for mt in candidates:
        entry: dict = {"model_type": mt}
        fusion_log.append(entry)
        try:
            fused = optimize(model, mt)
        except Exception as e:  # noqa: BLE001
            entry["error"] = " ".join(str(e).split())[:300]
            continue
        counts = fused_counts(fused)
        gained = {op: n - rep["fused_ops_before"].get(op, 0) for op, n in counts.items()
                  if n != rep["fused_ops_before"].get(op, 0)}
        entry.update(nodes=len(fused.graph.node), fused_ops=counts, new_ops=gained, num_heads=heads_of(fused))
        n_new = sum(v for v in gained.values() if v > 0)
        if n_new == 0:
            entry["result"] = "nothing fused"
            continue
        missing = missing_cpu_kernels(fused, kernels)
        if missing:
            entry["no_cpu_kernel"] = missing
        if ref is not None and not missing:
            # the outputs and every float tensor the fusion left in place (an output alone can hide
            # a wrong fusion: the saliency squashes the network's logits through a sigmoid)
            fused_names = {o for n in fused.graph.node for o in n.output}
            inner = [t for t in inner_all if t in fused_names]
            out, err = runner.run(with_outputs(fused, inner), feeds, tmpdir)
            if out is None:
                entry["cpu_error"] = err
            else:
                if inner and inner_ref is None:
                    full, err_ref = runner.run(with_outputs(model, inner_all), feeds, tmpdir)
                    inner_ref = dict(zip(out_names_ref, full)) if full is not None else {}
                    if full is None:
                        rep["inner_tensors_error"] = f"inner tensors not compared (outputs only): {err_ref}"
                n_out = len(model.graph.output)
                d = diff(ref, out[:n_out])
                got = dict(zip([o.name for o in model.graph.output] + [t for t in inner if t not in
                               {o.name for o in model.graph.output}], out))
                rel, where = worst_relative(inner_ref or {}, got) if inner else (0.0, "")
                entry["fp32_diff"] = d
                entry["tensors_compared"] = len(inner)
                entry["worst_tensor_rel"] = {"rel": rel, "tensor": where}
                entry["fp32_ok"] = d["finite"] and d["max_abs"] <= FUSE_TOL * scale and rel <= FUSE_TOL
        # force keeps a fusion that could not be checked here (CUDA-only ops, no CPU run), never a failed one
        ok = entry.get("fp32_ok", False) or (args.fuse == "force" and "fp32_ok" not in entry)
        entry["result"] = "candidate" if ok else "rejected"
        if ok and (best is None or n_new > best[0]):
            best = (n_new, mt, fused)
    # --- float16 ------------------------------------------------------------------------------
    unfused16, guard = to_float16(model, args.io == "f16", args.keep_fp32)
    rep.update(guard)
    d_unfused = None
    if ref is not None:
        out, err = runner.run(unfused16, feeds, tmpdir)
        if out is None:
            rep["fp16_unfused_cpu_error"] = err
        else:
            d_unfused = diff(ref, out)
            rep["fp16_unfused_diff"] = d_unfused
    final, final_diff, runs_on_cpu = unfused16, d_unfused, d_unfused is not None
    if best is not None:
        _, mt, fused = best
        fused16, guard_f = to_float16(fused, args.io == "f16", args.keep_fp32)
        keep, why = False, ""
        if ref is None:
            keep, why = args.fuse == "force", "no float32 reference run"
        else:
            out, err = runner.run(fused16, feeds, tmpdir)
            if out is None:
                no_kernel = missing_cpu_kernels(fused16, kernels)
                why = "float16 fused graph does not run on the CPU provider" + \
                      (f" (no CPU kernel: {', '.join(no_kernel)})" if no_kernel else "") + f": {err}"
                keep = args.fuse == "force"
                rep["fp16_fused_cpu_error"] = err
            else:
                d = diff(ref, out)
                rep["fp16_fused_diff"] = d
                limit = (2 * d_unfused["max_abs"] if d_unfused else 0.0) + FP16_SLACK * scale
                keep = d["finite"] and (d_unfused is None or d["max_abs"] <= limit)
                why = f"max|diff| {d['max_abs']:.3g} vs limit {limit:.3g}"
                if keep:
                    final_diff, runs_on_cpu = d, True
        if keep:
            final, chosen_type = fused16, mt
            rep.update(guard_f)
            if ref is None or "fp16_fused_diff" not in rep:
                final_diff, runs_on_cpu = None, False
        rep["fusion_decision"] = ("kept " if keep else "dropped ") + f"{mt}: {why}" if why else ("kept " if keep else "dropped ") + mt
    rep["fusion_candidates"] = fusion_log
    rep["fusion"] = chosen_type or "none"
    rep["fused_ops_after"] = fused_counts(final)
    rep["nodes_after"] = len(final.graph.node)
    rep["runs_on_cpu"] = runs_on_cpu
    rep["fp16_diff"] = final_diff
    missing = missing_cpu_kernels(final, kernels)
    if missing:
        rep["no_cpu_kernel"] = missing
    # float16 fused ops that the CPU provider only runs in float32 (ORT inserts Casts around them)
    f16_cpu = sorted({n.op_type for n in final.graph.node if n.domain == "com.microsoft"
                      and "tensor(float16)" not in kernels.get((n.domain, n.op_type), set())} - set(missing))
    if f16_cpu:
        rep["cpu_casts_around"] = f16_cpu
    rep["seconds"] = round(time.time() - t0, 1)
    return final, rep


def set_metadata(model: onnx.ModelProto, note: str, io16: bool) -> None:
    props = {p.key: p.value for p in model.metadata_props}
    props["retoucher.converted"] = note
    if "retoucher.dtype" in props:
        props["retoucher.dtype"] = "float16"
    del model.metadata_props[:]
    for k in sorted(props):
        e = model.metadata_props.add()
        e.key, e.value = k, props[k]


def save_model(model: onnx.ModelProto, path: str) -> list[str]:
    """Writes the model deterministically; returns the external data files written (relative to
    the model's folder), none below 2 GB."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if model.ByteSize() <= TWO_GB:
        with open(path, "wb") as f:
            f.write(model.SerializeToString(deterministic=True))
        return []
    location = os.path.basename(path) + ".data"
    if os.path.exists(path + ".data"):
        os.remove(path + ".data")
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=1024)
    return [location]


# ---------------------------------------------------------------------------------------------
# bundle.toml
# ---------------------------------------------------------------------------------------------
KEY_RE = r'(?:"(?:[^"\\]|\\.)*"|[A-Za-z0-9_-]+)'


def lock_key(name: str) -> str:
    """A [files] key as `retoucher bundle lock` (toml_edit) writes it: bare when it can be."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name, ensure_ascii=False)


def rewrite_manifest(text: str, hashes: dict[str, str], removed: set[str], header: str, note: str) -> str:
    lines = text.splitlines(keepends=True)
    out, table, files_end, seen = [], None, None, set()
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            if table == "files":
                files_end = len(out)
            table = stripped.strip("[]").strip()
        elif table is None and re.match(r"^description\s*=", line):
            try:
                value = tomllib.loads(line)["description"]
                line = f"description = {json.dumps(value.rstrip() + ' ' + note, ensure_ascii=False)}\n"
            except tomllib.TOMLDecodeError:
                pass   # a multi-line description: the header comment says it instead
        elif table == "files":
            m = re.match(rf"^(\s*)({KEY_RE})(\s*=\s*)\"[0-9A-Fa-f]*\"(.*)$", line.rstrip("\n"))
            if m:
                key = tomllib.loads(f"{m.group(2)} = 0").popitem()[0]
                seen.add(key)
                if key in removed:
                    continue
                if key in hashes:
                    line = f"{m.group(1)}{m.group(2)}{m.group(3)}\"{hashes[key]}\"{m.group(4)}\n"
        out.append(line)
    if table == "files":
        files_end = len(out)
    new = [f"{lock_key(k)} = \"{hashes[k]}\"\n" for k in sorted(hashes) if k not in seen]
    if new:
        if files_end is None:
            out.append("\n[files]\n")
            files_end = len(out)
        # after the last entry of the table (before trailing blank lines)
        while files_end > 0 and out[files_end - 1].strip() == "":
            files_end -= 1
        out[files_end:files_end] = new
    return header + "".join(out)


# ---------------------------------------------------------------------------------------------
def fmt_diff(d: dict | None) -> str:
    if not d:
        return "n/a"
    return f"max {d['max_abs']:.3g} mean {d['mean_abs']:.3g}" + ("" if d["finite"] else " NON-FINITE")


def print_report(r: dict) -> None:
    if r.get("skipped"):
        print(f"  {r['role']:22s} {r['file']}: {r['skipped']}")
        return
    print(f"  {r['role']:22s} {r['file']}")
    print(f"      nodes {r['nodes_before']} -> {r['nodes_after']}, size {r['size_mb_before']:.2f} -> "
          f"{r['size_mb_after']:.2f} MB, {r['seconds']} s")
    if r.get("note"):
        print(f"      {r['note']}")
        return
    for c in r.get("fusion_candidates", []):
        if "skipped" in c:
            print(f"      fusion skipped: {c['skipped']}")
            continue
        parts = [f"fusion {c['model_type']}:"]
        if "error" in c:
            parts.append(f"error {c['error']}")
        else:
            parts.append(", ".join(f"{k} {v:+d}" for k, v in c.get("new_ops", {}).items()) or "nothing fused")
            if c.get("num_heads"):
                parts.append(f"(heads {c['num_heads']})")
            if "fp32_diff" in c:
                parts.append(f"| fused f32 vs f32 {fmt_diff(c['fp32_diff'])}")
            if c.get("tensors_compared"):
                w = c["worst_tensor_rel"]
                parts.append(f"| {c['tensors_compared']} inner tensors: worst rel {w['rel']:.2g} ({w['tensor']})")
            if "no_cpu_kernel" in c:
                parts.append(f"| no CPU kernel: {', '.join(c['no_cpu_kernel'])} (CUDA only)")
            if "cpu_error" in c:
                parts.append(f"| CPU error: {c['cpu_error'][:160]}")
            parts.append(f"-> {c.get('result', '')}")
        print("      " + " ".join(parts))
    if "fusion_decision" in r:
        print(f"      {r['fusion_decision']}")
    print(f"      kept float32: {r['edge_nodes_fp32']} edge nodes (no weight before, or no heavy op after), "
          f"{r['norm_statistics_fp32']} norm-statistics nodes, {r['blocked_op_nodes_fp32']} blocked-op nodes; "
          f"{r['cast_round_trips_removed']} f32->f16->f32 cast round trips removed")
    if r.get("fused_ops_after"):
        print(f"      ops after: {r['fused_ops_after']}")
    if r.get("cpu_casts_around"):
        print(f"      CPU provider has float32-only kernels for {', '.join(r['cpu_casts_around'])} "
              f"(ORT casts around them on CPU; CUDA runs them in float16)")
    if r.get("no_cpu_kernel"):
        print(f"      NO CPU KERNEL for {', '.join(r['no_cpu_kernel'])}: this model runs on CUDA only")
    if r.get("fp32_error"):
        print(f"      float32 model did not run on the CPU: {r['fp32_error']}")
    if r.get("inputs_error"):
        print(f"      no validation input: {r['inputs_error']}")
    if "fp16_unfused_diff" in r and r["fusion"] != "none":
        print(f"      fp16 unfused vs f32: {fmt_diff(r['fp16_unfused_diff'])}")
    print(f"      fp16 ({r['fusion']}) vs f32 on CPU: {fmt_diff(r['fp16_diff'])}"
          + ("" if r["runs_on_cpu"] else "  (did not run on the CPU provider)"))
    for k in ("fp16_unfused_cpu_error", "fp16_fused_cpu_error"):
        if r.get(k) and not (k == "fp16_unfused_cpu_error" and r["fusion"] != "none"):
            print(f"      {k.replace('_', ' ')}: {r[k]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("src", help="source bundle folder (float32)")
    ap.add_argument("out", help="output bundle folder (created; its files are overwritten)")
    ap.add_argument("--io", choices=("f32", "f16"), default="f32",
                    help="element type of the graph inputs and outputs (default f32: keep_io_types)")
    ap.add_argument("--fuse", choices=("auto", "force", "none"), default="auto",
                    help="ORT transformer fusions: auto (kept when checked on the CPU), force (also when they "
                         "cannot be checked: CUDA-only ops), none")
    ap.add_argument("--only", default=None, help="comma-separated roles to convert (others are copied)")
    ap.add_argument("--keep-fp32", default="", help="comma-separated extra op types to keep in float32")
    ap.add_argument("--report", default=None, help="also write the report as JSON to this file")
    ap.add_argument("--batch", type=int, default=2, help="batch size of the validation input (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for the validation runs (default 2)")
    args = ap.parse_args(argv)
    args.keep_fp32 = [o for o in args.keep_fp32.split(",") if o]
    only = [o.strip() for o in args.only.split(",")] if args.only else None
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    src, out = os.path.normpath(args.src), os.path.normpath(args.out)
    if os.path.realpath(src) == os.path.realpath(out):
        ap.error("OUT_BUNDLE must differ from SRC_BUNDLE")
    with open(os.path.join(src, MANIFEST), "rb") as f:
        raw = f.read()
    manifest = tomllib.loads(raw.decode("utf-8"))
    listed = list(manifest.get("files", {}))
    roles = model_roles(manifest, src)
    if only is not None:
        known = {r for r, _ in roles} | {r.split("/")[0] for r, _ in roles}
        unknown = [o for o in only if o not in known]
        if unknown:
            ap.error(f"--only: no model with role {', '.join(unknown)} in this bundle (roles: {', '.join(r for r, _ in roles)})")
    os.makedirs(out, exist_ok=True)
    tmpdir = os.path.join(out, ".fp16-tmp")
    os.makedirs(tmpdir, exist_ok=True)

    runner, kernels = Runner(args.threads), cpu_kernels()
    flags = f"--io {args.io} --fuse {args.fuse}" + (f" --only {','.join(only)}" if only else "") + \
            (f" --keep-fp32 {','.join(args.keep_fp32)}" if args.keep_fp32 else "")
    print(f"converting {src} -> {out} ({flags}; onnxruntime {ort.__version__}, onnx {onnx.__version__}"
          f"{'' if HAVE_SYMPY else '; no sympy: fusion unavailable'})", flush=True)
    hashes: dict[str, str] = {}
    removed: set[str] = set()
    converted: set[str] = set()
    reports = []
    for role, rel in roles:
        src_path = os.path.join(src, rel)
        if not selected(role, only):
            reports.append({"role": role, "file": rel, "skipped": "not selected (--only): copied"})
            print_report(reports[-1])
            continue
        model, rep = convert_model(role, src_path, manifest, src, args, runner, kernels, tmpdir)
        rep["file"] = rel
        if not rep.get("copied"):
            note = f"float16 by models/export/fp16.py {flags} (onnxruntime {ort.__version__}" + \
                   (f", fused as {rep['fusion']})" if rep["fusion"] != "none" else ", unfused)")
            set_metadata(model, note, args.io == "f16")
            ext_before = external_files(src_path)
            dst = os.path.join(out, rel)
            written = save_model(model, dst)
            folder = os.path.dirname(rel)
            for e in ext_before:
                name = f"{folder}/{e}" if folder else e
                if e not in written:
                    removed.add(name)
                    if os.path.exists(os.path.join(out, name)):
                        os.remove(os.path.join(out, name))
            for e in written:
                name = f"{folder}/{e}" if folder else e
                hashes[name] = sha256_file(os.path.join(out, name))
                converted.add(name)
            hashes[rel] = sha256_file(dst)
            converted.add(rel)
            rep["size_mb_after"] = round((os.path.getsize(dst) + sum(os.path.getsize(os.path.join(out, folder, e)) for e in written)) / 1e6, 3)
        del model
        reports.append(rep)
        print_report(rep)
        sys.stdout.flush()
    shutil.rmtree(tmpdir, ignore_errors=True)

    # every other file, unchanged
    for name in listed:
        if name in converted or name in removed:
            continue
        s, d = os.path.join(src, name), os.path.join(out, name)
        os.makedirs(os.path.dirname(d) or ".", exist_ok=True)
        shutil.copyfile(s, d)
        hashes.setdefault(name, sha256_file(d))
    for role, rel in roles:          # a model the manifest names but [files] forgot
        if rel not in hashes and os.path.exists(os.path.join(out, rel)):
            hashes[rel] = sha256_file(os.path.join(out, rel))
        elif rel not in hashes:
            shutil.copyfile(os.path.join(src, rel), os.path.join(out, rel))
            hashes[rel] = sha256_file(os.path.join(out, rel))

    done = [r for r in reports if not r.get("skipped") and not r.get("copied")]
    fused = [f"{r['role']} ({r['fusion']})" for r in done if r["fusion"] != "none"]
    note = (f"[float16: converted from bundle {manifest.get('name', '?')!r} {manifest.get('version', '')} by "
            f"models/export/fp16.py {flags} with onnxruntime {ort.__version__}'s float16 converter"
            + (f"; ORT transformer fusions in {', '.join(fused)}" if fused else "; no fusions")
            + (f"; models on CUDA only: {', '.join(r['role'] for r in done if r.get('no_cpu_kernel'))}"
               if any(r.get("no_cpu_kernel") for r in done) else "") + ".]")
    header = (f"# Converted to float16 from bundle folder {os.path.basename(src)!r} by models/export/fp16.py {flags} "
              f"(onnxruntime {ort.__version__}): rerun it rather than editing by hand.\n")
    text = rewrite_manifest(raw.decode("utf-8"), hashes, removed, header, note)
    tomllib.loads(text)   # still valid TOML
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
        f.write(text)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump({"src": src, "out": out, "flags": flags, "onnxruntime": ort.__version__, "models": reports}, f, indent=1)
    print(f"wrote {out}")
    for name in sorted(hashes):
        print(f"  {hashes[name]}  {name}")
    return 0


# the transformer optimizer's symbolic shape inference needs sympy
HAVE_SYMPY = importlib.util.find_spec("sympy") is not None

if __name__ == "__main__":
    sys.exit(main())
