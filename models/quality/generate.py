"""Blemish benchmark generator: real photographs + synthetic defects + prompts -> train/val/test.

    python models/quality/generate.py [--out target/quality/bench] [--seed 12] [--splits test,val,train]
                                      [--ci-slice]

Writes, per split, `{split}/manifest.jsonl` and `{split}/{id}.png` (the image), `{id}-mask.png`
(8-bit, 255 = defect) and `{id}-clean.png` (the same crop before defects). One manifest line per
image, paths relative to the manifest (design §4.8):

    {"id", "image", "prompt", "mask", "clean", "class", "intended"?}

`class` is the defect class (defects.CLASSES), "none" for a defect-free image with an ordinary
prompt, or "intended" for an image whose prompt asks for an effect that looks like a defect and
that the image shows (unmarked: mask all zero). `intended` names that effect when there is one
(also on some defect images, whose prompt then asks for an effect of another class). Images with
an all-zero mask point `clean` at the image itself. Same seed, same packages -> byte-identical
files. `--ci-slice` also rewrites models/quality/ci-slice/ (a fixed part of the test split) and
models/quality/classes.png (one test image per class, ground truth tinted red).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import defects
import photos

SIZE = 256
SAMPLES_PER_PHOTO = {"train": 160, "val": 48, "test": 50}
SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
# Shares of the three kinds of image.
P_DEFECT, P_NONE = 0.62, 0.16  # the rest: "intended"
P_DEFECT_WITH_INTENDED = 0.25

# Prompts that ask for an effect which looks like a defect. The last phrasing of each is held out
# from training (used only in val/test), to see whether the text encoder generalises.
INTENDED_PHRASES: dict[str, tuple[str, ...]] = {
    "warp": ("a surreal wavy distortion", "a rippling funhouse mirror effect",
             "seen through wobbly glass", "a psychedelic swirl effect"),
    "patch": ("a collage of cut-out pieces", "a photomontage with repeated fragments",
              "a cubist collage", "a cut-and-paste scrapbook look"),
    "melt": ("a melting surreal dreamscape in the style of Dali", "dripping melted textures",
             "liquid melting shapes", "as if it were melting in the heat"),
    "blotch": ("a watercolour with paint blotches", "splashes of coloured paint",
               "colour stains and ink spots", "drops of paint spattered over it"),
    "blur": ("motion blur", "a dreamy soft-focus effect", "shallow depth of field with blurred areas",
             "a long exposure with blurry movement"),
    "noise": ("heavy film grain", "a grainy high ISO look", "analog noise texture",
              "a noisy night shot"),
    "stretch": ("glitch art stripes", "pixel sorting glitch effect", "datamosh streaks",
                "a digital glitch with smeared bands"),
    "text": ("scribbled handwriting all over it", "graffiti scrawls", "covered in doodles and scribbles",
             "with random ink squiggles drawn on top"),
}
STYLES = ("", ", photograph", ", high detail", ", 35mm photo", ", natural light", ", award-winning photo",
          ", sharp focus", ", 4k")
CI_SLICE = {"per_class": 2, "none": 4, "intended": 4}


@dataclass
class Sample:
    id: str
    image: np.ndarray  # uint8 HxWx3
    clean: np.ndarray
    mask: np.ndarray  # uint8 HxW, 0 or 255
    prompt: str
    cls: str
    intended: str | None


def crop(photo: Image.Image, rng: np.random.Generator) -> np.ndarray:
    w, h = photo.size
    side = int(rng.integers(200, min(w, h) + 1))
    x = int(rng.integers(0, w - side + 1))
    y = int(rng.integers(0, h - side + 1))
    out = photo.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    arr = np.asarray(out, np.float32) / 255.0
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def _apply(img: np.ndarray, cls: str, rng: np.random.Generator, count: int,
           radius_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """`count` visible regions of `cls` (each redrawn up to 12 times until it shows)."""
    mask = np.zeros(img.shape[:2], bool)
    for _ in range(count):
        for attempt in range(12):
            radius = rng.uniform(*radius_range) * (1.0 + 0.1 * attempt)
            out, m, visible = defects.draw(img, cls, rng, radius)
            if visible:
                img, mask = out, mask | m
                break
    return img, mask


def phrase(effect: str, split: str, rng: np.random.Generator) -> str:
    options = INTENDED_PHRASES[effect]
    if split == "train":
        options = options[:-1]
    return options[int(rng.integers(len(options)))]


def make(photo: photos.Photo, image: Image.Image, split: str, index: int, seed: int) -> Sample:
    rng = np.random.default_rng([seed, SPLIT_INDEX[split], index])
    clean = crop(image, rng)
    caption = photo.captions[int(rng.integers(len(photo.captions)))]
    prompt = caption + STYLES[int(rng.integers(len(STYLES)))]
    u = rng.random()
    img, mask = clean, np.zeros(clean.shape[:2], bool)
    intended: str | None = None
    if u < P_DEFECT:
        cls = defects.CLASSES[int(rng.integers(len(defects.CLASSES)))]
        if rng.random() < P_DEFECT_WITH_INTENDED:
            intended = str(rng.choice([c for c in defects.CLASSES if c != cls]))
    elif u < P_DEFECT + P_NONE:
        cls = "none"
    else:
        cls = "intended"
        intended = defects.CLASSES[int(rng.integers(len(defects.CLASSES)))]
    if intended is not None:
        # The effect the prompt asks for is painted first and is part of the intended picture.
        img, _ = _apply(img, intended, rng, int(rng.integers(1, 4)), (18.0, 60.0))
        clean = img
        prompt = f"{caption}, {phrase(intended, split, rng)}"
    if cls not in ("none", "intended"):
        img, mask = _apply(img, cls, rng, int(rng.integers(1, 3)), (10.0, 46.0))
    to8 = lambda a: (np.clip(a, 0, 1) * 255.0 + 0.5).astype(np.uint8)  # noqa: E731
    return Sample(f"{split}-{index:05d}-{photo.id}", to8(img), to8(clean),
                  mask.astype(np.uint8) * 255, prompt, cls, intended)


def _png(arr: np.ndarray, path: Path, level: int = 1) -> None:
    Image.fromarray(arr).save(path, compress_level=level)


def write(sample: Sample, folder: Path) -> dict:
    _png(sample.image, folder / f"{sample.id}.png")
    _png(sample.mask, folder / f"{sample.id}-mask.png")
    defect_free = not sample.mask.any()
    if not defect_free:
        _png(sample.clean, folder / f"{sample.id}-clean.png")
    line = {"id": sample.id, "image": f"{sample.id}.png", "prompt": sample.prompt,
            "mask": f"{sample.id}-mask.png",
            "clean": f"{sample.id}.png" if defect_free else f"{sample.id}-clean.png",
            "class": sample.cls}
    if sample.intended is not None:
        line["intended"] = sample.intended
    return line


def generate(out: Path, seed: int, cache: Path, photo_dir: Path,
             splits: tuple[str, ...] = ("test", "val", "train")) -> dict[str, list[dict]]:
    paths = photos.fetch(cache, photo_dir)
    manifests: dict[str, list[dict]] = {}
    for split in splits:
        members = photos.by_split()[split]
        folder = out / split
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        lines = []
        n = SAMPLES_PER_PHOTO[split]
        loaded = {p.id: Image.open(paths[p.id]).convert("RGB") for p in members}
        # Interleaved by photograph so that any prefix of the manifest covers every photograph.
        for i in range(n * len(members)):
            photo = members[i % len(members)]
            lines.append(write(make(photo, loaded[photo.id], split, i, seed), folder))
            if i % 200 == 0:
                print(f"{split}: {i}/{n * len(members)}", flush=True)
        (folder / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        manifests[split] = lines
    return manifests


def ci_slice(test_dir: Path, lines: list[dict], out: Path) -> None:
    """A fixed, small part of the test split: every class, defect-free and intended images."""
    want = {c: CI_SLICE["per_class"] for c in defects.CLASSES}
    want["none"], want["intended"] = CI_SLICE["none"], CI_SLICE["intended"]
    chosen = []
    for line in lines:
        if want.get(line["class"], 0) > 0:
            want[line["class"]] -= 1
            chosen.append(line)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for line in chosen:
        for key in ("image", "mask", "clean"):
            # Recompressed harder: these files are committed.
            _png(np.asarray(Image.open(test_dir / line[key])), out / line[key], level=9)
    (out / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in chosen))


def class_sheet(test_dir: Path, lines: list[dict], path: Path, tile: int = 160) -> None:
    """One test image per class (first in manifest order), ground truth tinted red below it."""
    from PIL import ImageDraw

    order = list(defects.CLASSES) + ["none", "intended"]
    first = {}
    for line in lines:
        first.setdefault(line["class"], line)
    sheet = Image.new("RGB", (tile * 5, (2 * tile + 16) * 2), "white")
    draw = ImageDraw.Draw(sheet)
    for k, cls in enumerate(order):
        line = first[cls]
        img = np.asarray(Image.open(test_dir / line["image"]).convert("RGB").resize((tile, tile)), np.float32)
        m = np.asarray(Image.open(test_dir / line["mask"]).resize((tile, tile)))[..., None] > 127
        tinted = np.where(m, img * 0.45 + np.array([255.0, 0, 0]) * 0.55, img)
        x, y = (k % 5) * tile, (k // 5) * (2 * tile + 16)
        label = cls if cls != "intended" else f"intended ({line['intended']})"
        draw.text((x + 4, y + 2), label, fill="black")
        sheet.paste(Image.fromarray(img.astype(np.uint8)), (x, y + 16))
        sheet.paste(Image.fromarray(tinted.astype(np.uint8)), (x, y + 16 + tile))
    sheet.save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="Blemish benchmark generator")
    ap.add_argument("--out", type=Path, default=Path("target/quality/bench"))
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--cache", type=Path, default=Path("target/quality/cache"))
    ap.add_argument("--photos", type=Path, default=Path("target/quality/photos"))
    ap.add_argument("--splits", default="test,val,train", help="comma-separated subset to write")
    ap.add_argument("--ci-slice", action="store_true", help="also rewrite models/quality/ci-slice/ "
                    "(needs the test split)")
    args = ap.parse_args()
    manifests = generate(args.out, args.seed, args.cache, args.photos, tuple(args.splits.split(",")))
    for split, lines in manifests.items():
        counts: dict[str, int] = {}
        for line in lines:
            counts[line["class"]] = counts.get(line["class"], 0) + 1
        print(split, len(lines), dict(sorted(counts.items())))
    if args.ci_slice:
        here = Path(__file__).resolve().parent
        ci_slice(args.out / "test", manifests["test"], here / "ci-slice")
        class_sheet(args.out / "test", manifests["test"], here / "classes.png")


if __name__ == "__main__":
    main()
