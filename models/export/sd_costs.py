#!/usr/bin/env python3
"""Parameter counts, weight sizes and FLOPs of Stable Diffusion inpainting's parts (1.5 and 2).

The architectures are built from their diffusers / transformers configs on torch's "meta"
device (no weights, no arithmetic) and one forward pass of each part is counted with
torch.utils.flop_counter at the tool's shapes: a 512 x 512 crop, 64 x 64 latents, 77 tokens,
batch 1. One-off, in the verification environment (models/diffusion-reference/requirements-verify.txt):

    OMP_NUM_THREADS=1 /tmp/sdv/bin/python models/export/sd_costs.py
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

UNETS = {
    "SD 1.5 inpainting": dict(in_channels=9, cross_attention_dim=768, attention_head_dim=8),
    "SD 2 inpainting": dict(in_channels=9, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                            use_linear_projection=True),
}
TEXT = {
    "SD 1.5 (CLIP ViT-L/14 text)": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, hidden_act="quick_gelu"),
    "SD 2 (OpenCLIP ViT-H/14 text, 23 layers)": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                                     num_attention_heads=16, hidden_act="gelu"),
}
VAE = dict(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, sample_size=512)


def count(module, *args, **kwargs) -> float:
    with FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return counter.get_total_flops() / 1e9


def params(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def row(name, p, gflops):
    print(f"| {name} | {p:,.1f} M | {p * 4 / 1e3:,.2f} GB | {p * 2 / 1e3:,.2f} GB | {gflops:,.0f} |")


def main() -> None:
    print("| part | parameters | fp32 | fp16 | GFLOPs per item |")
    print("|---|---|---|---|---|")
    with torch.device("meta"):
        for name, cfg in TEXT.items():
            model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **cfg))
            row(f"text encoder, {name}", params(model), count(model, torch.zeros(1, 77, dtype=torch.long)))
        for name, cfg in UNETS.items():
            unet = UNet2DConditionModel(sample_size=64, **cfg)
            gf = count(unet, torch.zeros(1, 9, 64, 64), torch.zeros(1), torch.zeros(1, 77, cfg["cross_attention_dim"]))
            row(f"UNet, {name} (one item, one step)", params(unet), gf)
        vae = AutoencoderKL(**VAE)
        x = torch.zeros(1, 3, 512, 512)
        enc = count(lambda s: vae.quant_conv(vae.encoder(s)), x)
        dec = count(lambda z: vae.decoder(vae.post_quant_conv(z)), torch.zeros(1, 4, 64, 64))
        row("VAE encoder (512 x 512)", params(vae.encoder) + params(vae.quant_conv), enc)
        row("VAE decoder (512 x 512)", params(vae.decoder) + params(vae.post_quant_conv), dec)


if __name__ == "__main__":
    main()
