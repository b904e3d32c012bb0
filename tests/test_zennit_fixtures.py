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


#: The reference each preset is checked against: EpsilonGammaBox uses the generalized Gamma rule (Zennit's).
REFERENCE_KEY = {"EpsilonGammaBox": "EpsilonGammaBox_generalized"}


@pytest.mark.parametrize("model,variant", VARIANTS, ids=[m + v for m, v in VARIANTS])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_matches_zennit(model, variant, preset):
    ref = load_reference(model)
    analyzer = onnxlrp.LRP(fixture_path(model + variant), PRESETS[preset](), verbose=False)
    expl = analyzer.analyze(ref["x"])
    np.testing.assert_array_equal(expl.output_selection, ref["output_selection"])
    errors = relative_l2(expl.val, ref[REFERENCE_KEY.get(preset, preset)])
    assert errors.max() <= TOLERANCE, f"{model}{variant} {preset}: per-sample relative L2 {errors}"


@pytest.mark.parametrize("model", FIXTURES)
def test_unnormalized_output_relevance_matches_zennit(model):
    ref = load_reference(model)
    analyzer = onnxlrp.LRP(fixture_path(model), onnxlrp.EpsilonPlus(), normalize_output_relevance=False,
                           verbose=False)
    errors = relative_l2(analyzer.analyze(ref["x"]).val, ref["EpsilonPlus_unnormalized"])
    assert errors.max() <= TOLERANCE


@pytest.mark.parametrize("model", FIXTURES)
def test_plain_gamma_composite_matches_the_plain_reference(model):
    """GammaRule (RelevancePropagation.jl's plain rule) stays available for composites that ask for it."""
    ref = load_reference(model)
    composite = onnxlrp.EpsilonGammaBox(-3.0, 3.0)
    composite.primitives[0].mapping["ConvLayer"] = onnxlrp.GammaRule(0.25)
    analyzer = onnxlrp.LRP(fixture_path(model), composite, verbose=False)
    errors = relative_l2(analyzer.analyze(ref["x"]).val, ref["EpsilonGammaBox"])
    assert errors.max() <= TOLERANCE


@pytest.mark.parametrize("model", ["mlp", "vgg", "mobilenet"])
def test_generalized_gamma_preset_is_unchanged_where_a_relu_follows_every_conv(model):
    """Where a ReLU follows every convolution the plain and the generalized rule agree, so the preset's
    switch to the generalized rule changes nothing there: the new preset equals the plain reference."""
    ref = load_reference(model)
    np.testing.assert_allclose(ref["EpsilonGammaBox"], ref["EpsilonGammaBox_generalized"], rtol=1e-12, atol=1e-15)
    analyzer = onnxlrp.LRP(fixture_path(model), onnxlrp.EpsilonGammaBox(-3.0, 3.0), verbose=False)
    assert relative_l2(analyzer.analyze(ref["x"]).val, ref["EpsilonGammaBox"]).max() <= TOLERANCE


def test_generalized_gamma_preset_differs_on_the_residual_net():
    """On the ResNet fixture (conv -> BN -> residual add -> ReLU) the two rules differ: the preset follows
    Zennit's generalized Gamma there, not the plain rule."""
    ref = load_reference("resnet")
    assert relative_l2(ref["EpsilonGammaBox"], ref["EpsilonGammaBox_generalized"]).min() > 1e-2
    val = onnxlrp.LRP(fixture_path("resnet"), onnxlrp.EpsilonGammaBox(-3.0, 3.0), verbose=False).analyze(ref["x"]).val
    assert relative_l2(val, ref["EpsilonGammaBox"]).min() > 1e-2
    assert relative_l2(val, ref["EpsilonGammaBox_generalized"]).max() <= TOLERANCE


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


@pytest.mark.parametrize("model,variant", VARIANTS, ids=[m + v for m, v in VARIANTS])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_no_preset_explodes(model, variant, preset):
    """sum |R_in| stays below 1e3 x |explained output| (seed 1: below 1e3) on every fixture."""
    ref = load_reference(model)
    val = onnxlrp.LRP(fixture_path(model + variant), PRESETS[preset](), verbose=False).analyze(ref["x"]).val
    assert np.all(np.abs(val).reshape(len(val), -1).sum(1) < 1e3)


class _FullGeneralizedGamma(onnxlrp.GeneralizedGammaRule):
    """The generalized rule with all four terms on every layer (no shortcut for non-negative inputs or a
    ReLU after the layer)."""

    def groups(self, layer):
        saved = {k: layer.extra.pop(k) for k in ("nonnegative_input", "relu_output") if k in layer.extra}
        try:
            return super().groups(layer)
        finally:
            layer.extra.update(saved)


@pytest.mark.parametrize("model", ["vgg", "resnet", "mobilenet"])
def test_generalized_gamma_shortcuts_are_exact(model):
    """After a ReLU (a- = 0) and before one (no relevance at z <= 0) the generalized rule drops the terms
    that vanish; the result equals the rule with every term."""
    ref = load_reference(model)
    fast = onnxlrp.LRP(fixture_path(model), onnxlrp.EpsilonGammaBox(-3.0, 3.0), verbose=False)
    assert any(l.extra["nonnegative_input"] and l.extra["relu_output"] for l in fast.layers if l.op_type == "Conv")
    composite = onnxlrp.EpsilonGammaBox(-3.0, 3.0)
    composite.primitives[0].mapping["ConvLayer"] = _FullGeneralizedGamma(0.25)
    full = onnxlrp.LRP(fixture_path(model), composite, verbose=False)
    assert relative_l2(fast.analyze(ref["x"]).val, full.analyze(ref["x"]).val).max() <= 1e-5


def test_relu_shortcut_is_dropped_before_a_rule_that_ignores_activations():
    """WSquare reading a ReLU's output gives relevance to zero activations, so the convolution before the
    ReLU keeps its z < 0 group, and the result is the full rule's."""
    ref = load_reference("resnet")
    base = onnxlrp.LRP(fixture_path("resnet"), onnxlrp.EpsilonGammaBox(-3.0, 3.0), verbose=False)
    by_input = {t.name: l for l in base.layers for t in l.inputs}
    layer, reader = next((l, by_input[relu.outputs[0].name]) for l in base.layers[1:] if l.op_type == "Conv"
                         and l.extra["relu_output"] for relu in [by_input[l.outputs[0].name]]
                         if by_input.get(relu.outputs[0].name) is not None
                         and by_input[relu.outputs[0].name].op_type == "Conv")
    extra = onnxlrp.LayerMap(reader.index, onnxlrp.WSquareRule())
    composite = onnxlrp.EpsilonGammaBox(-3.0, 3.0)
    composite.primitives.append(extra)
    analyzer = onnxlrp.LRP(fixture_path("resnet"), composite, verbose=False)
    assert not analyzer.layers[layer.index].extra["relu_output"]
    full = onnxlrp.EpsilonGammaBox(-3.0, 3.0)
    full.primitives[0].mapping["ConvLayer"] = _FullGeneralizedGamma(0.25)
    full.primitives.append(extra)
    expected = onnxlrp.LRP(fixture_path("resnet"), full, verbose=False).analyze(ref["x"]).val
    assert relative_l2(analyzer.analyze(ref["x"]).val, expected).max() <= 1e-5
