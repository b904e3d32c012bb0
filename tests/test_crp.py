"""Concept Relevance Propagation: relevance through chosen features of one layer."""
import numpy as np
import pytest

import onnxlrp

from .helpers_fixtures import fixture_path, load_reference


@pytest.fixture(scope="module")
def vgg():
    return onnxlrp.LRP(fixture_path("vgg"), onnxlrp.EpsilonPlus(), verbose=False)


@pytest.mark.parametrize("model,layer", [("vgg", 5), ("vgg", 9), ("resnet", 2)])
def test_concepts_over_all_features_add_up_to_lrp(model, layer):
    """Below a layer every path passes through (no skip connection around it), the concept relevances
    of all its features sum to the plain LRP relevance."""
    ref = load_reference(model)
    lrp = onnxlrp.LRP(fixture_path(model), onnxlrp.EpsilonGammaBox(-3.0, 3.0), verbose=False)
    channels = lrp.layers[layer].outputs[0].shape[1]
    expl = onnxlrp.CRP(lrp, layer, onnxlrp.IndexedFeatures(*range(channels))).analyze(ref["x"])
    n = len(ref["x"])
    assert expl.val.shape == (channels * n,) + ref["x"].shape[1:]
    total = expl.val.reshape((channels,) + ref["x"].shape).sum(0)
    full = lrp.analyze(ref["x"]).val
    np.testing.assert_allclose(total, full, rtol=1e-4, atol=1e-5 * np.abs(full).max())


def test_top_n_features_are_the_most_relevant_ones(vgg):
    ref = load_reference("vgg")
    expl = onnxlrp.CRP(vgg, 5, onnxlrp.TopNFeatures(3)).analyze(ref["x"])
    per_feature = expl.extras["concept_relevance"].sum(axis=(2, 3))
    features = expl.extras["features"]
    assert features.shape == (3, 4)
    for sample in range(4):
        np.testing.assert_array_equal(features[:, sample], np.argsort(-per_feature[sample])[:3])
    # Feature-major rows: rows 0..3 are the top feature of samples 0..3.
    assert expl.analyzer == "CRP" and expl.val.shape == (12, 3, 32, 32)
    np.testing.assert_array_equal(expl.output_selection, vgg.analyze(ref["x"]).output_selection)


def test_single_feature_matches_manual_mask(vgg):
    """IndexedFeatures(f) on a dense layer equals LRP with only feature f's relevance kept there."""
    ref = load_reference("vgg")
    expl = onnxlrp.CRP(vgg, 10, onnxlrp.IndexedFeatures(4)).analyze(ref["x"][:2])
    others = onnxlrp.CRP(vgg, 10, onnxlrp.IndexedFeatures(*[i for i in range(32) if i != 4])).analyze(ref["x"][:2])
    rest = others.val.reshape((31, 2) + ref["x"].shape[1:]).sum(0)
    np.testing.assert_allclose(expl.val + rest, vgg.analyze(ref["x"][:2]).val, rtol=1e-4, atol=1e-7)


def test_bad_arguments(vgg):
    with pytest.raises(onnxlrp.LRPError, match="layer index"):
        onnxlrp.CRP(vgg, len(vgg.layers) - 1, onnxlrp.TopNFeatures(1))
    with pytest.raises(onnxlrp.InputError, match="has 16 features"):
        onnxlrp.CRP(vgg, 5, onnxlrp.IndexedFeatures(16)).analyze(load_reference("vgg")["x"])
    with pytest.raises(ValueError):
        onnxlrp.TopNFeatures(0)
