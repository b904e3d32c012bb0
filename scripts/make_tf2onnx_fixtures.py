#!/usr/bin/env python
"""Small tf2onnx-converted Keras fixtures with TensorFlow reference outputs and gradients.

Writes into ``models_fixtures/tf2onnx/`` (relative to the repository root, or ``--out``), for
every model ``NAME`` below:

* ``NAME_op13.onnx``, ``NAME_op17.onnx``  ``tf2onnx.convert.from_keras`` at opset 13 / 17, NHWC
  input ``input`` with a dynamic batch axis; the graph ends in the Keras classifier softmax.
* ``NAME_ref.npz``  ``x`` (2 samples, NHWC float32, standard normal), ``logits32`` / ``logits64``
  (pre-softmax logits from TensorFlow in float32 / float64, same weights), ``selection`` (argmax of
  ``logits64``), ``grad_x_input64`` / ``grad_x_input32`` (gradient of the selected logit w.r.t. ``x``,
  times ``x``) and ``piecewise_linear`` (True when the net is built only from ReLU/ReLU6, max/avg
  pooling and affine ops; LRP-0 then equals gradient x input, unless a ReLU6 saturates: the
  manifest's ``relu6_saturated`` / ``lrp0_equals_grad_x_input`` say where).
* ``manifest.json``  builder, narrowing factor, shapes, parameter counts, file sizes, versions,
  float32-vs-float64 and onnxruntime-vs-TensorFlow deviations, and an op-type census with a line
  on the tf2onnx idioms in each graph.

The Keras applications are each built by their own ``keras.applications`` function with
``weights=None`` (random), ``include_top=True``, ``classes=10`` and the default softmax classifier.
Their full widths are far too large to commit (VGG16 alone ~130 MB), so ``narrowed`` divides the
widths of Conv2D / SeparableConv2D / Dense by an integer ``k`` while the builder runs; the graph
keeps the builder's exact topology, which ``check_topologies`` verifies against the full-width
build (NASNetMobile is narrowed through its generic builder instead, see ``NASNET_SMALL``).  Each
.onnx stays under 300 kB (NASNet: 700 kB), the folder under 7 MB.

Weights: every kernel from a seeded numpy Generator, He-scaled; BatchNorm gamma/beta random and
its moving statistics calibrated on a separate random batch, then perturbed (``calibrate_batchnorm``),
so that BN is no identity and the logits stay O(1-10) through ~50-200 layers.

TensorFlow with Keras 2 is needed (tf2onnx's ``from_keras`` does not work with Keras 3), in a
virtualenv of its own, outside the repository and apart from the project's onnx/onnxruntime::

    python3 -m venv /work/tfenv
    /work/tfenv/bin/pip install tensorflow-cpu==2.15.1 tf2onnx==1.16.1 protobuf==3.20.3 \\
        "numpy<2" onnx==1.16.2 onnxruntime
    /work/tfenv/bin/python scripts/make_tf2onnx_fixtures.py               # ~6 minutes on 2 cores
    /work/tfenv/bin/python scripts/make_tf2onnx_fixtures.py --only vgg16  # rebuild one model
    /work/tfenv/bin/python scripts/make_tf2onnx_fixtures.py --full --only # full-width check only

(resolved there: keras 2.15.0, numpy 1.26.4, onnxruntime 1.26.0.)  ``--full`` also builds the
un-narrowed applications at their smallest input, converts them in a temporary folder (nothing is
written to ``--out``) and prints how far onnxruntime is from TensorFlow (~6 minutes).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx.numpy_helper  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
import keras as keras_package  # noqa: E402
from keras.src.applications import (  # noqa: E402  the modules tf.keras.applications calls into
    densenet, efficientnet, mobilenet_v2, nasnet, resnet, resnet_v2, vgg16, xception)

keras = tf.keras
KERAS_VERSION = keras_package.__version__
assert KERAS_VERSION.startswith("2."), "tf2onnx.from_keras needs Keras 2 (tf.keras), got " + KERAS_VERSION

ROOT = Path(__file__).resolve().parent.parent
OPSETS = (13, 17)
CLASSES = 10
N_SAMPLES = 2
N_CALIB = 16
SEED = 0
MAX_ONNX_BYTES = 300_000
# BN shifts around +1 keep most ReLUs on.  With beta ~ 0, each BN that re-centres a ReLU output
# amplifies its fluctuations by ~1.2, and after ~50 of them the random net is chaotic: gradient x
# input sums to 10-100x the logit, which is then a float32 cancellation (ORT and TF float32 disagree
# by 2e-4 on ResNet50's softmax).  Trained nets are not like that, and LRP fixtures should not be.
BN_BETA_MEAN = 1.0
NASNET_MAX_ONNX_BYTES = 700_000


# --------------------------------------------------------------------------------------------------
# Narrowing: a stand-in for the ``layers`` namespace of an application module
# --------------------------------------------------------------------------------------------------

def _narrow(n: int, k: int) -> int:
    return max(1, int(n) // k)


class _NarrowLayers:
    """Passes everything through to the real layers namespace except the width-carrying layers.

    Conv2D / SeparableConv2D get ``filters // k``, Dense ``units // k`` (except the classifier,
    ``name='predictions'``), Reshape a narrowed last dimension (EfficientNet's squeeze-excite
    reshapes to ``(1, 1, filters)``).  DepthwiseConv2D follows its input by itself.
    """

    def __init__(self, base, k: int):
        self._base, self._k = base, k

    def __getattr__(self, name):
        attr = getattr(self._base, name)
        if name in ("Conv2D", "SeparableConv2D"):
            return self._wrap(attr, "filters")
        if name == "Dense":
            return self._wrap(attr, "units", keep=lambda kw: kw.get("name") == "predictions")
        if name == "Reshape":
            def reshape(target_shape, **kw):
                return attr(tuple(target_shape[:-1]) + (_narrow(target_shape[-1], self._k),), **kw)
            return reshape
        return attr

    def _wrap(self, cls, arg, keep=lambda kw: False):
        def make(*args, **kw):
            if not keep(kw):
                if args:
                    args = (_narrow(args[0], self._k),) + args[1:]
                else:
                    kw[arg] = _narrow(kw[arg], self._k)
            return cls(*args, **kw)
        return make


class _NominalBackend:
    """The keras backend, except that ``int_shape`` reports the nominal (un-narrowed) channels.

    MobileNetV2 sizes its expand conv from the input's actual channel count and adds the
    residual only when that count equals the nominal output width; DenseNet sizes its
    transition conv from the actual channels.  Seeing ``actual * k`` there, the builder divides
    every width exactly once and takes the same residual decisions as at full width.
    """

    def __init__(self, base, k: int):
        self._base, self._k = base, k

    def __getattr__(self, name):
        return getattr(self._base, name)

    def int_shape(self, x):
        shape = self._base.int_shape(x)
        return shape[:-1] + (shape[-1] * self._k,) if shape[-1] is not None else shape


@contextlib.contextmanager
def narrowed(module, k: int):
    """While active, ``module``'s builders create layers with widths divided by ``k``.

    Some modules bind ``layers = VersionAwareLayers()`` at import (vgg16, densenet, efficientnet,
    xception), others (resnet, mobilenet_v2) rebind the global inside the builder, so both names
    are patched; ``backend`` is patched for the builders that read channel counts back.
    """
    if k == 1:
        yield
        return
    saved = {name: getattr(module, name) for name in ("layers", "VersionAwareLayers", "backend")}
    proxy = _NarrowLayers(saved["VersionAwareLayers"](), k)
    module.layers = proxy
    module.VersionAwareLayers = lambda: proxy
    module.backend = _NominalBackend(saved["backend"], k)
    try:
        yield
    finally:
        for name, value in saved.items():   # also undoes resnet's / mobilenet_v2's global rebinding
            setattr(module, name, value)


def topology(model) -> list:
    """Layer classes and wiring (by layer index): what narrowing must not change."""
    index = {layer.name: i for i, layer in enumerate(model.layers)}
    out = []
    for layer in model.layers:
        inbound = []
        for node in layer._inbound_nodes:
            parents = node.inbound_layers
            parents = parents if isinstance(parents, (list, tuple)) else [parents]
            inbound.append(tuple(index[p.name] for p in parents))
        out.append((type(layer).__name__, tuple(inbound)))
    return out


# --------------------------------------------------------------------------------------------------
# Models: one small function per family; each takes the classifier activation so that a
# pre-softmax twin can be built with identical weights.
# --------------------------------------------------------------------------------------------------

# name: (keras builder, module patched for narrowing, builder, k, input shape NHWC, extra kwargs).
# k: the smallest of 8, 12, 16, 20, 24, 32 that keeps each .onnx under MAX_ONNX_BYTES (about
# params * 4 bytes plus ~0.3 kB of node names per node); the first layers keep >= 2 channels.
APPS = {
    "vgg16": ("keras.applications.VGG16", vgg16, vgg16.VGG16, 24, (32, 32, 3), {}),
    "resnet50": ("keras.applications.ResNet50", resnet, resnet.ResNet50, 20, (32, 32, 3), {}),
    "resnet50v2": ("keras.applications.ResNet50V2", resnet, resnet_v2.ResNet50V2, 24, (32, 32, 3), {}),
    # k must divide MobileNetV2's widths (16, 24, 32, ...) for its residual tests to come out as at
    # full width (k=16 drops residual Adds); alpha stays at its default 1.0
    "mobilenetv2": ("keras.applications.MobileNetV2", mobilenet_v2, mobilenet_v2.MobileNetV2, 8, (32, 32, 3), {}),
    "densenet121": ("keras.applications.DenseNet121", densenet, densenet.DenseNet121, 16, (32, 32, 3), {}),
    "efficientnetb0": ("keras.applications.EfficientNetB0", efficientnet, efficientnet.EfficientNetB0, 12,
                       (32, 32, 3), {}),
    # Xception's builder refuses inputs below 71x71
    "xception": ("keras.applications.Xception", xception, xception.Xception, 24, (71, 71, 3), {}),
}

# NASNet's cells compare actual channel counts with their nominal ``filters`` to decide where
# to insert 1x1 "adjust" projections, so patching would change its topology.  Instead the
# generic builder gets the smallest valid ``penultimate_filters`` (a multiple of 24 *
# filter_multiplier**2 = 96; cells get ``penultimate_filters // 24`` filters) and NASNetMobile's
# values for everything else.  Its ~1000 nodes alone take ~370 kB of names, so its files are
# the one exception to MAX_ONNX_BYTES (NASNET_MAX_ONNX_BYTES).
NASNET_MOBILE = dict(penultimate_filters=1056, num_blocks=4, stem_block_filters=32, skip_reduction=False,
                     filter_multiplier=2, default_size=224)
NASNET_SMALL = dict(NASNET_MOBILE, penultimate_filters=96)


def build_app(name: str, activation, full: bool = False):
    _, module, fn, k, shape, extra = APPS[name]
    kw = dict(include_top=True, weights=None, classes=CLASSES, classifier_activation=activation,
              input_shape=shape, **extra)
    if full:
        return fn(**kw)
    with narrowed(module, k):
        return fn(**kw)


def build_nasnet(activation, full: bool = False):
    params = NASNET_MOBILE if full else NASNET_SMALL
    return nasnet.NASNet(input_shape=(32, 32, 3), include_top=True, weights=None, classes=CLASSES,
                         classifier_activation=activation, **params)


def build_keras_cnn(activation):
    """Conv+BN+ReLU, max pool, a residual Add, a two-branch Concatenate, avg pools, Dense."""
    L = keras.layers
    inp = keras.Input((32, 32, 3), name="input")

    def conv_bn(x, filters, kernel, relu=True):
        x = L.Conv2D(filters, kernel, padding="same")(x)
        x = L.BatchNormalization()(x)
        return L.ReLU()(x) if relu else x

    x = conv_bn(inp, 8, 3)
    x = L.MaxPooling2D(2)(x)                                        # 16x16x8
    y = conv_bn(conv_bn(x, 8, 3), 8, 3, relu=False)
    x = L.ReLU()(L.Add()([x, y]))                                  # residual block
    a = L.Conv2D(8, 1, activation="relu")(x)                         # 1x1 branch, no BN
    b = conv_bn(x, 8, 3)
    x = L.Concatenate()([a, b])                                      # 16x16x16
    x = L.AveragePooling2D(2)(x)                                     # 8x8x16
    x = conv_bn(x, 16, 3)
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(CLASSES, activation=activation, name="predictions")(x)
    return keras.Model(inp, out, name="keras_cnn")


def build_keras_mlp(activation):
    """Flatten of an 8x8x1 image (tf2onnx emits a Reshape), two Dense+ReLU, Dense classifier."""
    L = keras.layers
    inp = keras.Input((8, 8, 1), name="input")
    x = L.Flatten()(inp)
    x = L.Dense(32, activation="relu")(x)
    x = L.Dense(32, activation="relu")(x)
    out = L.Dense(CLASSES, activation=activation, name="predictions")(x)
    return keras.Model(inp, out, name="keras_mlp")


def model_specs():
    """name -> (builder(activation), description fields for the manifest)."""
    specs = {}
    for name, (builder, _, _, k, shape, extra) in APPS.items():
        specs[name] = (lambda act, name=name: build_app(name, act),
                       dict(keras_builder=builder + "".join(f", {a}={b}" for a, b in extra.items()),
                            k=k, input_shape=list(shape)))
    specs["nasnetmobile"] = (build_nasnet, dict(
        keras_builder="keras.applications.nasnet.NASNet(" + ", ".join(f"{a}={b}" for a, b in NASNET_SMALL.items())
        + ")  # NASNetMobile values except penultimate_filters (1056)", k=None, input_shape=[32, 32, 3]))
    specs["keras_cnn"] = (build_keras_cnn, dict(keras_builder="functional (build_keras_cnn)", k=None,
                                                input_shape=[32, 32, 3]))
    specs["keras_mlp"] = (build_keras_mlp, dict(keras_builder="functional (build_keras_mlp)", k=None,
                                                input_shape=[8, 8, 1]))
    return specs


# --------------------------------------------------------------------------------------------------
# Weights: seeded, He-scaled; BatchNorm statistics calibrated so activations stay O(1)
# --------------------------------------------------------------------------------------------------

def randomize(model, rng: np.random.Generator):
    """Every weight from ``rng``: kernels N(0, 2 / fan_in), small biases, random BN affine."""
    for layer in model.layers:
        if not layer.weights:
            continue
        new = []
        for var, value in zip(layer.weights, layer.get_weights()):
            kind = var.name.split("/")[-1].split(":")[0]
            shape = value.shape
            if kind in ("kernel", "pointwise_kernel"):           # HWIO / IO: fan_in = all but last
                value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
            elif kind == "depthwise_kernel":                      # (kh, kw, C, mult): per channel
                value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:2]))
            elif kind == "bias":
                value = 0.1 * rng.standard_normal(shape)
            elif kind == "gamma":
                value = rng.uniform(0.5, 1.5, shape)
            elif kind == "beta":
                value = BN_BETA_MEAN + 0.2 * rng.standard_normal(shape)
            elif kind == "moving_mean":
                value = 0.1 * rng.standard_normal(shape)
            elif kind == "moving_variance":
                value = rng.uniform(0.5, 1.5, shape)
            elif kind in ("mean", "variance", "count"):            # EfficientNet's Normalization
                # The stem rescales by 1/255 first; a per-channel mean/variance around that
                # scale brings a standard-normal x back to O(1), so the same x works for all models.
                if kind == "mean":
                    value = rng.normal(0.0, 0.1, shape) / 255.0
                elif kind == "variance":
                    value = rng.uniform(0.5, 2.0, shape) / 255.0 ** 2
            else:
                raise ValueError(f"{layer.name}: unexpected weight {var.name}")
            new.append(np.asarray(value, dtype=var.dtype.as_numpy_dtype))
        layer.set_weights(new)


def calibrate_batchnorm(model, rng: np.random.Generator, calib: np.ndarray):
    """Set every BN's moving statistics near its actual input statistics, then perturb them.

    With random kernels, random moving statistics would scale activations by an arbitrary factor
    at each of up to ~200 BNs (vanishing or exploding logits).  One eager inference-mode forward
    pass with each BN's ``call`` wrapped: in topological order each BN sees its input with all
    upstream BNs already set, takes its mean/variance from it, offsets and scales them at random
    (so that folding BN is still a real test) and only then normalizes.
    """
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]

    def calibrating(bn):
        call = bn.call

        def calibrating_call(inputs, training=None, **kw):
            act = inputs.numpy().astype(np.float64)
            axes = tuple(range(act.ndim - 1))
            mean, var = act.mean(axis=axes), act.var(axis=axes)
            var = np.maximum(var, 1e-2 * var.mean() + 1e-6)           # channels dead on the batch
            gamma, beta, _, _ = bn.get_weights()
            moving_mean = mean + 0.2 * np.sqrt(var) * rng.standard_normal(mean.shape)
            moving_var = var * rng.uniform(0.6, 1.6, var.shape)
            bn.set_weights([gamma, beta, moving_mean.astype(np.float32), moving_var.astype(np.float32)])
            return call(inputs, training=False, **kw)
        return calibrating_call

    for bn in bns:
        bn.call = calibrating(bn)
    try:
        model(tf.constant(calib), training=False)
    finally:
        for bn in bns:
            del bn.call                                             # back to the class's method


def is_piecewise_linear(model) -> bool:
    """Only ReLU/ReLU6, pooling and affine ops (softmax at the output is stripped by LRP)."""
    linear_layers = (keras.layers.InputLayer, keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                     keras.layers.SeparableConv2D, keras.layers.Dense, keras.layers.BatchNormalization,
                     keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
                     keras.layers.GlobalAveragePooling2D, keras.layers.ZeroPadding2D, keras.layers.Cropping2D,
                     keras.layers.Flatten, keras.layers.Reshape, keras.layers.Add, keras.layers.Concatenate,
                     keras.layers.Dropout, keras.layers.ReLU, keras.layers.Activation)
    for layer in model.layers:
        if not isinstance(layer, linear_layers):
            return False
        if isinstance(layer, keras.layers.ReLU) and (layer.negative_slope or layer.threshold):
            return False
        act = getattr(layer, "activation", None)
        if act is not None and layer.name != "predictions" and act.__name__ not in ("linear", "relu"):
            return False
    return True


# --------------------------------------------------------------------------------------------------
# References, conversion, census
# --------------------------------------------------------------------------------------------------

def relu6_saturated(model, x: np.ndarray) -> list:
    """Per sample, how many ReLU6 outputs sit at the cap: there LRP's pass-through differs from
    the gradient (0), so LRP-0 equals gradient x input only when there are none."""
    capped = [layer for layer in model.layers if isinstance(layer, keras.layers.ReLU) and layer.max_value]
    if not capped:
        return [0] * len(x)
    outs = keras.Model(model.inputs, [layer.output for layer in capped])(x)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    return [int(sum((o.numpy()[i] >= layer.max_value).sum() for o, layer in zip(outs, capped)))
            for i in range(len(x))]


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def logits_and_grad_x_input(model, x: np.ndarray, selection: np.ndarray | None):
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        z = model(xt, training=False)
        sel = np.argmax(z.numpy(), axis=1) if selection is None else selection
        # samples are independent (inference mode), so one sum gives every sample's gradient
        picked = tf.reduce_sum(tf.gather(z, sel, axis=1, batch_dims=1))
    grad = tape.gradient(picked, xt).numpy()
    return z.numpy(), grad * x


def convert(model, shape, opset: int, path: Path):
    spec = (tf.TensorSpec((None,) + tuple(shape), tf.float32, name="input"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, output_path=str(path))


def run_onnx(path: Path, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def census(path: Path) -> dict:
    """Op-type counts and a one-line account of the tf2onnx idioms an LRP tool has to parse."""
    graph = onnx.load(str(path)).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    producer = {o: n for n in graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    consts.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})

    def attr(n, name, default=None):
        return next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == name), default)

    def src(name):
        return producer[name].op_type if name in producer else ("const" if name in consts else "input")

    convs = [n for n in graph.node if n.op_type == "Conv"]
    folded = sum(1 for n in convs if n.input[1].endswith("fused_bn"))
    depthwise = sum(1 for n in convs if attr(n, "group", 1) > 1)
    bn_after = collections.Counter(src(n.input[0]) for n in graph.node if n.op_type == "BatchNormalization")
    reshapes = [consts.get(n.input[1]) for n in graph.node if n.op_type == "Reshape"]
    layout = sum(1 for r in reshapes if r is not None and r.size == 4)   # (-1, C, 1, 1) / (-1, 1, H, W)
    sigmoid_out = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Sigmoid"}
    muls = [n for n in graph.node if n.op_type == "Mul"]
    swish = sum(1 for n in muls if any(sigmoid_out.get(i) in n.input for i in n.input))
    gate = sum(1 for n in muls if any(i in sigmoid_out for i in n.input)) - swish
    const_mul = sum(1 for n in muls if any(i in consts for i in n.input))
    first = [n.op_type for n in consumers[graph.input[0].name]]
    last = producer.get(graph.output[0].name)

    q = [f"NHWC input -> {ops['Transpose']} Transpose" + ("" if first == ["Transpose"] else f" (input feeds {first})")]
    if folded or ops["BatchNormalization"]:
        q.append(f"{folded}/{len(convs)} Conv carry folded BN")
    if ops["BatchNormalization"]:
        q.append(f"{ops['BatchNormalization']} BatchNormalization left (after " +
                 ", ".join(f"{k} x{v}" for k, v in bn_after.most_common()) + ")")
    if layout:
        q.append(f"{layout} layout Reshape to (-1,C,1,1)/(-1,1,H,W) in place of Transposes of 1x1 / 1-channel tensors")
    if len(reshapes) > layout:
        q.append(f"{len(reshapes) - layout} flatten Reshape")
    if ops["Clip"]:
        q.append(f"ReLU6 as {ops['Clip']} Clip")
    if swish:
        q.append(f"swish as Sigmoid*Mul x{swish}")
    if gate:
        q.append(f"{gate} squeeze-excite gate Mul")
    if const_mul:
        q.append(f"{const_mul} Mul by a constant (Rescaling/Normalization, unfolded BN)")
    if depthwise:
        q.append(f"{depthwise} depthwise Conv (group=C)")
    if ops["GlobalAveragePool"]:
        q.append(f"GlobalAveragePool+Squeeze x{ops['GlobalAveragePool']}")
    if ops["ReduceMean"]:
        q.append(f"{ops['ReduceMean']} ReduceMean")
    if ops["Pad"]:
        pad_to = collections.Counter(c.op_type for n in graph.node if n.op_type == "Pad"
                                     for c in consumers[n.output[0]])
        q.append(f"{ops['Pad']} explicit Pad (-> " + ", ".join(f"{k} x{v}" for k, v in pad_to.most_common()) + ")")
        if pad_to["MaxPool"]:   # its zeros matter where a window is all negative (ResNet50V2's pool1)
            q.append("onnxruntime's basic optimizer folds a zero Pad into MaxPool's -inf pads")
    if ops["Slice"]:
        q.append(f"{ops['Slice']} Slice (Cropping2D)")
    if ops["MatMul"]:
        q.append(f"Dense as MatMul+Add x{ops['MatMul']}")
    if ops["Gemm"]:
        q.append(f"{ops['Gemm']} Gemm")
    shape_ops = sum(ops[o] for o in ("Shape", "Gather", "ConstantOfShape", "Expand", "Unsqueeze"))
    q.append(f"{shape_ops} Shape/Gather/Unsqueeze ops" if shape_ops else "no Shape subgraphs")
    q.append(f"Softmax(axis={attr(last, 'axis', 'default')}) is the output node"
             if last is not None and last.op_type == "Softmax"
             else f"output produced by {last.op_type if last is not None else '?'}")
    return dict(op_counts=dict(sorted(ops.items())), nodes=len(graph.node), quirks="; ".join(q))


def make_model(builder, rng, calib):
    """Weights on the softmax model; the float32/float64 logit twins get copies of them."""
    keras.backend.clear_session()
    model = builder("softmax")
    randomize(model, rng)
    calibrate_batchnorm(model, rng, calib)
    weights = model.get_weights()
    twin32 = builder(None)
    twin32.set_weights(weights)
    keras.backend.set_floatx("float64")
    try:
        twin64 = builder(None)
        twin64.set_weights([w.astype(np.float64) for w in weights])
    finally:
        keras.backend.set_floatx("float32")
    return model, twin32, twin64


def make_fixture(name, builder, info, out: Path) -> dict:
    """Build, weight, reference, convert at both opsets and check one model; its manifest entry."""
    shape = tuple(info["input_shape"])
    rng = np.random.default_rng([SEED, sum(map(ord, name))])        # per model, stable
    calib = rng.standard_normal((N_CALIB,) + shape).astype(np.float32)
    x = rng.standard_normal((N_SAMPLES,) + shape).astype(np.float32)
    t0 = time.time()
    model, twin32, twin64 = make_model(builder, rng, calib)

    x64 = x.astype(np.float64)
    logits64, gxi64 = logits_and_grad_x_input(twin64, x64, None)
    selection = np.argmax(logits64, axis=1).astype(np.int64)
    logits32, gxi32 = logits_and_grad_x_input(twin32, x, selection)
    assert np.abs(logits32 - logits64).max() < 1e-3 * max(1.0, np.abs(logits64).max()), name
    scale = np.abs(logits64).max()
    assert 0.5 <= scale <= 30, f"{name}: logits magnitude {scale:.3g} outside O(1-10)"
    np.testing.assert_allclose(model(x).numpy(), softmax(logits32.astype(np.float64)), atol=1e-6)

    rel = (np.linalg.norm((gxi32 - gxi64).reshape(N_SAMPLES, -1), axis=1)
           / np.linalg.norm(gxi64.reshape(N_SAMPLES, -1), axis=1))
    record = dict(info, params=int(model.count_params()), piecewise_linear=is_piecewise_linear(model),
                  max_abs_logit=float(scale), logits32_vs_64=float(np.abs(logits32 - logits64).max()),
                  grad_x_input32_vs_64_rel_l2=float(rel.max()), relu6_saturated=relu6_saturated(twin64, x64),
                  files={}, census={})
    record["lrp0_equals_grad_x_input"] = record["piecewise_linear"] and not any(record["relu6_saturated"])
    for opset in OPSETS:
        path = out / f"{name}_op{opset}.onnx"
        convert(model, shape, opset, path)
        y = run_onnx(path, x)
        err = float(np.abs(y - softmax(logits32.astype(np.float64))).max())
        print(f"  {path.name}: {path.stat().st_size / 1e3:.0f} kB, max|ort - softmax(logits32)| = {err:.2e}")
        assert err <= 1e-5, (path.name, err)
        record["files"][path.name] = path.stat().st_size
        record["census"][path.name] = census(path)
        record[f"ort_max_abs_err_op{opset}"] = err
    ref = out / f"{name}_ref.npz"
    np.savez_compressed(ref, x=x, logits32=logits32.astype(np.float32), logits64=logits64.astype(np.float64),
                        selection=selection, grad_x_input64=gxi64.astype(np.float64),
                        grad_x_input32=gxi32.astype(np.float32),
                        piecewise_linear=np.array(record["piecewise_linear"]))
    record["files"][ref.name] = ref.stat().st_size
    print(f"  params {record['params']}, max|logit| {scale:.2f}, piecewise_linear {record['piecewise_linear']}, "
          f"float32 vs float64: logits {record['logits32_vs_64']:.1e}, grad x input "
          f"{record['grad_x_input32_vs_64_rel_l2']:.1e} (rel L2), {time.time() - t0:.0f} s")
    return record


# --------------------------------------------------------------------------------------------------
# --full: the un-narrowed applications (temporary files only)
# --------------------------------------------------------------------------------------------------

def check_full():
    rows = []
    builders = {name: (lambda act, name=name: build_app(name, act, full=True)) for name in APPS}
    builders["nasnetmobile"] = lambda act: build_nasnet(act, full=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, builder in builders.items():
            keras.backend.clear_session()
            t0 = time.time()
            model = builder("softmax")
            shape = tuple(model.input_shape[1:])
            rng = np.random.default_rng([SEED, 1, sum(map(ord, name))])
            randomize(model, rng)
            calibrate_batchnorm(model, rng, rng.standard_normal((N_CALIB,) + shape).astype(np.float32))
            x = rng.standard_normal((N_SAMPLES,) + shape).astype(np.float32)
            y_tf = model(x).numpy()
            path = Path(tmp) / f"{name}_full_op13.onnx"
            convert(model, shape, 13, path)
            err = float(np.abs(run_onnx(path, x) - y_tf).max())
            err_plain = float(np.abs(run_onnx(path, x, optimize=False) - y_tf).max())
            rows.append((name, "x".join(map(str, shape)), model.count_params(), path.stat().st_size / 1e6, err,
                         err_plain, time.time() - t0))
            path.unlink()
            print(f"  {name}: done in {rows[-1][-1]:.0f} s", flush=True)
    print("\nmax|softmax ort - tf| with onnxruntime's default graph optimizations and with ORT_DISABLE_ALL")
    print(f"{'model':<15} {'input':<8} {'params':>10} {'onnx MB':>8} {'ort default':>12} {'ort no-opt':>11} {'s':>5}")
    for r in rows:
        print(f"{r[0]:<15} {r[1]:<8} {r[2]:>10} {r[3]:>8.1f} {r[4]:>12.2e} {r[5]:>11.2e} {r[6]:>5.0f}")
    return rows


# --------------------------------------------------------------------------------------------------

def check_topologies():
    """Narrowed and full-width builds must have the same layers, wired the same way."""
    for name in APPS:
        keras.backend.clear_session()
        same = topology(build_app(name, "softmax")) == topology(build_app(name, "softmax", full=True))
        assert same, f"{name}: narrowing changed the topology"
    keras.backend.clear_session()
    assert topology(build_nasnet("softmax")) == topology(build_nasnet("softmax", full=True)), "nasnet"
    print("narrowed topologies equal the full-width builders'")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models_fixtures" / "tf2onnx")
    ap.add_argument("--only", nargs="*", metavar="NAME",
                    help="rebuild only these models, the manifest keeps the others (none: only --full)")
    ap.add_argument("--full", action="store_true", help="also check the un-narrowed applications")
    args = ap.parse_args(argv)
    tf.keras.utils.set_random_seed(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    partial = args.only is not None
    manifest = json.loads(manifest_path.read_text()) if partial and manifest_path.exists() else {}
    manifest["_versions"] = dict(tensorflow=tf.__version__, keras=KERAS_VERSION, tf2onnx=tf2onnx.__version__,
                                 onnx=onnx.__version__, onnxruntime=ort.__version__, numpy=np.__version__,
                                 opsets=list(OPSETS))
    check_topologies()
    for name, (builder, info) in model_specs().items():
        if partial and name not in args.only:
            continue
        print(name, flush=True)
        manifest[name] = make_fixture(name, builder, info, args.out)
        limit = NASNET_MAX_ONNX_BYTES if name == "nasnetmobile" else MAX_ONNX_BYTES
        for f, size in manifest[name]["files"].items():
            assert not f.endswith(".onnx") or size <= limit, (f, size)
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"{args.out}: {total / 1e6:.2f} MB")
    if args.full:
        check_full()


if __name__ == "__main__":
    sys.exit(main())
