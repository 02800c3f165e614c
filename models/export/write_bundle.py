#!/usr/bin/env python3
"""Turn an ONNX export of Qwen2-VL / Qwen2.5-VL into a retoucher bundle with `reasoning.mode = "vlm"`.

Takes a model folder in the onnx-community / transformers.js layout (as downloaded from e.g.
onnx-community/Qwen2.5-VL-3B-Instruct-ONNX or onnx-community/Qwen2-VL-2B-Instruct):

    MODEL/config.json, preprocessor_config.json, tokenizer.json
    MODEL/onnx/vision_encoder{SUFFIX}.onnx, embed_tokens{SUFFIX}.onnx, decoder_model_merged{SUFFIX}.onnx
          (+ their external data files, e.g. decoder_model_merged{SUFFIX}.onnx_data)

and a base bundle whose perception, action, taxonomy and regions settings are kept (e.g.
models/reference). Copies (or hard-links) the files into OUT, reads the pre-processing settings
from preprocessor_config.json, picks the box convention from config.json's model_type, and writes
OUT/bundle.toml with the sha256 of every file, external data included. Prints the model's layout
read from the ONNX files (layers, KV heads, head size, dtypes) and its costs.

    python models/export/write_bundle.py MODEL --base models/reference --out models/qwen25vl-3b \
        [--dtype fp16] [--max-pixels 401408] [--max-new-tokens 256] [--template FILE] [--link]

Needs onnx (models/requirements.txt). Python >= 3.11.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tomllib

import onnx

DTYPE_SUFFIX = {"fp32": "", "fp16": "_fp16", "q8": "_quantized", "q4": "_q4", "q4f16": "_q4f16",
                "int8": "_int8", "uint8": "_uint8", "bnb4": "_bnb4"}
# Qwen2-VL writes boxes in 0..1000 of the image; Qwen2.5-VL in pixels of the resized image.
BOX_SPACE = {"qwen2_vl": "norm1000", "qwen2_5_vl": "resized"}
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEMPLATE = os.path.join(HERE, "template.txt")
GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2}


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def external_files(path: str) -> list[str]:
    """Files named by the external-data entries of an ONNX model, relative to its folder."""
    model = onnx.load(path, load_external_data=False)
    names = set()
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                names.add(entry.value)
    return sorted(names)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)   # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(doc: dict, prefix: str = "") -> str:
    """Scalars and arrays of a table first, then its sub-tables (keys quoted when needed)."""
    def key(k: str) -> str:
        return k if k.replace("-", "").replace("_", "").isalnum() else json.dumps(k)
    scalars = [f"{key(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    out = "\n".join(scalars) + ("\n" if scalars else "")
    for k, v in doc.items():
        if isinstance(v, dict):
            name = f"{prefix}.{key(k)}" if prefix else key(k)
            out += f"\n[{name}]\n" + dump_toml(v, name)
    return out


def renamed(doc, old: str, new: str):
    """doc with every string value equal to `old` replaced by `new` (file references)."""
    if isinstance(doc, dict):
        return {k: renamed(v, old, new) for k, v in doc.items()}
    if isinstance(doc, list):
        return [renamed(v, old, new) for v in doc]
    return new if doc == old else doc


def layout(path: str) -> dict:
    model = onnx.load(path, load_external_data=False)
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    past = sorted(n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    kv = inputs[past[0]]
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in kv.shape.dim]
    return {"layers": len(past), "kv_heads": dims[1], "head_dim": dims[3], "kv_elem": kv.elem_type}


def costs(info: dict, cfg: dict, max_pixels: int) -> str:
    per_token = 2 * info["layers"] * info["kv_heads"] * info["head_dim"] * BYTES.get(info["kv_elem"], 4)
    tokens = max_pixels // (28 * 28)
    vocab = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size", 151936)
    return (f"  KV cache: {per_token} bytes per token ({per_token * (tokens + 300) / 2**20:.0f} MiB for one "
            f"image at max_pixels ({tokens} image tokens) + 300 text tokens)\n"
            f"  logits: {vocab * 4} bytes per prompt token at prefill in f32 (the export returns every position)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="export folder (config.json, preprocessor_config.json, tokenizer.json, onnx/)")
    ap.add_argument("--base", required=True, help="bundle whose perception/action/taxonomy settings are kept")
    ap.add_argument("--out", required=True, help="bundle folder to write")
    ap.add_argument("--dtype", choices=sorted(DTYPE_SUFFIX), default="fp32", help="which export variant")
    ap.add_argument("--max-pixels", type=int, help="default: preprocessor_config.json's (very large)")
    ap.add_argument("--min-pixels", type=int)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--template", default=DEFAULT_TEMPLATE, help="chat template with {{placeholders}}")
    ap.add_argument("--no-tool", action="store_true", help="regions may not name their tool")
    ap.add_argument("--link", action="store_true", help="hard-link instead of copying the large files")
    args = ap.parse_args(argv)

    with open(os.path.join(args.model, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    with open(os.path.join(args.model, "preprocessor_config.json"), encoding="utf-8") as f:
        pre = json.load(f)
    with open(os.path.join(args.base, "bundle.toml"), "rb") as f:
        base = tomllib.load(f)
    with open(args.template, encoding="utf-8") as f:
        template = f.read()
    model_type = cfg.get("model_type")
    if model_type not in BOX_SPACE:
        raise SystemExit(f"config.json model_type {model_type!r}: expected one of {sorted(BOX_SPACE)}")

    os.makedirs(args.out, exist_ok=True)
    files: dict[str, str] = {}

    def take(src: str, name: str) -> None:
        dst = os.path.join(args.out, name)
        if os.path.exists(dst):
            os.remove(dst)
        (os.link if args.link else shutil.copyfile)(src, dst)
        files[name] = sha256_file(dst)

    names = {}
    for graph in GRAPHS:
        name = f"{graph}{DTYPE_SUFFIX[args.dtype]}.onnx"
        src = os.path.join(args.model, "onnx", name)
        if not os.path.exists(src):
            raise SystemExit(f"missing {src}")
        take(src, name)
        for extra in external_files(src):
            take(os.path.join(args.model, "onnx", extra), extra)
        names[graph] = name
    take(os.path.join(args.model, "tokenizer.json"), "tokenizer.json")

    # keep the base bundle's other agents and their files; a base file named like one of the
    # VLM's (its perception tokenizer.json) is renamed "base_<name>" and so are references to it
    bundle = {k: v for k, v in base.items() if k != "files"}
    for name in base["files"]:
        new_name = f"base_{name}" if name in files else name
        take(os.path.join(args.base, name), new_name)
        if new_name != name:
            bundle = renamed(bundle, name, new_name)
    size = pre.get("size", {})
    vlm = {
        "vision_encoder": names["vision_encoder"], "embed_tokens": names["embed_tokens"],
        "decoder": names["decoder_model_merged"], "tokenizer": "tokenizer.json",
        "min_pixels": args.min_pixels or pre.get("min_pixels") or size.get("shortest_edge", 3136),
        "max_pixels": args.max_pixels or pre.get("max_pixels") or size.get("longest_edge", 12845056),
        "patch_size": pre.get("patch_size", 14), "merge_size": pre.get("merge_size", 2),
        "temporal_patch_size": pre.get("temporal_patch_size", 2),
        "mean": pre.get("image_mean"), "std": pre.get("image_std"),
        "image_token": "<|image_pad|>", "vision_start_token": "<|vision_start|>", "pad_token": "<|endoftext|>",
        "stop_tokens": ["<|im_end|>", "<|endoftext|>"], "max_new_tokens": args.max_new_tokens,
        "bbox_coordinates": BOX_SPACE[model_type], "allow_tool": not args.no_tool,
        "fallback": "regions" if "classifier" in base["reasoning"] else "saliency",
        "template": template,
    }
    bundle["name"] = os.path.basename(os.path.normpath(args.out))
    bundle["description"] = f"{model_type} from {os.path.abspath(args.model)} ({args.dtype}), perception and action from {base['name']}"
    bundle["reasoning"] = {**{k: v for k, v in base["reasoning"].items() if k != "vlm"}, "mode": "vlm", "vlm": vlm}
    bundle["files"] = files
    with open(os.path.join(args.out, "bundle.toml"), "w", encoding="utf-8") as f:
        f.write("# Written by models/export/write_bundle.py\n" + dump_toml(bundle))

    info = layout(os.path.join(args.model, "onnx", names["decoder_model_merged"]))
    print(f"wrote {args.out}/bundle.toml ({len(files)} files)")
    print(f"  decoder: {info['layers']} layers, {info['kv_heads']} KV heads of {info['head_dim']}, "
          f"KV {onnx.TensorProto.DataType.Name(info['kv_elem'])}; boxes: {vlm['bbox_coordinates']}")
    print(costs(info, cfg, int(vlm["max_pixels"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
