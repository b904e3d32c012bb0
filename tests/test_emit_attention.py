"""The layers of attention (onnxlrp/emitters/attention.py) and the AttnLRP / CP-LRP rules, against numpy.

AttnLRP in LXT's efficient form is input x modified gradient: LRP-0 on linear layers, the identity on
activations, half of the gradient to each operand of a product, the plain gradient through the softmax.
The references below are that modified gradient, written out by hand in float64 for a one-head attention.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxlrp

from .helpers import F32, check_adjoint, explain, init, make_lrp, make_model, stab, vi

n = helper.make_node
T, D = 4, 3


def _softmax(s, axis=-1):
    e = np.exp(s - s.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# -- one-head attention with a linear readout ---------------------------------------------------------------
def _attention_model(rng, einsum=False, scale=0.7):
    """x (N, T, D) -> q, k, v = x W^T -> P = softmax(c q k^T) -> O = P v -> y = V . flatten(O) + 0.3."""
    wq, wk, wv = (rng.normal(size=(D, D)).astype(F32) for _ in range(3))
    readout = rng.normal(size=(1, T * D)).astype(F32)
    if einsum:
        scores = [n("Einsum", ["q", "k"], ["s0"], equation="bqd,bkd->bqk")]
        context = [n("Einsum", ["p", "v"], ["o"], equation="bqk,bkd->bqd")]
    else:
        scores = [n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), n("MatMul", ["q", "kt"], ["s0"])]
        context = [n("MatMul", ["p", "v"], ["o"])]
    nodes = ([n("MatMul", ["x", "WqT"], ["q"]), n("MatMul", ["x", "WkT"], ["k"]), n("MatMul", ["x", "WvT"], ["v"])]
             + scores + [n("Mul", ["s0", "c"], ["s"]), n("Softmax", ["s"], ["p"], axis=-1)] + context
             + [n("Flatten", ["o"], ["f"], axis=1), n("Gemm", ["f", "V", "b"], ["y"], transB=1)])
    inits = [init("WqT", wq.T), init("WkT", wk.T), init("WvT", wv.T), init("c", np.array(scale)),
             init("V", readout), init("b", np.array([0.3]))]
    model = make_model(nodes, [("x", [None, T, D])], [("y", [None, 1])], inits)
    return model, (wq, wk, wv, readout[0].reshape(T, D), scale)


def _modified_gradient(x, weights, product_share=0.5, cp=False):
    """x * (gradient of y with LXT's modifications) for one sample x (T, D), float64."""
    wq, wk, wv, g_o, c = (np.asarray(w, np.float64) if not np.isscalar(w) else w for w in weights)
    x = x.astype(np.float64)
    q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
    p = _softmax(c * q @ k.T)
    if cp:  # probabilities held constant: everything through v, nothing into q and k
        g_v = p.T @ g_o
        return x * (g_v @ wv)
    g_p = product_share * g_o @ v.T
    g_v = product_share * p.T @ g_o
    g_s = p * (g_p - (p * g_p).sum(-1, keepdims=True))
    g_q = product_share * c * g_s @ k
    g_k = product_share * c * g_s.T @ q
    return x * (g_q @ wq + g_k @ wk + g_v @ wv)


@pytest.mark.parametrize("einsum", [False, True], ids=["matmul", "einsum"])
@pytest.mark.parametrize("composite", ["AttnLRP", "CPLRP", "default"])
def test_attention_equals_lxt_modified_gradient(einsum, composite):
    rng = np.random.default_rng(3)
    model, weights = _attention_model(rng, einsum=einsum)
    x = rng.normal(size=(2, T, D)).astype(F32)
    rules = None if composite == "default" else getattr(onnxlrp, composite)()
    e = explain(model, x, rules, sel=0, normalize_output_relevance=False)
    for i in range(2):
        expected = _modified_gradient(x[i], weights, cp=composite == "CPLRP")
        np.testing.assert_allclose(e.val[i], expected, rtol=2e-5, atol=2e-6)


def test_attention_rules_differ_from_each_other_and_from_the_gradient():
    """The checks above can fail: gradient x input, AttnLRP and CP-LRP give different relevance here."""
    rng = np.random.default_rng(3)
    _, weights = _attention_model(rng)
    x = rng.normal(size=(T, D))
    gxi = _modified_gradient(x, weights, product_share=1.0)
    attn = _modified_gradient(x, weights)
    cp = _modified_gradient(x, weights, cp=True)
    for a, b in ((gxi, attn), (attn, cp), (gxi, cp)):
        assert np.linalg.norm(a - b) > 0.05 * np.linalg.norm(a)


def test_layer_groups_of_attention():
    model, _ = _attention_model(np.random.default_rng(0))
    analyzer = make_lrp(model, onnxlrp.AttnLRP())
    groups = {l.op_type: l.group for l in analyzer.layers}
    assert groups["Softmax"] == "SoftmaxLayer"
    assert [l.group for l in analyzer.layers if l.op_type == "MatMul"] == ["DenseLayer"] * 3 + ["AttentionLayer"] * 2
    rules = {type(r).__name__ for l, r in zip(analyzer.layers, analyzer.rules) if l.group == "AttentionLayer"}
    assert rules == {"UniformRule"}
    cp = make_lrp(model, onnxlrp.CPLRP())
    assert {type(r).__name__ for l, r in zip(cp.layers, cp.rules) if l.group == "AttentionLayer"} == {"CPRule"}


# -- softmax with masks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fill", [-np.inf, np.finfo(np.float32).min], ids=["-inf", "finfo.min"])
def test_masked_softmax_gives_exact_zeros_and_no_nan(fill):
    """Scores masked by Where(mask, fill, s): the masked positions get exactly 0 relevance, nothing is NaN,
    and the others follow R_in = s_in * (R - p * sum R)."""
    rng = np.random.default_rng(5)
    w1, w2 = rng.normal(size=(4, 3)).astype(F32), rng.normal(size=(2, 4)).astype(F32)
    mask = np.array([[False, True, False, True]])
    nodes = [n("Gemm", ["x", "W1"], ["h"], transB=1), n("Where", ["m", "fill", "h"], ["hm"]),
             n("Softmax", ["hm"], ["p"], axis=-1), n("Gemm", ["p", "W2"], ["y"], transB=1)]
    inits = [init("W1", w1), init("W2", w2), init("fill", np.array(fill, F32)),
             onnx.numpy_helper.from_array(mask, "m")]
    model = make_model(nodes, [("x", [None, 3])], [("y", [None, 2])], inits)
    x = rng.normal(size=(3, 3)).astype(F32)
    e = explain(model, x, onnxlrp.AttnLRP(), sel=1)
    assert np.all(np.isfinite(e.val))
    layers = make_lrp(model, onnxlrp.AttnLRP(), layer_relevances=True)
    r_h = layers.analyze(x, 1).extras["layerwise_relevances"][1]  # arriving at the Where's output
    for i in range(3):
        h = x[i].astype(np.float64) @ w1.T
        hm = np.where(mask[0], -np.inf, h)
        p = _softmax(hm)
        r_p = p * w2[1] / stab(p @ w2[1])
        r_hm = np.where(mask[0], 0.0, hm) * (r_p - p * r_p.sum())
        assert np.all(r_h[i][mask[0]] == 0) and np.all(np.isfinite(r_h[i]))
        np.testing.assert_allclose(r_h[i], r_hm, rtol=1e-4, atol=1e-7)
        expected = x[i] * (w1.T @ (r_hm / stab(h)))
        np.testing.assert_allclose(e.val[i], expected, rtol=1e-4, atol=1e-6)


def test_where_with_a_mask_input_and_a_float_mask_product():
    """A mask from another graph input (Where on Equal(mask, 0), then a product with the float mask): the
    condition gets no relevance and masked positions none."""
    rng = np.random.default_rng(6)
    w = rng.normal(size=(4, 3)).astype(F32)
    nodes = [n("Gemm", ["x", "W"], ["h"], transB=1), n("Equal", ["mask", "zero"], ["off"]),
             n("Where", ["off", "fill", "h"], ["hm"]), n("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
             n("Mul", ["hm", "mf"], ["y"])]
    inits = [init("W", w), onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"), init("fill", np.array(-5.0))]
    model = make_model(nodes, [("x", [None, 3]), vi("mask", [None, 4], TensorProto.INT64)], [("y", [None, 4])], inits)
    analyzer = make_lrp(model)
    assert {l.op_type: l.group for l in analyzer.layers}["Where"] == "MaskLayer"
    x = rng.normal(size=(2, 3)).astype(F32)
    mask = np.array([[1, 1, 0, 1], [1, 0, 1, 1]], np.int64)
    for sel in range(4):
        e = analyzer.analyze(x, np.full(2, sel), inputs={"mask": mask})
        for i in range(2):
            expected = x[i] * w[sel] / stab(x[i].astype(np.float64) @ w[sel]) * mask[i, sel]
            np.testing.assert_allclose(e.val[i], expected, rtol=1e-5, atol=1e-7)


# -- products and gates ------------------------------------------------------------------------------------
def _gated_model(rng):
    """z = silu(x W1^T) * (x W2^T): a gated unit (SwiGLU without the down projection)."""
    w1, w2 = rng.normal(size=(3, 2)).astype(F32), rng.normal(size=(3, 2)).astype(F32)
    nodes = [n("Gemm", ["x", "W1"], ["a"], transB=1), n("Sigmoid", ["a"], ["sa"]), n("Mul", ["a", "sa"], ["g"]),
             n("Gemm", ["x", "W2"], ["b"], transB=1), n("Mul", ["g", "b"], ["z"])]
    return make_model(nodes, [("x", [None, 2])], [("z", [None, 3])], [init("W1", w1), init("W2", w2)]), w1, w2


@pytest.mark.parametrize("composite", ["AttnLRP", "CPLRP"])
def test_gated_unit(composite):
    """AttnLRP: half to the gate (identity through SiLU, then LRP-0), half to the up branch. CP-LRP (LXT's
    cp_gated_mlp_forward): the gate is held constant, all relevance goes to the up branch."""
    rng = np.random.default_rng(8)
    model, w1, w2 = _gated_model(rng)
    groups = [l.group for l in make_lrp(model).layers]
    assert sorted(groups) == ["ActivationLayer", "ActivationLayer", "DenseLayer", "DenseLayer", "ProductLayer"]
    x = rng.normal(size=(1, 2)).astype(F32)
    e = explain(model, x, getattr(onnxlrp, composite)(), sel=2)
    a, b = x[0].astype(np.float64) @ w1.T, x[0].astype(np.float64) @ w2.T
    gate_share = 0.5 if composite == "AttnLRP" else 0.0
    expected = (x[0] * w1[2] * gate_share / stab(a[2]) + x[0] * w2[2] * (1 - gate_share) / stab(b[2]))
    np.testing.assert_allclose(e.val[0], expected, rtol=1e-5, atol=1e-7)


def _tanh_gelu(x_name, out, prefix):
    """GPT-2's gelu_new as the legacy exporter writes it: 0.5x * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    p = prefix
    nodes = [n("Mul", [x_name, p + "half"], [p + "hx"]), n("Pow", [x_name, p + "three"], [p + "x3"]),
             n("Mul", [p + "x3", p + "k"], [p + "kx3"]), n("Add", [x_name, p + "kx3"], [p + "inner"]),
             n("Mul", [p + "inner", p + "c"], [p + "scaled"]), n("Tanh", [p + "scaled"], [p + "t"]),
             n("Add", [p + "t", p + "one"], [p + "t1"]), n("Mul", [p + "hx", p + "t1"], [out])]
    inits = [init(p + "half", np.array(0.5)), init(p + "three", np.array(3.0)), init(p + "k", np.array(0.044715)),
             init(p + "c", np.array(np.sqrt(2 / np.pi))), init(p + "one", np.array(1.0))]
    return nodes, inits


def test_tanh_gelu_is_an_activation_and_runs_with_every_optimization():
    """The tanh-GELU pattern passes relevance through (identity rule); its Pow needs no emitter; the
    relevance graph loads with onnxruntime's FastGeluFusion on (which once dropped a tensor we read)."""
    rng = np.random.default_rng(9)
    w1, w2 = rng.normal(size=(3, 2)).astype(F32), rng.normal(size=(2, 3)).astype(F32)
    gelu, gelu_inits = _tanh_gelu("h", "g", "gelu/")
    nodes = [n("Gemm", ["x", "W1"], ["h"], transB=1)] + gelu + [n("Gemm", ["g", "W2"], ["y"], transB=1)]
    model = make_model(nodes, [("x", [None, 2])], [("y", [None, 2])], [init("W1", w1), init("W2", w2)] + gelu_inits)
    analyzer = make_lrp(model, onnxlrp.AttnLRP())
    assert "Pow" not in [l.op_type for l in analyzer.layers]
    x = rng.normal(size=(2, 2)).astype(F32)
    e = analyzer.analyze(x, 0)
    for i in range(2):
        h = x[i].astype(np.float64) @ w1.T
        g = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
        r_g = g * w2[0] / stab(g @ w2[0])
        np.testing.assert_allclose(e.val[i], x[i] * (w1.T @ (r_g / stab(h))), rtol=1e-4, atol=1e-7)
    ort.InferenceSession(analyzer.relevance_model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_rmsnorm_pattern_is_the_identity():
    """x * Reciprocal(Sqrt(ReduceMean(x^2) + eps)) * w (LLaMA's RMSNorm): the statistic is held constant
    (LXT's rms_norm_forward), so relevance passes the normalization unchanged."""
    rng = np.random.default_rng(10)
    w1, w2 = rng.normal(size=(4, 3)).astype(F32), rng.normal(size=(2, 4)).astype(F32)
    nodes = [n("Gemm", ["x", "W1"], ["h"], transB=1), n("Pow", ["h", "two"], ["h2"]),
             n("ReduceMean", ["h2", "ax"], ["ms"], keepdims=1), n("Add", ["ms", "eps"], ["mse"]),
             n("Sqrt", ["mse"], ["rms"]), n("Reciprocal", ["rms"], ["inv"]), n("Mul", ["h", "inv"], ["hn"]),
             n("Gemm", ["hn", "W2"], ["y"], transB=1)]
    inits = [init("W1", w1), init("W2", w2), init("two", np.array(2.0)), init("eps", np.array(1e-6)),
             onnx.numpy_helper.from_array(np.array([-1], np.int64), "ax")]
    model = make_model(nodes, [("x", [None, 3])], [("y", [None, 2])], inits, opset=18)
    analyzer = make_lrp(model, onnxlrp.AttnLRP())
    gate = next(l for l in analyzer.layers if l.op_type == "Mul")
    assert gate.group == "ActivationLayer" and [t.name for t in gate.inputs] == ["h"]
    assert "Pow" not in [l.op_type for l in analyzer.layers]
    x = rng.normal(size=(1, 3)).astype(F32)
    e = analyzer.analyze(x, 1)
    h = x[0].astype(np.float64) @ w1.T
    hn = h / np.sqrt((h ** 2).mean() + 1e-6)
    r_hn = hn * w2[1] / stab(hn @ w2[1])
    np.testing.assert_allclose(e.val[0], x[0] * (w1.T @ (r_hn / stab(h))), rtol=1e-4, atol=1e-7)


# -- data movement used by transformers --------------------------------------------------------------------
@pytest.mark.parametrize("indices", [0, -1, [0, 2, 0]], ids=["scalar", "negative", "repeated"])
def test_gather_of_data_is_the_adjoint(indices):
    """h[:, i] (class token) and h[:, [i, j, i]]: relevance goes back to the gathered positions (summed where
    an index repeats), as gradient x input of the readout."""
    rng = np.random.default_rng(11)
    idx = np.asarray(indices, np.int64)
    nodes = [n("Gather", ["x", "idx"], ["z"], axis=1)]
    inits = [onnx.numpy_helper.from_array(idx, "idx")]
    x = rng.normal(size=(2, T, D)).astype(F32)
    check_adjoint(nodes, inits, x, "z", lambda a: np.take(a, idx, axis=1), rng)


def test_expand_sums_the_copies():
    rng = np.random.default_rng(12)
    nodes = [n("Expand", ["x", "shape"], ["z"])]
    inits = [onnx.numpy_helper.from_array(np.array([1, 3, D], np.int64), "shape")]
    x = rng.normal(size=(2, 1, D)).astype(F32)
    check_adjoint(nodes, inits, x, "z", lambda a: np.broadcast_to(a, (a.shape[0], 3, D)), rng)


# -- token inputs ------------------------------------------------------------------------------------------
VOCAB, H, CLASSES = 11, 3, 2


def _token_model(rng, sequence_output=False, dynamic=True):
    """ids (N, T) -> Gather(table) -> + position table -> Gemm per token -> mean over T (or per-token logits)."""
    table = rng.normal(size=(VOCAB, H)).astype(F32)
    pos = rng.normal(size=(1, T, H)).astype(F32)
    w = rng.normal(size=(H, CLASSES)).astype(F32)
    nodes = [n("Cast", ["ids"], ["ids32"], to=TensorProto.INT32), n("Gather", ["table", "ids32"], ["emb"]),
             n("Add", ["emb", "pos"], ["h"]), n("MatMul", ["h", "W"], ["logits_t"])]
    if not sequence_output:
        nodes.append(n("ReduceMean", ["logits_t", "ax"], ["y"], keepdims=0))
    else:
        nodes.append(n("Identity", ["logits_t"], ["y"]))
    inits = [init("table", table), init("pos", pos), init("W", w),
             onnx.numpy_helper.from_array(np.array([1], np.int64), "ax"),
             onnx.numpy_helper.from_array(np.array([1, 1, 1, 1, 1], np.float32), "unused")]
    seq = "seq" if dynamic else T
    out = [None, seq, CLASSES] if sequence_output else [None, CLASSES]
    model = make_model(nodes, [vi("ids", [None, seq], TensorProto.INT64)], [("y", out)], inits[:4], opset=18)
    return model, table, pos, w


def test_token_input_is_explained_at_the_embedding_output():
    rng = np.random.default_rng(13)
    model, table, pos, w = _token_model(rng, dynamic=False)
    analyzer = make_lrp(model, onnxlrp.AttnLRP(), normalize_output_relevance=False)
    ids = np.array([[1, 4, 4, 10], [0, 2, 3, 5]])
    e = analyzer.analyze(ids, 1)
    assert e.val.shape == (2, T, H)
    for i in range(2):
        emb = table[ids[i]].astype(np.float64)
        h = emb + pos[0]
        # y = mean_t h_t . w[:, 1]: LRP-0 through the position bias gives emb * w / T (value-seeded)
        expected = emb * w[:, 1] / T * ((h @ w[:, 1]) / stab(h @ w[:, 1]))[:, None]
        np.testing.assert_allclose(e.val[i], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(e.extras["token_relevance"], e.val.sum(-1), rtol=1e-6)
    with pytest.raises(onnxlrp.InputError, match="out of range"):
        analyzer.analyze(np.array([[1, 2, 3, VOCAB]]))
    with pytest.raises(onnxlrp.InputError, match="integer token ids"):
        analyzer.analyze(np.zeros((1, T), F32))


def test_dynamic_sequence_length_builds_one_graph_per_length():
    rng = np.random.default_rng(14)
    model, table, _, w = _token_model(rng)
    model.graph.initializer[1].CopyFrom(init("pos", np.zeros((1, 1, H))))  # broadcasts over any length
    analyzer = make_lrp(model, onnxlrp.AttnLRP())
    for length in (3, 6):
        ids = rng.integers(0, VOCAB, size=(2, length))
        e = analyzer.analyze(ids, 0)
        assert e.val.shape == (2, length, H)
        np.testing.assert_allclose(e.val.sum((1, 2)), 1.0, rtol=1e-5)  # no bias: conservative


def test_sequence_output_explains_one_position():
    """(N, T, V) outputs: ``position`` picks the position, output_selection the class there; the default
    is the top class at the last position. A position-wise model puts relevance at that position only."""
    rng = np.random.default_rng(15)
    model, _, _, _ = _token_model(rng, sequence_output=True, dynamic=False)
    analyzer = make_lrp(model, onnxlrp.AttnLRP())
    ids = rng.integers(0, VOCAB, size=(2, T))
    e = analyzer.analyze(ids)
    assert e.extras["output_position"].tolist() == [T - 1, T - 1]
    np.testing.assert_array_equal(e.output_selection, e.output[:, -1].argmax(-1))
    e = analyzer.analyze(ids, output_selection=1, position=1)
    assert e.output_selection.tolist() == [1, 1] and e.extras["output_position"].tolist() == [1, 1]
    token = np.abs(e.extras["token_relevance"])
    assert np.all(token[:, [0, 2, 3]] == 0) and np.all(token[:, 1] > 0)
    with pytest.raises(onnxlrp.InputError, match="position"):
        analyzer.analyze(ids, position=T)


def test_default_values_of_a_token_models_other_inputs():
    rng = np.random.default_rng(16)
    table = rng.normal(size=(VOCAB, H)).astype(F32)
    types = rng.normal(size=(2, H)).astype(F32)
    w = rng.normal(size=(H, CLASSES)).astype(F32)
    nodes = [n("Gather", ["table", "input_ids"], ["emb"]), n("Gather", ["types", "token_type_ids"], ["te"]),
             n("Add", ["emb", "te"], ["h"]), n("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             n("Unsqueeze", ["mf", "last"], ["m3"]), n("Mul", ["h", "m3"], ["hm"]),
             n("ReduceSum", ["hm", "ax"], ["pooled"], keepdims=0), n("MatMul", ["pooled", "W"], ["y"])]
    inits = [init("table", table), init("types", types), init("W", w),
             onnx.numpy_helper.from_array(np.array([-1], np.int64), "last"),
             onnx.numpy_helper.from_array(np.array([1], np.int64), "ax")]
    ins = [vi(name, [None, "seq"], TensorProto.INT64) for name in ("input_ids", "attention_mask", "token_type_ids")]
    model = make_model(nodes, ins, [("y", [None, CLASSES])], inits, opset=18)
    analyzer = make_lrp(model, onnxlrp.AttnLRP())
    ids = rng.integers(0, VOCAB, size=(2, 5))
    default = analyzer.analyze(ids, 0)
    given = analyzer.analyze(ids, 0, inputs={"attention_mask": np.ones((2, 5), np.int64),
                                             "token_type_ids": np.zeros((2, 5), np.int64)})
    np.testing.assert_allclose(default.val, given.val, rtol=1e-6)
    masked = analyzer.analyze(ids, 0, inputs={"attention_mask": np.array([[1, 1, 1, 0, 0]] * 2)})
    assert np.all(masked.val[:, 3:] == 0) and np.all(masked.val[:, :3] != 0)
    with pytest.raises(onnxlrp.InputError, match="no other input 'attn_mask'"):
        analyzer.analyze(ids, 0, inputs={"attn_mask": np.ones((2, 5), np.int64)})
    with pytest.raises(onnxlrp.InputError, match="attention_mask"):
        analyzer.analyze(ids, 0, inputs={"attention_mask": np.ones((2, 5, 1), np.int64)})


def test_integer_input_without_an_embedding_is_refused():
    nodes = [n("Cast", ["x"], ["z"], to=TensorProto.FLOAT)]
    model = make_model(nodes, [vi("x", [None, 2], TensorProto.INT64)], [("z", [None, 2])])
    with pytest.raises(onnxlrp.ModelLoadError, match="no embedding lookup"):
        make_lrp(model)
