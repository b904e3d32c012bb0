"""onnxlrp against Zennit: relevances of the committed fixture models vs. float64 Zennit references.

The references (models_fixtures/*_ref.npz) were computed by scripts/make_fixtures.py with Zennit rules
configured to RelevancePropagation.jl's semantics; this test needs neither torch nor zennit.
"""
import numpy as np
import pytest

import onnxlrp

from .helpers_fixtures import FIXTURES, fixture_path, load_reference, relative_l2

PRESETS = {
    "EpsilonGammaBox": lambda: onnxlrp.EpsilonGammaBox(-3.0, 3.0),
    "EpsilonPlus": onnxlrp.EpsilonPlus,
    "EpsilonAlpha2Beta1": onnxlrp.EpsilonAlpha2Beta1,
    "EpsilonPlusFlat": onnxlrp.EpsilonPlusFlat,
    "EpsilonAlpha2Beta1Flat": onnxlrp.EpsilonAlpha2Beta1Flat,
}
VARIANTS = [(m, v) for m in FIXTURES for v in ("", "_dynamo")] + [("vgg", "_bn_preserved")]
TOLERANCE = 1e-4


@pytest.mark.parametrize("model,variant", VARIANTS, ids=[m + v for m, v in VARIANTS])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_matches_zennit(model, variant, preset):
    ref = load_reference(model)
    analyzer = onnxlrp.LRP(fixture_path(model + variant), PRESETS[preset](), verbose=False)
    expl = analyzer.analyze(ref["x"])
    np.testing.assert_array_equal(expl.output_selection, ref["output_selection"])
    errors = relative_l2(expl.val, ref[preset])
    assert errors.max() <= TOLERANCE, f"{model}{variant} {preset}: per-sample relative L2 {errors}"


@pytest.mark.parametrize("model", FIXTURES)
def test_unnormalized_output_relevance_matches_zennit(model):
    ref = load_reference(model)
    analyzer = onnxlrp.LRP(fixture_path(model), onnxlrp.EpsilonPlus(), normalize_output_relevance=False,
                           verbose=False)
    errors = relative_l2(analyzer.analyze(ref["x"]).val, ref["EpsilonPlus_unnormalized"])
    assert errors.max() <= TOLERANCE


@pytest.mark.parametrize("model", FIXTURES)
def test_generalized_gamma_matches_zennit_gamma(model):
    """Zennit's Gamma is RelevancePropagation.jl's GeneralizedGammaRule."""
    ref = load_reference(model)
    composite = onnxlrp.EpsilonGammaBox(-3.0, 3.0)
    composite.primitives[0].mapping["ConvLayer"] = onnxlrp.GeneralizedGammaRule(0.25)
    analyzer = onnxlrp.LRP(fixture_path(model), composite, verbose=False)
    errors = relative_l2(analyzer.analyze(ref["x"]).val, ref["EpsilonGammaBox_generalized"])
    assert errors.max() <= TOLERANCE


@pytest.mark.parametrize("model", ["mlp", "vgg", "resnet"])  # ReLU networks (mobilenet has ReLU6)
@pytest.mark.parametrize("variant", ["", "_dynamo"])
def test_lrp0_equals_gradient_times_input(model, variant):
    """On ReLU networks LRP-0 with the output value as seed equals gradient x input (from torch)."""
    ref = load_reference(model)
    analyzer = onnxlrp.LRP(fixture_path(model + variant), normalize_output_relevance=False, verbose=False)
    errors = relative_l2(analyzer.analyze(ref["x"]).val, ref["grad_x_input"])
    assert errors.max() <= TOLERANCE


@pytest.mark.parametrize("model", FIXTURES)
def test_output_matches_torch_logits(model):
    ref = load_reference(model)
    expl = onnxlrp.LRP(fixture_path(model), verbose=False).analyze(ref["x"])
    np.testing.assert_allclose(expl.output, ref["logits"], rtol=1e-4, atol=1e-5)


def test_batch_equals_samples_one_by_one():
    ref = load_reference("resnet")
    analyzer = onnxlrp.LRP(fixture_path("resnet"), onnxlrp.EpsilonPlus(), verbose=False)
    batch = analyzer.analyze(ref["x"]).val
    for i in range(len(ref["x"])):
        single = analyzer.analyze(ref["x"][i:i + 1]).val[0]
        np.testing.assert_allclose(single, batch[i], rtol=1e-5, atol=1e-7)
