#!/usr/bin/env python3
"""Builds assets/flux1-tiny: the tiny random-weight FLUX.1 of the test fixtures laid out like a
diffusers repository, plus word-level tokenizers for its toy vocabularies (1000 ids: CLIP bos 998,
eos 999; T5 pad 0, eos 1). Standard library only. Usage: scripts/make-tiny-flux.py FIXTURES_ROOT"""
import json
import shutil
import sys
from pathlib import Path


src = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures") / "flux1_tiny"
dst = Path(__file__).resolve().parent.parent / "assets" / "flux1-tiny"
for comp in ["transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"]:
    shutil.copytree(src / comp, dst / comp, dirs_exist_ok=True)

from tiny_tokenizer import tokenizer  # noqa: E402  (scripts/ is on sys.path when run)


clip = tokenizer(1000, {"<unk>": 997, "<|startoftext|>": 998, "<|endoftext|>": 999},
                 "<|startoftext|>", "<|endoftext|>", "<unk>")
t5 = tokenizer(1000, {"<pad>": 0, "</s>": 1, "<unk>": 2}, None, "</s>", "<unk>")
for name, tok, pad in [("tokenizer", clip, "<|endoftext|>"), ("tokenizer_2", t5, "<pad>")]:
    (dst / name).mkdir(parents=True, exist_ok=True)
    (dst / name / "tokenizer.json").write_text(json.dumps(tok, indent=1))
    (dst / name / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
(dst / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1"}, indent=1))
print(f"wrote {dst}")
