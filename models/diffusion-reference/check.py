#!/usr/bin/env python3
"""Check the diffusion reference bundle: manifest, hashes, layout, tokenizer, every model's
documented behaviour, the noise contract, and what a repair does (reference.py).

    python3 models/diffusion-reference/generate.py --tokenizer   # the CLIP tokenizer.json, once
    python3 models/diffusion-reference/check.py [BUNDLE_DIR]     # default: the folder of this script

Needs numpy, onnx, onnxruntime 1.31.1 and tokenizers (models/requirements.txt). Exits non-zero
on the first failed assertion.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import tomllib

import numpy as np
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import generate  # noqa: E402
import noise  # noqa: E402
import pixels  # noqa: E402
import reference  # noqa: E402

EXPORTS = list(generate.EXPORTS)
TOOL_KEYS = {"export", "tokenizer", "max_tokens", "add_special_tokens", "pad_id", "text_template", "negative_prompt",
             "scheduler", "steps", "max_steps", "guidance_scale", "native_size", "context", "latent_scale", "latent_mask"}
BOS, EOS = 49406, 49407
INSTRUCTION = generate.DESCRIPTIONS["hand"]


def ok(msg: str) -> None:
    print(f"ok   {msg}")


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------------------------
def check_manifest(root: str) -> dict:
    with open(os.path.join(root, "bundle.toml"), "rb") as f:
        b = tomllib.load(f)
    tool = b["action"]["tools"]["diffusion-inpaint"]
    assert set(tool) == TOOL_KEYS, f"diffusion-inpaint keys {sorted(tool)}"
    assert b["action"]["routing"] == {"hand": "diffusion-inpaint"} and b["action"]["default_tool"] == "patchmatch"
    assert tool["scheduler"] in ("ddim", "euler") and 1 <= tool["steps"] <= tool["max_steps"]
    assert tool["native_size"] % 8 == 0 and tool["latent_mask"] in ("nearest", "any")
    assert tool["tokenizer"] in b["files"] and f"{tool['export']}/unet/model.onnx" in b["files"]
    for category in b["taxonomy"]["categories"]:
        assert category in b["taxonomy"]["descriptions"] or "default" in b["taxonomy"]["descriptions"]
    tokenizer_path = os.path.join(root, tool["tokenizer"])
    if not os.path.exists(tokenizer_path):
        raise SystemExit(f"{tokenizer_path} is missing: run models/diffusion-reference/generate.py --tokenizer")
    for name, digest in b["files"].items():
        got = sha256_file(os.path.join(root, name))
        assert got == digest, f"sha256 mismatch for {name}: {got} != {digest}"
    with open(os.path.join(HERE, "..", "reference", "bundle.toml"), "rb") as f:
        ref = tomllib.load(f)
    for name in generate.COPIED:
        assert b["files"][name] == ref["files"][name], f"{name} differs from models/reference/{name}"
    assert b["perception"] == ref["perception"] and b["reasoning"] == ref["reasoning"]
    ok(f"bundle.toml: keys, routing, sha256 of all {len(b['files'])} files, perception/classifier = models/reference")
    return b


def check_regenerates(root: str, bundle: dict) -> None:
    tokenizer = os.path.join(root, bundle["action"]["tools"]["diffusion-inpaint"]["tokenizer"])
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, os.path.join(HERE, "generate.py"), "--out", tmp, "--reuse-tokenizer", tokenizer],
                       check=True, stdout=subprocess.DEVNULL)
        for name in list(bundle["files"]) + ["bundle.toml"]:
            with open(os.path.join(root, name), "rb") as a, open(os.path.join(tmp, name), "rb") as b:
                assert a.read() == b.read(), f"generate.py does not reproduce {name}"
    ok("generate.py reproduces every file byte for byte")


# ---------------------------------------------------------------------------------------------
def check_layout(root: str) -> dict[str, reference.Export]:
    expected = {
        "sd-inpaint": {"input_ids": "int32", "timestep": "float32", "timestep_rank": 1, "vae_encoder_output": "latent_sample"},
        "variants/optimum-1x": {"input_ids": "int32", "timestep": "int64", "timestep_rank": 1, "vae_encoder_output": "latent_sample"},
        "variants/optimum-onnx": {"input_ids": "int64", "timestep": "float32", "timestep_rank": 0,
                                  "vae_encoder_output": "latent_parameters"},
    }
    exports = {}
    for folder in EXPORTS:
        e = reference.Export.load(os.path.join(root, folder))
        assert e.describe() == expected[folder], f"{folder}: {e.describe()}"
        io = lambda s: ([(i.name, i.type, i.shape) for i in s.get_inputs()], [(o.name, o.type, o.shape) for o in s.get_outputs()])  # noqa: E731
        ids_t = "tensor(int32)" if expected[folder]["input_ids"] == "int32" else "tensor(int64)"
        assert io(e.text_encoder) == ([("input_ids", ids_t, ["batch", "sequence"])],
                                      [("last_hidden_state", "tensor(float)", ["batch", "sequence", 32]),
                                       ("pooler_output", "tensor(float)", ["batch", 32])])
        t_t = "tensor(int64)" if expected[folder]["timestep"] == "int64" else "tensor(float)"
        t_s = [] if expected[folder]["timestep_rank"] == 0 else ["timestep_batch"]
        assert io(e.unet) == ([("sample", "tensor(float)", ["batch", 9, "height", "width"]), ("timestep", t_t, t_s),
                               ("encoder_hidden_states", "tensor(float)", ["batch", "sequence", 32])],
                              [("out_sample", "tensor(float)", ["batch", 4, "height", "width"])])
        out = expected[folder]["vae_encoder_output"]
        assert io(e.vae_encoder) == ([("sample", "tensor(float)", ["batch", 3, "height", "width"])],
                                     [(out, "tensor(float)", ["batch", 8 if out == "latent_parameters" else 4,
                                                              "height_latent", "width_latent"])])
        assert io(e.vae_decoder) == ([("latent_sample", "tensor(float)", ["batch", 4, "latent_height", "latent_width"])],
                                     [("sample", "tensor(float)", ["batch", 3, "height", "width"])])
        for name in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json"):
            assert os.path.exists(os.path.join(root, folder, name)), f"{folder}/{name}"
        exports[folder] = e
    ok("layout: 3 exports, tensor names/types/shapes, detected variants (ids i32/i64, timestep f32[N]/i64[N]/f32[], "
       "latent_sample/latent_parameters)")
    return exports


# ---------------------------------------------------------------------------------------------
def check_tokenizer(root: str, bundle: dict) -> None:
    spec = reference.ToolSpec.from_bundle(root)
    tok = Tokenizer.from_file(os.path.join(root, spec.tokenizer))
    assert tok.get_vocab_size() == 49408 and tok.token_to_id("<|startoftext|>") == BOS and tok.token_to_id("<|endoftext|>") == EOS
    ids = reference.tokenize(tok, ["A Photo of a RED hand!!", "", " ".join(["word"] * 100)], spec)
    assert ids.shape == (3, 77)
    assert ids[0, :9].tolist() == [BOS, 320, 1125, 539, 320, 736, 2463, 748, EOS] and set(ids[0, 9:]) == {EOS}
    assert ids[1, :2].tolist() == [BOS, EOS] and set(ids[1, 2:]) == {EOS}
    assert ids[2, 0] == BOS and ids[2, 76] == EOS and len(set(ids[2, 1:76].tolist())) == 1 and ids[2, 1] != EOS
    # the JSON's own truncation/padding give the same ids as the bundle's settings
    plain = Tokenizer.from_file(os.path.join(root, spec.tokenizer))
    assert plain.encode("A Photo of a RED hand!!").ids == ids[0].tolist()
    for word, cid, _ in generate.COLOUR_WORDS:
        assert plain.encode(word).ids[:3] == [BOS, cid, EOS], f"colour word {word} is not CLIP id {cid}"
    # the UNet's colour words do not occur in the bundle's descriptions
    colour_ids = {cid for _, cid, _ in generate.COLOUR_WORDS}
    for name, text in bundle["taxonomy"]["descriptions"].items():
        assert not colour_ids & set(plain.encode(text.replace("{category}", name)).ids), f"colour word in {name}"
    ok("CLIP tokenizer: 49408 ids, BOS/EOS, padding with 49407 to 77, truncation keeps EOS, colour-word ids")


# ---------------------------------------------------------------------------------------------
def upsample8(planes: np.ndarray) -> np.ndarray:
    """Bilinear x8 upsampling with half-pixel centres and clamped edges (ONNX Resize linear)."""
    def axis(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(8 * n) + 0.5) / 8 - 0.5, 0, n - 1)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n - 1), src - lo
    y0, y1, fy = axis(planes.shape[2])
    x0, x1, fx = axis(planes.shape[3])
    rows = planes[:, :, y0] * (1 - fy)[:, None] + planes[:, :, y1] * fy[:, None]
    return rows[:, :, :, x0] * (1 - fx) + rows[:, :, :, x1] * fx


def check_vae(exports: dict[str, reference.Export]) -> None:
    rng = np.random.default_rng(1)
    blocks = rng.uniform(-1, 1, (3, 3, 5, 4)).astype(np.float32)                      # N=3, 40x32 image
    image = np.repeat(np.repeat(blocks, 8, axis=2), 8, axis=3)
    means = {}
    for folder, e in exports.items():
        mean = e.encode_image(image)
        assert mean.shape == (3, 4, 5, 4)
        scaled = mean * generate.LATENT_SCALE
        want = np.einsum("kc,nchw->nkhw", generate.M, blocks)
        assert np.max(np.abs(scaled - want)) < 1e-5, "scaled latents != M @ block means"
        back = e.decode(mean)
        assert back.shape == image.shape
        # decode(encode(x)) = the block means, upsampled bilinearly (half-pixel centres, edges clamped)
        assert np.max(np.abs(back - upsample8(blocks))) < 1e-5, "decode(encode(x)) != bilinear block means"
        means[folder] = mean
    raw = exports["variants/optimum-onnx"].vae_encoder.run(None, {"sample": image})[0]
    assert raw.shape == (3, 8, 5, 4) and np.all(raw[:, 4:] == generate.LOGVAR)
    assert np.array_equal(means["sd-inpaint"], means["variants/optimum-onnx"])
    flat = np.full((1, 3, 64, 64), 0.3, np.float32)
    e = exports["sd-inpaint"]
    assert np.max(np.abs(e.decode(e.encode_image(flat)) - flat)) < 1e-5
    ok("VAE: scaled latents = M @ 8x8 block means, decode inverts it (flat images exactly), "
       "latent_parameters = [same mean, logvar -12]")


def check_text_encoder(exports: dict[str, reference.Export]) -> None:
    e = exports["sd-inpaint"]
    ids = np.full((4, 77), EOS, np.int64)
    ids[:, 0] = BOS
    ids[0, 1:4] = [320, 1125, 539]            # a photo of
    ids[1, 1:4] = [320, 1125, 736]            # a photo red
    ids[2, 1:4] = [1125, 320, 539]            # photo a of
    ids[3, 1:3] = [736, 736]
    h = e.encode_text(ids)
    assert h.shape == (4, 77, 32)
    assert np.array_equal(h[0, :3], h[1, :3]) and not np.allclose(h[0, 3:], h[1, 3:]), "causal, token-dependent"
    assert not np.allclose(h[0, 1], h[2, 2]), "position-dependent (same token, another position)"
    red = [w for w, _, _ in generate.COLOUR_WORDS].index("red")
    assert h[1, :3, red].tolist() == [0, 0, 0] and set(h[1, 3:, red].tolist()) == {1.0}
    assert set(h[3, 1:, red].tolist()) == {1.0}
    pooled = e.text_encoder.run(["pooler_output"], {"input_ids": ids.astype(np.int32)})[0]
    assert np.array_equal(pooled[0], h[0, 4]) and np.array_equal(pooled[3], h[3, 3]), "pooler = state at first EOS"
    single = np.concatenate([e.encode_text(ids[i:i + 1]) for i in range(4)])
    assert np.max(np.abs(single - h)) <= 1e-6
    h64 = exports["variants/optimum-onnx"].encode_text(ids)
    assert np.array_equal(h, h64)
    ok("text encoder: causal, token- and position-dependent, colour channels, pooler at EOS, batch-independent, "
       "int32 = int64 ids")


def unet_formula(sample: np.ndarray, t: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """The UNet's documented function, in numpy (f64)."""
    x, m, z = sample[:, :4].astype(np.float64), sample[:, 4:5].astype(np.float64), sample[:, 5:9].astype(np.float64)
    known = 1 - m
    fill = (z * known).sum(axis=(2, 3), keepdims=True) / np.maximum(known.sum(axis=(2, 3), keepdims=True), 1e-6)
    shift = (hidden.astype(np.float64).mean(axis=1) @ generate.text_shift_rgb() @ generate.M.T)[:, :, None, None]
    target = known * z + m * (fill + shift)
    acp = generate.alphas_cumprod()[np.clip(np.round(t), 0, 999).astype(int)][:, None, None, None]
    n = (x - np.sqrt(acp) * target) / np.sqrt(1 - acp)
    return n - generate.GAMMA * np.sqrt(acp) * np.tanh(n)


def check_unet(exports: dict[str, reference.Export]) -> None:
    rng = np.random.default_rng(2)
    n, h, w = 4, 6, 5
    sample = rng.standard_normal((n, 9, h, w)).astype(np.float32)
    sample[:, 4] = (rng.uniform(size=(n, h, w)) < 0.4).astype(np.float32)
    hidden = exports["sd-inpaint"].encode_text(np.tile(np.array([[BOS, 736] + [EOS] * 75]), (n, 1)))
    hidden[1:] = exports["sd-inpaint"].encode_text(np.tile(np.array([[BOS, 320] + [EOS] * 75]), (n - 1, 1)))
    t = np.array([951, 501, 51, 1])
    want = unet_formula(sample, t, hidden)
    for folder in ("sd-inpaint", "variants/optimum-1x"):
        e = exports[folder]
        got = e.unet.run(None, {"sample": sample, "timestep": t.astype(e.timestep_dtype), "encoder_hidden_states": hidden})[0]
        assert np.max(np.abs(got - want)) < 2e-4, f"{folder}: {np.max(np.abs(got - want))}"
        each = np.concatenate([e.predict(sample[i:i + 1], t[i], hidden[i:i + 1]) for i in range(n)])
        # (f32 rounding may differ with the batch size: relative 1e-6)
        assert np.max(np.abs(each - got) / np.maximum(1.0, np.abs(got))) <= 1e-6, "items at different timesteps batch together"
        one = e.unet.run(None, {"sample": sample, "timestep": t[:1].astype(e.timestep_dtype), "encoder_hidden_states": hidden})[0]
        assert np.max(np.abs(one - unet_formula(sample, np.full(n, t[0]), hidden))) < 2e-4, "a [1] timestep broadcasts"
    scalar = exports["variants/optimum-onnx"]
    got = scalar.unet.run(None, {"sample": sample, "timestep": np.array(501.0, np.float32), "encoder_hidden_states": hidden})[0]
    assert np.max(np.abs(got - unet_formula(sample, np.full(n, 501), hidden))) < 2e-4
    moved = unet_formula(sample, np.array([951, 951, 951, 951]), hidden)
    assert np.max(np.abs(moved - want)) > 0.1, "the timestep matters"
    ok("UNet: matches its documented formula (|d| < 2e-4), per-item timesteps [N] and [1] broadcast, scalar timestep, "
       "batch-independent")


# ---------------------------------------------------------------------------------------------
def check_noise() -> None:
    key = noise.noise_key("job-7", 0, 2)
    assert key == 0x55C489443118DF80
    assert noise.u64_stream(key, 2) == [0x9789E840067869AF, 0x80373E1690EBE99C]
    assert noise.u64_stream(0, 1) == [0xE220A8397B1DCDAF]  # SplitMix64 seeded with 0
    want = [-1.02403295, -0.00542364782, -1.10623002, -0.573932946, 0.36465773, 1.55456305, 2.25120592, -0.912169158]
    assert np.max(np.abs(noise.normals(key, 8) - np.array(want, np.float32))) < 1e-7
    assert np.array_equal(noise.normals(key, 7), noise.normals(key, 8)[:7]), "an odd count drops the last sine"
    big = noise.normals(noise.noise_key("stats", 0, 0), 200_000).astype(np.float64)
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01 and abs(np.mean(big ** 3)) < 0.03
    assert not np.array_equal(noise.region_noise("job-7", 0, 2, (1, 4, 4, 4)), noise.region_noise("job-7", 1, 2, (1, 4, 4, 4)))
    ok("noise: known answers for key('job-7:0:2'), SplitMix64(0), standard normal statistics")


# ---------------------------------------------------------------------------------------------
def scene(colour, size=(90, 120)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A flat crop of `colour` with a magenta ellipse hole in the middle."""
    h, w = size
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = colour
    yy, xx = np.mgrid[0:h, 0:w]
    blob = (yy - h / 2) ** 2 / (h / 4.5) ** 2 + (xx - w / 2) ** 2 / (w / 4.8) ** 2 <= 1
    img[blob] = (255, 0, 255)
    return img, (blob * 255).astype(np.uint8), blob


def run(img, hole, **kw) -> tuple[dict, dict]:
    req = {"image": {"width": img.shape[1], "height": img.shape[0], "rgb": img.ravel().tolist()},
           "mask": {"width": hole.shape[1], "height": hole.shape[0], "data": hole.ravel().tolist()},
           "instruction": INSTRUCTION, "prompt": "", "job_id": "job-7", "iteration": 0, "region": 2}
    req.update(kw)
    return reference.repair(req)


def check_repairs() -> None:
    for colour in [(60, 140, 70), (200, 180, 150), (30, 40, 90), (128, 128, 128)]:
        img, hole, blob = scene(colour)
        for sched in ("ddim", "euler"):
            _, a = run(img, hole, scheduler=sched)
            inside = a["patch"][blob].astype(np.float64)
            err = np.abs(inside.mean(axis=0) - colour)
            assert np.all(err <= 8), f"{sched} {colour}: hole mean {inside.mean(axis=0)}"
            d = np.sqrt(((inside / 255 - [1, 0, 1]) ** 2).sum(axis=1))
            assert d.min() > 0.5, f"near-magenta pixel left in the hole ({d.min()})"
    ok("repair: the hole takes the surroundings' colour (|mean - background| <= 8 levels, DDIM and Euler, 4 colours)")

    img, hole, blob = scene((60, 140, 70))
    hole_mean = lambda a: a["patch"][blob].astype(np.float64).mean(axis=0)  # noqa: E731
    base = hole_mean(run(img, hole)[1])
    red = hole_mean(run(img, hole, prompt="red")[1])
    assert red[0] - base[0] > 30 and red[1] < base[1] - 10 and red[2] < base[2] - 10, (base, red)
    blue = hole_mean(run(img, hole, prompt="blue")[1])
    assert blue[2] - base[2] > 30, (base, blue)
    shifts = [hole_mean(run(img, hole, prompt="red", guidance_scale=g)[1])[0] - base[0] for g in (1.0, 3.0, 7.5)]
    assert shifts[0] < shifts[1] < shifts[2] and shifts[2] > 4 * shifts[0] > 0, shifts
    neg = hole_mean(run(img, hole, negative_prompt="green")[1])
    assert neg[1] < base[1] - 30, (base, neg)
    other = hole_mean(run(img, hole, prompt="a violinist on a rainy street")[1])
    assert 0 < np.abs(other - base).max() < 1, (base, other)
    ok(f"text and guidance matter: 'red' moves the hole by {np.round(red - base).tolist()}, 'blue' by "
       f"{np.round(blue - base).tolist()}; red shift at g=1/3/7.5: {np.round(shifts, 1).tolist()}; negative 'green' "
       f"by {np.round(neg - base).tolist()}; a colourless prompt by {np.abs(other - base).max():.2f} levels")

    r1, a1 = run(img, hole)
    r2, a2 = run(img, hole)
    assert r1 == r2, "the same request gives the same result"
    _, a3 = run(img, hole, job_id="job-8")
    assert not np.array_equal(a1["initial_latents"], a3["initial_latents"])
    assert not np.array_equal(a1["patch"], a3["patch"])
    assert np.abs(hole_mean(a1) - hole_mean(a3)).max() <= 3
    ok("deterministic: a request repeats exactly; another job_id draws other noise (another patch, the same hole "
       "colour within 3 levels)")

    results = {}
    for folder in EXPORTS:
        for sched in ("ddim", "euler"):
            results[folder, sched] = run(img, hole, export=folder, scheduler=sched, steps=12)[1]
    for sched in ("ddim", "euler"):
        base_r = results["sd-inpaint", sched]
        for folder in EXPORTS[1:]:
            other_r = results[folder, sched]
            for key in base_r:
                if key.startswith("step") or key in ("decoded", "masked_image_latents", "text_embeddings"):
                    assert np.max(np.abs(base_r[key] - other_r[key])) <= 1e-6, f"{folder} {sched} {key}"
            assert np.array_equal(base_r["patch"], other_r["patch"])
    ok("variants: every step's latents, the decoded crop and the patch agree across the 3 exports (<= 1e-6), both schedulers")

    _, near = run(img, hole, latent_mask="nearest")
    _, anym = run(img, hole, latent_mask="any")
    assert near["mask_latent"].sum() < anym["mask_latent"].sum()
    assert np.abs(hole_mean(near) - (60, 140, 70)).max() <= 12
    ok(f"latent_mask: 'nearest' marks {int(near['mask_latent'].sum())} cells, 'any' {int(anym['mask_latent'].sum())}; "
       "both fill the hole")

    _, g1 = run(img, hole, guidance_scale=1.0)
    assert g1["text_embeddings"].shape[0] == 1, "guidance <= 1 runs the conditional branch only"
    # (DDIM with 1 "leading" step denoises only from t = 1 and leaves the noise, as in diffusers)
    for sched, steps in (("euler", 1), ("ddim", 5), ("euler", 5), ("ddim", 50), ("euler", 50)):
        _, s = run(img, hole, steps=steps, scheduler=sched)
        assert np.abs(hole_mean(s) - (60, 140, 70)).max() <= 6, (sched, steps)
    try:
        run(img, hole, steps=51)
        raise AssertionError("steps above max_steps must be refused")
    except ValueError as e:
        assert "max_steps" in str(e)
    ok("guidance 1 = conditional branch only; 5 and 50 steps repair (Euler from 1); steps > max_steps refused")


def check_cli(root: str) -> None:
    img, hole, _ = scene((200, 180, 150), size=(40, 56))
    with tempfile.TemporaryDirectory() as tmp:
        pixels.write_png(os.path.join(tmp, "crop.png"), img)
        pixels.write_png(os.path.join(tmp, "hole.png"), hole)
        assert np.array_equal(pixels.read_png(os.path.join(tmp, "crop.png")), img)
        request = {"bundle": root, "image": os.path.join(tmp, "crop.png"), "mask": os.path.join(tmp, "hole.png"),
                   "text": "a natural hand", "job_id": "cli", "iteration": 1, "region": 0, "scheduler": "euler", "steps": 4}
        with open(os.path.join(tmp, "req.json"), "w") as f:
            json.dump(request, f)
        subprocess.run([sys.executable, os.path.join(HERE, "reference.py"), os.path.join(tmp, "req.json"),
                        "--out", os.path.join(tmp, "out.json"), "--npy", os.path.join(tmp, "npy"),
                        "--png", os.path.join(tmp, "patch.png")], check=True)
        with open(os.path.join(tmp, "out.json")) as f:
            out = json.load(f)
        assert set(out) == {"settings", "variant", "input_ids", "schedule", "noise", "initial_latents", "mask_latent",
                            "masked_image_latents", "text_embeddings", "steps", "decoded", "patch"}
        assert len(out["steps"]) == 4 and out["steps"][0]["latents"]["shape"] == [1, 4, 16, 16]
        assert out["schedule"]["timesteps"] == [751, 501, 251, 1] and len(out["schedule"]["sigmas"]) == 5
        assert out["patch"]["width"] == 56 and len(out["patch"]["rgb"]) == 40 * 56 * 3
        last = np.load(os.path.join(tmp, "npy", "step003_latents.npy"))
        assert np.array_equal(last.ravel(), np.array(out["steps"][3]["latents"]["data"], np.float32))
        assert np.array_equal(pixels.read_png(os.path.join(tmp, "patch.png")).ravel(), np.array(out["patch"]["rgb"], np.uint8))
        _, again = reference.repair(request)
        assert np.array_equal(again["step003_latents"], last)
    ok("reference.py CLI: PNG in, JSON + .npy + PNG out, same numbers as the library call")


def check_export_tool(root: str) -> None:
    """models/export/sd_inpaint_bundle.py on an export with an SD 2.x style tokenizer folder."""
    spec = reference.ToolSpec.from_bundle(root)
    with open(os.path.join(root, spec.tokenizer), encoding="utf-8") as f:
        model = json.load(f)["model"]
    img, hole, blob = scene((200, 180, 150))
    with tempfile.TemporaryDirectory() as tmp:
        export = os.path.join(tmp, "sd2")
        subprocess.run(["cp", "-r", os.path.join(root, "variants", "optimum-onnx"), export], check=True)
        os.makedirs(os.path.join(export, "tokenizer"))
        with open(os.path.join(export, "tokenizer", "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(model["vocab"], f, ensure_ascii=False)
        with open(os.path.join(export, "tokenizer", "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(model["merges"]) + "\n")
        with open(os.path.join(export, "tokenizer", "special_tokens_map.json"), "w") as f:
            json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
                       "unk_token": "<|endoftext|>"}, f)
        tool = os.path.join(HERE, "..", "export", "sd_inpaint_bundle.py")
        subprocess.run([sys.executable, tool, tmp, "--export", "sd2", "--route", "hand", "--steps", "10"],
                       check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(tmp, "bundle.toml"), "rb") as f:
            b = tomllib.load(f)
        t = b["action"]["tools"]["diffusion-inpaint"]
        assert (t["pad_id"], t["native_size"], t["latent_scale"], t["steps"]) == (0, 128, 0.18215, 10)
        assert b["action"]["routing"]["hand"] == "diffusion-inpaint" and "onnx-inpaint" in b["action"]["tools"]
        for name, digest in b["files"].items():
            assert sha256_file(os.path.join(tmp, name)) == digest, name
        result, a = run(img, hole, bundle=tmp)
        assert result["input_ids"]["cond"][-1] == 0 and result["variant"]["timestep_rank"] == 0
        assert np.abs(a["patch"][blob].astype(np.float64).mean(axis=0) - (200, 180, 150)).max() <= 8
    ok("models/export/sd_inpaint_bundle.py: detects the export, writes its tokenizer.json (SD 2.x pad '!' = 0) "
       "and a bundle.toml whose hashes verify and that repairs")


def main(argv=None) -> int:
    root = os.path.abspath((argv or sys.argv[1:] or [HERE])[0])
    bundle = check_manifest(root)
    check_regenerates(root, bundle)
    exports = check_layout(root)
    check_tokenizer(root, bundle)
    check_vae(exports)
    check_text_encoder(exports)
    check_unet(exports)
    check_noise()
    check_repairs()
    check_cli(root)
    check_export_tool(root)
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
