#!/usr/bin/env python3
"""Turn a Stable Diffusion inpainting ONNX export into a retoucher model bundle.

    sd_inpaint_bundle.py BUNDLE_DIR --export sd-inpaint [--base models/reference] [options]

BUNDLE_DIR/EXPORT must hold an export in the diffusers / optimum layout (`optimum-cli export
onnx --task inpainting`, or diffusers' convert_stable_diffusion_checkpoint_to_onnx.py, or a
public ONNX export): text_encoder/, unet/, vae_encoder/, vae_decoder/ (each model.onnx, plus
model.onnx_data or other external-data files when large), tokenizer/ (vocab.json, merges.txt,
special_tokens_map.json), scheduler/scheduler_config.json. The tool

  1. reads every model's inputs and outputs (graph only, weights are not loaded) and refuses
     what the diffusion-inpaint tool cannot run, saying why (not 9 UNet channels, SDXL's extra
     inputs, an unknown VAE-encoder output, a scheduler config with v-prediction, ...);
  2. writes EXPORT/tokenizer/tokenizer.json from vocab.json + merges.txt
     (models/export/clip_tokenizer.py), padding with the export's own pad token
     (special_tokens_map.json: "<|endoftext|>" for SD 1.x, "!" for SD 2.x);
  3. copies the files of the --base bundle (default models/reference: perception, classifier,
     their tokenizer, its other tools' models) and keeps its taxonomy, perception, reasoning and
     other tools' settings;
  4. writes BUNDLE_DIR/bundle.toml with [action.tools.diffusion-inpaint] (native size from
     unet/config.json sample_size x 8, latent_scale from vae_decoder/config.json scaling_factor,
     the options below) and the sha256 of every file of the bundle, external data included.

Needs onnx and numpy (models/requirements.txt). Hashing a 5 GB export takes about 10-20 s.
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
from onnx import TensorProto

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "diffusion-reference"))
import clip_tokenizer  # noqa: E402
import schedulers  # noqa: E402

TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT64: "int64",
         TensorProto.INT32: "int32", TensorProto.DOUBLE: "float64"}


class ExportError(SystemExit):
    pass


def io(path: str) -> tuple[dict, dict]:
    """{name: (type, shape)} of the graph's inputs and outputs, without loading weights."""
    model = onnx.load(path, load_external_data=False)
    init = {i.name for i in model.graph.initializer}

    def describe(values):
        out = {}
        for v in values:
            if v.name in init:
                continue
            t = v.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            out[v.name] = (TYPES.get(t.elem_type, str(t.elem_type)), shape)
        return out

    return describe(model.graph.input), describe(model.graph.output)


def inspect(export: str) -> dict:
    """What the diffusion-inpaint tool detects from the export; raises ExportError on what it cannot run."""
    found = {}
    te_in, te_out = io(os.path.join(export, "text_encoder", "model.onnx"))
    if "input_ids" not in te_in or "last_hidden_state" not in te_out:
        raise ExportError(f"text_encoder: inputs {sorted(te_in)}, outputs {sorted(te_out)}; "
                          "input_ids -> last_hidden_state expected")
    found["input_ids"] = te_in["input_ids"][0]
    found["hidden_size"] = te_out["last_hidden_state"][1][-1]
    un_in, un_out = io(os.path.join(export, "unet", "model.onnx"))
    if sorted(un_in) != ["encoder_hidden_states", "sample", "timestep"] or "out_sample" not in un_out:
        raise ExportError(f"unet: inputs {sorted(un_in)}, outputs {sorted(un_out)}; sample, timestep, "
                          "encoder_hidden_states -> out_sample expected (SDXL's text_embeds/time_ids are not supported)")
    if un_in["sample"][1][1] != 9:
        raise ExportError(f"unet sample has {un_in['sample'][1][1]} channels: not an inpainting UNet (9 expected)")
    found["unet_dtype"] = un_in["sample"][0]
    found["timestep"] = f"{un_in['timestep'][0]} {'scalar' if not un_in['timestep'][1] else str(un_in['timestep'][1])}"
    enc_in, enc_out = io(os.path.join(export, "vae_encoder", "model.onnx"))
    vae = [name for name in ("latent_sample", "latent_parameters") if name in enc_out]
    if "sample" not in enc_in or not vae:
        raise ExportError(f"vae_encoder: outputs {sorted(enc_out)}; latent_sample or latent_parameters expected")
    found["vae_encoder_output"] = vae[0]
    dec_in, dec_out = io(os.path.join(export, "vae_decoder", "model.onnx"))
    if "latent_sample" not in dec_in or "sample" not in dec_out:
        raise ExportError("vae_decoder: latent_sample -> sample expected")
    with open(os.path.join(export, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    try:
        schedulers.TrainSchedule.from_config(config)
    except schedulers.SchedulerConfigError as e:
        raise ExportError(f"scheduler/scheduler_config.json: {e}") from e
    found["timestep_spacing"] = config.get("timestep_spacing", "leading (absent: taken as leading)")
    return found


def read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def pad_token_of(tokenizer_dir: str) -> str:
    special = read_json(os.path.join(tokenizer_dir, "special_tokens_map.json"), {})
    pad = special.get("pad_token", clip_tokenizer.EOS)
    return pad["content"] if isinstance(pad, dict) else pad


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def toml_tables(doc: dict, prefix: str = "") -> list[str]:
    """A small TOML writer for bundle manifests (scalars, arrays of scalars, nested tables)."""
    lines, tables = [], []
    for k, v in doc.items():
        key = k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)
        if isinstance(v, dict):
            tables.append((key, v))
        else:
            lines.append(f"{key} = {toml_value(v)}")
    out = ([f"[{prefix}]"] if prefix and lines else []) + lines
    for key, v in tables:
        out += [""] + toml_tables(v, f"{prefix}.{key}" if prefix else key)
    return out


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle_dir")
    ap.add_argument("--export", default="sd-inpaint", help="the export's folder inside BUNDLE_DIR")
    ap.add_argument("--base", default=os.path.join(HERE, "..", "reference"),
                    help="bundle whose taxonomy, perception and reasoning are kept (default models/reference)")
    ap.add_argument("--name", default="sd-inpaint")
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--route", default="hand,face,limb,body",
                    help="comma-separated categories repaired by diffusion-inpaint")
    ap.add_argument("--scheduler", choices=schedulers.SCHEDULERS, default="ddim")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--negative-prompt", default="blurry, low quality, deformed, extra fingers")
    ap.add_argument("--text-template", default="{instruction}, {prompt}")
    ap.add_argument("--context", type=float, default=1.0)
    ap.add_argument("--latent-mask", choices=("nearest", "any"), default="any",
                    help="a latent cell is hole when any of its 8x8 pixels is (default), or by its top-left pixel as diffusers")
    ap.add_argument("--inspect", action="store_true", help="only print what is detected")
    args = ap.parse_args(argv)

    root = os.path.abspath(args.bundle_dir)
    export = os.path.join(root, args.export)
    found = inspect(export)
    for k, v in found.items():
        print(f"{k:20s} {v}")
    if found["unet_dtype"] != "float32":
        print(f"note: the UNet takes {found['unet_dtype']} inputs", file=sys.stderr)
    if args.inspect:
        return 0

    # tokenizer.json from vocab.json + merges.txt, with the export's pad token
    tok_dir = os.path.join(export, "tokenizer")
    pad = pad_token_of(tok_dir)
    vocab, merges = clip_tokenizer.vocab_from_hf(tok_dir)
    with open(os.path.join(tok_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(clip_tokenizer.tokenizer_json(vocab, merges, pad))
    unet_cfg = read_json(os.path.join(export, "unet", "config.json"), {})
    vae_cfg = read_json(os.path.join(export, "vae_decoder", "config.json"), {})
    native = 8 * int(unet_cfg.get("sample_size", 64))
    max_len = int(read_json(os.path.join(tok_dir, "tokenizer_config.json"), {}).get("model_max_length", 77))

    with open(os.path.join(args.base, "bundle.toml"), "rb") as f:
        base = tomllib.load(f)
    for name in base["files"]:  # the base's models, tokenizer and other tools' files
        if name.split("/")[0] == args.export:
            continue
        src, dst = os.path.abspath(os.path.join(args.base, name)), os.path.join(root, name)
        if src != dst:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)
    categories = base["taxonomy"]["categories"]
    routes = [c for c in args.route.split(",") if c]
    unknown = [c for c in routes if c not in categories]
    if unknown:
        raise SystemExit(f"--route names categories not in the taxonomy: {unknown}")
    tools = {k: v for k, v in base["action"].get("tools", {}).items() if k != "diffusion-inpaint"}
    tools["diffusion-inpaint"] = {
        "export": args.export,
        "tokenizer": f"{args.export}/tokenizer/tokenizer.json",
        "max_tokens": max_len,
        "add_special_tokens": True,
        "pad_id": vocab[pad],
        "text_template": args.text_template,
        "negative_prompt": args.negative_prompt,
        "scheduler": args.scheduler,
        "steps": args.steps,
        "max_steps": args.max_steps,
        "guidance_scale": args.guidance_scale,
        "native_size": native,
        "context": args.context,
        "latent_scale": float(vae_cfg.get("scaling_factor", 0.18215)),
        "latent_mask": args.latent_mask,
    }
    routing = dict(base["action"].get("routing", {}))
    routing.update({c: "diffusion-inpaint" for c in routes})
    manifest = {
        "schema": 1, "name": args.name, "version": args.version,
        "description": f"{base.get('description', '')} Regions of {', '.join(routes)} are repaired by diffusion "
                       f"inpainting with the export in {args.export}/.",
        "taxonomy": base["taxonomy"], "defaults": base["defaults"], "perception": base["perception"],
        "reasoning": base["reasoning"],
        "action": {"default_tool": base["action"]["default_tool"], "routing": routing, "tools": tools},
        "batching": {**base.get("batching", {}), "unet": {"max_batch_size": 16, "max_delay_ms": 2}},
    }
    files = {}
    for dirpath, _, names in os.walk(root):
        for n in sorted(names):
            rel = os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/")
            if rel != "bundle.toml":
                files[rel] = sha256_file(os.path.join(root, rel))
    manifest["files"] = dict(sorted(files.items()))
    text = "# Written by models/export/sd_inpaint_bundle.py\n" + "\n".join(toml_tables(manifest)) + "\n"
    tomllib.loads(text)  # what we wrote parses
    with open(os.path.join(root, "bundle.toml"), "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.join(root, 'bundle.toml')}: {len(files)} files, native size {native}, pad id {vocab[pad]} ({pad!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
