#!/usr/bin/env python3
"""The diffusers baseline for `candiff bench flux-step`: one denoising step of a full-size
FLUX.1-dev transformer with random bf16 weights, same shapes, eager mode (or `torch.compile` with
--compile MODE, e.g. max-autotune; the first call's time, compilation included, is reported apart).

Usage: python3 scripts/bench_diffusers_flux.py [--width 1024 --height 1024 --txt-tokens 512 --iters 5]
       [--compile max-autotune]
Prints one JSON line."""
import argparse
import json
import os
import sys
import time

import torch
from diffusers import FluxTransformer2DModel

p = argparse.ArgumentParser()
p.add_argument("--width", type=int, default=1024)
p.add_argument("--height", type=int, default=1024)
p.add_argument("--txt-tokens", type=int, default=512)
p.add_argument("--iters", type=int, default=5)
p.add_argument("--compile", metavar="MODE", help="torch.compile the transformer with this mode")
a = p.parse_args()

torch.manual_seed(0)
with torch.device("meta"):
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )
model = model.to_empty(device="cuda").to(torch.bfloat16).eval()
with torch.no_grad():
    for prm in model.parameters():
        prm.normal_(0.0, 0.02)  # the same spread as candiff's synthetic weights

h, w = a.height // 16, a.width // 16
dev, dt = "cuda", torch.bfloat16
img = torch.randn(1, h * w, 64, device=dev, dtype=dt)
txt = torch.randn(1, a.txt_tokens, 4096, device=dev, dtype=dt)
pooled = torch.randn(1, 768, device=dev, dtype=dt)
t = torch.tensor([0.5], device=dev, dtype=dt)
g = torch.tensor([3.5], device=dev, dtype=dt)


def ar(n):
    return torch.arange(n, dtype=torch.float32)


img_ids = torch.stack(torch.meshgrid(torch.zeros(1), ar(h), ar(w), indexing="ij"), -1).reshape(-1, 3).to(dev)
txt_ids = torch.zeros(a.txt_tokens, 3, device=dev)


if a.compile:
    model = torch.compile(model, mode=a.compile)


def step():
    return model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                 guidance=g, img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]


with torch.inference_mode():
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    if a.compile:
        step()  # the autotuned graph's second call, warm
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / a.iters
variant = f"diffusers bf16 torch.compile({a.compile})" if a.compile else "diffusers bf16 eager"
print(json.dumps({"variant": variant, "ms_per_step": ms, "first_call_s": first_s, "width": a.width, "height": a.height,
                  "txt_tokens": a.txt_tokens, "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}))
# After a compiled run the interpreter did not exit before the call's time limit (inductor's worker
# pool, session 13): the result is printed, so leave at once.
sys.stdout.flush()
os._exit(0)
