#!/usr/bin/env python3
"""One-off: export a tiny randomly initialised Qwen2.5-VL with PyTorch and compare its ONNX layout
with models/vlm-reference (not run by CI: it needs torch, a 5.7 GB install here).

    python3 -m venv .tools/vlm-export
    .tools/vlm-export/bin/pip install -r models/export/requirements.txt
    .tools/vlm-export/bin/python models/export/export_tiny.py OUT_DIR

Exports the text decoder with its KV cache (`decoder_model_merged.onnx`), the token embedding and
the vision encoder with the TorchScript exporter, then with onnxruntime: checks that the decoder's
input/output names, element types and ranks equal the reference bundle's, runs a prefill with an
empty cache and a decode step, compares a step with PyTorch, and shows that the traced vision
encoder has lost its grid input (the grid is baked in at trace time), which is why real bundles
take the onnx-community vision encoders.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import onnxruntime as ort
import torch
from transformers import DynamicCache, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE_DECODER = os.path.join(HERE, "..", "vlm-reference", "decoder_model_merged.onnx")
LAYERS, KV_HEADS, HEAD_DIM, HIDDEN = 2, 2, 16, 64


class Decoder(torch.nn.Module):
    """(inputs_embeds, attention_mask, position_ids [3,B,S], past k/v per layer) -> (logits, present k/v)."""

    def __init__(self, model, config):
        super().__init__()
        self.lm, self.head, self.config = model.model.language_model, model.lm_head, config

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.config)
        for i in range(0, len(past), 2):
            cache.update(past[i], past[i + 1], i // 2)
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (self.head(out.last_hidden_state), *present)


class Embed(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.model.language_model.embed_tokens

    def forward(self, input_ids):
        return self.embed(input_ids)


class Vision(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.visual = model.model.visual

    def forward(self, pixel_values, image_grid_thw):
        out = self.visual(pixel_values, grid_thw=image_grid_thw)
        return out if torch.is_tensor(out) else out.pooler_output


def io(sess):
    return ([(i.name, i.type, len(i.shape)) for i in sess.get_inputs()],
            [(o.name, o.type, len(o.shape)) for o in sess.get_outputs()])


def main(out: str) -> int:
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=KV_HEADS, vocab_size=151936, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
                           fullatt_block_indexes=[1], window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3))
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    decoder = Decoder(model, config.text_config)

    names_in = ["inputs_embeds", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    names_out = ["logits"] + [f"present.{i}.{k}" for i in range(LAYERS) for k in ("key", "value")]
    axes = {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {1: "batch_size", 2: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in names_in[3:]})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in names_out[1:]})
    b, s, past = 1, 5, 3
    args = (torch.randn(b, s, HIDDEN), torch.ones(b, past + s, dtype=torch.int64),
            torch.arange(past, past + s).view(1, 1, s).expand(3, b, s).contiguous(),
            *[torch.randn(b, KV_HEADS, past, HEAD_DIM) for _ in range(2 * LAYERS)])
    path = os.path.join(out, "decoder_model_merged.onnx")
    with torch.no_grad():
        torch.onnx.export(decoder, args, path, input_names=names_in, output_names=names_out, dynamic_axes=axes,
                          opset_version=17, dynamo=False)
        torch.onnx.export(Embed(model), (torch.tensor([[1, 2, 3]]),), os.path.join(out, "embed_tokens.onnx"),
                          input_names=["input_ids"], output_names=["inputs_embeds"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch_size", 1: "sequence_length"},
                                        "inputs_embeds": {0: "batch_size", 1: "sequence_length"}})
        pixels, grid = torch.randn(256, 1176), torch.tensor([[1, 16, 16]])
        torch.onnx.export(Vision(model), (pixels, grid), os.path.join(out, "vision_encoder.onnx"),
                          input_names=["pixel_values", "image_grid_thw"], output_names=["image_features"],
                          dynamic_axes={"pixel_values": {0: "num_patches"}, "image_features": {0: "num_merged"}},
                          opset_version=17, dynamo=False)
        eager = [t.numpy() for t in decoder(*args)]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    exported = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(REFERENCE_DECODER, opts, providers=["CPUExecutionProvider"])
    assert io(exported) == io(reference), (io(exported), io(reference))
    kv = exported.get_inputs()[3].shape
    assert kv[1:] == [KV_HEADS, "past_sequence_length", HEAD_DIM], kv
    print("decoder: names, element types and ranks equal models/vlm-reference's; past", kv)
    got = exported.run(None, {n: a.numpy() for n, a in zip(names_in, args)})
    print(f"decoder: max |PyTorch - ONNX Runtime| over logits and present = "
          f"{max(float(np.abs(e - g).max()) for e, g in zip(eager, got)):.2e}")
    empty = {n: np.zeros((2, KV_HEADS, 0, HEAD_DIM), np.float32) for n in names_in[3:]}
    embeds = np.random.default_rng(0).standard_normal((2, 7, HIDDEN)).astype(np.float32)
    prefill = exported.run(None, {"inputs_embeds": embeds, "attention_mask": np.ones((2, 7), np.int64),
                                  "position_ids": np.broadcast_to(np.arange(7), (3, 2, 7)).copy(), **empty})
    cache = {n: a for n, a in zip(names_in[3:], prefill[1:])}
    step = exported.run(None, {"inputs_embeds": embeds[:, :1], "attention_mask": np.ones((2, 8), np.int64),
                               "position_ids": np.full((3, 2, 1), 7, np.int64), **cache})
    print("decoder: prefill with an empty cache", [a.shape for a in prefill[:2]], "then a step", [a.shape for a in step[:2]])
    vision = ort.InferenceSession(os.path.join(out, "vision_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
    print("vision (traced):", io(vision), "-> the grid input is gone and the output size is fixed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qwen25vl-tiny-onnx"))
