#!/usr/bin/env python3
"""PyTorch eager baseline of the bench bundle's perception graph (img/s per batch size).

    python models/bench/torch_baseline.py BUNDLE [--device cuda|cpu] [--dtype bf16|fp32]
        [--batch-sizes 1,8,32] [--seconds 5] [--warmup 3] [--json OUT]
    python models/bench/torch_baseline.py BUNDLE --check        # CPU, fp32, against onnxruntime

The SAME network as BUNDLE/perception.onnx (models/bench/generate.py: ViT/16 image encoder,
T5-style text encoder with learned absolute positions, fusion self-attention layers, per-patch
saliency head, and the reference rule side branch when the bundle has it), written by hand as an
idiomatic torch module: nn.functional linear / layer_norm / gelu (erf) /
scaled_dot_product_attention (flash or memory-efficient kernels on CUDA), T5 RMSNorm statistics
in float32 as Hugging Face's T5LayerNorm does. Every weight is read from the ONNX initializers
(by the names generate.py gives them), and the sizes (width, heads, layers, image size) from the
graph, so it works for the default, `--image-size`, `--tiny` and `--fp16` bundles (fp16
weights are widened to float32, then cast to --dtype). Point it at the generator's bundle, not at
a fp16.py conversion (fusion renames and merges the weights).

Timing: for each batch size, `--warmup` untimed iterations, then iterations until `--seconds`
have passed (at least `--min-iters`), each: the host float32/int64 input tensors -> device
(pinned host memory, non-blocking copies, as the worker's CUDA path does: src/engine/staging.rs
binds pinned staging buffers through an IoBinding; `--pageable` for plain memory), forward pass
under `torch.inference_mode()`, saliency -> a pinned host tensor; wall-clock time with
`torch.cuda.synchronize()` before the clock is read. So host<->device copies are INCLUDED, like
the worker's model-only figure (`retoucher bench`, models' `model_only_items_per_s`: session
calls with host inputs and outputs). bf16: weights and activations bfloat16, the reference rule
and the output in float32.

`--check`: builds the module on the CPU in float32 and compares its saliency with onnxruntime's
CPU provider on the same seeded inputs (two items, one with a magenta disk and one prompt with the
token `magenta`, padding in the mask), on the saliency and on the head's logits before the sigmoid
(the network itself; the saliency is mostly the rule and a squashed random map): fails above
max |diff| 1e-4 on the saliency or 1e-5 x max(1, max|logit|) on the logits (measured: 1.2e-7 and
4.8e-7 on the --tiny bundle, where dropping the text padding mask moves the logits by 1.2e-4; see
models/bench/README.md), and prints the bfloat16 module's difference for information.

Needs torch (models/bench/requirements-torch.txt, a venv of its own) + onnx (+ onnxruntime for
--check).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time

import numpy as np
import onnx
from onnx import numpy_helper
import torch
import torch.nn.functional as F

CHECK_TOL = 1e-4          # saliency, absolute
LOGITS_TOL = 1e-5         # head logits, x max(1, max|logit|)


# ---------------------------------------------------------------------------------------------
# Reading the ONNX graph: weights by generator name, sizes
# ---------------------------------------------------------------------------------------------
def load_graph(path: str) -> tuple[dict[str, np.ndarray], dict]:
    model = onnx.load(path)
    weights: dict[str, np.ndarray] = {}
    for t in model.graph.initializer:
        name = t.name.split("/", 1)[-1]
        hint = re.sub(r"_\d+$", "", name)
        arr = numpy_helper.to_array(t)
        if arr.dtype == np.float16:
            arr = arr.astype(np.float32)
        weights.setdefault(hint, arr)
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("retoucher.bundle") != "bench" or meta.get("retoucher.agent") != "perception":
        raise SystemExit(f"{path} is not a bench perception graph from models/bench/generate.py "
                         f"(metadata {meta.get('retoucher.bundle')!r}/{meta.get('retoucher.agent')!r})")
    if "vit0_attn_q_w" not in weights and "vit_ln_f_g" not in weights:
        raise SystemExit(f"{path}: the generator's weight names are gone (a fused / converted graph?): "
                         "use the bundle generate.py wrote")
    pix = next(i for i in model.graph.input if i.name == "pixel_values")
    size = pix.type.tensor_type.shape.dim[2].dim_value
    eps = [a.f for n in model.graph.node if n.op_type == "LayerNormalization" for a in n.attribute if a.name == "epsilon"]
    cfg = {
        "image_size": size,
        "width": weights["patch_w"].shape[0],
        "patch": weights["patch_w"].shape[2],
        "heads": int(weights["split_heads"][2]),
        "vit_layers": sum(1 for k in weights if re.fullmatch(r"vit\d+_ln1_g", k)),
        "t5_layers": sum(1 for k in weights if re.fullmatch(r"t5_\d+_rms1_w", k)),
        "fusion_layers": sum(1 for k in weights if re.fullmatch(r"fusion\d+_ln1_g", k)),
        "ln_eps": eps[0] if eps else 1e-6,
        "rms_eps": float(weights.get("eps", 1e-6)),
        "mask_value": float(weights.get("neg", -10000.0)),
        "magenta": meta.get("retoucher.magenta_rule") == "true",
        "params": int(meta.get("retoucher.params", 0)),
        "gflops_per_item": float(meta.get("retoucher.gflops_per_item", 0)),
    }
    return weights, cfg


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------
class BenchPerception(torch.nn.Module):
    def __init__(self, weights: dict[str, np.ndarray], cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.w = torch.nn.ParameterDict()
        for k, v in weights.items():
            if v.dtype == np.float32 and v.size > 1:
                self.w[k.replace(".", "_")] = torch.nn.Parameter(torch.from_numpy(np.array(v, copy=True)), requires_grad=False)
        # the reference rule's constants stay float32 buffers
        if cfg["magenta"]:
            for k in ("std", "mean", "magenta_rgb"):
                self.register_buffer(f"rule_{k}", torch.from_numpy(weights[k].astype(np.float32)).reshape(1, 3, 1, 1))
            self.cap = float(weights["cap"])
            self.r2 = float(weights["r2"])
            self.sharpness = float(weights["sharpness"])
            self.magenta_id = int(weights["magenta_id"])

    # layers ------------------------------------------------------------------------------------
    def linear(self, x, name, bias=True):
        return F.linear(x, self.w[f"{name}_w"].t(), self.w[f"{name}_b"] if bias else None)

    def ln(self, x, name):
        return F.layer_norm(x, (x.shape[-1],), self.w[f"{name}_g"], self.w[f"{name}_b"], self.cfg["ln_eps"])

    def rms(self, x, name):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.cfg["rms_eps"])).to(x.dtype) * self.w[f"{name}_w"]

    def attention(self, x, bias, name, has_bias):
        n, t, d = x.shape
        h = self.cfg["heads"]
        q = self.linear(x, f"{name}_q", has_bias).view(n, t, h, d // h).transpose(1, 2)
        k = self.linear(x, f"{name}_k", has_bias).view(n, t, h, d // h).transpose(1, 2)
        v = self.linear(x, f"{name}_v", has_bias).view(n, t, h, d // h).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)      # scale 1/sqrt(dh), as the graph
        return self.linear(o.transpose(1, 2).reshape(n, t, d), f"{name}_o", has_bias)

    def vit_block(self, x, bias, name):
        x = x + self.attention(self.ln(x, f"{name}_ln1"), bias, f"{name}_attn", True)
        return x + self.linear(F.gelu(self.linear(self.ln(x, f"{name}_ln2"), f"{name}_fc1")), f"{name}_fc2")

    def t5_block(self, x, bias, name):
        x = x + self.attention(self.rms(x, f"{name}_rms1"), bias, f"{name}_attn", False)
        return x + self.linear(F.relu(self.linear(self.rms(x, f"{name}_rms2"), f"{name}_wi", False)), f"{name}_wo", False)

    def key_bias(self, mask, dtype):
        return ((1.0 - mask[:, None, None, :].to(dtype)) * self.cfg["mask_value"]).to(dtype)

    # forward -----------------------------------------------------------------------------------
    def forward(self, pixel_values, input_ids, attention_mask, logits=False):
        c = self.cfg
        dt = self.w["patch_w"].dtype
        n, s, p = pixel_values.shape[0], c["image_size"], c["patch"]
        g = s // p
        x = F.conv2d(pixel_values.to(dt), self.w["patch_w"], self.w["patch_b"], stride=p)        # [N,D,G,G]
        img = (x.flatten(2) + self.w["vit_pos"]).transpose(1, 2)                                    # [N,P,D]
        for i in range(c["vit_layers"]):
            img = self.vit_block(img, None, f"vit{i}")
        img = self.ln(img, "vit_ln_f")

        L = input_ids.shape[1]
        txt = F.embedding(input_ids, self.w["t5_embed"]) + self.w["t5_pos"][:L]
        tbias = self.key_bias(attention_mask, dt)
        for i in range(c["t5_layers"]):
            txt = self.t5_block(txt, tbias, f"t5_{i}")
        txt = self.rms(txt, "t5_final_rms")

        fmask = torch.cat([torch.ones(n, g * g, dtype=attention_mask.dtype, device=attention_mask.device), attention_mask], 1)
        fbias = self.key_bias(fmask, dt)
        x = torch.cat([img, txt], 1)
        for i in range(c["fusion_layers"]):
            x = self.vit_block(x, fbias, f"fusion{i}")
        x = self.ln(x, "fusion_ln_f")
        y = self.linear(x[:, : g * g], "head")                                                      # [N,P,p*p]
        y = F.pixel_shuffle(y.transpose(1, 2).reshape(n, p * p, g, g), p)                          # [N,1,S,S]
        if logits:
            return y.float()
        sal = torch.sigmoid(y).float()
        if not c["magenta"]:
            return sal
        rgb = pixel_values.float() * self.rule_std + self.rule_mean
        d2 = ((rgb - self.rule_magenta_rgb) ** 2).sum(1, keepdim=True)
        rule = torch.sigmoid((self.r2 - d2) * self.sharpness)
        hit = ((input_ids == self.magenta_id).float() * attention_mask.float()).amax(1)
        rule = rule * (1.0 - hit)[:, None, None, None]
        return torch.maximum(sal * self.cap, rule)


# ---------------------------------------------------------------------------------------------
def seeded_inputs(cfg: dict, batch: int, vocab: int, seed: int = 0, max_tokens: int = 32):
    rng = np.random.default_rng(seed)
    s = cfg["image_size"]
    pix = rng.uniform(-1.0, 1.0, (batch, 3, s, s)).astype(np.float32)       # mean = std = 0.5: [-1, 1]
    ids = rng.integers(4, min(vocab, 60), (batch, max_tokens)).astype(np.int64)
    mask = np.ones((batch, max_tokens), np.int64)
    for b in range(batch):
        n = 3 + (7 * b) % (max_tokens - 3)
        ids[b, n:], mask[b, n:] = 0, 0
        ids[b, 0] = 6
        if b % 2 == 0:      # a magenta disk in the image
            yy, xx = np.ogrid[:s, :s]
            disk = (yy - s * 0.4) ** 2 + (xx - s * 0.6) ** 2 <= (s * 0.1) ** 2
            pix[b, 0][disk], pix[b, 1][disk], pix[b, 2][disk] = 1.0, -1.0, 1.0
    if batch > 1:
        ids[1, 1] = 53      # 'magenta' in the prompt: the rule is gated off
    return pix, ids, mask


def build(bundle: str, device: str, dtype: torch.dtype):
    weights, cfg = load_graph(os.path.join(bundle, "perception.onnx"))
    vocab = weights["t5_embed"].shape[0]
    model = BenchPerception(weights, cfg).eval()
    del weights
    for k in list(model.w.keys()):
        model.w[k].data = model.w[k].data.to(device=device, dtype=dtype)
    for name, buf in list(model.named_buffers()):
        setattr(model, name, buf.to(device))
    return model, cfg, vocab


def check(bundle: str) -> int:
    import onnxruntime as ort
    torch.manual_seed(0)
    model, cfg, vocab = build(bundle, "cpu", torch.float32)
    pix, ids, mask = seeded_inputs(cfg, 2, vocab)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    # the head's logits before the sigmoid (DepthToSpace output) as a second output: the saliency
    # alone is mostly the reference rule and a squashed random map, the logits show the network
    graph = onnx.load(os.path.join(bundle, "perception.onnx"))
    d2s = next(n.output[0] for n in graph.graph.node if n.op_type == "DepthToSpace")
    if d2s not in [o.name for o in graph.graph.output]:
        fp16 = any(p.key == "retoucher.dtype" and p.value == "float16" for p in graph.metadata_props)
        elem = onnx.TensorProto.FLOAT16 if fp16 else onnx.TensorProto.FLOAT
        graph.graph.output.append(onnx.helper.make_tensor_value_info(d2s, elem, None))
    sess = ort.InferenceSession(graph.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del graph
    ref, ref_logits = sess.run(["saliency", d2s], {"pixel_values": pix, "input_ids": ids, "attention_mask": mask})
    ref_logits = ref_logits.astype(np.float32)
    t = (torch.from_numpy(pix), torch.from_numpy(ids), torch.from_numpy(mask))
    with torch.inference_mode():
        out = model(*t).numpy()
        logits = model(*t, logits=True).numpy()
    d = np.abs(out.astype(np.float64) - ref)
    dl = np.abs(logits.astype(np.float64) - ref_logits)
    above = int((ref > 0.5).sum())
    print(f"check {bundle}: torch fp32 (CPU) vs onnxruntime {ort.__version__} CPU, batch 2, saliency {list(ref.shape)}: "
          f"max |diff| {d.max():.3g}, mean {d.mean():.3g} (tol {CHECK_TOL}); head logits (range "
          f"{ref_logits.min():.2f}..{ref_logits.max():.2f}, std {ref_logits.std():.3g}): max |diff| {dl.max():.3g}, "
          f"mean {dl.mean():.3g} (tol {LOGITS_TOL} x max(1, max|logit|)); pixels > 0.5: {above} onnxruntime, "
          f"{int((out > 0.5).sum())} torch")
    model16, _, _ = build(bundle, "cpu", torch.bfloat16)
    with torch.inference_mode():
        out16 = model16(*t).numpy()
        logits16 = model16(*t, logits=True).numpy()
    d16 = np.abs(out16.astype(np.float64) - ref)
    dl16 = np.abs(logits16.astype(np.float64) - ref_logits)
    print(f"  for information, torch bf16 (CPU) vs onnxruntime fp32: saliency max |diff| {d16.max():.3g}, "
          f"mean {d16.mean():.3g}; logits max {dl16.max():.3g}, mean {dl16.mean():.3g}")
    ok = bool(np.isfinite(out).all() and d.max() <= CHECK_TOL
              and dl.max() <= LOGITS_TOL * max(1.0, float(np.abs(ref_logits).max()))
              and ((out > 0.5) == (ref > 0.5)).all())
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


def bench(args) -> int:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False     # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.time()
    model, cfg, vocab = build(args.bundle, device, dtype)
    load_s = time.time() - t0

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    results = []
    for b in args.batch_sizes:
        pix, ids, mask = seeded_inputs(cfg, b, vocab, seed=b)
        host = [torch.from_numpy(pix), torch.from_numpy(ids), torch.from_numpy(mask)]
        pinned = device == "cuda" and not args.pageable
        s = cfg["image_size"]
        out_host = torch.empty((b, 1, s, s), dtype=torch.float32, pin_memory=pinned)
        if pinned:
            host = [t.pin_memory() for t in host]

        def step():
            x = [t.to(device, non_blocking=pinned) for t in host]
            out_host.copy_(model(*x), non_blocking=pinned)
            return out_host

        try:
            with torch.inference_mode():
                for _ in range(args.warmup):
                    step()
                sync()
                iters, start = 0, time.perf_counter()
                while True:
                    step()
                    iters += 1
                    sync()
                    elapsed = time.perf_counter() - start
                    if iters >= args.min_iters and elapsed >= args.seconds:
                        break
        except torch.OutOfMemoryError as e:
            results.append({"batch": b, "error": f"out of memory: {e}"[:300]})
            print(f"  batch {b:3d}: out of memory")
            torch.cuda.empty_cache()
            continue
        r = {"batch": b, "iters": iters, "seconds": round(elapsed, 3), "ms_per_batch": round(1000 * elapsed / iters, 3),
             "img_per_s": round(b * iters / elapsed, 2)}
        if cfg["gflops_per_item"]:
            r["tflops"] = round(r["img_per_s"] * cfg["gflops_per_item"] / 1000, 3)
        results.append(r)
        print(f"  batch {b:3d}: {r['img_per_s']:9.2f} img/s, {r['ms_per_batch']:9.2f} ms/batch ({iters} iterations)"
              + (f", ~{r['tflops']} TFLOP/s" if "tflops" in r else ""), flush=True)
    report = {
        "what": "PyTorch eager baseline of the bench perception graph (models/bench/torch_baseline.py)",
        "bundle": os.path.abspath(args.bundle), "device": device, "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "threads": torch.get_num_threads(), "config": cfg, "load_s": round(load_s, 2),
        "timing": "wall clock per iteration: host->device copy of the inputs + forward + device->host copy of the "
                  "saliency, torch.cuda.synchronize() before reading the clock; warm-up iterations excluded",
        "host_memory": "pinned" if device == "cuda" and not args.pageable else "pageable",
        "warmup": args.warmup, "min_seconds": args.seconds, "results": results,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("bundle", help="a bench bundle written by models/bench/generate.py")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (default 1,8,32)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations per batch size (default 3)")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per batch size, at least (default 5)")
    ap.add_argument("--min-iters", type=int, default=5, help="timed iterations per batch size, at least (default 5)")
    ap.add_argument("--pageable", action="store_true",
                    help="CUDA: copy from/to pageable host memory (default: pinned, as the worker's IoBinding)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the report to this file")
    ap.add_argument("--check", action="store_true", help="compare with onnxruntime on the CPU (fp32) and exit")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        return check(args.bundle)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    print(f"torch {torch.__version__} eager, {args.device}, {args.dtype}, bundle {args.bundle}", flush=True)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
