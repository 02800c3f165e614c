#!/usr/bin/env python3
"""Build the HuggingFace `tokenizer.json` of a CLIP text encoder (Stable Diffusion 1.x / 2.x).

The vocabulary is the real CLIP BPE vocabulary, taken from one of:

  --open-clip           `bpe_simple_vocab_16e6.txt.gz` inside the PyPI wheel open-clip-torch==3.3.0
                        (MIT; the vocabulary OpenAI published with CLIP, MIT), downloaded with pip
                        (`pip download --no-deps`, nothing is installed) and checked by sha256
  --bpe FILE            that .txt.gz file, already on disk (checked by sha256)
  --hf-tokenizer DIR    a diffusers / optimum export's `tokenizer/` folder (`vocab.json` + `merges.txt`)

and the file written is what transformers' CLIPTokenizer builds from the same vocabulary:

  normalizer      NFC, whitespace runs -> " ", lower case
  pre-tokenizer   split on <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+
                  (CLIP's own pattern; the text between matches, i.e. whitespace, is dropped), then
                  byte-level (GPT-2's byte -> unicode table)
  model           BPE, 49408 ids: 256 byte symbols, the same 256 with "</w>", 48894 merges,
                  <|startoftext|> = 49406, <|endoftext|> = 49407 (also the unknown token);
                  end-of-word suffix "</w>", no continuing-subword prefix
  post-processor  <|startoftext|> text <|endoftext|>
  truncation      77 tokens including the two special tokens (so at most 75 text tokens; the
                  last id of a truncated prompt is still <|endoftext|>)
  padding         to exactly 77 with --pad-token: "<|endoftext|>" (49407) as Stable Diffusion
                  1.x's tokenizer, or "!" (id 0) as Stable Diffusion 2.x's and open_clip's
  decoder         byte-level

Only the standard library is needed (pip for --open-clip). The output is deterministic.

    python3 models/export/clip_tokenizer.py --open-clip --pad-token '<|endoftext|>' --out tokenizer.json
    python3 models/export/clip_tokenizer.py --hf-tokenizer EXPORT/tokenizer --out EXPORT/tokenizer/tokenizer.json
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile

OPEN_CLIP_PACKAGE = "open-clip-torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses: lines 1 .. 48894 of the file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
MAX_LENGTH = 77
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (CLIP uses the same)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def vocab_from_bpe(data: bytes) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges from bpe_simple_vocab_16e6.txt.gz (its bytes)."""
    got = hashlib.sha256(data).hexdigest()
    if got != BPE_SHA256:
        raise SystemExit(f"CLIP vocabulary has sha256 {got}, expected {BPE_SHA256}")
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = lines[1:NUM_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or vocab[BOS] != BOS_ID or vocab[EOS] != EOS_ID:
        raise SystemExit("unexpected CLIP vocabulary layout")
    return vocab, merges


def vocab_from_hf(folder: str) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges of a transformers CLIPTokenizer folder (vocab.json + merges.txt)."""
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [line for line in lines if line and not line.startswith("#version")]
    if vocab.get(BOS) != BOS_ID or vocab.get(EOS) != EOS_ID:
        raise SystemExit(f"{folder}: not a CLIP vocabulary ({BOS} must be {BOS_ID}, {EOS} {EOS_ID})")
    return vocab, merges


def download_open_clip_bpe() -> bytes:
    """bpe_simple_vocab_16e6.txt.gz out of the pinned open-clip-torch wheel (nothing installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
             "--only-binary=:all:", "--dest", tmp, OPEN_CLIP_PACKAGE],
            check=True,
        )
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if len(wheels) != 1:
            raise SystemExit(f"pip download {OPEN_CLIP_PACKAGE} gave {wheels}")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
            return z.read(BPE_MEMBER)


def tokenizer_json(vocab: dict[str, int], merges: list[str], pad_token: str) -> str:
    """The tokenizer.json text (HuggingFace `tokenizers` format)."""
    if pad_token not in vocab:
        raise SystemExit(f"pad token {pad_token!r} is not in the vocabulary")

    def added(token: str, i: int) -> dict:
        return {"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": True, "special": True}

    doc = {
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": MAX_LENGTH, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": MAX_LENGTH}, "direction": "Right", "pad_to_multiple_of": None,
                    "pad_id": vocab[pad_token], "pad_type_id": 0, "pad_token": pad_token},
        "added_tokens": [added(BOS, BOS_ID), added(EOS, EOS_ID)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"},
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Removed", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": [EOS, EOS_ID], "cls": [BOS, BOS_ID],
                           "trim_offsets": False, "add_prefix_space": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": EOS, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False,
                  "vocab": dict(sorted(vocab.items(), key=lambda kv: kv[1])),
                  "merges": merges},
    }
    return json.dumps(doc, ensure_ascii=False, indent=1) + "\n"


def build(source: str, pad_token: str, bpe: str | None = None, hf_folder: str | None = None) -> bytes:
    """tokenizer.json bytes from `source` ("open-clip" | "bpe" | "hf")."""
    if source == "open-clip":
        vocab, merges = vocab_from_bpe(download_open_clip_bpe())
    elif source == "bpe":
        with open(bpe, "rb") as f:
            vocab, merges = vocab_from_bpe(f.read())
    elif source == "hf":
        vocab, merges = vocab_from_hf(hf_folder)
    else:
        raise ValueError(source)
    return tokenizer_json(vocab, merges, pad_token).encode("utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--open-clip", action="store_true", help=f"download {OPEN_CLIP_PACKAGE} with pip and use its vocabulary")
    src.add_argument("--bpe", help="bpe_simple_vocab_16e6.txt.gz on disk")
    src.add_argument("--hf-tokenizer", help="a CLIPTokenizer folder with vocab.json and merges.txt")
    ap.add_argument("--pad-token", default=EOS,
                    help=f"padding token: {EOS!r} (SD 1.x, id {EOS_ID}, the default) or '!' (SD 2.x, id 0)")
    ap.add_argument("--out", required=True, help="tokenizer.json to write")
    args = ap.parse_args(argv)
    source = "open-clip" if args.open_clip else "bpe" if args.bpe else "hf"
    data = build(source, args.pad_token, bpe=args.bpe, hf_folder=args.hf_tokenizer)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "wb") as f:
        f.write(data)
    print(f"{hashlib.sha256(data).hexdigest()}  {args.out} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
