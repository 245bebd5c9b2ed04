#!/usr/bin/env python3
"""The diffusers baseline for `candiff bench flux-step --model flux.2-*`: one denoising step of a
full-size FLUX.2 transformer (dev, klein 4B/9B) with random bf16 weights, same shapes, eager mode.

Usage: python3 scripts/bench_diffusers_flux2.py [--model flux.2-dev --width 1024 --height 1024
       --txt-tokens 512 --iters 5]
Prints one JSON line."""
import argparse
import json
import time

import torch
from diffusers import Flux2Transformer2DModel

# Sizes of the released configs (heads of 128 channels, MLP ratio 3, axes 4 x 32).
CONFIGS = {
    "flux.2-dev": dict(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                       guidance_embeds=True),
    "flux.2-klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                            guidance_embeds=False),
    "flux.2-klein-9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                            guidance_embeds=False),
}

p = argparse.ArgumentParser()
p.add_argument("--model", default="flux.2-dev", choices=sorted(CONFIGS))
p.add_argument("--width", type=int, default=1024)
p.add_argument("--height", type=int, default=1024)
p.add_argument("--txt-tokens", type=int, default=512)
p.add_argument("--iters", type=int, default=5)
a = p.parse_args()

torch.manual_seed(0)
cfg = CONFIGS[a.model]
with torch.device("meta"):
    model = Flux2Transformer2DModel(in_channels=128, attention_head_dim=128, **cfg)
model = model.to_empty(device="cuda").to(torch.bfloat16).eval()
with torch.no_grad():
    for prm in model.parameters():
        prm.normal_(0.0, 0.02)  # the same spread as candiff's synthetic weights

h, w = a.height // 16, a.width // 16
dev, dt = "cuda", torch.bfloat16
img = torch.randn(1, h * w, 128, device=dev, dtype=dt)
txt = torch.randn(1, a.txt_tokens, cfg["joint_attention_dim"], device=dev, dtype=dt)
t = torch.tensor([0.5], device=dev, dtype=dt)
g = torch.tensor([3.5], device=dev, dtype=dt) if cfg["guidance_embeds"] else None
hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
zeros = torch.zeros(h * w, dtype=torch.long)
img_ids = torch.stack([zeros, hh.reshape(-1), ww.reshape(-1), zeros], -1).to(dev)
l = torch.arange(a.txt_tokens)
txt_ids = torch.stack([torch.zeros_like(l)] * 3 + [l], -1).to(dev)


def step():
    return model(hidden_states=img, encoder_hidden_states=txt, timestep=t, guidance=g, img_ids=img_ids,
                 txt_ids=txt_ids, return_dict=False)[0]


with torch.inference_mode():
    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / a.iters
print(json.dumps({"model": a.model, "variant": "diffusers bf16 eager", "ms_per_step": ms, "width": a.width,
                  "height": a.height, "txt_tokens": a.txt_tokens, "torch": torch.__version__,
                  "gpu": torch.cuda.get_device_name(), "max_allocated_bytes": torch.cuda.max_memory_allocated()}))
