"""Scores a bundle's perception.onnx on a benchmark split with ONNX Runtime, as the worker runs it.

    python models/blemish/evaluate.py [--split test] [--bundle models/blemish] [--json OUT]
    python models/blemish/evaluate.py --split val --choose-tau     # the bundle's threshold

Per image: the manifest's prompt tokenised like the worker (no special tokens, truncated to
`max_tokens`, right-padded with 0), pixels normalised with the bundle's mean/std (the benchmark
images are already the model's input size), the saliency map resized bilinearly (half-pixel,
no antialiasing: the worker's Map::resize) to the image, and compared with `mask > 127`.

Reported, overall and per class (the keys of design §4.8 where they exist):
- `auc`: pixel ROC AUC over every pixel of the images considered (for a class: its images);
- `iou`: |saliency > tau AND mask| / |saliency > tau OR mask| summed over defect images;
- `recall`: share of ground-truth regions (8-connected) with at least one pixel above tau;
- `false_positive_area`: mean share of pixels above tau on images whose mask is empty
  (`none` and `intended` also separately).
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from scipy import ndimage
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def pixel_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U), ties counted half; NaN without both kinds of pixel."""
    s = scores.ravel().astype(np.float64)
    y = labels.ravel().astype(bool)
    pos = int(y.sum())
    neg = y.size - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    ranks = np.empty(s.size, np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def upsample(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear, align_corners=False, edges clamped (PyTorch's interpolate; the worker's)."""
    def axis(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, src - 1)
        return lo, hi, (x - lo).astype(np.float32)

    ylo, yhi, fy = axis(m.shape[0], h)
    xlo, xhi, fx = axis(m.shape[1], w)
    rows = m[ylo] * (1 - fy)[:, None] + m[yhi] * fy[:, None]
    return rows[:, xlo] * (1 - fx) + rows[:, xhi] * fx


class Perception:
    def __init__(self, bundle: Path) -> None:
        spec = tomllib.loads((bundle / "bundle.toml").read_text())
        p = spec["perception"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.session = ort.InferenceSession(str(bundle / p["model"]), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(bundle / p["tokenizer"]))
        self.size, self.max_tokens = p["input_size"], p["max_tokens"]
        self.mean = np.array(p["mean"], np.float32)
        self.std = np.array(p["std"], np.float32)
        self.tau = spec["defaults"]["saliency_threshold"]

    def __call__(self, images: list[np.ndarray], prompts: list[str]) -> list[np.ndarray]:
        ids = np.zeros((len(prompts), self.max_tokens), np.int64)
        mask = np.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            got = self.tokenizer.encode(prompt, add_special_tokens=False).ids[: self.max_tokens]
            ids[i, : len(got)], mask[i, : len(got)] = got, 1
        px = []
        for img in images:
            if img.shape[:2] != (self.size, self.size):
                img = np.asarray(Image.fromarray(img).resize((self.size, self.size), Image.Resampling.BILINEAR))
            px.append(((img.astype(np.float32) / 255.0 - self.mean) / self.std).transpose(2, 0, 1))
        sal = self.session.run(["saliency"], {"pixel_values": np.stack(px), "input_ids": ids,
                                              "attention_mask": mask})[0]
        return [upsample(s[0], img.shape[0], img.shape[1]) for s, img in zip(sal, images)]


def run(perception: Perception, folder: Path) -> tuple[list[dict], list[np.ndarray], list[np.ndarray]]:
    lines = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines() if x.strip()]
    maps, masks = [], []
    for s in range(0, len(lines), 16):
        chunk = lines[s:s + 16]
        images = [np.asarray(Image.open(folder / x["image"]).convert("RGB")) for x in chunk]
        maps += perception(images, [x["prompt"] for x in chunk])
        masks += [np.asarray(Image.open(folder / x["mask"]).convert("L")) > 127 for x in chunk]
    return lines, maps, masks


def localisation(maps: list[np.ndarray], masks: list[np.ndarray], tau: float, auc: bool = True) -> dict:
    out: dict = {"images": len(maps)}
    if auc:
        out["auc"] = pixel_auc(np.concatenate([m.ravel() for m in maps]),
                               np.concatenate([m.ravel() for m in masks]))
    inter = union = regions = hit = 0
    fp = []
    for s, m in zip(maps, masks):
        above = s > tau
        if m.any():
            inter += int((above & m).sum())
            union += int((above | m).sum())
            labels, n = ndimage.label(m, structure=np.ones((3, 3)))
            regions += n
            hit += len(set(np.unique(labels[above])) - {0})
        else:
            fp.append(float(above.mean()))
    out["iou"] = inter / union if union else float("nan")
    out["recall"] = hit / regions if regions else float("nan")
    out["false_positive_area"] = float(np.mean(fp)) if fp else float("nan")
    return out


def report(lines: list[dict], maps: list[np.ndarray], masks: list[np.ndarray], tau: float) -> dict:
    result = localisation(maps, masks, tau)
    result["tau"] = tau
    per_class = {}
    for cls in sorted({x["class"] for x in lines}):
        idx = [i for i, x in enumerate(lines) if x["class"] == cls]
        per_class[cls] = localisation([maps[i] for i in idx], [masks[i] for i in idx], tau)
    result["per_class"] = per_class
    return result


def choose_tau(maps: list[np.ndarray], masks: list[np.ndarray]) -> tuple[float, list[tuple[float, float, float]]]:
    """The threshold (0.10 to 0.90 in steps of 0.05) with the best pooled IoU on defect images;
    a tie goes to the higher threshold (fewer false alarms)."""
    table = []
    for tau in np.round(np.arange(0.1, 0.95, 0.05), 2):
        r = localisation(maps, masks, float(tau), auc=False)
        table.append((float(tau), r["iou"], r["false_positive_area"]))
    best = max(round(t[1], 3) for t in table)
    return max(t[0] for t in table if round(t[1], 3) == best), table


def main() -> None:
    ap = argparse.ArgumentParser(description="score perception on a benchmark split")
    ap.add_argument("--bundle", type=Path, default=HERE)
    ap.add_argument("--bench", type=Path, default=ROOT / "target/quality/bench")
    ap.add_argument("--split", default="test")
    ap.add_argument("--manifest-dir", type=Path, help="score this folder's manifest.jsonl instead")
    ap.add_argument("--choose-tau", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    perception = Perception(args.bundle)
    folder = args.manifest_dir or args.bench / args.split
    lines, maps, masks = run(perception, folder)
    if args.choose_tau:
        tau, table = choose_tau(maps, masks)
        for t, iou, fp in table:
            print(f"tau {t:.2f}: iou {iou:.4f} false_positive_area {fp:.4f}")
        print(f"chosen tau {tau}")
        return
    result = report(lines, maps, masks, perception.tau)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
