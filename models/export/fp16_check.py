#!/usr/bin/env python3
"""Saliency parity of a float16 bundle against its float32 source, on real photographs.

    python models/export/fp16_check.py FP32_BUNDLE FP16_BUNDLE [--images DIR_OR_MANIFEST]
        [--max-abs 0.25] [--mean-abs 0.001] [--max-flips 0.001] [--batch 4] [--json OUT]

An independent Python reference (it shares no code with fp16.py): runs the perception model of
both bundles with onnxruntime's CPU provider on the same inputs, prepared exactly as the worker
prepares them (src/agents/perception.rs, src/agents/text.rs, src/imaging/tensor.rs):

- image: decoded to 8-bit RGB (alpha dropped), resized to `input_size` x `input_size` (aspect not
  kept) with the worker's widened triangle filter (the port in
  models/diffusion-reference/pixels.py), then `v * (1 / (255 std[c])) + (-mean[c] / std[c])` in
  float32, CHW;
- prompt: the bundle's tokenizer.json with its post-processor when `add_special_tokens` (default
  true), truncated to `max_tokens` inside the tokenizer (longest-first, right, special tokens
  kept), then right-padded to exactly `max_tokens` with `pad_id` (else the tokenizer's padding
  id, else the id of [PAD], <pad>, <|pad|> or <PAD>); attention_mask 1 for real tokens.

Images: a manifest in the `retoucher eval` format (JSON lines with "image" and "prompt", paths
relative to it; default models/quality/ci-slice/manifest.jsonl, 24 photographs) or a folder of
PNG/JPEG files (prompt `--prompt`). The saliency maps are compared at the model's output
resolution (the worker's resize to the image size is a convex combination, so it cannot raise
the maximum difference). Printed: max / mean / 99.9th-percentile absolute difference, and the
share of pixels on different sides of the bundle's `saliency_threshold` ("flips"), overall and per
image. Exits 1 when max-abs, mean-abs or flips exceed their tolerances (defaults chosen from the
measurements in models/README.md, "fp16 bundles and fused attention", with margin), 2 on a
setup error (the two bundles' [perception] pre-processing differs, a model does not load).

Needs the pins of models/requirements.txt (onnxruntime, tokenizers, pillow, numpy).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tomllib

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_IMAGES = os.path.join(REPO, "models", "quality", "ci-slice", "manifest.jsonl")
CONVENTIONAL_PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<PAD>")
# Tolerances (models/README.md, "fp16 bundles and fused attention"), from the CI slice (24 photos):
# models/blemish -> fp16.py: max 0.108, mean 3.3e-4, flips 2.1e-4 of the 64x64 maps (the float16
# MobileNetV2 features; no image changed status); bench --tiny -> fp16.py: max 3.7e-6, no flips.
# Margin over the worst: 2.3x (max), 3x (mean), 4.7x (flips).
DEFAULT_MAX_ABS = 0.25
DEFAULT_MEAN_ABS = 0.001
DEFAULT_MAX_FLIPS = 0.001


def load_pixels_module():
    path = os.path.join(REPO, "models", "diffusion-reference", "pixels.py")
    spec = importlib.util.spec_from_file_location("retoucher_pixels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PIXELS = load_pixels_module()


class PromptEncoder:
    """src/agents/text.rs PromptEncoder."""

    def __init__(self, path: str, max_tokens: int, add_special: bool, pad_id: int | None):
        self.tok = Tokenizer.from_file(path)
        if pad_id is None and self.tok.padding:
            pad_id = self.tok.padding["pad_id"]
        if pad_id is None:
            pad_id = next((self.tok.token_to_id(t) for t in CONVENTIONAL_PAD_TOKENS
                           if self.tok.token_to_id(t) is not None), None)
        if pad_id is None:
            raise ValueError(f"{path} names no pad token: the bundle needs pad_id")
        self.tok.enable_truncation(max_length=max_tokens, strategy="longest_first", direction="right", stride=0)
        self.tok.no_padding()
        self.max_tokens, self.add_special, self.pad_id = max_tokens, add_special, pad_id

    def encode(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tok.encode(prompt, add_special_tokens=self.add_special).ids[: self.max_tokens]
        n = len(ids)
        ids = ids + [self.pad_id] * (self.max_tokens - n)
        return np.asarray(ids, np.int64), np.asarray([1] * n + [0] * (self.max_tokens - n), np.int64)


def pixel_values(rgb: np.ndarray, size: int, mean, std) -> np.ndarray:
    """src/imaging/tensor.rs to_chw: resize_u8 then v * scale[c] + offset[c] in float32."""
    planes = PIXELS.resize_u8(rgb, size, size)                       # CHW f32, 0..255
    scale = np.asarray([np.float32(1.0) / (np.float32(255.0) * np.float32(s)) for s in std], np.float32)
    offset = np.asarray([-np.float32(m) / np.float32(s) for m, s in zip(mean, std)], np.float32)
    return (planes * scale[:, None, None] + offset[:, None, None]).astype(np.float32)


def read_rgb(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_images(spec: str, prompt: str) -> list[tuple[str, str, str]]:
    """(id, path, prompt) from a manifest (JSON lines) or a folder."""
    if os.path.isdir(spec):
        names = sorted(f for f in os.listdir(spec) if f.lower().endswith((".png", ".jpg", ".jpeg")))
        return [(os.path.splitext(f)[0], os.path.join(spec, f), prompt) for f in names]
    base = os.path.dirname(os.path.abspath(spec))
    out = []
    with open(spec, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                job = json.loads(line)
                out.append((job.get("id", job["image"]), os.path.join(base, job["image"]), job.get("prompt", prompt)))
    return out


def perception_spec(bundle: str) -> tuple[dict, dict]:
    with open(os.path.join(bundle, "bundle.toml"), "rb") as f:
        manifest = tomllib.load(f)
    return manifest, manifest["perception"]


def session(path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("fp32_bundle")
    ap.add_argument("fp16_bundle")
    ap.add_argument("--images", default=DEFAULT_IMAGES, help="manifest (JSON lines) or folder of images "
                    "(default: models/quality/ci-slice/manifest.jsonl)")
    ap.add_argument("--prompt", default="a photo", help="prompt for the images of a folder (default 'a photo')")
    ap.add_argument("--max-abs", type=float, default=DEFAULT_MAX_ABS, help=f"tolerance (default {DEFAULT_MAX_ABS})")
    ap.add_argument("--mean-abs", type=float, default=DEFAULT_MEAN_ABS, help=f"tolerance (default {DEFAULT_MEAN_ABS})")
    ap.add_argument("--max-flips", type=float, default=DEFAULT_MAX_FLIPS,
                    help=f"tolerated share of pixels on the other side of saliency_threshold (default {DEFAULT_MAX_FLIPS})")
    ap.add_argument("--batch", type=int, default=4, help="images per session call (default 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args(argv)

    try:
        m32, p32 = perception_spec(args.fp32_bundle)
        m16, p16 = perception_spec(args.fp16_bundle)
        keys = ("input_size", "mean", "std", "max_tokens", "add_special_tokens", "pad_id")
        differ = [k for k in keys if p32.get(k) != p16.get(k)]
        if differ:
            raise ValueError(f"the bundles' [perception] pre-processing differs in {', '.join(differ)}")
        size = int(p32["input_size"])
        encoder = PromptEncoder(os.path.join(args.fp32_bundle, p32["tokenizer"]), int(p32["max_tokens"]),
                                bool(p32.get("add_special_tokens", True)), p32.get("pad_id"))
        enc16 = PromptEncoder(os.path.join(args.fp16_bundle, p16["tokenizer"]), int(p16["max_tokens"]),
                              bool(p16.get("add_special_tokens", True)), p16.get("pad_id"))
        s32 = session(os.path.join(args.fp32_bundle, p32["model"]), args.threads)
        s16 = session(os.path.join(args.fp16_bundle, p16["model"]), args.threads)
        images = load_images(args.images, args.prompt)
        if not images:
            raise ValueError(f"no images in {args.images}")
    except Exception as e:  # noqa: BLE001
        print(f"fp16_check: {e}", file=sys.stderr)
        return 2
    tau = float(m32.get("defaults", {}).get("saliency_threshold", 0.5))
    mean = [float(v) for v in p32.get("mean", [0.0, 0.0, 0.0])]
    std = [float(v) for v in p32.get("std", [1.0, 1.0, 1.0])]
    in16 = {i.name: i.type for i in s16.get_inputs()}

    per_image, all_diffs, flips_total, pixels_total = [], [], 0, 0
    for start in range(0, len(images), args.batch):
        chunk = images[start:start + args.batch]
        pix = np.stack([pixel_values(read_rgb(p), size, mean, std) for _, p, _ in chunk])
        toks = [encoder.encode(pr) for _, _, pr in chunk]
        toks16 = [enc16.encode(pr) for _, _, pr in chunk]
        if any((a[0] != b[0]).any() for a, b in zip(toks, toks16)):
            print("fp16_check: the two bundles' tokenizers encode a prompt differently", file=sys.stderr)
            return 2
        feeds = {"pixel_values": pix, "input_ids": np.stack([t[0] for t in toks]),
                 "attention_mask": np.stack([t[1] for t in toks])}
        feeds16 = dict(feeds)
        if in16.get("pixel_values") == "tensor(float16)":     # an --io f16 conversion
            feeds16["pixel_values"] = pix.astype(np.float16)
        y32 = s32.run(["saliency"], feeds)[0].astype(np.float64)
        y16 = s16.run(["saliency"], feeds16)[0].astype(np.float64)
        for (ident, _, prompt), a, b in zip(chunk, y32, y16):
            d = np.abs(a - b)
            flips = int(((a > tau) != (b > tau)).sum())
            flips_total += flips
            pixels_total += d.size
            all_diffs.append(d.reshape(-1))
            per_image.append({"id": ident, "max_abs": float(d.max()), "mean_abs": float(d.mean()), "flips": flips,
                              "pixels": int(d.size), "above_tau_fp32": int((a > tau).sum()),
                              "above_tau_fp16": int((b > tau).sum()), "finite": bool(np.isfinite(b).all())})
    d = np.concatenate(all_diffs)
    summary = {"fp32_bundle": args.fp32_bundle, "fp16_bundle": args.fp16_bundle, "images": len(per_image),
               "output_shape": list(y32.shape[1:]), "saliency_threshold": tau,
               "max_abs": float(d.max()), "mean_abs": float(d.mean()), "p999_abs": float(np.quantile(d, 0.999)),
               "flips": flips_total / pixels_total, "finite": all(r["finite"] for r in per_image),
               "images_status_changed": sum((r["above_tau_fp32"] > 0) != (r["above_tau_fp16"] > 0) for r in per_image),
               "tolerance": {"max_abs": args.max_abs, "mean_abs": args.mean_abs, "flips": args.max_flips},
               "onnxruntime": ort.__version__, "per_image": per_image}
    for r in per_image:
        print(f"  {r['id']:28s} max {r['max_abs']:.3g}  mean {r['mean_abs']:.3g}  flips {r['flips']}/{r['pixels']}  "
              f"above tau {r['above_tau_fp32']} -> {r['above_tau_fp16']}")
    ok = (summary["finite"] and summary["max_abs"] <= args.max_abs and summary["mean_abs"] <= args.mean_abs
          and summary["flips"] <= args.max_flips)
    summary["ok"] = ok
    print(f"{len(per_image)} images, saliency {summary['output_shape']}, tau {tau}: max |diff| {summary['max_abs']:.4g} "
          f"(tol {args.max_abs}), mean {summary['mean_abs']:.3g} (tol {args.mean_abs}), p99.9 {summary['p999_abs']:.3g}, "
          f"flips {summary['flips']:.2e} (tol {args.max_flips}), images whose clean/flagged status changed: "
          f"{summary['images_status_changed']} -> {'OK' if ok else 'FAIL'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
