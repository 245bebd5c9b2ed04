#!/usr/bin/env python3
"""The PyTorch baseline for `candiff bench attention`: torch's default SDPA (bf16, [B, H, S, D],
no mask) at the same shapes. Usage: python3 scripts/bench_torch_attention.py [--shapes 24x4608,...]
Prints one JSON line per shape."""
import argparse
import json
import time

import torch
import torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--shapes", default="24x4608,24x27280,40x32760")
p.add_argument("--head-dim", type=int, default=128)
p.add_argument("--iters", type=int, default=10)
a = p.parse_args()
for shape in a.shapes.split(","):
    h, s = map(int, shape.split("x"))
    q, k, v = (torch.randn(1, s, h, a.head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    with torch.inference_mode():
        F.scaled_dot_product_attention(q, k, v)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            F.scaled_dot_product_attention(q, k, v)
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3 / a.iters
    print(json.dumps({"impl": "torch sdpa", "heads": h, "tokens": s, "ms": ms,
                      "tflops": 4 * h * s * s * a.head_dim / (ms * 1e-3) / 1e12, "torch": torch.__version__}))
