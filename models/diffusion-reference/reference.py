#!/usr/bin/env python3
"""Independent reference of the `diffusion-inpaint` tool: one region repair, step by step.

Runs a Stable Diffusion inpainting export in the diffusers / optimum ONNX layout with
onnxruntime and numpy, with diffusers' semantics (pipeline_stable_diffusion_inpaint.py,
scheduling_ddim.py, scheduling_euler_discrete.py), deterministically:

  1. crop (any size, 8-bit RGB) -> S x S with the worker's triangle filter, x/127.5 - 1 (f32)
     hole (8-bit, > 0 = hole)  -> S x S coverage with the same filter, hole where coverage > 0
  2. masked image = image * (hole < 0.5); masked latents = latent_scale * VAE-encoder mean
     (latent_sample, or the first 4 channels of latent_parameters: the distribution's mean, where
     diffusers would sample)
  3. latent mask [1,1,S/8,S/8]: "nearest" = hole[8i, 8j] (torch.nn.functional.interpolate, as
     diffusers), or "any" = 1 when any pixel of the 8x8 cell is hole
  4. text: the conditioning text and the negative prompt, tokenized (special tokens as the bundle
     says, truncated to max_tokens, padded with pad_id), encoded as one batch [uncond; cond]
  5. latents = noise(job_id, iteration, region) * init_noise_sigma (noise.py)
  6. per step i with timestep t: x = scale_model_input(latents); UNet on
     cat[x, mask, masked latents] for the batch [uncond; cond] (timestep [t, t], or t as a scalar
     when the export takes one); eps = eps_u + g (eps_c - eps_u) in f32 (g <= 1: the conditional
     branch alone, eps = eps_c); latents = scheduler step (schedulers.py)
  7. decoded = clip(vae_decoder(latents / latent_scale) / 2 + 0.5, 0, 1), then resized to the
     crop's size with the worker's filter and rounded to 8 bits (the patch the worker composites)

    python3 reference.py REQUEST.json [--out RESULT.json] [--npy DIR] [--png PATCH.png]

REQUEST.json (or "-" for stdin):
  {"bundle": "models/diffusion-reference",      optional, default: this folder
   "export": "variants/optimum-onnx",           optional, default: the bundle's export
   "image": "crop.png" | {"width": w, "height": h, "rgb": [u8 * h*w*3]},
   "mask":  "hole.png" | {"width": w, "height": h, "data": [u8 * h*w]},       > 0 = hole
   "text": "...",                               or the template's parts:
   "instruction": "...", "prompt": "...", "category": "...",
   "job_id": "job-7", "iteration": 0, "region": 2,
   optional overrides of the bundle: "negative_prompt", "scheduler", "steps", "guidance_scale",
   "latent_mask", "native_size"}

RESULT.json: the request's effective settings, "input_ids" {uncond, cond}, the scheduler's
"schedule" (timesteps, init_noise_sigma, and sigmas or alpha_prod_t / alpha_prod_t_prev),
"variant" (what was detected from the sessions), flat C-order f32 arrays with their shapes:
"noise", "initial_latents" [1,4,h,w], "mask_latent" [1,1,h,w], "masked_image_latents" [1,4,h,w],
"text_embeddings" [2,L,D], "steps": [{"index", "timestep", "model_input", "eps", "latents"}]
(latents after the step), "decoded" [1,3,S,S] (in [0,1]), and "patch" {width, height, rgb}
(8-bit, the crop's size). --npy writes the arrays as .npy files too; --png writes the patch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import noise  # noqa: E402
import pixels  # noqa: E402
import schedulers  # noqa: E402

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class ExportError(ValueError):
    """An export whose sessions do not have the Stable Diffusion inpainting layout."""


def session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


@dataclass
class Export:
    """The four sessions of an export folder and what was detected from their inputs and outputs."""

    text_encoder: ort.InferenceSession
    unet: ort.InferenceSession
    vae_encoder: ort.InferenceSession
    vae_decoder: ort.InferenceSession
    ids_dtype: type
    timestep_dtype: type
    timestep_scalar: bool
    vae_output: str          # "latent_sample" | "latent_parameters"
    scheduler_config: dict

    @staticmethod
    def load(folder: str) -> "Export":
        part = {name: session(os.path.join(folder, name, "model.onnx"))
                for name in ("text_encoder", "unet", "vae_encoder", "vae_decoder")}

        def inputs(s):
            return {i.name: i for i in s.get_inputs()}

        def outputs(s):
            return {o.name: o for o in s.get_outputs()}

        te_in = inputs(part["text_encoder"])
        if "input_ids" not in te_in or "last_hidden_state" not in outputs(part["text_encoder"]):
            raise ExportError("text_encoder must take input_ids and give last_hidden_state")
        ids_dtype = ORT_TYPES.get(te_in["input_ids"].type)
        if ids_dtype not in (np.int32, np.int64):
            raise ExportError(f"text_encoder input_ids has type {te_in['input_ids'].type} (int32 or int64 expected)")

        un_in = inputs(part["unet"])
        if sorted(un_in) != ["encoder_hidden_states", "sample", "timestep"]:
            raise ExportError(f"unet inputs are {sorted(un_in)}; an SD 1.x/2.x inpainting UNet takes exactly "
                              "sample, timestep, encoder_hidden_states (SDXL's text_embeds/time_ids are not supported)")
        if "out_sample" not in outputs(part["unet"]):
            raise ExportError("unet must give out_sample")
        channels = un_in["sample"].shape[1]
        if isinstance(channels, int) and channels != 9:
            raise ExportError(f"unet sample has {channels} channels; an inpainting UNet takes 9")
        ts = un_in["timestep"]
        timestep_dtype = ORT_TYPES.get(ts.type)
        if timestep_dtype is None or timestep_dtype == np.float64:
            raise ExportError(f"unet timestep has type {ts.type}")
        if len(ts.shape) not in (0, 1):
            raise ExportError(f"unet timestep has rank {len(ts.shape)} (0 or 1 expected)")

        enc_out = outputs(part["vae_encoder"])
        if "latent_sample" in enc_out:
            vae_output = "latent_sample"
        elif "latent_parameters" in enc_out:
            vae_output = "latent_parameters"
        else:
            raise ExportError(f"vae_encoder gives {sorted(enc_out)}; latent_sample or latent_parameters expected")
        if "latent_sample" not in inputs(part["vae_decoder"]) or "sample" not in outputs(part["vae_decoder"]):
            raise ExportError("vae_decoder must take latent_sample and give sample")
        with open(os.path.join(folder, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        return Export(part["text_encoder"], part["unet"], part["vae_encoder"], part["vae_decoder"],
                      ids_dtype, timestep_dtype, len(ts.shape) == 0, vae_output, config)

    def describe(self) -> dict:
        return {"input_ids": np.dtype(self.ids_dtype).name, "timestep": np.dtype(self.timestep_dtype).name,
                "timestep_rank": 0 if self.timestep_scalar else 1, "vae_encoder_output": self.vae_output}

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        return self.text_encoder.run(["last_hidden_state"], {"input_ids": ids.astype(self.ids_dtype)})[0]

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """The latent distribution's mean (unscaled)."""
        out = self.vae_encoder.run([self.vae_output], {"sample": image})[0]
        return out if self.vae_output == "latent_sample" else out[:, :4]

    def timestep(self, t, batch: int) -> np.ndarray:
        value = np.asarray(t).astype(self.timestep_dtype)
        return value.reshape(()) if self.timestep_scalar else np.full((batch,), value, self.timestep_dtype)

    def predict(self, sample: np.ndarray, t, hidden: np.ndarray) -> np.ndarray:
        return self.unet.run(["out_sample"], {"sample": sample, "timestep": self.timestep(t, sample.shape[0]),
                                              "encoder_hidden_states": hidden})[0]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.vae_decoder.run(["sample"], {"latent_sample": latents})[0]


@dataclass
class ToolSpec:
    """[action.tools.diffusion-inpaint] of bundle.toml."""

    export: str
    tokenizer: str
    max_tokens: int
    add_special_tokens: bool
    pad_id: int
    text_template: str
    negative_prompt: str
    scheduler: str
    steps: int
    max_steps: int
    guidance_scale: float
    native_size: int
    context: float
    latent_scale: float
    latent_mask: str

    @staticmethod
    def from_bundle(root: str) -> "ToolSpec":
        with open(os.path.join(root, "bundle.toml"), "rb") as f:
            table = tomllib.load(f)["action"]["tools"]["diffusion-inpaint"]
        return ToolSpec(**{k: table[k] for k in ToolSpec.__dataclass_fields__})


def conditioning_text(template: str, instruction: str, prompt: str, category: str) -> str:
    """The template with {instruction}, {prompt} and {category} replaced (no other syntax)."""
    return template.replace("{instruction}", instruction).replace("{prompt}", prompt).replace("{category}", category)


def tokenize(tokenizer: Tokenizer, texts: list[str], spec: ToolSpec) -> np.ndarray:
    """int64 [len(texts), max_tokens]: special tokens per the bundle, truncated (keeping them), padded."""
    tokenizer.enable_truncation(max_length=spec.max_tokens)
    pad_token = tokenizer.id_to_token(spec.pad_id) or ""
    tokenizer.enable_padding(length=spec.max_tokens, pad_id=spec.pad_id, pad_token=pad_token)
    encodings = tokenizer.encode_batch(texts, add_special_tokens=spec.add_special_tokens)
    return np.array([e.ids for e in encodings], dtype=np.int64)


def latent_mask(hole: np.ndarray, rule: str) -> np.ndarray:
    """[S,S] {0,1} -> [1,1,S/8,S/8]."""
    if rule == "nearest":
        small = hole[0::8, 0::8]
    elif rule == "any":
        s = hole.shape[0] // 8
        small = hole.reshape(s, 8, s, 8).max(axis=(1, 3))
    else:
        raise ValueError(f"latent_mask {rule!r} (nearest or any)")
    return small[None, None].astype(np.float32)


def load_image(value, key: str, channels: int) -> np.ndarray:
    """HWC u8 from a PNG path or {"width", "height", key: [...]}."""
    if isinstance(value, str):
        img = pixels.read_png(value)
        if channels == 1 and img.shape[2] == 3:
            raise ValueError(f"{value}: a mask must be a grey PNG")
        if channels == 3 and img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        return img
    w, h = int(value["width"]), int(value["height"])
    data = np.asarray(value[key], dtype=np.uint8)
    if data.size != w * h * channels:
        raise ValueError(f"{key} has {data.size} values, expected {w * h * channels}")
    return data.reshape(h, w, channels)


def repair(request: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """One region repair; returns the JSON-ready result and the arrays."""
    root = request.get("bundle", HERE)
    spec = ToolSpec.from_bundle(root)
    export = Export.load(os.path.join(root, request.get("export", spec.export)))
    scheduler_name = request.get("scheduler", spec.scheduler)
    steps = int(request.get("steps", spec.steps))
    if not 1 <= steps <= spec.max_steps:
        raise ValueError(f"steps {steps} outside 1..={spec.max_steps} (the bundle's max_steps)")
    guidance = float(request.get("guidance_scale", spec.guidance_scale))
    negative = request.get("negative_prompt", spec.negative_prompt)
    rule = request.get("latent_mask", spec.latent_mask)
    size = int(request.get("native_size", spec.native_size))
    if size % 8:
        raise ValueError(f"native_size {size} is not a multiple of 8")
    text = request.get("text")
    if text is None:
        text = conditioning_text(spec.text_template, request.get("instruction", ""), request.get("prompt", ""),
                                 request.get("category", ""))

    crop = load_image(request["image"], "rgb", 3)
    hole_u8 = load_image(request["mask"], "data", 1)
    if crop.shape[:2] != hole_u8.shape[:2]:
        raise ValueError(f"image {crop.shape[1]}x{crop.shape[0]} and mask {hole_u8.shape[1]}x{hole_u8.shape[0]} differ")
    height, width = crop.shape[:2]

    # 1-3: image, mask, masked-image latents
    image = pixels.resize_u8(crop, size, size) * np.float32(1.0 / 127.5) + np.float32(-1.0)   # [3,S,S]
    hole = (pixels.resize_u8(hole_u8, size, size)[0] > 0).astype(np.float32)                 # [S,S]
    masked = (image * (hole < 0.5))[None].astype(np.float32)
    masked_latents = (export.encode_image(masked) * np.float32(spec.latent_scale)).astype(np.float32)
    mask = latent_mask(hole, rule)

    # 4: text, one batch [uncond; cond]
    tokenizer = Tokenizer.from_file(os.path.join(root, spec.tokenizer))
    ids = tokenize(tokenizer, [negative, text], spec)
    hidden = export.encode_text(ids)
    cfg = guidance > 1.0
    if not cfg:
        hidden = hidden[1:]

    # 5: noise
    sched = schedulers.make(scheduler_name, export.scheduler_config, steps)
    h = size // 8
    start = noise.region_noise(request["job_id"], int(request["iteration"]), int(request["region"]), (1, 4, h, h))
    latents = (start.astype(np.float64) * sched.init_noise_sigma).astype(np.float32)
    initial = latents.copy()

    # 6: denoising
    batch = 2 if cfg else 1
    cond_mask = np.repeat(mask, batch, axis=0)
    cond_latents = np.repeat(masked_latents, batch, axis=0)
    g = np.float32(guidance)
    records = []
    for i, t in enumerate(sched.timesteps):
        x = sched.scale_model_input(latents, i)
        sample = np.concatenate([np.repeat(x, batch, axis=0), cond_mask, cond_latents], axis=1)
        out = export.predict(sample, t, hidden)
        eps = (out[0:1] + g * (out[1:2] - out[0:1])).astype(np.float32) if cfg else out
        latents = sched.step(eps, i, latents)
        records.append({"index": i, "timestep": int(t), "model_input": x, "eps": eps, "latents": latents})

    # 7: decode and bring back to the crop
    decoded = np.clip(export.decode((latents / np.float32(spec.latent_scale)).astype(np.float32)) / np.float32(2.0)
                      + np.float32(0.5), 0.0, 1.0).astype(np.float32)
    patch = pixels.to_u8(pixels.resize_planes(decoded[0], width, height) * np.float32(255.0))    # [3,h,w]
    patch = np.transpose(patch, (1, 2, 0))

    arrays = {"noise": start, "initial_latents": initial, "mask_latent": mask, "masked_image_latents": masked_latents,
              "text_embeddings": hidden, "decoded": decoded, "patch": patch}
    for r in records:
        for key in ("model_input", "eps", "latents"):
            arrays[f"step{r['index']:03d}_{key}"] = r[key]

    def flat(a: np.ndarray) -> dict:
        return {"shape": list(a.shape), "data": [float(v) for v in a.astype(np.float32).ravel()]}

    result = {
        "settings": {"export": request.get("export", spec.export), "scheduler": scheduler_name, "steps": steps,
                     "guidance_scale": guidance, "negative_prompt": negative, "text": text, "latent_mask": rule,
                     "native_size": size, "latent_scale": spec.latent_scale, "job_id": request["job_id"],
                     "iteration": int(request["iteration"]), "region": int(request["region"]),
                     "noise_key": f"0x{noise.noise_key(request['job_id'], request['iteration'], request['region']):016x}"},
        "variant": export.describe(),
        "input_ids": {"uncond": ids[0].tolist(), "cond": ids[1].tolist()},
        "schedule": sched.describe(),
        "noise": flat(start),
        "initial_latents": flat(initial),
        "mask_latent": flat(mask),
        "masked_image_latents": flat(masked_latents),
        "text_embeddings": flat(hidden),
        "steps": [{"index": r["index"], "timestep": r["timestep"], "model_input": flat(r["model_input"]),
                   "eps": flat(r["eps"]), "latents": flat(r["latents"])} for r in records],
        "decoded": flat(decoded),
        "patch": {"width": width, "height": height, "rgb": patch.ravel().tolist()},
    }
    return result, arrays


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("request", help="request JSON file, or - for stdin")
    ap.add_argument("--out", help="result JSON (default: stdout)")
    ap.add_argument("--npy", help="also write every array as DIR/NAME.npy")
    ap.add_argument("--png", help="also write the patch (crop-sized repair) as a PNG")
    args = ap.parse_args(argv)
    text = sys.stdin.read() if args.request == "-" else open(args.request, encoding="utf-8").read()
    result, arrays = repair(json.loads(text))
    if args.npy:
        os.makedirs(args.npy, exist_ok=True)
        for name, a in arrays.items():
            np.save(os.path.join(args.npy, f"{name}.npy"), a)
    if args.png:
        pixels.write_png(args.png, arrays["patch"])
    body = json.dumps(result, separators=(",", ":"))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(body + "\n")
    else:
        sys.stdout.write(body + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
