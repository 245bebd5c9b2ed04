#!/usr/bin/env python3
"""The diffusers baseline for `candiff bench wan-step` / `wan-decode`: one call of a full-size
Wan2.2 transformer (A14B expert or TI2V-5B) with random bf16 weights, eager mode, same shapes; or
a full-size Wan VAE decode with random weights.

Usage: python3 scripts/bench_diffusers_wan.py --model ti2v-5b --width 1280 --height 704 --frames 121
       python3 scripts/bench_diffusers_wan.py --decode wan22 --width 1280 --height 704 --frames 121
Prints one JSON line."""
import argparse
import json
import time

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

p = argparse.ArgumentParser()
p.add_argument("--model", default="ti2v-5b", choices=["a14b", "ti2v-5b"])
p.add_argument("--decode", choices=["wan21", "wan22"])
p.add_argument("--width", type=int, default=1280)
p.add_argument("--height", type=int, default=704)
p.add_argument("--frames", type=int, default=121)
p.add_argument("--txt-tokens", type=int, default=512)
p.add_argument("--iters", type=int, default=2)
p.add_argument("--per-token-timesteps", action="store_true",
               help="TI2V as WanPipeline calls it (expand_timesteps): one timestep per token")
a = p.parse_args()
dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)
f = (a.frames - 1) // 4 + 1


def randomize(model):
    model = model.to_empty(device=dev).to(dt).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0.0, 0.02)  # the same spread as candiff's synthetic weights
    return model


if a.decode:
    kw = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
              patch_size=2, scale_factor_spatial=16) if a.decode == "wan22" else dict(base_dim=96, z_dim=16)
    with torch.device("meta"):
        vae = AutoencoderKLWan(**kw)
    vae = randomize(vae)
    s = 16 if a.decode == "wan22" else 8
    z = torch.randn(1, kw["z_dim"], f, a.height // s, a.width // s, device=dev, dtype=dt)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = vae.decode(z, return_dict=False)[0]
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    print(json.dumps({"impl": "diffusers", "decode": a.decode, "seconds": secs, "shape": list(out.shape),
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))
    raise SystemExit

cfg = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
           text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
           qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
spatial = 8
if a.model == "ti2v-5b":
    cfg.update(num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30)
    spatial = 16
with torch.device("meta"):
    model = WanTransformer3DModel(**cfg)
model = randomize(model)
h, w = a.height // spatial, a.width // spatial
x = torch.randn(1, cfg["in_channels"], f, h, w, device=dev, dtype=dt)
ctx = torch.randn(1, a.txt_tokens, 4096, device=dev, dtype=dt)
tokens = f * (h // 2) * (w // 2)
t = torch.full((1, tokens) if a.per_token_timesteps else (1,), 900.0, device=dev)


def step():
    return model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]


with torch.inference_mode():
    step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / a.iters
print(json.dumps({"impl": "diffusers", "model": a.model, "ms_per_call": ms, "tokens": tokens,
                  "per_token_timesteps": a.per_token_timesteps, "width": a.width, "height": a.height,
                  "frames": a.frames, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))
