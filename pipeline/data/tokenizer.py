"""Tokenizers through `transformers` (fast): built from the run's own captions or loaded from a local
folder. Nothing is downloaded.

The vocabulary is chosen deterministically: `tokenizers`' WordPiece trainer breaks frequency ties in
hash order, and five trainings on the same captions gave five different vocabularies here, so a run
and its re-run would train different models. We count words with the BERT normalizer and
pre-tokenizer, keep the most frequent ones whole (ties alphabetical), add every character seen as a
word-initial and a `##` continuation piece, and give that vocabulary to a WordPiece model: a rare word
becomes pieces, nothing becomes [UNK] unless it has an unseen character.

A word is kept whole only if it occurs `min_count` times (2, as Hugging Face's BERT WordPiece recipe):
on a small web the budget outgrows the words in use, and a word seen in one caption (a name, a typo,
keyboard noise) then gets an embedding row of its own that one image alone trains. That row can only
memorise the pair, and a memorised pair later looks like a perfect match to the filter that should
remove it (docs/architecture.md, "capfilt"). In pieces, such a word shares its rows with every word
spelled alike.

transformers 5 silently ignores `BertTokenizerFast(vocab_file=...)`, so we build the fast tokenizer
from a `tokenizers` object and save/load it as a folder, and we check the vocabulary size.
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Iterable

from pipeline.errors import InputError

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_vocab(texts: Iterable[str], vocab_size: int, min_count: int = 2) -> dict[str, int]:
    from tokenizers import normalizers, pre_tokenizers

    normalize = normalizers.BertNormalizer(lowercase=True)
    split = pre_tokenizers.BertPreTokenizer()
    words = collections.Counter()
    for text in texts:
        words.update(w for w, _ in split.pre_tokenize_str(normalize.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    pieces = SPECIAL + chars + [f"##{c}" for c in chars]
    budget = max(0, vocab_size - len(pieces))
    ranked = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
    frequent = [w for w, n in ranked if len(w) > 1 and n >= min_count][:budget]
    return {tok: i for i, tok in enumerate(pieces + frequent)}


def train_tokenizer(texts: Iterable[str], vocab_size: int, folder: Path, min_count: int = 2):
    """Build a lowercase WordPiece tokenizer on `texts`; save it to `folder`; return it loaded."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = build_vocab(texts, vocab_size, min_count)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    loaded = load_tokenizer(folder)
    if len(loaded) != len(vocab):
        raise RuntimeError(f"tokenizer saved with {len(vocab)} tokens reloads with {len(loaded)}")
    return loaded


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    from pipeline.storage import as_path, local_copy

    folder = as_path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise InputError(f"{folder}: no tokenizer.json (a tokenizer folder saved by transformers is expected)")
    with local_copy(folder) as local:   # transformers reads files by name
        tok = AutoTokenizer.from_pretrained(str(local), local_files_only=True)
    missing = [t for t in SPECIAL if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id) and t != "[UNK]"]
    if missing:
        raise InputError(f"{folder}: tokenizer lacks special tokens {missing}")
    return tok
