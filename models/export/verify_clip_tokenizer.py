#!/usr/bin/env python3
"""Check a CLIP tokenizer.json token for token against two independent CLIP tokenizers.

  1. open_clip's SimpleTokenizer (OpenAI's original pure-Python BPE: ftfy + html unescape,
     CLIP's regex, its own merge loop), from the open-clip-torch wheel;
  2. transformers' CLIPTokenizer built from vocab.json + merges.txt written from the same
     vocabulary (what a diffusers export's tokenizer/ folder holds), with
     padding="max_length", max_length=77, truncation=True, as the Stable Diffusion pipelines call it.

One-off, outside the project's environment (open_clip imports torch at module level; a stub
stands in for it, the tokenizer does not use it):

    python3 -m venv /tmp/clipv && /tmp/clipv/bin/pip install -r models/export/requirements-verify.txt
    /tmp/clipv/bin/pip install --no-deps open-clip-torch==3.3.0
    /tmp/clipv/bin/python models/export/verify_clip_tokenizer.py TOKENIZER_JSON [--pad-token '<|endoftext|>']

Exits non-zero when an id differs anywhere except in the documented gap (CLEANING_GAP below):
the original tokenizer un-escapes HTML entities and repairs mojibake with ftfy before
tokenizing, the tokenizer.json (like every HuggingFace CLIP tokenizer) does not; and open_clip
does not treat the literal text "<|endoftext|>" as its special token.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import types

from tokenizers import Tokenizer
from transformers import CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_tokenizer  # noqa: E402

PROMPTS = [
    "",
    "a photo of a cat",
    "A Photo Of A CAT",
    "a violinist on a rainy street, cinematic light",
    "Malformed hand (1234 px, confidence 0.99): fingers are fused, missing or extra.",
    "don't won't it's we're they've I'm you'll he'd",
    "DON'T IT'S",
    "hello!!! what?? ... --- ;;; (brackets) [square] {curly} <angle>",
    "numbers 12345 and 3.14159 and 1,000,000 and 2nd 3rd",
    "tabs\tand\nnewlines  and   spaces",
    "  leading and trailing spaces  ",
    "café naïve résumé façade Ångström",
    "cafe\u0301 (combining accent, NFC)",
    "日本語のテキスト 中文 한국어",
    "emoji 🙂🎨🔥 and symbols © ® ™ € £ ¥",
    "Ünïcödé ÄÖÜ ẞ ß",
    "magenta red green blue yellow white black orange",
    "a,b.c;d:e!f?g",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "URL https://example.com/path?q=1&r=2 and email a.b@c.de",
    " ".join(["word"] * 100),
    " ".join(f"token{i}" for i in range(60)),
    "a " * 80 + "end",
]
# The original tokenizer's pre-cleaning (html.unescape, ftfy.fix_text) is not part of any
# HuggingFace CLIP tokenizer: these inputs are expected to differ from open_clip only.
# And open_clip names its special tokens <start_of_text> / <end_of_text>, so it reads the
# literal text "<|endoftext|>" as punctuation and words; OpenAI's original tokenizer and every
# HuggingFace CLIP tokenizer read it as the special token itself.
CLEANING_GAP = [
    "fish &amp; chips &lt;3",
    "mojibake: cafÃ© â€œquotesâ€\x9d",
    "<|startoftext|> inside <|endoftext|> text",
]


def load_simple_tokenizer():
    stub = None
    if "torch" not in sys.modules:
        stub = types.ModuleType("torch")
        stub.LongTensor = stub.Tensor = object
        sys.modules["torch"] = stub
    # located, not imported: open_clip/__init__ needs torch
    path = os.path.join(importlib.util.find_spec("open_clip").submodule_search_locations[0], "tokenizer.py")
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if stub is not None:
        del sys.modules["torch"]
    return module.SimpleTokenizer(), os.path.join(os.path.dirname(path), "bpe_simple_vocab_16e6.txt.gz")


def simple_ids(tok, text: str, pad_id: int) -> list[int]:
    """open_clip's __call__ without torch: sot + ids + eot, cut to 77 with eot last, padded."""
    ids = [tok.sot_token_id] + tok.encode(text) + [tok.eot_token_id]
    if len(ids) > 77:
        ids = ids[:77]
        ids[-1] = tok.eot_token_id
    return ids + [pad_id] * (77 - len(ids))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tokenizer_json")
    ap.add_argument("--pad-token", default=clip_tokenizer.EOS)
    args = ap.parse_args(argv)

    ours = Tokenizer.from_file(args.tokenizer_json)
    simple, bpe_path = load_simple_tokenizer()
    with open(bpe_path, "rb") as f:
        vocab, merges = clip_tokenizer.vocab_from_bpe(f.read())
    pad_id = vocab[args.pad_token]

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        hf = CLIPTokenizer(vocab=os.path.join(tmp, "vocab.json"), merges=os.path.join(tmp, "merges.txt"),
                           pad_token=args.pad_token)
        # the --hf-tokenizer path of the converter must give the same file as the vocabulary
        converted = clip_tokenizer.tokenizer_json(*clip_tokenizer.vocab_from_hf(tmp), args.pad_token)
    with open(args.tokenizer_json, encoding="utf-8") as f:
        same_file = f.read() == converted
    print(f"{'ok  ' if same_file else 'FAIL'} converting vocab.json + merges.txt gives the same tokenizer.json")

    failures = 0 if same_file else 1
    for text in PROMPTS + CLEANING_GAP:
        got = ours.encode(text).ids
        want_simple = simple_ids(simple, text, pad_id)
        want_hf = hf(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        gap = text in CLEANING_GAP
        ok_simple = got == want_simple
        ok_hf = got == want_hf
        if not ok_hf or (not ok_simple and not gap):
            failures += 1
        status = "ok  " if ok_hf and ok_simple else ("gap " if ok_hf and gap else "FAIL")
        print(f"{status} {sum(i != pad_id for i in got[1:]) + 1:2d} ids  open_clip={'=' if ok_simple else 'x'} "
              f"transformers={'=' if ok_hf else 'x'}  {text[:60]!r}")
        if not ok_simple and not gap:
            print("     ours     ", got)
            print("     open_clip", want_simple)
        if not ok_hf:
            print("     ours        ", got)
            print("     transformers", want_hf)
    print(f"{len(PROMPTS) + len(CLEANING_GAP)} prompts, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
