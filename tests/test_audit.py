"""onnxlrp audit (issue 10, part 1): every committed fixture passes with the default thresholds, and each
check catches a sabotage of its own, naming the layer."""
from __future__ import annotations

import glob
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxlrp
from onnxlrp.auditing import CHECKS, audit
from onnxlrp.cli import main
from onnxlrp.rules import Group, Term, ZeroRule

from .helpers import init, make_model
from .helpers_fixtures import fixture_path

FIXTURES = fixture_path("vgg").rsplit("/", 1)[0]


def _statuses(report):
    return {c.name: c.status for c in report.checks}


@pytest.mark.parametrize("name,composite,expected", [
    ("vgg", onnxlrp.EpsilonGammaBox(-3, 3), {"identity": "pass"}),
    ("resnet", None, {"identity": "pass"}),
    ("mlp", onnxlrp.EpsilonPlus(), {"identity": "pass"}),
    ("mobilenet", onnxlrp.EpsilonAlpha2Beta1(), {"identity": "skip"}),  # ReLU6 saturates: no identity
    ("vgg_dynamo", onnxlrp.EpsilonPlusFlat(), {"identity": "pass"}),
    ("resnet_dynamo", onnxlrp.EpsilonGammaBox(-3, 3), {"identity": "pass"}),
])
def test_fixtures_pass_with_default_thresholds(name, composite, expected):
    report = audit(fixture_path(name), composite)
    assert report.passed, report.table()
    statuses = _statuses(report)
    assert [c.name for c in report.checks] == list(CHECKS)
    assert statuses["coverage"] == statuses["forward"] == statuses["conservation"] == statuses["health"] == "pass"
    assert statuses["precision"] == statuses["faithfulness"] == "pass"
    for check, status in expected.items():
        assert statuses[check] == status, report.table()


#: every other committed fixture, audited under the composite a user would pick for it; the suite runs one
#: export per architecture, ONNXLRP_HEAVY_TESTS=1 all of them (op13 twins of the op17 Keras graphs, legacy14
#: transformer exports, NASNetMobile at ~45 s, and issue 9's two open pairs)
HEAVY = pytest.mark.skipif(not os.environ.get("ONNXLRP_HEAVY_TESTS"), reason="minutes: set ONNXLRP_HEAVY_TESTS=1")
ISSUE_9 = pytest.mark.xfail(strict=True, reason="issue 9: residual sums that nearly cancel explode (ResNet50V2) "
                                                "or rank patches against the logit (DenseNet121) under EpsilonGammaBox")
_IN_THE_TEST_ABOVE = {"vgg", "resnet", "mlp", "mobilenet", "vgg_dynamo", "resnet_dynamo"}


def _every_fixture():
    cases = []
    for path in sorted(glob.glob(f"{FIXTURES}/*.onnx")) + sorted(glob.glob(f"{FIXTURES}/tf2onnx/*.onnx")) + \
            sorted(glob.glob(f"{FIXTURES}/transformers/*.onnx")):
        rel = os.path.relpath(path, FIXTURES)
        stem = os.path.splitext(os.path.basename(rel))[0]
        if stem in _IN_THE_TEST_ABOVE:
            continue
        marks = []
        if rel.startswith("transformers/"):
            composite = onnxlrp.CPLRP() if "gpt2" in stem else onnxlrp.AttnLRP()
            marks += [HEAVY] if "legacy14" in stem else []
        elif "mlp" in stem:
            composite = onnxlrp.EpsilonPlus()
        else:
            composite = onnxlrp.EpsilonGammaBox(-3, 3)
        if rel.startswith("tf2onnx/"):
            marks += [HEAVY] if stem.endswith("op13") or "nasnet" in stem else []
            marks += [HEAVY, ISSUE_9] if "resnet50v2" in stem or "densenet121" in stem else []
        cases.append(pytest.param(rel, composite, id=rel, marks=marks))
    return cases


@pytest.mark.parametrize("path,composite", _every_fixture())
def test_every_committed_fixture_passes_with_default_thresholds(path, composite):
    report = audit(f"{FIXTURES}/{path}", composite, samples=2, precision_check=False)
    assert report.passed, report.table()


# -- each check can fail ------------------------------------------------------------------------------------
n = helper.make_node
RNG = np.random.default_rng(0)


def _mlp(op=("Relu",), hidden=5):
    nodes = [n("Gemm", ["x", "w1", "b1"], ["h"]), n(op[0], ["h"], ["a"]), n("Gemm", ["a", "w2", "b2"], ["y"])]
    inits = [init("w1", RNG.standard_normal((4, hidden))), init("b1", RNG.standard_normal(hidden)),
             init("w2", RNG.standard_normal((hidden, 3))), init("b2", RNG.standard_normal(3))]
    return make_model(nodes, [("x", [None, 4])], ["y"], inits)


def test_coverage_catches_a_node_passed_through_with_skip_checks():
    report = audit(_mlp(("Sin",)), skip_checks=True, precision_check=False)
    cov = report.check("coverage")
    assert cov.status == "fail" and "pass relevance through unchanged" in cov.summary and "(Sin)" in cov.summary
    assert not report.passed
    assert audit(_mlp(("Sin",)), skip_checks=True, precision_check=False,
                 fail_on=("forward", "conservation")).passed  # --fail-on chooses what gates


def test_coverage_without_skip_checks_lists_the_unsupported_nodes():
    report = audit(_mlp(("Sin",)))
    assert report.check("coverage").status == "fail" and "Sin" in report.check("coverage").summary
    assert all(c.status == "skip" for c in report.checks[1:])


class _FlippedZero(ZeroRule):
    """A rule with a wrong sign: LRP-0's relevance, negated."""

    def groups(self, layer):
        return [Group([Term(self.modify_input, self.modify_layer(layer))], coef=-1.0)]


def test_conservation_names_the_layer_of_a_rule_with_a_wrong_sign():
    rules = [ZeroRule(), onnxlrp.PassRule(), _FlippedZero()]
    report = audit(_mlp(), rules, precision_check=False)
    con = report.check("conservation")
    assert con.status == "fail" and con.layer.startswith("2 ")
    assert "layer 2" in con.summary and "_FlippedZero" in con.summary and "lost or created" in con.summary


def test_conservation_catches_a_backward_that_is_not_the_transpose(monkeypatch):
    from onnxlrp.emitters.dense import GemmEmitter
    backward = GemmEmitter.backward

    def scaled(self, ctx, layer, s, params):  # a bug: 10 % too much on every Gemm's transpose
        return [ctx.b.op("Mul", [g, ctx.b.const(np.asarray(1.1, np.float32))]) for g in backward(self, ctx, layer, s, params)]
    monkeypatch.setattr(GemmEmitter, "backward", scaled)
    report = audit(_mlp(), precision_check=False)
    assert report.check("conservation").status == "fail" and report.check("conservation").layer.startswith("2 ")


def test_forward_catches_a_bad_canonization(monkeypatch):
    import onnxlrp.canonization as canonization_module  # the analyzer imports it where it canonizes
    canonize = canonization_module.canonize_graph

    def bad(graph, **kw):  # a canonization that changes a weight
        out = canonize(graph, **kw)
        gemm = next(node for node in graph.nodes if node.op == "Gemm")
        gemm.inputs[1].values = gemm.inputs[1].values * 1.01
        return out
    monkeypatch.setattr(canonization_module, "canonize_graph", bad)
    report = audit(_mlp(), precision_check=False)
    fwd = report.check("forward")
    assert fwd.status == "fail" and fwd.figures["max_rel_error"] > 1e-3 and "plain onnxruntime" in fwd.summary


def test_identity_catches_a_wrong_derivative(monkeypatch):
    from onnxlrp.emitters import elementwise
    monkeypatch.setitem(elementwise._DERIVATIVES, "Relu", lambda o, node, x, y: None)  # ReLU' = 1: wrong
    report = audit(_mlp(), precision_check=False)
    assert report.check("identity").status == "fail"
    assert report.check("conservation").status == "pass"  # LRP itself is fine


def _overflowing():
    nodes = [n("Gemm", ["x", "w1"], ["h"]), n("Relu", ["h"], ["a"]), n("Gemm", ["a", "w2"], ["y"])]
    return make_model(nodes, [("x", [None, 2])], ["y"], [init("w1", [[1.0, 1.0], [-1.0, 1.0]]), init("w2", [[3e38], [0.1]])])


def test_health_names_the_layer_where_nan_starts():
    report = audit(_overflowing(), inputs=np.array([[1.5, 1.0], [1.0, 1.0]], np.float32), precision_check=False)
    health = report.check("health")
    assert health.status == "fail" and "samples [1]" in health.summary and "layer 2" in health.summary


def test_health_names_the_layer_of_an_explosion():
    """Keras ResNet50V2 under EpsilonGammaBox: residual sums that nearly cancel (issue 9's open pair)."""
    from .test_tf2onnx_fixtures import DIR
    r = np.load(DIR / "resnet50v2_ref.npz")
    report = audit(str(DIR / "resnet50v2_op13.onnx"), onnxlrp.EpsilonGammaBox(-3, 3), inputs=r["x"],
                   precision_check=False, fail_on=("health",))
    health = report.check("health")
    assert health.status == "fail" and "explodes" in health.summary and "(Add) passes back" in health.summary


def test_precision_can_fail():
    report = audit(fixture_path("mlp"), onnxlrp.EpsilonPlus(), thresholds={"precision_rtol": 1e-12})
    assert report.check("precision").status == "fail"
    with pytest.raises(ValueError, match="unknown audit thresholds"):
        audit(fixture_path("mlp"), thresholds={"precision": 1})


# -- output for CI ------------------------------------------------------------------------------------------
def test_json_and_junit_are_valid(tmp_path):
    report = audit(_mlp(("Sin",)), skip_checks=True, precision_check=False)
    data = json.loads(report.to_json())
    assert data["passed"] is False and [c["name"] for c in data["checks"]] == list(CHECKS)
    suite = ET.fromstring(report.to_junit())
    assert suite.tag == "testsuite" and suite.get("tests") == str(len(CHECKS)) and suite.get("failures") == "1"
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert cases["coverage"].find("failure") is not None and cases["precision"].find("skipped") is not None


def test_cli_exit_codes_json_and_junit(tmp_path, capsys):
    good = str(fixture_path("mlp"))
    junit = tmp_path / "audit.xml"
    assert main(["audit", good, "-c", "EpsilonPlus", "--junit", str(junit), "--no-precision"],
                standalone_mode=False) == 0
    out = capsys.readouterr().out
    assert "audit passed" in out and "conservation  PASS" in out
    assert ET.parse(junit).getroot().get("failures") == "0"

    bad = tmp_path / "sin.onnx"
    onnx.save(_mlp(("Sin",)), bad)
    assert main(["audit", str(bad), "--skip-checks", "--json", "--no-precision"], standalone_mode=False) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is False and data["checks"][0]["status"] == "fail"
    assert main(["audit", str(bad), "--skip-checks", "--no-precision", "--fail-on", "forward,health"],
                standalone_mode=False) == 0
    assert main(["audit", str(bad), "--fail-on", "forwards"], standalone_mode=False) == 2
    assert "unknown check(s) forwards" in capsys.readouterr().err
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((3, 20)).astype(np.float32))
    assert main(["audit", good, "--inputs", str(x), "--no-precision", "--json"], standalone_mode=False) == 0
    assert json.loads(capsys.readouterr().out)["inputs"] == "3 given"


# -- faithfulness -------------------------------------------------------------------------------------------
def _few_features_logit():
    """y0 = 5 x0 + 3 x1 + 0.1 sum(x2..x9), y1 = 0: the explained logit lives in two of ten features."""
    w = np.zeros((10, 2))
    w[0, 0], w[1, 0], w[2:, 0] = 5.0, 3.0, 0.1
    return make_model([n("Gemm", ["x", "w"], ["y"])], [("x", [None, 10])], ["y"], [init("w", w)])


def test_faithfulness_morf_of_lrp0_destroys_a_known_logit_fastest():
    x = np.abs(RNG.standard_normal((6, 10))).astype(np.float32) + 0.5
    report = audit(_few_features_logit(), inputs=x, output_selection=0, precision_check=False)
    faith = report.check("faithfulness")
    assert faith.status == "pass", faith.summary
    rel, rnd = faith.figures["relevance"], faith.figures["random"]
    assert rel["morf_curve"][0] == pytest.approx(rel["lerf_curve"][0])
    # removing x0 and x1 first (2 of 10 features: by step 3 of 16) takes most of the logit at once
    assert rel["morf_curve"][3] < 0.25 * rel["morf_curve"][0] < rel["lerf_curve"][3]
    assert rel["abpc"] > 0.4 and abs(rnd["abpc"]) < 0.15  # random orders score about 0


def test_faithfulness_fails_for_an_attribution_that_points_the_wrong_way():
    x = np.abs(RNG.standard_normal((6, 10))).astype(np.float32) + 0.5
    report = audit(_few_features_logit(), [_FlippedZero()], inputs=x, output_selection=0, precision_check=False,
                   fail_on=("faithfulness",))
    faith = report.check("faithfulness")
    assert faith.status == "fail" and faith.figures["relevance"]["abpc"] < 0 and not report.passed


def test_health_reports_denominators_within_the_stabilizer():
    """x = (1, -1 + 1e-7) through w = (1, 1): z ~ 1e-7, below the 1e-6 of EpsilonRule, and the relevance of
    the output reaches it: the stabilizer, not the rule, decides what the inputs get (here: an explosion)."""
    model = make_model([n("Gemm", ["x", "w"], ["y"])], [("x", [None, 2])], ["y"], [init("w", [[1.0], [1.0]])])
    x = np.array([[1.0, -1.0 + 1e-7]], np.float32)
    report = audit(model, [onnxlrp.EpsilonRule(1e-6)], inputs=x, precision_check=False, fail_on=("health",))
    health = report.check("health")
    assert health.figures["stabilizer_hits"] == {f"0 {report.data['layers'][0]['name']}": 1.0}, health.figures
    assert health.status == "fail" and "below the stabilizer on 100.0%" in health.summary
    calm = audit(model, [onnxlrp.EpsilonRule(1e-6)], inputs=np.array([[1.0, 1.0]], np.float32), precision_check=False)
    assert calm.check("health").figures["stabilizer_hits"] == {}
