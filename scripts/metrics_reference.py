#!/usr/bin/env python3
"""Reference PSNR/SSIM values for tests/compare_metrics.rs, computed with scikit-image on fixture
images (needs numpy, scipy, scikit-image). Usage: scripts/metrics_reference.py [FIXTURES_ROOT]"""
import json
import struct
import sys
from pathlib import Path

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

root = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")


def load(path, name):
    d = path.read_bytes()
    n = struct.unpack("<Q", d[:8])[0]
    h = json.loads(d[8:8 + n])[name]
    a, b = h["data_offsets"]
    return np.frombuffer(d[8 + n + a:8 + n + b], dtype=np.float32).reshape(h["shape"]).astype(np.float64)


flux = load(root / "flux1_tiny/pipeline.safetensors", "image")
frames = load(root / "wan22_tiny/pipeline_a14b.safetensors", "frames")
pairs = {"flux_image_vs_wan_frame0": (flux, frames[0]), "wan_frame0_vs_frame4": (frames[0], frames[4])}
for k, (a, b) in pairs.items():
    p = peak_signal_noise_ratio(a, b, data_range=1.0)
    s = structural_similarity(a, b, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False)
    print(f"{k}: psnr {p:.10f} ssim {s:.10f}")
