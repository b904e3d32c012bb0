"""``onnxlrp explain MODEL --text ... --tokenizer tokenizer.json`` on a BERT fixture."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import onnxlrp

from .test_cli import invoke

tokenizers = pytest.importorskip("tokenizers")

BERT = str(Path(__file__).resolve().parent.parent / "models_fixtures" / "transformers" / "bert_legacy14.onnx")
WORDS = "the a movie was great terrible i loved it hated plot acting boring fun and but not very good bad".split()


def _tokenizer(path, n_words=len(WORDS), offset=0):
    """A word-level tokenizer with BERT's [CLS] ... [SEP] template (ids 0-3 special, words from 4)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS[:n_words]:
        vocab[w] = len(vocab) + offset
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path))
    return tok


def test_text_explains_each_line_and_writes_html(tmp_path):
    tok_path = tmp_path / "tokenizer.json"
    tok = _tokenizer(tok_path)
    text_file = tmp_path / "lines.txt"
    text_file.write_text("the movie was great\n\ni hated the plot but loved the acting\na good movie\n")
    out = tmp_path / "out"
    res = invoke("explain", BERT, "--text-file", text_file, "--tokenizer", tok_path, "-o", out, "--json")
    assert res.exit_code == 0, res.output + res.stderr
    data = json.loads(res.stdout)
    assert data["rules"] == "AttnLRP()"  # the default for token models
    assert [r["line"] for r in data["results"]] == [1, 3, 4]
    page = (out / "text_heatmap.html").read_text()
    assert page.count("<span") == sum(len(r["tokens"]) for r in data["results"]) and "acting" in page
    analyzer = onnxlrp.LRP(BERT, onnxlrp.AttnLRP(), verbose=False, device="cpu")
    for r in data["results"]:
        ids = np.asarray([tok.encode(r["text"]).ids])
        e = analyzer.analyze(ids)
        assert r["explained"] == int(e.output_selection[0])
        np.testing.assert_allclose(r["token_relevance"], e.extras["token_relevance"][0], rtol=1e-5, atol=1e-7)
    # plain output: one header and one token line per text line
    res = invoke("explain", BERT, "--text", "a good movie", "--tokenizer", tok_path, "-o", out, "-f")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("line 1: class") and "movie(" in lines[1]


def test_text_errors_name_the_problem(tmp_path):
    tok_path = tmp_path / "tokenizer.json"
    _tokenizer(tok_path)
    res = invoke("explain", BERT, "--text", "a movie")
    assert res.exit_code == 2 and "--tokenizer" in res.stderr
    res = invoke("explain", BERT, "img.png", "--text", "a movie", "--tokenizer", tok_path)
    assert res.exit_code == 2 and "not both" in res.stderr
    big = tmp_path / "big.json"
    _tokenizer(big, offset=1000)
    res = invoke("explain", BERT, "--text", "a movie", "--tokenizer", big, "-o", tmp_path / "o")
    assert res.exit_code == 1 and "out of range" in res.stderr and "do not match" in res.stderr
    res = invoke("explain", BERT, str(tok_path), "-o", tmp_path / "o")
    assert res.exit_code == 1 and "token ids" in res.stderr and "--text" in res.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    res = invoke("explain", BERT, "--text", "a movie", "--tokenizer", bad, "-o", tmp_path / "o")
    assert res.exit_code == 1 and "not a tokenizer.json" in res.stderr
