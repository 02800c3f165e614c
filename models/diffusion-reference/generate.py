#!/usr/bin/env python3
"""Generate the `diffusion-reference` model bundle: Stable Diffusion inpainting in miniature.

Writes, next to this script:

    sd-inpaint/                 the default export, in the diffusers ONNX layout
      model_index.json
      text_encoder/model.onnx   input_ids i32 [N,L] -> last_hidden_state f32 [N,L,32], pooler_output f32 [N,32]
      unet/model.onnx           sample f32 [N,9,h,w], timestep f32 [N], encoder_hidden_states f32 [N,L,32]
                                -> out_sample f32 [N,4,h,w]
      vae_encoder/model.onnx    sample f32 [N,3,H,W] -> latent_sample f32 [N,4,H/8,W/8]
      vae_decoder/model.onnx    latent_sample f32 [N,4,h,w] -> sample f32 [N,3,8h,8w]
      tokenizer/                tokenizer.json (CLIP, built from open-clip-torch's vocabulary, not
                                committed), tokenizer_config.json, special_tokens_map.json
      scheduler/scheduler_config.json
      */config.json             the components' configs, as exports carry them
    variants/optimum-1x/        the same models with timestep i64 [N] (as optimum 1.x exported it)
    variants/optimum-onnx/      input_ids i64, timestep f32 scalar, vae_encoder -> latent_parameters
                                f32 [N,8,h,w] (as optimum-onnx exports now)
    perception.onnx, classifier.onnx, tokenizer.json   copies of models/reference/ (same sha256)
    bundle.toml                 manifest with the sha256 of every file above

The graphs are tiny and hand-built (standard ONNX operators, opset 17, dynamic batch and size);
their exact behaviour is documented in models/README.md ("The diffusion reference bundle"):
the VAE is an invertible colour transform of 8x8 block means, the text encoder a causal
function of the CLIP token ids with colour-word channels, and the UNet predicts the noise whose
removal leaves, inside the hole, the mean masked-image latent of the known cells plus a colour
shift read from the text.

Only `onnx` and `numpy` are needed for the graphs (models/requirements.txt); the CLIP
tokenizer.json is built by models/export/clip_tokenizer.py from the pinned open-clip-torch wheel
(pip download). Deterministic: reruns give byte-identical files.

    python3 models/diffusion-reference/generate.py              # everything, into this folder
    python3 models/diffusion-reference/generate.py --out DIR    # elsewhere
    python3 models/diffusion-reference/generate.py --tokenizer  # only the (uncommitted) CLIP
                                                                # tokenizer.json, checked against bundle.toml
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tomllib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "export"))
import clip_tokenizer  # noqa: E402

OPSET = 17
IR_VERSION = 8
PRODUCER = "retoucher-diffusion-reference-generator"
BUNDLE_VERSION = "1.0.0"

# ---------------------------------------------------------------------------------------------
# The model constants (contract: models/README.md)
# ---------------------------------------------------------------------------------------------
NATIVE_SIZE = 128        # the crop is processed at 128 x 128; latents 16 x 16
LATENT_SCALE = 0.18215   # Stable Diffusion 1.x/2.x VAE scaling factor
TEXT_LEN = 77
HIDDEN = 32              # text hidden size D (encoder_hidden_states [N, 77, 32])
TRAIN_STEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
LOGVAR = -12.0           # the VAE encoder's (constant) log-variance in the latent_parameters form
GAMMA = 0.5              # the UNet's imperfection: x0 = target + GAMMA * sqrt(1 - a) * tanh(n)

# Scaled latents (latent_sample * 0.18215) of an 8x8 block = M @ mean RGB of the block in [-1, 1].
# Rows: 3 x (BT.601 luma, Cb, Cr, and a green-magenta axis), so scaled latents span about
# [-3, 3] like Stable Diffusion's. The decoder applies pinv(M), so decode(encode(x)) is x for
# images that are constant on each 8x8 block.
M = 3.0 * np.array([
    [0.299, 0.587, 0.114],
    [-0.168736, -0.331264, 0.5],
    [0.5, -0.418688, -0.081312],
    [0.25, -0.5, 0.25],
], dtype=np.float64)
M_PINV = np.linalg.pinv(M)

# Colour words: CLIP ids of "<word></w>" and the RGB shift (in [-1, 1] units) their presence
# adds to the hole. Checked against the tokenizer by check.py.
COLOUR_SHIFT = 0.06
COLOUR_WORDS = [  # (word, CLIP id, direction in RGB)
    ("red", 736, (1.0, -0.5, -0.5)),
    ("green", 1901, (-0.5, 1.0, -0.5)),
    ("blue", 1746, (-0.5, -0.5, 1.0)),
    ("yellow", 4481, (0.5, 0.5, -1.0)),
    ("white", 1579, (1.0, 1.0, 1.0)),
    ("black", 1449, (-1.0, -1.0, -1.0)),
    ("magenta", 38091, (0.5, -1.0, 0.5)),
    ("orange", 4287, (1.0, 0.0, -1.0)),
]
K = len(COLOUR_WORDS)
DS = HIDDEN - K                                       # sinusoidal token features
OMEGA = 0.0137 * (1.0 + np.arange(DS)) ** 0.5         # token frequencies (radians per id)
THETA = 0.61 * np.arange(DS)                          # token phases
NU = 0.091 * (1.0 + np.arange(DS))                    # position frequencies (radians per position)
TEXT_SHIFT = 0.0002                                   # weight scale of the sinusoidal features


def text_shift_rgb() -> np.ndarray:
    """W_rgb [HIDDEN, 3]: hole RGB shift = mean over positions of last_hidden_state @ W_rgb."""
    w = np.zeros((HIDDEN, 3), np.float64)
    for k, (_, _, rgb) in enumerate(COLOUR_WORDS):
        w[k] = COLOUR_SHIFT * np.asarray(rgb)
    k = np.arange(DS)[:, None]
    c = np.arange(3)[None, :]
    w[K:] = TEXT_SHIFT * np.sin(1.7 * k + 2.3 * c + 0.4)
    return w


def alphas_cumprod() -> np.ndarray:
    betas = np.linspace(BETA_START ** 0.5, BETA_END ** 0.5, TRAIN_STEPS, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


# ---------------------------------------------------------------------------------------------
# Graph building
# ---------------------------------------------------------------------------------------------
class Graph:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def _name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}/{hint}_{self.n}"

    def const(self, value, dtype=np.float32, hint="c") -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs, hint: str | None = None, out: str | None = None, **attrs) -> str:
        name = self._name(hint or op_type)
        out = out or name
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def model(self, name: str, doc: str, inputs, outputs, metadata: dict[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits, doc_string=doc)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                                  producer_name=PRODUCER, producer_version=BUNDLE_VERSION, model_version=1,
                                  doc_string=doc)
        for k in sorted(metadata):
            entry = model.metadata_props.add()
            entry.key, entry.value = k, metadata[k]
        onnx.checker.check_model(model, full_check=True)
        return model


def tensor(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def meta(component: str) -> dict[str, str]:
    return {"retoucher.bundle": "diffusion-reference", "retoucher.version": BUNDLE_VERSION,
            "retoucher.component": component}


# ---------------------------------------------------------------------------------------------
# text_encoder/model.onnx
# ---------------------------------------------------------------------------------------------
def build_text_encoder(ids_type: int) -> onnx.ModelProto:
    g = Graph("text_encoder")
    ids = g.op("Cast", ["input_ids"], "ids64", to=TensorProto.INT64)                          # [N,L]
    length = g.op("Gather", [g.op("Shape", [ids], "shape"), g.const(1, np.int64, "one_i")], "L", axis=0)
    pos_i = g.op("Range", [g.const(0, np.int64, "zero_i"), length, g.const(1, np.int64, "step")], "pos_i")  # [L]
    pos = g.op("Cast", [pos_i], "pos", to=TensorProto.FLOAT)
    # token features sin(id * omega + theta): [N,L,DS]
    idf = g.op("Cast", [ids], "idf", to=TensorProto.FLOAT)
    idf3 = g.op("Unsqueeze", [idf, g.const([2], np.int64, "ax2")], "idf3")
    phi = g.op("Sin", [g.op("Add", [g.op("Mul", [idf3, g.const(OMEGA, hint="omega")], "id_omega"),
                                   g.const(THETA, hint="theta")], "phase")], "phi")
    # causal mean of the token features over positions <= p (CLIP's text encoder is causal)
    count = g.op("Unsqueeze", [g.op("Add", [pos, g.const(1.0, hint="one")], "count"), g.const([1], np.int64, "ax1")], "count2")
    cmean = g.op("Div", [g.op("CumSum", [phi, g.const(1, np.int64, "axis_l")], "cum"), count], "cmean")
    # position features cos(p * nu): [L,DS]
    psi = g.op("Cos", [g.op("Mul", [g.op("Unsqueeze", [pos, g.const([1], np.int64, "ax1b")], "pos2"),
                                   g.const(NU, hint="nu")], "pos_nu")], "psi")
    feats = g.op("Add", [g.op("Add", [g.op("Mul", [phi, g.const(0.5, hint="half")], "phi_h"),
                                      g.op("Mul", [cmean, g.const(0.5, hint="half2")], "cmean_h")], "mix"),
                         g.op("Mul", [psi, g.const(0.25, hint="quarter")], "psi_q")], "feats")
    # colour-word channels: 1 from the word's first occurrence on (causal presence), else 0
    hit = g.op("Equal", [g.op("Unsqueeze", [ids, g.const([2], np.int64, "ax2b")], "ids3"),
                         g.const([cid for _, cid, _ in COLOUR_WORDS], np.int64, "colour_ids")], "hit")
    seen = g.op("CumSum", [g.op("Cast", [hit], "hit_f", to=TensorProto.FLOAT), g.const(1, np.int64, "axis_l2")], "seen")
    presence = g.op("Min", [seen, g.const(1.0, hint="one2")], "presence")
    g.op("Concat", [presence, feats], "last_hidden_state", out="last_hidden_state", axis=2)
    # pooler_output: the hidden state at the first position of the largest id (<|endoftext|>), as CLIP
    eos = g.op("ArgMax", [idf], "eos_pos", axis=1, keepdims=1)                                 # [N,1]
    onehot = g.op("Cast", [g.op("Equal", [pos_i, eos], "is_eos")], "is_eos_f", to=TensorProto.FLOAT)
    picked = g.op("Mul", ["last_hidden_state", g.op("Unsqueeze", [onehot, g.const([2], np.int64, "ax2c")], "onehot3")], "picked")
    g.op("ReduceSum", [picked, g.const([1], np.int64, "axis_sum")], "pooler_output", out="pooler_output", keepdims=0)

    doc = ("Reference CLIP-like text encoder. last_hidden_state[n,p] = concat(presence of each colour word "
           f"({', '.join(w for w, _, _ in COLOUR_WORDS)}) at or before p, 0.5*sin(id*omega+theta) + 0.5*causal "
           "mean of the same up to p + 0.25*cos(p*nu)); pooler_output = last_hidden_state at argmax(input_ids).")
    return g.model("retoucher_reference_text_encoder", doc,
                   [tensor("input_ids", ids_type, ["batch", "sequence"])],
                   [tensor("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]),
                    tensor("pooler_output", TensorProto.FLOAT, ["batch", HIDDEN])],
                   meta("text_encoder"))


# ---------------------------------------------------------------------------------------------
# unet/model.onnx
# ---------------------------------------------------------------------------------------------
def build_unet(timestep_type: int, timestep_scalar: bool) -> onnx.ModelProto:
    g = Graph("unet")
    ch = g.const([1], np.int64, "axis_c")
    x = g.op("Slice", ["sample", g.const([0], np.int64, "s0"), g.const([4], np.int64, "e0"), ch], "latents")
    m = g.op("Slice", ["sample", g.const([4], np.int64, "s1"), g.const([5], np.int64, "e1"), ch], "mask")
    z = g.op("Slice", ["sample", g.const([5], np.int64, "s2"), g.const([9], np.int64, "e2"), ch], "masked_latents")
    one = g.const(1.0, hint="one")
    known = g.op("Sub", [one, m], "known")
    hw = g.const([2, 3], np.int64, "axes_hw")
    num = g.op("ReduceSum", [g.op("Mul", [z, known], "z_known"), hw], "num", keepdims=1)        # [N,4,1,1]
    den = g.op("ReduceSum", [known, hw], "den", keepdims=1)                                    # [N,1,1,1]
    fill = g.op("Div", [num, g.op("Max", [den, g.const(1e-6, hint="eps")], "den_safe")], "fill")
    # text: mean over positions, then a linear map to a latent shift
    w_lat = text_shift_rgb() @ M.T                                                             # [HIDDEN,4]
    text = g.op("ReduceMean", ["encoder_hidden_states"], "text_mean", axes=[1], keepdims=0)    # [N,HIDDEN]
    shift = g.op("Unsqueeze", [g.op("MatMul", [text, g.const(w_lat, hint="w_text")], "shift"), hw], "shift4")
    target = g.op("Add", [g.op("Mul", [known, z], "keep"),
                          g.op("Mul", [m, g.op("Add", [fill, shift], "fill_shift")], "hole")], "target")
    # timestep -> alphas_cumprod[t] (the training schedule), broadcast to the batch
    t = g.op("Cast", ["timestep"], "t_f", to=TensorProto.FLOAT)
    if timestep_scalar:
        t = g.op("Reshape", [t, g.const([1], np.int64, "shape1")], "t_1")
    batch = g.op("Slice", [g.op("Shape", ["sample"], "sample_shape"), g.const([0], np.int64, "b0"),
                           g.const([1], np.int64, "b1")], "batch")
    t = g.op("Expand", [t, batch], "t_n")                                                      # [N]
    t = g.op("Cast", [g.op("Round", [g.op("Clip", [t, g.const(0.0, hint="t_lo"), g.const(TRAIN_STEPS - 1.0, hint="t_hi")],
                                           "t_clip")], "t_round")], "t_idx", to=TensorProto.INT64)
    acp = g.op("Gather", [g.const(alphas_cumprod(), hint="alphas_cumprod"), t], "acp", axis=0)
    acp4 = g.op("Unsqueeze", [acp, g.const([1, 2, 3], np.int64, "axes_chw")], "acp4")         # [N,1,1,1]
    a = g.op("Sqrt", [acp4], "sqrt_a")
    s = g.op("Sqrt", [g.op("Sub", [one, acp4], "one_minus_a")], "sqrt_1ma")
    # the implied noise of the current latents for that target, and the predicted noise
    n = g.op("Div", [g.op("Sub", [x, g.op("Mul", [a, target], "a_target")], "resid"), s], "n_hat")
    damp = g.op("Mul", [g.op("Mul", [a, g.const(GAMMA, hint="gamma")], "ga"), g.op("Tanh", [n], "tanh_n")], "damp")
    g.op("Sub", [n, damp], "out_sample", out="out_sample")

    t_shape = [] if timestep_scalar else ["timestep_batch"]
    doc = ("Reference inpainting UNet. sample = cat[latents x, mask m, masked-image latents z]; a = alphas_cumprod[round(t)] "
           "(scaled-linear betas 0.00085..0.012, 1000 steps); target = (1-m) z + m (mean of z over cells with m=0 + "
           "mean_p(encoder_hidden_states) @ W); n = (x - sqrt(a) target) / sqrt(1-a); "
           f"out_sample = n - {GAMMA} sqrt(a) tanh(n).")
    return g.model("retoucher_reference_unet", doc,
                   [tensor("sample", TensorProto.FLOAT, ["batch", 9, "height", "width"]),
                    tensor("timestep", timestep_type, t_shape),
                    tensor("encoder_hidden_states", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
                   [tensor("out_sample", TensorProto.FLOAT, ["batch", 4, "height", "width"])],
                   meta("unet"))


# ---------------------------------------------------------------------------------------------
# vae_encoder/model.onnx, vae_decoder/model.onnx
# ---------------------------------------------------------------------------------------------
def build_vae_encoder(parameters: bool) -> onnx.ModelProto:
    g = Graph("vae_encoder")
    pooled = g.op("AveragePool", ["sample"], "block_mean", kernel_shape=[8, 8], strides=[8, 8])
    w = (M / LATENT_SCALE).reshape(4, 3, 1, 1)
    if parameters:
        mean = g.op("Conv", [pooled, g.const(w, hint="w_enc")], "mean")
        logvar = g.op("Expand", [g.const(LOGVAR, hint="logvar"), g.op("Shape", [mean], "mean_shape")], "logvar_full")
        g.op("Concat", [mean, logvar], "latent_parameters", out="latent_parameters", axis=1)
        out = tensor("latent_parameters", TensorProto.FLOAT, ["batch", 8, "height_latent", "width_latent"])
        what = f"latent_parameters = cat[mean, logvar = {LOGVAR}]"
    else:
        g.op("Conv", [pooled, g.const(w, hint="w_enc")], "latent_sample", out="latent_sample")
        out = tensor("latent_sample", TensorProto.FLOAT, ["batch", 4, "height_latent", "width_latent"])
        what = "latent_sample = mean (deterministic; a real export samples)"
    doc = (f"Reference VAE encoder: mean = M @ (8x8 block mean of sample) / {LATENT_SCALE}, M = {M.tolist()}; {what}.")
    return g.model("retoucher_reference_vae_encoder", doc,
                   [tensor("sample", TensorProto.FLOAT, ["batch", 3, "height", "width"])], [out], meta("vae_encoder"))


def build_vae_decoder() -> onnx.ModelProto:
    g = Graph("vae_decoder")
    w = (M_PINV * LATENT_SCALE).reshape(3, 4, 1, 1)
    rgb = g.op("Conv", ["latent_sample", g.const(w, hint="w_dec")], "block_rgb")
    g.op("Resize", [rgb, "", g.const([1.0, 1.0, 8.0, 8.0], hint="scales")], "sample", out="sample",
         mode="linear", coordinate_transformation_mode="half_pixel")
    doc = (f"Reference VAE decoder: sample = bilinear 8x upsampling (half-pixel centres) of pinv(M) @ latent_sample * "
           f"{LATENT_SCALE}, the inverse of the encoder on blockwise-constant images.")
    return g.model("retoucher_reference_vae_decoder", doc,
                   [tensor("latent_sample", TensorProto.FLOAT, ["batch", 4, "latent_height", "latent_width"])],
                   [tensor("sample", TensorProto.FLOAT, ["batch", 3, "height", "width"])], meta("vae_decoder"))


# ---------------------------------------------------------------------------------------------
# Export folders (diffusers layout)
# ---------------------------------------------------------------------------------------------
EXPORTS = {
    # folder: (input_ids type, timestep type, timestep scalar, vae encoder gives latent_parameters, what it mirrors)
    "sd-inpaint": (TensorProto.INT32, TensorProto.FLOAT, False, False,
                   "diffusers' convert_stable_diffusion_checkpoint_to_onnx.py (OnnxStableDiffusionInpaintPipeline)"),
    "variants/optimum-1x": (TensorProto.INT32, TensorProto.INT64, False, False, "optimum 1.x (ORTStableDiffusionInpaintPipeline)"),
    "variants/optimum-onnx": (TensorProto.INT64, TensorProto.FLOAT, True, True, "optimum-onnx (current optimum-cli export onnx)"),
}
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.42.1",
    "beta_end": BETA_END,
    "beta_schedule": "scaled_linear",
    "beta_start": BETA_START,
    "clip_sample": False,
    "num_train_timesteps": TRAIN_STEPS,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
TOKENIZER_FILE = "sd-inpaint/tokenizer/tokenizer.json"
PAD_TOKEN = clip_tokenizer.EOS   # Stable Diffusion 1.x pads with <|endoftext|> (49407)


def json_bytes(doc) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


def export_files(folder: str) -> dict[str, bytes]:
    ids_type, t_type, t_scalar, params, mirrors = EXPORTS[folder]
    latent = NATIVE_SIZE // 8
    files = {
        "model_index.json": json_bytes({
            "_class_name": "OnnxStableDiffusionInpaintPipeline", "_diffusers_version": "0.42.1",
            "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["diffusers", "OnnxRuntimeModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "OnnxRuntimeModel"],
            "vae_decoder": ["diffusers", "OnnxRuntimeModel"], "vae_encoder": ["diffusers", "OnnxRuntimeModel"],
            "_retoucher_mirrors": mirrors}),
        "scheduler/scheduler_config.json": json_bytes(SCHEDULER_CONFIG),
        "text_encoder/model.onnx": build_text_encoder(ids_type).SerializeToString(deterministic=True),
        "text_encoder/config.json": json_bytes({"architectures": ["CLIPTextModel"], "hidden_size": HIDDEN,
                                                "max_position_embeddings": TEXT_LEN, "vocab_size": 49408,
                                                "bos_token_id": clip_tokenizer.BOS_ID, "eos_token_id": clip_tokenizer.EOS_ID}),
        "unet/model.onnx": build_unet(t_type, t_scalar).SerializeToString(deterministic=True),
        "unet/config.json": json_bytes({"_class_name": "UNet2DConditionModel", "in_channels": 9, "out_channels": 4,
                                        "sample_size": latent, "cross_attention_dim": HIDDEN}),
        "vae_encoder/model.onnx": build_vae_encoder(params).SerializeToString(deterministic=True),
        "vae_decoder/model.onnx": build_vae_decoder().SerializeToString(deterministic=True),
    }
    for part in ("vae_encoder", "vae_decoder"):
        files[f"{part}/config.json"] = json_bytes({"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
                                                   "latent_channels": 4, "sample_size": NATIVE_SIZE,
                                                   "scaling_factor": LATENT_SCALE})
    if folder == "sd-inpaint":
        special = {"bos_token": clip_tokenizer.BOS, "eos_token": clip_tokenizer.EOS,
                   "pad_token": PAD_TOKEN, "unk_token": clip_tokenizer.EOS}
        files["tokenizer/special_tokens_map.json"] = json_bytes(special)
        files["tokenizer/tokenizer_config.json"] = json_bytes({**special, "model_max_length": TEXT_LEN,
                                                               "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"})
    return {f"{folder}/{name}": data for name, data in files.items()}


# ---------------------------------------------------------------------------------------------
# bundle.toml
# ---------------------------------------------------------------------------------------------
# Short, instruction-like descriptions: they become the conditioning text. None names a colour
# word, so with the test text encoder they leave the hole at its surroundings' colour.
DESCRIPTIONS = {
    "hand": "a natural hand with five distinct fingers",
    "face": "a symmetric natural face",
    "text": "clean legible lettering",
    "limb": "a natural arm or leg joined to the body",
    "body": "a plausible body in a natural pose",
    "object": "a coherent object with clean edges",
    "animal": "an animal with natural anatomy",
    "architecture": "straight continuous lines in consistent perspective",
    "vehicle": "a vehicle with a coherent body and round wheels",
    "food": "distinct appetising food",
    "texture": "the surrounding texture, seamless",
    "background": "the surrounding background, seamless",
    "default": "a natural {category} that matches its surroundings",
}
REFERENCE = os.path.join(HERE, "..", "reference")
COPIED = ("perception.onnx", "classifier.onnx", "tokenizer.json")


def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def build_bundle_toml(hashes: dict[str, str], categories: list[str]) -> str:
    cats = ", ".join(toml_str(c) for c in categories)
    desc = "\n".join(f"{k} = {toml_str(v)}" for k, v in DESCRIPTIONS.items())
    files = "\n".join(f"{toml_str(name)} = {toml_str(h)}" for name, h in sorted(hashes.items()))
    return f"""# Generated by models/diffusion-reference/generate.py -- do not edit by hand; rerun the script.
# {TOKENIZER_FILE} is not committed: `generate.py --tokenizer` builds it (scripts/test-services.sh does).
schema = 1
name = "diffusion-reference"
version = "{BUNDLE_VERSION}"
description = "Diffusion reference bundle: the reference bundle's perception and classifier, with hands repaired by diffusion-inpaint on a miniature Stable Diffusion inpainting export (diffusers ONNX layout). Its UNet fills the hole with the mean colour of the known part of the crop, shifted by colour words in the text. For tests, demos and as a template for real SD inpainting bundles."

[taxonomy]
categories = [{cats}]

[taxonomy.descriptions]
{desc}

[defaults]
saliency_threshold = 0.5
max_iterations = 3

[perception]
model = "perception.onnx"
tokenizer = "tokenizer.json"
input_size = 256
max_tokens = 32
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]

[reasoning]
mode = "regions"
classifier = "classifier.onnx"
input_size = 64
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]
min_region_pixels = 16
dilate_pixels = 4
feather_pixels = 2
max_regions = 16
context = 0.05

[action]
default_tool = "patchmatch"

[action.routing]
hand = "diffusion-inpaint"

[action.tools.diffusion-inpaint]
export = "sd-inpaint"
tokenizer = "{TOKENIZER_FILE}"
max_tokens = {TEXT_LEN}
add_special_tokens = true
pad_id = {clip_tokenizer.EOS_ID}
text_template = "{{instruction}}, {{prompt}}"
negative_prompt = ""
scheduler = "ddim"
steps = 20
max_steps = 50
guidance_scale = 7.5
native_size = {NATIVE_SIZE}
context = 1.0
latent_scale = {LATENT_SCALE}
latent_mask = "any"

[action.tools.patchmatch]
patch_size = 7
iterations = 4

[batching.perception]
max_batch_size = 8
max_delay_ms = 5

[batching.unet]
max_batch_size = 16
max_delay_ms = 2

[files]
{files}
"""


def write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def reference_categories() -> tuple[list[str], dict[str, str]]:
    """The reference bundle's taxonomy and file hashes."""
    with open(os.path.join(REFERENCE, "bundle.toml"), "rb") as f:
        ref = tomllib.load(f)
    return ref["taxonomy"]["categories"], ref["files"]


def build_tokenizer(out: str, expect: str | None, reuse: str | None = None) -> str:
    """Builds the CLIP tokenizer.json into `out`: from the pinned open-clip-torch wheel (pip
    download), or copied from `reuse` (an already built one)."""
    path = os.path.join(out, TOKENIZER_FILE)
    if expect and os.path.exists(path):
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == expect:
                return expect
    if reuse:
        with open(reuse, "rb") as f:
            data = f.read()
    else:
        data = clip_tokenizer.build("open-clip", PAD_TOKEN)
    digest = write(path, data)
    if expect and digest != expect:
        raise SystemExit(f"{path}: sha256 {digest}, but bundle.toml says {expect}")
    return digest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=HERE, help="output folder (default: the folder of this script)")
    ap.add_argument("--tokenizer", action="store_true",
                    help="only build the CLIP tokenizer.json (if missing or stale) and check it against bundle.toml")
    ap.add_argument("--reuse-tokenizer", metavar="FILE",
                    help="copy this CLIP tokenizer.json instead of building it (no download)")
    args = ap.parse_args(argv)
    if args.tokenizer:
        with open(os.path.join(args.out, "bundle.toml"), "rb") as f:
            expect = tomllib.load(f)["files"][TOKENIZER_FILE]
        build_tokenizer(args.out, expect, args.reuse_tokenizer)
        print(f"{expect}  {TOKENIZER_FILE}")
        return 0

    categories, ref_hashes = reference_categories()
    hashes: dict[str, str] = {}
    for name in COPIED:
        with open(os.path.join(REFERENCE, name), "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != ref_hashes[name]:
            raise SystemExit(f"models/reference/{name} does not match its bundle.toml; regenerate the reference bundle")
        hashes[name] = write(os.path.join(args.out, name), data)
    for folder in EXPORTS:
        for name, data in export_files(folder).items():
            hashes[name] = write(os.path.join(args.out, name), data)
    hashes[TOKENIZER_FILE] = build_tokenizer(args.out, None, args.reuse_tokenizer)
    write(os.path.join(args.out, "bundle.toml"), build_bundle_toml(hashes, categories).encode("utf-8"))
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in hashes if n != TOKENIZER_FILE)
    print(f"wrote bundle to {args.out} ({len(hashes)} files, {total} bytes without the tokenizer)")
    for name, h in sorted(hashes.items()):
        print(f"  {h}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
