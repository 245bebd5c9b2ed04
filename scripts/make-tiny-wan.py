#!/usr/bin/env python3
"""Builds assets/wan22-tiny: the tiny random-weight Wan2.2 A14B-style pipeline of the test fixtures
(two experts, Wan2.1 VAE, UniPC shift 12) laid out like a diffusers repository, plus a word-level
tokenizer for its 64-id UMT5 vocabulary (pad 0, eos 1, unk 2). Standard library only.
Usage: scripts/make-tiny-wan.py [FIXTURES_ROOT]"""
import json
import shutil
import sys
from pathlib import Path

from tiny_tokenizer import tokenizer  # noqa: E402  (scripts/ is on sys.path when run)

src = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures") / "wan22_tiny"
dst = Path(__file__).resolve().parent.parent / "assets" / "wan22-tiny"
for comp, folder in [("text_encoder", "text_encoder"), ("transformer", "transformer_a14b_high"),
                     ("transformer_2", "transformer_a14b_low"), ("vae", "vae21"), ("scheduler", "scheduler_a14b")]:
    shutil.copytree(src / folder, dst / comp, dirs_exist_ok=True)

VOCAB_SIZE = 64
WORDS = (
    "a an the of and with in on at to by for from under over near photo cat dog bird horse fish tree "
    "flower forest mountain river sea sky cloud sun moon city street house car boat red orange yellow "
    "green blue purple black white golden bright dark small large old snow rain light water fire "
    "walking running flying slowly camera"
).split()
tok = tokenizer(VOCAB_SIZE, {"<pad>": 0, "</s>": 1, "<unk>": 2}, None, "</s>", "<unk>", WORDS)
(dst / "tokenizer").mkdir(parents=True, exist_ok=True)
(dst / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok, indent=1))
index = json.loads((src / "pipeline_a14b" / "model_index.json").read_text())
index["tokenizer"] = ["transformers", "T5TokenizerFast"]
(dst / "model_index.json").write_text(json.dumps(index, indent=1))
print(f"wrote {dst}")
