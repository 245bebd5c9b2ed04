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

WORDS = (
    "a an the of and with in on at to by for from under over near beside photo painting portrait "
    "cat dog bird horse fish tree flower forest mountain river lake sea sky cloud sun moon star city "
    "street house car boat train red orange yellow green blue purple black white gray golden bright "
    "dark small large old young happy quiet sunset sunrise night morning winter summer snow rain light "
    "shadow glass stone wood metal water fire garden field road bridge window door table chair book "
    "man woman child face eyes hair smile hat coat dress detailed sharp soft cinematic studio x"
).split()


def tokenizer(vocab_size, specials, bos, eos, unk):
    vocab = {tok: i for tok, i in specials.items()}
    nxt = max(specials.values()) + 1 if max(specials.values()) < 100 else 3
    for w in WORDS:
        while nxt in vocab.values():
            nxt += 1
        vocab[w] = nxt
        nxt += 1
    assert max(vocab.values()) < vocab_size
    single = ([{"SpecialToken": {"id": bos, "type_id": 0}}] if bos else []) + [
        {"Sequence": {"id": "A", "type_id": 0}},
        {"SpecialToken": {"id": eos, "type_id": 0}},
    ]
    special = {t: {"id": t, "ids": [specials[t]], "tokens": [t]} for t in ([bos] if bos else []) + [eos]}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for t, i in specials.items()
        ],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": single, "special_tokens": special},
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": unk},
    }


clip = tokenizer(1000, {"<unk>": 997, "<|startoftext|>": 998, "<|endoftext|>": 999},
                 "<|startoftext|>", "<|endoftext|>", "<unk>")
t5 = tokenizer(1000, {"<pad>": 0, "</s>": 1, "<unk>": 2}, None, "</s>", "<unk>")
for name, tok, pad in [("tokenizer", clip, "<|endoftext|>"), ("tokenizer_2", t5, "<pad>")]:
    (dst / name).mkdir(parents=True, exist_ok=True)
    (dst / name / "tokenizer.json").write_text(json.dumps(tok, indent=1))
    (dst / name / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad}))
(dst / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1"}, indent=1))
print(f"wrote {dst}")
