"""Word-level `tokenizer.json` builder for the tiny offline models (standard library only)."""

WORDS = (
    "a an the of and with in on at to by for from under over near beside photo painting portrait "
    "cat dog bird horse fish tree flower forest mountain river lake sea sky cloud sun moon star city "
    "street house car boat train red orange yellow green blue purple black white gray golden bright "
    "dark small large old young happy quiet sunset sunrise night morning winter summer snow rain light "
    "shadow glass stone wood metal water fire garden field road bridge window door table chair book "
    "man woman child face eyes hair smile hat coat dress detailed sharp soft cinematic studio x"
).split()


def tokenizer(vocab_size, specials, bos, eos, unk, words=WORDS):
    vocab = {tok: i for tok, i in specials.items()}
    nxt = max(specials.values()) + 1 if max(specials.values()) < 100 else 3
    for w in words:
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
