#!/usr/bin/env python3
"""Check the VLM reference bundle and the reference implementation against the documented behaviour.

    python models/vlm-reference/generate.py     # first: writes tokenizer.json (npm) and the graphs
    python models/vlm-reference/check.py        # asserts everything in models/README.md

Runs the graphs with onnxruntime through reference.py and asserts: the session layouts of the
three variants; exact answers for magenta / clean images and for prompts that change the
category, tool, box or format; that a corrupted cache, wrong positions, a missing rope delta, a
wrong grid or an ignored attention mask change the text, while left or right padding with a
correct mask does not; batched == one at a time; fp16 and Qwen2-VL variants == fp32; and the
answer parser tests (test_answer.py). Exits non-zero on the first failure.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference as R  # noqa: E402

sys.path.insert(0, os.path.join(HERE, "..", "export"))
import write_bundle  # noqa: E402

IMAGES = os.path.join(HERE, "images")
HAND = '[{"bbox_2d":[112,56,196,112],"category":"hand","instruction":"Redraw it with five distinct fingers and natural joints."}]'
OBJECT = '[{"bbox_2d":[112,56,196,112],"category":"object","instruction":"Remove the blemish and continue the surrounding texture."}]'
DRAGON = '[{"bbox_2d":[112,56,196,112],"category":"dragon","instruction":"Replace the scales with smooth skin."}]'
FACE_300 = '[{"bbox_2d":[196,28,560,392],"category":"face","instruction":"Make the eyes level and the features symmetric."}]'
OBJECT_640 = ('```json\n[{"bbox_2d":[56,224,168,308],"category":"object","instruction":"Remove the blemish and '
              'continue the surrounding texture."}]\n```')
FLAG_IDS = {1424, 6078, 3579, 12300, 25105, 50436, 10900, 15625, 6884, 83393, 10865, 15683}


def ok(msg: str) -> None:
    print(f"ok   {msg}")


def req(rid: str, prompt: str, image: str = "magenta-224.png", **extra) -> dict:
    return {"id": rid, "image": image, "prompt": prompt, "regions": [[112, 56, 196, 112]], **extra}


def run(bundle: R.Bundle, requests: list[dict], mode: str = "sequential", max_active: int = 8) -> list[dict]:
    if mode == "batched":
        seqs, _ = R.run_batched(bundle, requests, IMAGES, max_active)
    else:
        seqs, _ = R.run_sequential(bundle, requests, IMAGES)
    return [R.report(bundle, s) for s in seqs]


def decode_alone(bundle: R.Bundle, seq: R.Sequence) -> str:
    step = 0
    while not R.finish_if_done(bundle, seq):
        R.decode_step(bundle, [seq], step)
        step += 1
    return R.report(bundle, seq)["text"]


# ---------------------------------------------------------------------------------------------
def check_layouts() -> None:
    for folder, suffix, grid, ft in (("", "", "image_grid_thw", "tensor(float)"),
                                     ("fp16", "_fp16", "image_grid_thw", "tensor(float16)"),
                                     ("qwen2-vl", "", "grid_thw", "tensor(float)")):
        b = R.Bundle(os.path.join(HERE, folder))
        assert b.vlm["vision_encoder"] == f"vision_encoder{suffix}.onnx"
        io = lambda s: ([(i.name, i.type, i.shape) for i in s.get_inputs()],  # noqa: E731
                        [(o.name, o.type, o.shape) for o in s.get_outputs()])
        assert io(b.vision) == ([("pixel_values", ft, ["num_patches", 1176]), (grid, "tensor(int64)", [1, 3])],
                                [("image_features", ft, ["num_merged", 16])]), io(b.vision)
        assert io(b.embed) == ([("input_ids", "tensor(int64)", ["batch_size", "sequence_length"])],
                               [("inputs_embeds", ft, ["batch_size", "sequence_length", 16])])
        ins, outs = io(b.decoder)
        assert ins[:3] == [("inputs_embeds", ft, ["batch_size", "sequence_length", 16]),
                           ("attention_mask", "tensor(int64)", ["batch_size", "total_sequence_length"]),
                           ("position_ids", "tensor(int64)", [3, "batch_size", "sequence_length"])], ins[:3]
        assert outs[0] == ("logits", ft, ["batch_size", "sequence_length", 151936])
        assert [n for n, _, _ in ins[3:]] == [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
        assert [n for n, _, _ in outs[1:]] == [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
        assert all(t == ft and s == ["batch_size", 2, "past_sequence_length", 16] for _, t, s in ins[3:])
        assert (b.layers, b.kv_heads, b.head_dim) == (2, 2, 16)
        assert b.manifest["reasoning"]["vlm"]["fallback"] == ("saliency" if folder == "fp16" else "regions")
        assert ("classifier.onnx" in b.manifest["files"]) == (folder != "fp16")
    ok("layouts: names, ranks and dtypes of the three variants; 2 layers, 2 KV heads of 16 read from the sessions")


def check_tokenizer_and_template(b: R.Bundle) -> None:
    t = b.tokenizer
    for text, want in (("<|im_start|>", 151644), ("<|im_end|>", 151645), ("<|endoftext|>", 151643),
                       ("<|vision_start|>", 151652), ("<|vision_end|>", 151653), ("<|image_pad|>", 151655)):
        assert t.token_to_id(text) == want, text
    assert b.image_token == 151655 and b.vision_start == 151652 and b.stop_tokens == {151645, 151643}
    text = R.prompt_text(b, 'say "hi" <|im_end|>\n<b>', [[1, 2, 30, 40]], (300, 200), (308, 196))
    assert 'Prompt: "say \\"hi\\" \\u003c|im_end|\\u003e\\n\\u003cb\\u003e"\n' in text, text
    assert "Salient regions: [[1,2,31,39]]<|im_end|>" in text, text    # resized space: 30*308/300 = 30.8 -> 31
    assert "of the 308x196 image" in text and '["hand","face","text",' in text
    assert '"tool\" one of ["onnx-inpaint","patchmatch"]' in text
    ids = t.encode(text, add_special_tokens=False).ids
    assert ids.count(151645) == 2 and ids.count(151644) == 3, "job prompt text must not form special tokens"
    assert not FLAG_IDS & set(ids), "the template itself must not contain keyword tokens"
    assert R.render("a {{x}} {{y}}", {"x": "{{y}}", "y": "1"}) == "a {{y}} 1"
    for bad in ("{{nope}}", "{{x"):
        try:
            R.render(bad, {"x": ""})
        except ValueError:
            continue
        raise AssertionError(f"render accepted {bad!r}")
    ok("tokenizer ids; template placeholders, JSON escaping of the job prompt, boxes in the resized space")


def check_preprocessing(b: R.Bundle) -> None:
    sr = lambda h, w: R.smart_resize(h, w, 28, 3136, 200704)  # noqa: E731
    assert sr(224, 224) == (224, 224) and sr(200, 300) == (196, 308) and sr(480, 640) == (364, 504)
    assert sr(28, 28) == (56, 56) and sr(42, 600) == (56, 588) and sr(70, 600) == (56, 588)  # half to even
    assert sr(1000, 1000) == (448, 448)
    rgb = R.load_rgb(os.path.join(IMAGES, "magenta-224.png"))
    v = R.preprocess(rgb, b.vlm)
    assert v.pixel_values.shape == (256, 1176) and v.grid_thw.tolist() == [[1, 16, 16]]
    # row 0 = patch (0,0): channel-major, both temporal frames equal, 14x14 pixels
    x = v.pixel_values[0].reshape(3, 2, 14, 14)
    assert np.array_equal(x[:, 0], x[:, 1])
    # rows 0..3 are the 2x2 patches of merged token 0 (row-major), row 4 starts merged token 1
    # (x = 28), row 32 is merged token 8, the first of the second merged row (y = 28)
    def patch(py: int, px: int) -> np.ndarray:
        p = rgb[py * 14:(py + 1) * 14, px * 14:(px + 1) * 14].astype(np.float64) / 255
        return ((p.astype(np.float32) - np.float32(b.vlm["mean"])) / np.float32(b.vlm["std"])).transpose(2, 0, 1)
    for row, (py, px) in {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1), 4: (0, 2), 5: (0, 3), 32: (2, 0), 64: (4, 0)}.items():
        assert np.array_equal(v.pixel_values[row].reshape(3, 2, 14, 14)[:, 1], patch(py, px)), row
    pos, delta = R.rope_index([1, 2, 151652] + [151655] * 6 + [151653, 7], 151655, 151652, [1, 4, 6], 2)
    assert pos.tolist() == [[0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],
                            [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
                            [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]] and delta == 8 - 11, (pos, delta)
    ok("smart resize, rescale/normalise, patchify order, M-RoPE positions and rope delta")


def check_answers(b: R.Bundle) -> list[dict]:
    cases = [
        (req("hand", "a violinist with six fingers on his hand, cinematic light"), HAND, "stop_token"),
        (req("clean", "a quiet street at night", image="clean-224.png", regions=[]), "[]", "stop_token"),
        (req("object", "a cup of coffee on a table"), OBJECT, "stop_token"),
        (req("no-space", "hand"), OBJECT, "stop_token"),
        (req("both", "her face and his hands"), HAND, "stop_token"),
        (req("face-wide", "portrait, her face in soft light, wide shot", image="magenta-300x200.png",
             regions=[[200, 40, 280, 120]]), FACE_300, "stop_token"),
        (req("fenced", "a red car parked by a fenced garden", image="magenta-640x480.png",
             regions=[[60, 300, 200, 420]]), OBJECT_640, "stop_token"),
        (req("clean-fenced", "a fenced yard", image="clean-224.png"), "```json\n[]\n```", "stop_token"),
        (req("dragon", "a dragon over the city"), DRAGON, "stop_token"),
        (req("patch", "a hand on a patch of grass"), HAND[:-2] + ',"tool":"patchmatch"}]', "stop_token"),
        (req("brush", "a face painted with a brush"),
         HAND[:-2].replace("hand", "face").replace("Redraw it with five distinct fingers and natural joints.",
                                                   "Make the eyes level and the features symmetric.")
         + ',"tool":"airbrush"}]', "stop_token"),
        (req("broken", "a broken vase"), OBJECT[:-1], "stop_token"),
    ]
    results = run(b, [c[0] for c in cases])
    for (r_in, want, stop), got in zip(cases, results):
        assert got["text"] == want and got["stop_reason"] == stop, (r_in["id"], got["text"], got["stop_reason"])
        assert got["generated_ids"][-1] == 151645
        assert b.tokenizer.encode(want, add_special_tokens=False).ids == got["generated_ids"][:-1], r_in["id"]
        assert not FLAG_IDS & set(got["generated_ids"]), "answers must not contain keyword tokens"
    by = {c[0]["id"]: g for c, g in zip(cases, results)}
    a = lambda rid: by[rid]["answer"]  # noqa: E731
    assert a("hand")["regions"] == [{"bbox": [112, 56, 196, 112], "category": "hand", "tool": None, "notes": [],
                                     "instruction": "Redraw it with five distinct fingers and natural joints."}]
    assert a("clean") == {"error": None, "regions": [], "dropped": []}
    assert a("face-wide")["regions"][0]["bbox"] == [190, 28, 300, 200] and a("face-wide")["regions"][0]["notes"] == ["clipped"]
    assert a("fenced")["regions"][0]["bbox"] == [71, 295, 214, 407]
    assert a("dragon") == {"error": None, "regions": [], "dropped": [{"index": 0, "reason": "unknown_category"}]}
    assert a("patch")["regions"][0]["tool"] == "patchmatch"
    assert a("brush")["regions"][0]["tool"] is None and a("brush")["regions"][0]["notes"] == ["unknown_tool"]
    assert a("broken")["error"] == "invalid_json"
    assert by["hand"]["prompt_tokens"] == 228 and by["hand"]["rope_delta"] == -56
    assert by["fenced"]["image"]["grid_thw"] == [1, 26, 36] and by["fenced"]["rope_delta"] == -216

    forever = run(b, [req("forever", "a hand, forever young")])[0]
    assert forever["stop_reason"] == "max_new_tokens" and forever["generated_tokens"] == 128
    assert forever["text"] == HAND + " " * (128 - len(b.tokenizer.encode(HAND, add_special_tokens=False).ids))
    assert len(forever["answer"]["regions"]) == 1
    short = R.Bundle(HERE, max_new_tokens=10)
    cut = run(short, [req("cut", "a hand")])[0]
    assert cut["stop_reason"] == "max_new_tokens" and cut["answer"]["error"] == "invalid_json"
    ok("answers: exact text for magenta / clean images and every keyword; validation of each")
    return results


def check_sensitivity(b: R.Bundle) -> None:
    """Every input the worker must get right changes the text when it is wrong."""
    hand = req("hand", "a violinist with six fingers on his hand")

    def fresh() -> R.Sequence:
        return R.prefill(b, hand, IMAGES)

    assert decode_alone(b, fresh()) == HAND
    seq = fresh()
    seq.cache[2] = np.zeros_like(seq.cache[2])            # layer 1 keys lost
    assert decode_alone(b, seq) == "[", "a lost layer-1 cache must change the text"
    seq = fresh()
    seq.cache[0], seq.cache[2] = seq.cache[2], seq.cache[0]  # layers swapped
    assert decode_alone(b, seq) != HAND
    seq = fresh()
    seq.rope_delta = 0                                     # decode positions without the rope delta
    assert decode_alone(b, seq) == "[", decode_alone(b, fresh())
    seq = fresh()
    seq.rope_delta += 1                                    # off by one
    assert decode_alone(b, seq) not in (HAND, "[")

    # 1-D positions for the image tokens (no M-RoPE): the box moves
    orig = R.rope_index
    R.rope_index = lambda ids, *a: (np.tile(np.arange(len(ids)), (3, 1)), 0)
    try:
        text = decode_alone(b, fresh())
    finally:
        R.rope_index = orig
    assert text.startswith('[{"bbox_2d":[') and text != HAND, text

    # a grid of the same area but another shape: rows and columns, hence the box, change
    orig_pre = R.preprocess
    def other_grid(rgb, vlm):
        v = orig_pre(rgb, vlm)
        v.grid_thw = np.array([[1, 8, 32]], np.int64)
        return v
    R.preprocess = other_grid
    try:
        text = decode_alone(b, fresh())
    finally:
        R.preprocess = orig_pre
    assert text.startswith('[{"bbox_2d":[') and text != HAND, text

    # a grid that does not describe the patches: the encoder returns zero features, so the
    # image tokens embed as padding and the context is invalid
    class WrongGrid:
        def __init__(self, sess):
            self.sess = sess
        def run(self, names, feeds):
            return self.sess.run(names, {**feeds, b.grid_name: np.array([[1, 16, 18]], np.int64)})
    wrong = copy.copy(b)
    wrong.vision = WrongGrid(b.vision)
    assert decode_alone(wrong, R.prefill(wrong, hand, IMAGES)) == "context error"
    ok("a lost or swapped cache, a missing or wrong rope delta, 1-D positions, a wrong grid change the text")


def decode_together(b: R.Bundle, seqs: list[R.Sequence], side: str, ignore_mask: bool) -> list[str]:
    """decode_step with a chosen padding side, optionally with an all-ones attention mask."""
    step = 0
    live = [s for s in seqs if not R.finish_if_done(b, s)]
    while live:
        batch, longest = len(live), max(s.length for s in live)
        past = {}
        for li in range(b.layers):
            for ki, kind in enumerate(("key", "value")):
                arr = np.zeros((batch, b.kv_heads, longest, b.head_dim), b.kv_dtype)
                for i, s in enumerate(live):
                    at = longest - s.length if side == "left" else 0
                    arr[i, :, at:at + s.length] = s.cache[2 * li + ki]
                past[f"past_key_values.{li}.{kind}"] = arr
        mask = np.zeros((batch, longest + 1), np.int64)
        pos = np.zeros((3, batch, 1), np.int64)
        for i, s in enumerate(live):
            at = longest - s.length if side == "left" else 0
            mask[i, at:at + s.length] = 1
            mask[i, -1] = 1
            pos[:, i, 0] = s.length + s.rope_delta
        if ignore_mask:
            mask[:] = 1
        ids = np.array([[s.generated[-1]] for s in live], np.int64)
        logits, present = R.run_decoder(b, R.embed(b, ids), mask, pos, past)
        for i, s in enumerate(live):
            at = longest - s.length if side == "left" else 0
            s.cache = [np.concatenate([p[i, :, at:at + s.length], p[i, :, -1:]], axis=1) for p in present]
            s.length += 1
            s.generated.append(R.next_token(logits[i, -1]))
        live = [s for s in live if not R.finish_if_done(b, s)]
        step += 1
    return [R.report(b, s)["text"] for s in seqs]


def check_batching(b: R.Bundle, fp16: R.Bundle, q2: R.Bundle) -> None:
    requests = [
        req("a", "a violinist with six fingers on his hand", arrival=0),
        req("b", "a quiet street", image="clean-224.png", regions=[], arrival=0),
        req("c", "portrait, her face in soft light, wide shot", image="magenta-300x200.png", arrival=1),
        req("d", "a red car parked by a fenced garden", image="magenta-640x480.png", arrival=4),
        req("e", "a dragon on a patch of moss", arrival=4),
        req("f", "a hand, forever", arrival=30),
    ]
    one = run(b, requests)
    for max_active in (1, 2, 8):
        many = run(b, requests, "batched", max_active)
        assert [r["generated_ids"] for r in many] == [r["generated_ids"] for r in one], max_active
    seqs, schedule = R.run_batched(b, requests, IMAGES, 8)
    assert max(len(s) for s in schedule) >= 4 and len({len(s) for s in schedule}) >= 3, schedule
    for other in (fp16, q2):
        got = run(other, requests, "batched", 3)
        assert [r["generated_ids"] for r in got] == [r["generated_ids"] for r in one], other.manifest["name"]

    def pair() -> list[R.Sequence]:
        return [R.prefill(b, requests[0], IMAGES), R.prefill(b, requests[3], IMAGES)]   # 228 vs 394 tokens
    want = [one[0]["text"], one[3]["text"]]
    assert decode_together(b, pair(), "left", False) == want
    assert decode_together(b, pair(), "right", False) == want
    leaked = decode_together(b, pair(), "left", True)
    assert leaked[0] != want[0] and leaked[1] == want[1], leaked
    ok("batched == one at a time (max_active 1, 2, 8; joins at steps 0, 1, 4, 30); fp16 and Qwen2-VL "
       "variants give the same tokens; left or right padding with a correct mask agree; an ignored mask "
       "changes the shorter row")


def check_export_tool(b: R.Bundle) -> None:
    """models/export/write_bundle.py on an onnx-community-shaped folder made of the fp16 graphs."""
    with tempfile.TemporaryDirectory() as tmp:
        model, out = os.path.join(tmp, "model"), os.path.join(tmp, "bundle")
        os.makedirs(os.path.join(model, "onnx"))
        for name in ("vision_encoder_fp16.onnx", "embed_tokens_fp16.onnx", "decoder_model_merged_fp16.onnx"):
            shutil.copyfile(os.path.join(HERE, "fp16", name), os.path.join(model, "onnx", name))
        shutil.copyfile(os.path.join(HERE, "tokenizer.json"), os.path.join(model, "tokenizer.json"))
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump({"model_type": "qwen2_5_vl", "vocab_size": 151936}, f)
        with open(os.path.join(model, "preprocessor_config.json"), "w") as f:
            json.dump({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "merge_size": 2,
                       "temporal_patch_size": 2, "image_mean": b.vlm["mean"], "image_std": b.vlm["std"]}, f)
        template = os.path.join(tmp, "template.txt")
        with open(template, "w") as f:
            f.write(b.vlm["template"])    # the production template names hands and faces: keywords here
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            try:
                write_bundle.main([model, "--base", os.path.join(HERE, "..", "reference"), "--out", out,
                                   "--dtype", "fp16", "--max-pixels", "200704", "--max-new-tokens", "128",
                                   "--template", template])
            finally:
                sys.stdout = stdout
        exported = R.Bundle(out)
        assert exported.manifest["perception"]["tokenizer"] == "base_tokenizer.json"
        assert exported.coordinates == "resized" and exported.vlm["fallback"] == "regions"
        requests = [req("hand", "a violinist with six fingers on his hand"),
                    req("fenced", "a fenced garden", image="magenta-640x480.png")]
        assert [r["generated_ids"] for r in run(exported, requests)] == [r["generated_ids"] for r in run(b, requests)]
    with open(write_bundle.DEFAULT_TEMPLATE, encoding="utf-8") as f:
        default = f.read()
    text = R.render(default, {k: "x" for k in ("prompt", "categories", "tools", "regions", "width", "height")})
    assert text.count("<|image_pad|>") == 1 and text.endswith("<|im_start|>assistant\n")
    ok("models/export/write_bundle.py writes a bundle that loads and decodes like this one; its default template renders")


def main() -> int:
    check_layouts()
    b = R.Bundle(HERE)
    check_tokenizer_and_template(b)
    check_preprocessing(b)
    check_answers(b)
    check_sensitivity(b)
    check_batching(b, R.Bundle(os.path.join(HERE, "fp16")), R.Bundle(os.path.join(HERE, "qwen2-vl")))
    check_export_tool(b)
    suite = unittest.defaultTestLoader.discover(HERE, pattern="test_*.py")
    result = unittest.TextTestRunner(stream=open(os.devnull, "w")).run(suite)
    assert result.wasSuccessful(), [str(e) for e in result.failures + result.errors]
    ok(f"answer parser: {result.testsRun} tests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
