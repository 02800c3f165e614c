#!/usr/bin/env python3
"""Reference VLM reasoning (Qwen2-VL / Qwen2.5-VL ONNX layout), the worker's yardstick.

Runs a `reasoning.mode = "vlm"` bundle with onnxruntime exactly as the model needs it, written
from transformers' Qwen2-VL image processor and `get_rope_index`: smart resize, PIL bicubic
resampling, rescale and CLIP normalisation, the patchify permutation, the chat template, the
<|image_pad|> expansion, M-RoPE position ids and rope delta, greedy decoding with the KV cache;
and continuous batching: per-sequence caches gathered into a left-padded batch every step,
sequences joining and leaving between steps. Nothing here knows the test bundle's graphs: names,
layer count, KV heads, head size and dtypes are read from the sessions.

    python models/vlm-reference/reference.py REQUESTS.json [--bundle DIR] [--mode sequential|batched]
        [--max-active N] [--max-new-tokens N] [--dump DIR]

REQUESTS.json is a list of {"id", "image", "prompt", "regions"?, "arrival"?}: image path relative
to the requests file, regions the saliency-proposed boxes [[x1,y1,x2,y2], ...] in input-image
pixels (x2, y2 exclusive), arrival the decode step at which the request joins (batched mode).
Prints one JSON object on stdout (models/README.md, "Reference CLI").

Needs numpy, onnxruntime, tokenizers and pillow (models/requirements.txt).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from answer import COORDINATES, validate  # noqa: E402

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore

HERE = os.path.dirname(os.path.abspath(__file__))
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


# ---------------------------------------------------------------------------------------------
# Bundle
# ---------------------------------------------------------------------------------------------
def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


class Bundle:
    """A VLM bundle: sessions, tokenizer and the [reasoning.vlm] settings."""

    def __init__(self, root: str, max_new_tokens: int | None = None):
        with open(os.path.join(root, "bundle.toml"), "rb") as f:
            self.manifest = tomllib.load(f)
        for name, want in self.manifest["files"].items():
            got = sha256_file(os.path.join(root, name))
            if got != want:
                raise SystemExit(f"{name}: sha256 {got} != {want} (bundle.toml)")
        if self.manifest["reasoning"]["mode"] != "vlm":
            raise SystemExit("bundle: reasoning.mode is not \"vlm\"")
        vlm = self.manifest["reasoning"]["vlm"]
        self.vlm = vlm
        self.vision = session(os.path.join(root, vlm["vision_encoder"]))
        self.embed = session(os.path.join(root, vlm["embed_tokens"]))
        self.decoder = session(os.path.join(root, vlm["decoder"]))
        self.tokenizer = Tokenizer.from_file(os.path.join(root, vlm["tokenizer"]))
        self.categories = list(self.manifest["taxonomy"]["categories"])
        self.tools = sorted(self.manifest["action"]["tools"].keys())
        self.max_regions = int(self.manifest["reasoning"]["max_regions"])
        self.max_new_tokens = int(max_new_tokens or vlm["max_new_tokens"])
        self.coordinates = vlm.get("bbox_coordinates", "input")
        if self.coordinates not in COORDINATES:
            raise SystemExit(f"bbox_coordinates must be one of {COORDINATES}")

        def token_id(text: str) -> int:
            i = self.tokenizer.token_to_id(text)
            if i is None:
                raise SystemExit(f"tokenizer has no token {text!r}")
            return i
        self.image_token = token_id(vlm["image_token"])
        self.vision_start = token_id(vlm["vision_start_token"])
        self.pad_token = token_id(vlm["pad_token"])
        self.stop_tokens = {token_id(t) for t in vlm["stop_tokens"]}
        if vlm["template"].count(vlm["image_token"]) != 1:
            raise SystemExit("template: the image token must appear exactly once")

        # everything about the graphs comes from the sessions
        v_in = {i.name: i for i in self.vision.get_inputs()}
        self.pixel_dtype = ORT_TYPES[v_in["pixel_values"].type]
        (self.grid_name,) = [n for n in v_in if n != "pixel_values"]   # image_grid_thw or grid_thw
        self.embed_dtype = ORT_TYPES[self.embed.get_outputs()[0].type]
        d_in = {i.name: i for i in self.decoder.get_inputs()}
        self.layers = len([n for n in d_in if n.startswith("past_key_values.") and n.endswith(".key")])
        kv = d_in["past_key_values.0.key"]
        self.kv_heads, self.head_dim = int(kv.shape[1]), int(kv.shape[3])
        self.kv_dtype = ORT_TYPES[kv.type]
        self.decoder_embed_dtype = ORT_TYPES[d_in["inputs_embeds"].type]


# ---------------------------------------------------------------------------------------------
# Image pre-processing (transformers Qwen2VLImageProcessor, slow path)
# ---------------------------------------------------------------------------------------------
def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL smart_resize: multiples of `factor`, area within [min_pixels, max_pixels].
    round() is Python's (half to even), as in transformers."""
    if height < factor or width < factor:
        raise ValueError(f"image {width}x{height}: each side must be at least {factor} pixels")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {width}x{height}: aspect ratio above 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_rgb(path: str) -> np.ndarray:
    """8-bit RGB [H,W,3]; an alpha channel is composited over white (transformers convert_rgb)."""
    with Image.open(path) as im:
        if im.mode != "RGB":
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, rgba).convert("RGB")
        return np.asarray(im, dtype=np.uint8).copy()


@dataclass
class Vision:
    pixel_values: np.ndarray     # [P, C*T*p*p] f32
    grid_thw: np.ndarray         # [1, 3] i64
    resized: tuple[int, int]     # (width, height)


def preprocess(rgb: np.ndarray, vlm: dict) -> Vision:
    patch, merge, temporal = int(vlm["patch_size"]), int(vlm["merge_size"]), int(vlm["temporal_patch_size"])
    h, w = rgb.shape[:2]
    rh, rw = smart_resize(h, w, patch * merge, int(vlm["min_pixels"]), int(vlm["max_pixels"]))
    if (rh, rw) != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((rw, rh), Image.Resampling.BICUBIC), dtype=np.uint8)
    x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)                    # rescale
    x = (x - np.array(vlm["mean"], np.float32)) / np.array(vlm["std"], np.float32)   # normalize (f32)
    x = x.transpose(2, 0, 1)[None]                                                    # [1,C,H,W]
    x = np.concatenate([x] * temporal, axis=0)                                        # one frame -> T
    gt, gh, gw = x.shape[0] // temporal, rh // patch, rw // patch
    x = x.reshape(gt, temporal, 3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = np.ascontiguousarray(x.reshape(gt * gh * gw, 3 * temporal * patch * patch))
    return Vision(pixel_values, np.array([[gt, gh, gw]], np.int64), (rw, rh))


# ---------------------------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------------------------
def json_text(value) -> str:
    """Compact JSON, non-ASCII kept, '<' and '>' escaped (so no text can form a special token)."""
    return (json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            .replace("<", "\\u003c").replace(">", "\\u003e"))


def render(template: str, values: dict[str, str]) -> str:
    """Replace each {{name}} once, left to right; substituted text is not scanned again."""
    out, i = [], 0
    while True:
        j = template.find("{{", i)
        if j < 0:
            out.append(template[i:])
            return "".join(out)
        k = template.find("}}", j + 2)
        name = template[j + 2:k] if k >= 0 else None
        if name not in values:
            raise ValueError(f"template: unknown placeholder at {j}: {template[j:j + 20]!r}")
        out += [template[i:j], values[name]]
        i = k + 2


def space_size(coordinates: str, image: tuple[int, int], resized: tuple[int, int]) -> tuple[int, int]:
    return {"input": image, "resized": resized, "norm1000": (1000, 1000)}[coordinates]


def to_space(v: int, size: int, space: int) -> int:
    """An input-pixel coordinate in the answer's space, rounded half up (integers only)."""
    return (2 * v * space + size) // (2 * size)


def prompt_text(bundle: Bundle, prompt: str, regions: list[list[int]], image: tuple[int, int],
                resized: tuple[int, int]) -> str:
    sw, sh = space_size(bundle.coordinates, image, resized)
    boxes = [[to_space(x1, image[0], sw), to_space(y1, image[1], sh), to_space(x2, image[0], sw),
              to_space(y2, image[1], sh)] for x1, y1, x2, y2 in regions]
    return render(bundle.vlm["template"], {
        "prompt": json_text(prompt), "categories": json_text(bundle.categories),
        "tools": json_text(bundle.tools if bundle.vlm.get("allow_tool", False) else []),
        "regions": json_text(boxes), "width": str(sw), "height": str(sh)})


def rope_index(ids: list[int], image_token: int, vision_start: int, grid_thw, merge: int) -> tuple[np.ndarray, int]:
    """get_rope_index for one sequence with at most one image: position ids [3, S] and rope delta."""
    t, h, w = (int(v) for v in grid_thw)
    lh, lw = h // merge, w // merge
    pos = np.zeros((3, len(ids)), np.int64)
    if image_token not in ids:
        pos[:] = np.arange(len(ids))
        return pos, 0
    start = ids.index(image_token)
    assert start > 0 and ids[start - 1] == vision_start, "the image tokens must follow <|vision_start|>"
    n = t * lh * lw
    pos[:, :start] = np.arange(start)
    s = np.arange(n)
    pos[0, start:start + n] = start + s // (lh * lw)
    pos[1, start:start + n] = start + (s // lw) % lh
    pos[2, start:start + n] = start + s % lw
    nxt = start + max(t, lh, lw)          # max of the image positions + 1
    rest = len(ids) - (start + n)
    pos[:, start + n:] = nxt + np.arange(rest)
    max_pos = int(pos.max())
    return pos, max_pos + 1 - len(ids)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
@dataclass
class Sequence:
    request: dict
    prompt_text: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    image: dict = field(default_factory=dict)
    rope_delta: int = 0
    cache: list[np.ndarray] = field(default_factory=list)   # per layer: key, value [kv_heads, L, head_dim]
    length: int = 0
    generated: list[int] = field(default_factory=list)
    stop_reason: str | None = None
    timings: dict = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)          # decode step index of each generated token


def empty_past(bundle: Bundle, batch: int) -> dict[str, np.ndarray]:
    shape = (batch, bundle.kv_heads, 0, bundle.head_dim)
    return {f"past_key_values.{i}.{k}": np.zeros(shape, bundle.kv_dtype)
            for i in range(bundle.layers) for k in ("key", "value")}


def embed(bundle: Bundle, ids: np.ndarray) -> np.ndarray:
    (out,) = bundle.embed.run(None, {"input_ids": ids})
    return out.astype(bundle.decoder_embed_dtype)


def run_decoder(bundle: Bundle, embeds, mask, positions, past) -> tuple[np.ndarray, list[np.ndarray]]:
    outs = bundle.decoder.run(None, {"inputs_embeds": embeds, "attention_mask": mask,
                                     "position_ids": positions, **past})
    names = [o.name for o in bundle.decoder.get_outputs()]
    got = dict(zip(names, outs))
    present = [got[f"present.{i}.{k}"] for i in range(bundle.layers) for k in ("key", "value")]
    return got["logits"], present


def next_token(logits_row: np.ndarray) -> int:
    return int(np.argmax(logits_row.astype(np.float32)))   # first maximum on ties


def finish_if_done(bundle: Bundle, seq: Sequence) -> bool:
    last = seq.generated[-1]
    if last in bundle.stop_tokens:
        seq.stop_reason = "stop_token"
    elif len(seq.generated) >= bundle.max_new_tokens:
        seq.stop_reason = "max_new_tokens"
    return seq.stop_reason is not None


def prefill(bundle: Bundle, req: dict, base: str) -> Sequence:
    seq = Sequence(req)
    t0 = time.perf_counter()
    rgb = load_rgb(os.path.join(base, req["image"]))
    vis = preprocess(rgb, bundle.vlm)
    h, w = rgb.shape[:2]
    seq.prompt_text = prompt_text(bundle, req["prompt"], req.get("regions", []), (w, h), vis.resized)
    ids = bundle.tokenizer.encode(seq.prompt_text, add_special_tokens=False).ids
    merge = int(bundle.vlm["merge_size"])
    n_image = int(np.prod(vis.grid_thw[0])) // (merge * merge)
    at = ids.index(bundle.image_token)
    ids = ids[:at] + [bundle.image_token] * n_image + ids[at + 1:]
    seq.prompt_ids = ids
    (features,) = bundle.vision.run(None, {"pixel_values": vis.pixel_values.astype(bundle.pixel_dtype),
                                           bundle.grid_name: vis.grid_thw})
    t1 = time.perf_counter()
    embeds = embed(bundle, np.array([ids], np.int64))
    rows = np.flatnonzero(np.array(ids) == bundle.image_token)
    assert len(rows) == features.shape[0], "image features do not match the image tokens"
    embeds[0, rows] = features.astype(embeds.dtype)
    pos, seq.rope_delta = rope_index(ids, bundle.image_token, bundle.vision_start, vis.grid_thw[0], merge)
    logits, present = run_decoder(bundle, embeds, np.ones((1, len(ids)), np.int64), pos[:, None, :],
                                  empty_past(bundle, 1))
    seq.cache = [p[0] for p in present]
    seq.length = len(ids)
    seq.generated.append(next_token(logits[0, -1]))
    t2 = time.perf_counter()
    seq.image = {"width": w, "height": h, "resized_width": vis.resized[0], "resized_height": vis.resized[1],
                 "grid_thw": vis.grid_thw[0].tolist(), "image_tokens": n_image,
                 "pixel_values_sha256": hashlib.sha256(vis.pixel_values.astype("<f4").tobytes()).hexdigest()}
    seq.timings = {"vision_ms": (t1 - t0) * 1e3, "prefill_ms": (t2 - t1) * 1e3, "decode_ms": 0.0,
                   "time_to_first_token_ms": (t2 - t0) * 1e3}
    seq.steps.append(-1)
    seq.pixel_values, seq.position_ids = vis.pixel_values, pos
    return seq


def decode_step(bundle: Bundle, active: list[Sequence], step: int) -> None:
    """One token for every active sequence: caches left-padded into one batch."""
    t0 = time.perf_counter()
    batch, longest = len(active), max(s.length for s in active)
    past = {}
    for li in range(bundle.layers):
        for ki, kind in enumerate(("key", "value")):
            arr = np.zeros((batch, bundle.kv_heads, longest, bundle.head_dim), bundle.kv_dtype)
            for b, s in enumerate(active):
                arr[b, :, longest - s.length:] = s.cache[2 * li + ki]
            past[f"past_key_values.{li}.{kind}"] = arr
    mask = np.zeros((batch, longest + 1), np.int64)
    positions = np.zeros((3, batch, 1), np.int64)
    for b, s in enumerate(active):
        mask[b, longest - s.length:] = 1
        positions[:, b, 0] = s.length + s.rope_delta
    ids = np.array([[s.generated[-1]] for s in active], np.int64)
    logits, present = run_decoder(bundle, embed(bundle, ids), mask, positions, past)
    dt = (time.perf_counter() - t0) * 1e3
    for b, s in enumerate(active):
        s.cache = [p[b, :, longest - s.length:] for p in present]
        s.length += 1
        s.generated.append(next_token(logits[b, -1]))
        s.steps.append(step)
        s.timings["decode_ms"] += dt


def run_sequential(bundle: Bundle, requests: list[dict], base: str) -> tuple[list[Sequence], list[list[str]]]:
    done, schedule = [], []
    for req in requests:
        seq = prefill(bundle, req, base)
        step = 0
        while not finish_if_done(bundle, seq):
            decode_step(bundle, [seq], step)
            schedule.append([req["id"]])
            step += 1
        done.append(seq)
    return done, schedule


def run_batched(bundle: Bundle, requests: list[dict], base: str, max_active: int) -> tuple[list[Sequence], list[list[str]]]:
    """Continuous batching: at each step, admit arrived requests (prefill, one at a time) up to
    max_active, then one decode step for all active sequences; finished ones leave."""
    pending = sorted(range(len(requests)), key=lambda i: (int(requests[i].get("arrival", 0)), i))
    results: dict[int, Sequence] = {}
    active: list[tuple[int, Sequence]] = []
    schedule: list[list[str]] = []
    step = 0
    while pending or active:
        while pending and int(requests[pending[0]].get("arrival", 0)) <= step and len(active) < max_active:
            i = pending.pop(0)
            seq = prefill(bundle, requests[i], base)
            (results.__setitem__(i, seq) if finish_if_done(bundle, seq) else active.append((i, seq)))
        if active:
            decode_step(bundle, [s for _, s in active], step)
            schedule.append([s.request["id"] for _, s in active])
            still = []
            for i, s in active:
                (results.__setitem__(i, s) if finish_if_done(bundle, s) else still.append((i, s)))
            active = still
        step += 1
    return [results[i] for i in range(len(requests))], schedule


def report(bundle: Bundle, seq: Sequence) -> dict:
    gen = seq.generated
    body = gen[:-1] if seq.stop_reason == "stop_token" else gen
    text = bundle.tokenizer.decode(body, skip_special_tokens=False)
    img = seq.image
    answer = validate(text, categories=bundle.categories, tools=bundle.tools,
                      allow_tool=bool(bundle.vlm.get("allow_tool", False)), max_regions=bundle.max_regions,
                      coordinates=bundle.coordinates, image_w=img["width"], image_h=img["height"],
                      resized_w=img["resized_width"], resized_h=img["resized_height"])
    return {"id": seq.request["id"], "prompt_text": seq.prompt_text, "prompt_ids": seq.prompt_ids,
            "prompt_tokens": len(seq.prompt_ids), "image": img, "rope_delta": seq.rope_delta,
            "generated_ids": gen, "generated_tokens": len(gen), "stop_reason": seq.stop_reason,
            "text": text, "answer": answer.to_json(), "decode_steps": seq.steps,
            "timings_ms": {k: round(v, 3) for k, v in seq.timings.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("requests", help="JSON list of requests")
    ap.add_argument("--bundle", default=HERE, help="bundle folder (default: models/vlm-reference)")
    ap.add_argument("--mode", choices=("sequential", "batched"), default="sequential")
    ap.add_argument("--max-active", type=int, default=8, help="batched mode: active sequences at most")
    ap.add_argument("--max-new-tokens", type=int, help="override reasoning.vlm.max_new_tokens")
    ap.add_argument("--dump", help="write <id>.pixel_values.f32 and <id>.position_ids.i64 (raw little-endian) here")
    args = ap.parse_args(argv)

    bundle = Bundle(args.bundle, args.max_new_tokens)
    with open(args.requests, encoding="utf-8") as f:
        requests = json.load(f)
    base = os.path.dirname(os.path.abspath(args.requests))
    if args.mode == "batched":
        seqs, schedule = run_batched(bundle, requests, base, max(1, args.max_active))
    else:
        seqs, schedule = run_sequential(bundle, requests, base)
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        for s in seqs:
            s.pixel_values.astype("<f4").tofile(os.path.join(args.dump, f"{s.request['id']}.pixel_values.f32"))
            s.position_ids.astype("<i8").tofile(os.path.join(args.dump, f"{s.request['id']}.position_ids.i64"))
    out = {"mode": args.mode, "bundle": bundle.manifest["name"],
           "model": {"layers": bundle.layers, "kv_heads": bundle.kv_heads, "head_dim": bundle.head_dim,
                     "kv_dtype": np.dtype(bundle.kv_dtype).name, "grid_input": bundle.grid_name},
           "decode_batches": schedule, "results": [report(bundle, s) for s in seqs]}
    json.dump(out, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
