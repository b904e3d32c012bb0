#!/usr/bin/env python
"""Write models_fixtures/transformers/tokenizer.json: a word-level tokenizer for the README's text
examples on the random-weight BERT and GPT-2 fixtures (vocabulary 100: ids 0-3 special, 4-99 words).

It stands in for a model's real tokenizer.json (`tokenizers` format, as Hugging Face ships it), which
`onnxlrp explain --text` reads the same way.
"""
import argparse
import os

from tokenizers import Tokenizer, models, pre_tokenizers, processors

WORDS = """the a an and or but not no very so too of to in on at for with from by is was are were be been
it this that these those i you he she we they my your his her our their movie film plot acting story
scene actor actress director music great good fine nice fun funny loved liked enjoyed best wonderful
bad terrible awful boring dull hated worst poor weak long short slow fast really quite just all more
most some any every one two time""".split()


def build():
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    assert len(vocab) <= 100, len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(root, "models_fixtures", "transformers", "tokenizer.json"))
    path = ap.parse_args().out
    build().save(path)
    print(f"wrote {path}")
