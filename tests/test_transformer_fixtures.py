"""Transformers exported by PyTorch's legacy (opset 14, 17) and dynamo (opset 18) exporters, against LXT 2.1.

Fixtures (models_fixtures/transformers/, made by scripts/make_transformer_fixtures.py): small random-weight
BERT, DistilBERT, RoBERTa, GPT-2, HF ViT, timm ViT and an nn.TransformerEncoder classifier, with float64 LXT
references: AttnLRP, CP-LRP and plain gradient x input, value-seeded, at the word-embedding output (text)
or the pixels (vision). onnxlrp with normalize_output_relevance=False must equal them per sample.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

import onnxlrp

DIR = Path(__file__).resolve().parent.parent / "models_fixtures" / "transformers"
MANIFEST = json.loads((DIR / "manifest.json").read_text())["families"]
FILES = [(family, name) for family, info in MANIFEST.items() for name in sorted(info["files"])]
TOL = 1e-4


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    axes = tuple(range(1, a.ndim))
    return np.sqrt(((a - b) ** 2).sum(axes)) / np.sqrt((b ** 2).sum(axes))


@lru_cache(maxsize=None)
def ref(family):
    return dict(np.load(DIR / f"{family}_ref.npz"))


def _args(family):
    """(x, inputs, output selection kwargs) for analyze()."""
    r = ref(family)
    names = MANIFEST[family]["input_names"]
    x = r[names[0]]
    inputs = {k: r[k] for k in names[1:]}
    kw = {"position": int(r["target_position"])} if "target_position" in r else {}
    return x, inputs, kw


@lru_cache(maxsize=None)
def analyzer(name, composite, normalize=False):
    return onnxlrp.LRP(str(DIR / name), getattr(onnxlrp, composite)(), verbose=False, device="cpu",
                       normalize_output_relevance=normalize)


@pytest.mark.parametrize("family,name", FILES, ids=[n for _, n in FILES])
@pytest.mark.parametrize("composite,key", [("AttnLRP", "attnlrp"), ("CPLRP", "cplrp")])
def test_matches_lxt(family, name, composite, key):
    r = ref(family)
    x, inputs, kw = _args(family)
    e = analyzer(name, composite).analyze(x, r["target"], inputs=inputs, **kw)
    logits = r["logits"] if "target_position" not in r else r["logits"]
    np.testing.assert_allclose(e.output, logits, rtol=1e-4, atol=1e-4)
    assert e.val.shape == r[key].shape
    err = rel_l2(e.val, r[key])
    assert np.all(err <= TOL), f"{name} {composite}: per-sample relative L2 {err}"
    np.testing.assert_array_equal(e.output_selection, r["target"])
    if "target_position" in r:
        assert np.all(e.extras["output_position"] == int(r["target_position"]))


@pytest.mark.parametrize("family", sorted(MANIFEST))
def test_the_rules_are_told_apart(family):
    """AttnLRP differs from CP-LRP and from gradient x input on every sample, both in the references and in
    onnxlrp's results (so the comparisons above can fail)."""
    r = ref(family)
    assert np.all(rel_l2(r["attnlrp"], r["grad_x_input"]) > 3e-2)
    assert np.all(rel_l2(r["attnlrp"], r["cplrp"]) > 3e-2)
    name = sorted(MANIFEST[family]["files"])[0]
    x, inputs, kw = _args(family)
    attn = analyzer(name, "AttnLRP").analyze(x, r["target"], inputs=inputs, **kw).val
    cp = analyzer(name, "CPLRP").analyze(x, r["target"], inputs=inputs, **kw).val
    assert np.all(rel_l2(attn, cp) > 3e-2) and np.all(rel_l2(attn, r["grad_x_input"]) > 3e-2)


@pytest.mark.parametrize("family", sorted(MANIFEST))
def test_normalized_seed_divides_by_the_logit(family):
    """The default seed 1 gives LXT's relevance divided by the explained logit."""
    r = ref(family)
    name = sorted(MANIFEST[family]["files"])[-1]  # the dynamo export, with external data
    x, inputs, kw = _args(family)
    e = analyzer(name, "AttnLRP", normalize=True).analyze(x, r["target"], inputs=inputs, **kw)
    logits = r["logits"][:, int(r["target_position"])] if "target_position" in r else r["logits"]
    logit = logits[np.arange(len(x)), r["target"]]
    expected = r["attnlrp"] / logit.reshape((-1,) + (1,) * (r["attnlrp"].ndim - 1))
    assert np.all(rel_l2(e.val, expected) <= TOL)
    if MANIFEST[family]["input_names"][0] == "input_ids":
        np.testing.assert_allclose(e.extras["token_relevance"], e.val.sum(-1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_masked_positions_get_no_relevance(family):
    """Sample 1 masks its last 3 positions: they get exactly zero relevance, and nothing is NaN."""
    r = ref(family)
    x, inputs, kw = _args(family)
    assert np.all(inputs["attention_mask"][1, -3:] == 0)
    for name in sorted(MANIFEST[family]["files"]):
        e = analyzer(name, "AttnLRP").analyze(x, r["target"], inputs=inputs, **kw)
        assert np.all(np.isfinite(e.val)) and np.all(e.val[1, -3:] == 0)


def test_other_lengths_and_default_inputs():
    """A dynamic sequence axis: another length builds its own graph; a model's mask and token types default
    to ones and zeros."""
    r = ref("bert")
    a = analyzer("bert_legacy14.onnx", "AttnLRP")
    ids = r["input_ids"][:, :7]
    given = a.analyze(ids, 1, inputs={"attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    default = a.analyze(ids, 1)
    assert default.val.shape == (3, 7, 32)
    np.testing.assert_allclose(default.val, given.val, rtol=1e-6, atol=1e-9)


def test_layer_listing_shows_the_attention_groups():
    a = analyzer("gpt2_dynamo18.onnx", "AttnLRP")
    groups = {l.group for l in a.layers}
    assert {"AttentionLayer", "SoftmaxLayer", "DenseLayer", "MaskLayer"} <= groups
    rules = {type(rule).__name__ for rule in a.rules}
    assert {"SoftmaxRule", "UniformRule", "LayerNormRule", "EpsilonRule", "PassRule"} <= rules
    assert all(r.epsilon == 1e-30 for r in a.rules if hasattr(r, "epsilon"))  # LXT divides nowhere
