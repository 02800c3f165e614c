"""The trainable part of the perception model, twice: in JAX (training) and as ONNX nodes (export).

    text:   ids -> frozen int8 embedding (text.py) -> LayerNorm + position -> 1 transformer layer
    fusion: 16x16 image tokens (from the stride-16 features) ++ text tokens -> 2 transformer
            layers of self-attention over both (the paper's concatenation + self-attention)
    head:   upsample x2 + stride-8 features -> conv3x3 -> FiLM(text) -> upsample x2 + stride-4
            features -> conv3x3 -> FiLM(text) -> 1x1 conv -> sigmoid: saliency [N,1,64,64]

Both versions use the same operators with the same conventions (NCHW, half-pixel bilinear
upsampling, LayerNorm eps 1e-5, padding keys masked with -1e4), and export.py checks that the
ONNX graph reproduces the JAX forward pass.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from graph import Graph

D = 64  # token width
HEADS = 4
MLP = 128
FUSION_LAYERS = 2
IMG_TOKENS = 16  # per side: 16 x 16 tokens
MAX_POS = 64  # text positions available (inputs may be shorter)
LN_EPS = 1e-5
MASK_NEG = -1e4
C8, C4, C4_SKIP, C8_SKIP = 64, 32, 16, 32


# ------------------------------------------------------------------------------------ params
def init(key: jax.Array, in_f4: int, in_f8: int, in_f16: int, emb_dim: int) -> dict:
    keys = iter(jax.random.split(key, 64))

    def dense(i: int, o: int) -> dict:
        return {"w": jax.random.normal(next(keys), (i, o)) * (1.0 / np.sqrt(i)), "b": jnp.zeros(o)}

    def conv(i: int, o: int, k: int) -> dict:
        return {"w": jax.random.normal(next(keys), (o, i, k, k)) * np.sqrt(2.0 / (i * k * k)),
                "b": jnp.zeros(o)}

    def ln() -> dict:
        return {"g": jnp.ones(D), "b": jnp.zeros(D)}

    def layer() -> dict:
        return {"ln1": ln(), "qkv": dense(D, 3 * D), "out": dense(D, D), "ln2": ln(),
                "fc1": dense(D, MLP), "fc2": dense(MLP, D)}

    film8 = {"w": jnp.zeros((D, 2 * C8)), "b": jnp.zeros(2 * C8)}
    film4 = {"w": jnp.zeros((D, 2 * C4)), "b": jnp.zeros(2 * C4)}
    head = conv(C4, 1, 1)
    head["b"] = jnp.full(1, -3.0)  # defects are a few % of the pixels
    return {
        "t_in": {"w": jax.random.normal(next(keys), (emb_dim, D)) * (1.0 / np.sqrt(emb_dim)), "b": jnp.zeros(D)},
        "t_ln": ln(),
        "t_pos": jax.random.normal(next(keys), (MAX_POS, D)) * 0.02,
        "t_layer": layer(),
        "t_pool_ln": ln(),
        "v_in": conv(in_f16, D, 1),
        "v_pos": jax.random.normal(next(keys), (1, D, IMG_TOKENS, IMG_TOKENS)) * 0.02,
        "fusion": [layer() for _ in range(FUSION_LAYERS)],
        "skip8": conv(in_f8, C8_SKIP, 1),
        "dec8": conv(D + C8_SKIP, C8, 3),
        "film8": film8,
        "red8": conv(C8, C4, 1),
        "skip4": conv(in_f4, C4_SKIP, 1),
        "dec4": conv(C4 + C4_SKIP, C4, 3),
        "film4": film4,
        "head": head,
    }


# ------------------------------------------------------------------------------------ JAX
def _ln(p: dict, x: jax.Array) -> jax.Array:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + LN_EPS) * p["g"] + p["b"]


def _dense(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["w"] + p["b"]


def _layer(p: dict, x: jax.Array, key_bias: jax.Array) -> jax.Array:
    n, t, _ = x.shape
    h = _dense(p["qkv"], _ln(p["ln1"], x)).reshape(n, t, 3, HEADS, D // HEADS)
    q, k, v = (h[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [N,H,T,dh]
    att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(D // HEADS) + key_bias[:, None, None, :], axis=-1)
    o = (att @ v).transpose(0, 2, 1, 3).reshape(n, t, D)
    x = x + _dense(p["out"], o)
    return x + _dense(p["fc2"], jax.nn.relu(_dense(p["fc1"], _ln(p["ln2"], x))))


def _conv(p: dict, x: jax.Array) -> jax.Array:
    k = p["w"].shape[-1]
    y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), [(k // 2, k // 2)] * 2,
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + p["b"][None, :, None, None]


def _up2(x: jax.Array) -> jax.Array:
    n, c, h, w = x.shape
    return jax.image.resize(x, (n, c, 2 * h, 2 * w), "bilinear")


def _film(p: dict, x: jax.Array, pooled: jax.Array) -> jax.Array:
    c = x.shape[1]
    gb = _dense(p, pooled)
    return x * (1.0 + gb[:, :c, None, None]) + gb[:, c:, None, None]


def apply(params: dict, f4: jax.Array, f8: jax.Array, f16: jax.Array, emb: jax.Array,
          mask: jax.Array) -> jax.Array:
    """Saliency logits [N,1,64,64]. `emb` [N,L,E] are the dequantised token embeddings, `mask`
    [N,L] the attention mask (1 = token, 0 = padding)."""
    n, l, _ = emb.shape
    mask = mask.astype(jnp.float32)
    t = _ln(params["t_ln"], _dense(params["t_in"], emb)) + params["t_pos"][:l]
    t_bias = (1.0 - mask) * MASK_NEG
    t = _layer(params["t_layer"], t, t_bias)
    pooled = (t * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1.0)
    pooled = _ln(params["t_pool_ln"], pooled)

    v = _conv(params["v_in"], f16) + params["v_pos"]
    tokens = IMG_TOKENS * IMG_TOKENS
    z = jnp.concatenate([v.reshape(n, D, tokens).transpose(0, 2, 1), t], axis=1)
    bias = jnp.concatenate([jnp.zeros((n, tokens)), t_bias], axis=1)
    for p in params["fusion"]:
        z = _layer(p, z, bias)
    v = z[:, :tokens].transpose(0, 2, 1).reshape(n, D, IMG_TOKENS, IMG_TOKENS)

    h = jnp.concatenate([_up2(v), jax.nn.relu(_conv(params["skip8"], f8))], axis=1)
    h = _film(params["film8"], jax.nn.relu(_conv(params["dec8"], h)), pooled)
    h = jax.nn.relu(_conv(params["red8"], h))
    h = jnp.concatenate([_up2(h), jax.nn.relu(_conv(params["skip4"], f4))], axis=1)
    h = _film(params["film4"], jax.nn.relu(_conv(params["dec4"], h)), pooled)
    return _conv(params["head"], h)


# ------------------------------------------------------------------------------------ ONNX
class _Emit:
    def __init__(self, g: Graph, params: dict) -> None:
        self.g = g
        self.p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)

    def c(self, name: str, value) -> str:
        return self.g.const(name, np.asarray(value))

    def ln(self, name: str, p: dict, x: str) -> str:
        return self.g.op("LayerNormalization", [x, self.c(f"{name}.g", p["g"]), self.c(f"{name}.b", p["b"])],
                         axis=-1, epsilon=LN_EPS)

    def dense(self, name: str, p: dict, x: str) -> str:
        y = self.g.op("MatMul", [x, self.c(f"{name}.w", p["w"])])
        return self.g.op("Add", [y, self.c(f"{name}.b", p["b"])])

    def conv(self, name: str, p: dict, x: str) -> str:
        k = p["w"].shape[-1]
        return self.g.op("Conv", [x, self.c(f"{name}.w", p["w"]), self.c(f"{name}.b", p["b"])],
                         kernel_shape=[k, k], pads=[k // 2] * 4)

    def relu(self, x: str) -> str:
        return self.g.op("Relu", [x])

    def layer(self, name: str, p: dict, x: str, key_bias: str) -> str:
        g, dh = self.g, D // HEADS
        h = self.dense(f"{name}.qkv", p["qkv"], self.ln(f"{name}.ln1", p["ln1"], x))
        h = g.op("Reshape", [h, self.c(f"{name}.shape5", np.array([0, -1, 3, HEADS, dh], np.int64))])
        q, k, v = g.op("Split", [h, self.c(f"{name}.split", np.array([1, 1, 1], np.int64))], outputs=3, axis=2)
        q, k, v = (g.op("Transpose", [g.op("Squeeze", [t, self.c(f"{name}.ax{i}", np.array([2], np.int64))])],
                        perm=[0, 2, 1, 3]) for i, t in enumerate((q, k, v)))
        scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
        scores = g.op("Mul", [scores, self.c(f"{name}.scale", np.array(1.0 / np.sqrt(dh), np.float32))])
        scores = g.op("Add", [scores, key_bias])
        att = g.op("Softmax", [scores], axis=-1)
        o = g.op("Transpose", [g.op("MatMul", [att, v])], perm=[0, 2, 1, 3])
        o = g.op("Reshape", [o, self.c(f"{name}.shape3", np.array([0, -1, D], np.int64))])
        x = g.op("Add", [x, self.dense(f"{name}.out", p["out"], o)])
        m = self.dense(f"{name}.fc2", p["fc2"], self.relu(self.dense(f"{name}.fc1", p["fc1"],
                                                                     self.ln(f"{name}.ln2", p["ln2"], x))))
        return g.op("Add", [x, m])

    def up2(self, name: str, x: str) -> str:
        return self.g.op("Resize", [x, "", self.c(f"{name}.scales", np.array([1, 1, 2, 2], np.float32))],
                         mode="linear", coordinate_transformation_mode="half_pixel")

    def film(self, name: str, p: dict, x: str, pooled: str, channels: int) -> str:
        g = self.g
        gb = self.dense(name, p, pooled)
        gb = g.op("Unsqueeze", [gb, self.c(f"{name}.axes", np.array([2, 3], np.int64))])  # [N,2C,1,1]
        gamma, beta = g.op("Split", [gb, self.c(f"{name}.split", np.array([channels, channels], np.int64))],
                           outputs=2, axis=1)
        gamma = g.op("Add", [gamma, self.c(f"{name}.one", np.array(1.0, np.float32))])
        return g.op("Add", [g.op("Mul", [x, gamma]), beta])


def emit(g: Graph, params: dict, feats: dict[str, str], emb: str, mask_f: str) -> str:
    """Adds the trainable part to `g`: `emb` [N,L,E] f32 embeddings, `mask_f` [N,L] f32 mask.
    Returns the name of the logits [N,1,64,64]."""
    e = _Emit(g, params)
    p = e.p
    c = e.c
    # Text encoder.
    t = e.ln("t_ln", p["t_ln"], e.dense("t_in", p["t_in"], emb))
    l_dim = g.op("Shape", [emb], start=1, end=2)
    pos = g.op("Slice", [c("t_pos", p["t_pos"]), c("t_pos.start", np.array([0], np.int64)), l_dim,
                         c("t_pos.axis", np.array([0], np.int64))])
    t = g.op("Add", [t, pos])
    one = c("one", np.array(1.0, np.float32))
    t_bias = g.op("Mul", [g.op("Sub", [one, mask_f]), c("mask_neg", np.array(MASK_NEG, np.float32))])
    t_bias = g.op("Unsqueeze", [t_bias, c("axes12", np.array([1, 2], np.int64))])  # [N,1,1,L]
    t = e.layer("t_layer", p["t_layer"], t, t_bias)
    mask3 = g.op("Unsqueeze", [mask_f, c("axis2", np.array([2], np.int64))])  # [N,L,1]
    total = g.op("ReduceSum", [g.op("Mul", [t, mask3]), c("axis1", np.array([1], np.int64))], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [mask_f, c("axis1b", np.array([1], np.int64))], keepdims=1), one])
    pooled = e.ln("t_pool_ln", p["t_pool_ln"], g.op("Div", [total, count]))

    # Fusion: image tokens ++ text tokens; image keys are never masked.
    tokens = IMG_TOKENS * IMG_TOKENS
    v = g.op("Add", [e.conv("v_in", p["v_in"], feats["f16"]), c("v_pos", p["v_pos"])])
    v = g.op("Transpose", [g.op("Reshape", [v, c("v.shape", np.array([0, D, tokens], np.int64))])], perm=[0, 2, 1])
    z = g.op("Concat", [v, t], axis=1)
    # Zero bias for the image keys, built from the mask's batch size: [N,1,1,tokens].
    zeros_img = g.op("Mul", [g.op("Slice", [t_bias, c("zb.s", np.array([0], np.int64)),
                                            c("zb.e", np.array([1], np.int64)), c("zb.a", np.array([3], np.int64))]),
                             c("zero", np.array(0.0, np.float32))])
    zeros_img = g.op("Tile", [zeros_img, c("zb.reps", np.array([1, 1, 1, tokens], np.int64))])
    bias = g.op("Concat", [zeros_img, t_bias], axis=3)
    for i, lp in enumerate(p["fusion"]):
        z = e.layer(f"fusion{i}", lp, z, bias)
    v = g.op("Slice", [z, c("v.s", np.array([0], np.int64)), c("v.e", np.array([tokens], np.int64)),
                       c("v.a", np.array([1], np.int64))])
    v = g.op("Reshape", [g.op("Transpose", [v], perm=[0, 2, 1]),
                         c("v.shape4", np.array([0, D, IMG_TOKENS, IMG_TOKENS], np.int64))])

    # Decoder.
    h = g.op("Concat", [e.up2("up8", v), e.relu(e.conv("skip8", p["skip8"], feats["f8"]))], axis=1)
    h = e.film("film8", p["film8"], e.relu(e.conv("dec8", p["dec8"], h)), pooled, C8)
    h = e.relu(e.conv("red8", p["red8"], h))
    h = g.op("Concat", [e.up2("up4", h), e.relu(e.conv("skip4", p["skip4"], feats["f4"]))], axis=1)
    h = e.film("film4", p["film4"], e.relu(e.conv("dec4", p["dec4"], h)), pooled, C4)
    return e.conv("head", p["head"], h)
