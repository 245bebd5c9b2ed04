#!/usr/bin/env python3
"""Builds assets/flux2-tiny (dev: Mistral3 conditioning, guidance embedded) and
assets/flux2-klein-tiny (klein: Qwen3 conditioning, CFG): the tiny random-weight FLUX.2 stack of
the test fixtures laid out like diffusers repositories, plus word-level tokenizers holding each
encoder's chat-template tokens (toy vocabularies of 512 ids). Standard library only.
Usage: scripts/make-tiny-flux2.py FIXTURES_ROOT"""
import json
import shutil
import sys
from pathlib import Path

from tiny_tokenizer import tokenizer

src = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures") / "flux2_tiny"
assets = Path(__file__).resolve().parent.parent / "assets"

VOCAB = 512
# Ids of the templates' special tokens (pad ids as the tiny encoders' configs give them: 11 and 7).
MISTRAL = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "<pad>": 11, "[SYSTEM_PROMPT]": 17,
           "[/SYSTEM_PROMPT]": 18}
QWEN3 = {"<unk>": 0, "<|im_start|>": 5, "<|im_end|>": 6, "<|endoftext|>": 7, "<think>": 8, "</think>": 9}

for name, transformer, encoder, specials, eos, pad_side, pipeline in [
    ("flux2-tiny", "transformer", "text_encoder_mistral3", MISTRAL, "</s>", "left", "Flux2Pipeline"),
    ("flux2-klein-tiny", "transformer_klein", "text_encoder_qwen3", QWEN3, "<|im_end|>", "right", "Flux2KleinPipeline"),
]:
    dst = assets / name
    for s, d in [(transformer, "transformer"), (encoder, "text_encoder"), ("vae", "vae"), ("scheduler", "scheduler")]:
        shutil.copytree(src / s, dst / d, dirs_exist_ok=True)
    (dst / "tokenizer").mkdir(parents=True, exist_ok=True)
    tok = tokenizer(VOCAB, specials, None, eos, "<unk>")
    (dst / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok, indent=1))
    (dst / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"padding_side": pad_side}))
    (dst / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "_diffusers_version": "0.42.1"}, indent=1))
    print(f"wrote {dst}")
