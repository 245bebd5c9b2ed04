#!/usr/bin/env python3
"""Writes LPIPS (AlexNet backbone, v0.1 linear heads) as one .safetensors file for
`candiff compare --lpips FILE`: the `lpips` package's weights under its own names.
Needs: pip install lpips torchvision safetensors (torchvision downloads AlexNet's ImageNet weights).
Usage: scripts/export-lpips.py [OUT_FILE, default lpips-alex.safetensors]"""
import sys

import lpips
from safetensors.torch import save_file

out = sys.argv[1] if len(sys.argv) > 1 else "lpips-alex.safetensors"
net = lpips.LPIPS(net="alex", version="0.1", verbose=False).eval()
# `lins.N` alias `linN`: keep one name per tensor.
state = {k: v.float().clone().contiguous() for k, v in net.state_dict().items() if not k.startswith("lins.")}
save_file(state, out)
print(f"wrote {out}: {len(state)} tensors")
