#!/usr/bin/env python
"""Generate the small ONNX fixture models and Zennit reference relevances.

Writes into ``models_fixtures/`` (relative to the repository root, or ``--out``):

* ``<name>.onnx``             legacy TorchScript exporter (``dynamo=False``), opset 13,
                              dynamic batch axis, eval mode (BN folded into Conv by the exporter)
* ``<name>_dynamo.onnx``      dynamo exporter (``dynamo=True``), opset 18, dynamic batch axis
* ``vgg_bn_preserved.onnx``   legacy exporter with ``training=TrainingMode.PRESERVE`` (model in
                              eval mode) so that ``BatchNormalization`` nodes stay in the graph
* ``<name>_ref.npz``          inputs + logits + gradient x input + Zennit relevances

for ``name`` in ``mlp``, ``vgg``, ``resnet``, ``mobilenet``.  ``vgg`` has a Softmax at the
output of the exported graph; all references are computed on the logits (model without
the softmax), since the tool strips an output softmax.

Reference semantics (follow RelevancePropagation.jl, built from Zennit's machinery, *not*
Zennit's named preset composites):

=======================  ==========================  ==============================  ==========================
composite                first convolution           other convolutions              Linear (dense)
=======================  ==========================  ==============================  ==========================
EpsilonGammaBox          ZBox(-3, 3, stab 1e-9)      plain Gamma(0.25, stab 1e-9)    Epsilon(1e-6)
EpsilonGammaBox_         ZBox(-3, 3, stab 1e-9)      zennit (generalized) Gamma      Epsilon(1e-6)
  generalized                                          (0.25, stab 1e-9)
EpsilonPlus              ZPlus(stab 1e-9)            ZPlus(stab 1e-9)                Epsilon(1e-6)
EpsilonAlpha2Beta1       AlphaBeta(2,1, stab 1e-9)   AlphaBeta(2,1, stab 1e-9)       Epsilon(1e-6)
EpsilonPlusFlat          Flat(stab 1e-9)             ZPlus(stab 1e-9)                Epsilon(1e-6)
EpsilonAlpha2Beta1Flat   Flat(stab 1e-9)             AlphaBeta(2,1, stab 1e-9)       Epsilon(1e-6)
=======================  ==========================  ==============================  ==========================

"first convolution" is the first Conv module; a first *Linear* layer never gets ZBox/Flat
(so for the MLP all composites reduce to Epsilon(1e-6) everywhere).  Everywhere:
activations (ReLU, ReLU6) -> Pass; residual sums and (adaptive) average pooling ->
Norm(stabilizer=1e-6) (== Epsilon(1e-6)); MaxPool -> no rule (gradient, winner takes all);
Dropout/Flatten -> identity; BatchNorm fused into the preceding conv (BN eps included) via
an exact variant of ``SequentialMergeBatchNorm``.  Zennit's stabilizer adds
``eps * sign(z)`` with ``sign(0) = +1``.

"plain Gamma" (RelevancePropagation.jl ``GammaRule``):
``R_in = a * Wg^T (R_out / stab(Wg a + bg))`` with ``Wg = W + gamma W+``, ``bg = b + gamma b+``.

All stored relevances are computed in float64 (``model.double()``) from the float32 inputs
``x``.  Output relevance: one-hot of the per-sample argmax with value 1 (unsuffixed keys), or
one-hot times the selected logit (``*_unnormalized`` keys).

Seed choice and ``float32_consistency``
---------------------------------------
The tool under test runs in float32 (onnxruntime) and is checked against these references
at a per-sample relative L2 error ``||R_tool - R_ref|| / ||R_ref|| <= 1e-4``.  That check
is only meaningful if float32 arithmetic *itself* can reproduce the reference: where the
LRP computation is ill-conditioned (e.g. plain Gamma denominators ``Wg a + bg`` close to 0)
any float32 implementation, however correct, lands 1e-4 .. 1e-2 away from the float64
value, and the fixture could not distinguish a semantic error from rounding.  Therefore
every composite key (including ``*_generalized`` and ``*_unnormalized``) is computed twice
with the very same zennit machinery: in float64 (stored) and in float32 (``model.float()``,
float32 inputs and output relevance).  The seed of each model (weights and inputs) is picked
by a bounded, deterministic search (``choose_seed``): the preferred seed ``MODEL_SEEDS[name]``
first, then 1, 2, ..., ``SEED_SEARCH_MAX``; the first seed for which the float32 result of
*every* key is within ``FLOAT32_TARGET = 1e-6`` (worst per-sample relative L2, i.e. plain
accumulated float32 rounding) is taken, else the one with the smallest worst error.  A 1e-4
tolerance then leaves two orders of magnitude between float32 rounding of a
well-conditioned computation and the test threshold.  The measured worst float32-vs-float64
error per key is stored as ``float32_consistency`` (float64 array, key order in
``meta_json["float32_consistency_keys"]``); ``meta_json`` also records the chosen seed and
every seed tried.  (The numbers are those of this machine's float32 kernels; the search is
deterministic for a given torch build, single-threaded.)

The ResNet needs more than a seed: with generic BN parameters the Norm rule of the residual
sum sends relevance to negative residual-branch outputs, where the plain Gamma denominator
``z + gamma z+`` crosses zero (no seed in 1..120 got below 7e-5; seed 31 of the previous
version of this script: 3e-4).  Its BNs are therefore set up like a trained ResNet with
small-gamma residual init (calibrated running statistics; last BN of each residual branch
with scale U(0.2, 0.4) and shift ~ 1.0), see ``init_resnet_batchnorm``.  Residual adds, the
overlapping 3x3/2 max pool, BN and the global average pool are unchanged.  Negative branch
outputs with relevance become rare but do not vanish; since only they make plain and
generalized Gamma differ, the ResNet seed must also keep those two references >= 1e-2 apart
(per-sample relative L2, ``GAMMA_DISCRIMINATION``), so the fixture can still tell them
apart at a 1e-4 tolerance.

Run:  python scripts/make_fixtures.py [--out models_fixtures]
Requires torch, zennit (torchvision is stubbed if broken, see ``zennit_compat.py``), onnx,
onnxruntime, and onnxscript for the dynamo exporter.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from onnx_files import strip_stack_traces  # noqa: E402
from zennit_compat import import_zennit, residual_sum_canonizer  # noqa: E402

zennit = import_zennit()
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import LayerMapComposite, SpecialFirstLayerMapComposite  # noqa: E402
from zennit.core import BasicHook, Stabilizer  # noqa: E402
from zennit.layer import Sum  # noqa: E402
from zennit.rules import (  # noqa: E402
    AlphaBeta, Epsilon, Flat, Gamma, GammaMod, Norm, Pass, ZBox, ZPlus,
)
from zennit.types import Activation, AvgPool, BatchNorm, Convolution  # noqa: E402

import onnx  # noqa: E402

REPO = HERE.parent
BATCH = 4
NUM_CLASSES = 10
LEGACY_OPSET = 13
DYNAMO_OPSET = 18

# --- rule parameters (see module docstring) ---
EPSILON = 1e-6          # Epsilon rule on dense layers
NORM_STAB = 1e-6        # Norm (== Epsilon) on pooling / residual sums
STAB = 1e-9             # Gamma, ZPlus, AlphaBeta, ZBox, Flat (Julia default)
GAMMA = 0.25
ZBOX_LOW, ZBOX_HIGH = -3.0, 3.0

# Preferred seed per model; ``choose_seed`` tries it first, then 1, 2, ..., SEED_SEARCH_MAX
# (skipping it) and takes the first seed whose float32 reproduction of *every* stored
# composite is within FLOAT32_TARGET (per-sample relative L2); if none is, the best one.
MODEL_SEEDS = {"mlp": 1, "vgg": 2, "resnet": 3, "mobilenet": 4}
SEED_SEARCH_MAX = 64
FLOAT32_TARGET = 1e-6
# Models on which plain and generalized Gamma can differ (negative relevance reaches conv
# outputs via the residual Norm rule; on the chain nets they are provably identical): the
# chosen seed must also keep the two apart, min per-sample relative L2 >= this.
GAMMA_DISCRIMINATION = {"resnet": 1e-2}
INPUT_SEED_OFFSET = 1000


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(20, 32), nn.ReLU(),
            nn.Linear(32, 32), nn.ReLU(),
            nn.Linear(32, NUM_CLASSES),
        )

    def forward(self, x):
        return self.layers(x)


class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(32, NUM_CLASSES),
        )

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; the residual add is a plain ``+`` (exports as ONNX ``Add``).

    For the Zennit reference, ``residual_sum_canonizer`` (zennit_compat.py) temporarily replaces
    ``forward`` by a version routing the add through ``zennit.layer.Sum`` (Norm rule).
    Module registration order == forward order of the leaves (needed by
    SequentialMergeBatchNorm): conv1, bn1, relu1, conv2, bn2, [downsample conv, bn], relu2.
    """

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.downsample = None
        self.relu2 = nn.ReLU()

    def _branches(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return identity, out

    def forward(self, x):
        identity, out = self._branches(x)
        return self.relu2(out + identity)


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # overlapping windows
        self.layer1 = BasicBlock(8, 8, stride=1)    # identity shortcut
        self.layer2 = BasicBlock(8, 16, stride=2)   # 1x1-conv-BN downsample shortcut
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, NUM_CLASSES)

    def residual_branch_batchnorms(self):
        """The BNs whose outputs enter a residual sum (last BN of each branch)."""
        bns = []
        for block in (self.layer1, self.layer2):
            bns.append(block.bn2)
            if block.downsample is not None:
                bns.append(block.downsample[1])
        return bns

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(self.flatten(self.avgpool(x)))


class MobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            # strided conv 32 -> 16
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
            # depthwise (groups = channels), strided 16 -> 8
            nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
            # dilated conv (dilation 2), size preserving
            nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.BatchNorm2d(16), nn.ReLU6(),
            # pointwise conv
            nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU6(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


class WithOutputSoftmax(nn.Module):
    """Export wrapper: appends a Softmax over the class axis."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        return self.softmax(self.model(x))


MODEL_SPECS = {
    # name: (constructor, input shape without batch, output softmax in exported graph)
    "mlp": (MLP, (20,), False),
    "vgg": (VGG, (3, 32, 32), True),
    "resnet": (ResNet, (3, 32, 32), False),
    "mobilenet": (MobileNet, (3, 32, 32), False),
}


def init_parameters(model: nn.Module) -> None:
    """Random weights (uses the global torch RNG, seeded by the caller).

    Conv/Linear: Kaiming-normal weights (ReLU gain) and U(-0.1, 0.1) biases, so that the
    activations neither vanish nor explode (PyTorch's default init gives nearly
    input-independent, bias-dominated logits for these small nets).  Every BN gets
    non-trivial running stats and affine params.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.uniform_(m.bias, -0.1, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c))
                m.running_var.copy_(0.5 + torch.rand(c))
                m.weight.copy_(0.5 + torch.rand(c))
                m.bias.copy_(0.2 * torch.randn(c))


# ResNet residual branches: the last BN of each residual branch (bn2, downsample BN) gets a
# "small-gamma" scale U(RES_BN_SCALE) and a positive shift RES_BN_SHIFT_MEAN + 0.2 N(0,1)
# (see init_resnet_batchnorm); running stats of all ResNet BNs are calibrated on data.
RES_BN_SCALE = (0.2, 0.4)
RES_BN_SHIFT_MEAN = 1.0
CALIBRATION_BATCH = 64


def init_resnet_batchnorm(model: "ResNet") -> None:
    """ResNet-specific BN setup (uses the global torch RNG, after :func:`init_parameters`).

    Why: the plain Gamma rule divides the relevance of each conv output by
    ``Wg a + bg``.  On a residual net the Norm rule of the residual sum hands relevance to
    residual-branch outputs ``z < 0`` (wherever the other summand outweighs them), and there
    ``Wg a + bg = z + gamma * z+`` crosses zero, so some denominators come arbitrarily
    close to 0 (condition numbers ~1e3 seen with the generic BN init; float32 then
    reproduces the float64 EpsilonGammaBox reference only to ~1e-4 .. 1e-2).  Like a trained
    ResNet with "zero-/small-gamma" residual init, the branch BN here has a small scale and
    a positive shift, so relevance-carrying branch outputs are (almost always) positive,
    where ``z + gamma * z+ >= (1 + gamma) z`` is well conditioned.  The branch still depends
    on its input (scale / shift ~ 0.2 .. 0.4), and negative branch outputs with relevance
    remain (rarely), so plain and generalized Gamma still differ (see GAMMA_DISCRIMINATION).

    1. residual-branch BNs: weight ~ U(RES_BN_SCALE), bias ~ RES_BN_SHIFT_MEAN + 0.2 N(0, 1)
    2. running mean/var of *all* BNs are set to the batch statistics of CALIBRATION_BATCH
       standard-normal images (train-mode forward pass, cumulative average), as in a trained
       net, so that every BN output is ~ weight * N(0, 1) + bias.
    """
    bns = model.residual_branch_batchnorms()
    with torch.no_grad():
        for bn in bns:
            c = bn.num_features
            lo, hi = RES_BN_SCALE
            bn.weight.copy_(lo + (hi - lo) * torch.rand(c))
            bn.bias.copy_(RES_BN_SHIFT_MEAN + 0.2 * torch.randn(c))
        all_bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in all_bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average == plain batch statistics
        model.train()
        model(torch.randn((CALIBRATION_BATCH,) + MODEL_SPECS["resnet"][1]))
        model.eval()
        for bn in all_bns:
            bn.momentum = 0.1
            bn.num_batches_tracked.zero_()


def build_model(name: str, seed: int | None = None) -> nn.Module:
    ctor = MODEL_SPECS[name][0]
    torch.manual_seed(MODEL_SEEDS[name] if seed is None else seed)
    model = ctor()
    init_parameters(model)
    if isinstance(model, ResNet):
        init_resnet_batchnorm(model)
    return model.float().eval()


def make_inputs(name: str, seed: int | None = None) -> np.ndarray:
    shape = MODEL_SPECS[name][1]
    gen = torch.Generator().manual_seed((MODEL_SEEDS[name] if seed is None else seed) + INPUT_SEED_OFFSET)
    return torch.randn((BATCH,) + shape, generator=gen, dtype=torch.float32).numpy()


# ----------------------------------------------------------------------------------------
# Zennit machinery
# ----------------------------------------------------------------------------------------
class PlainGamma(BasicHook):
    """Gamma rule of RelevancePropagation.jl (NOT Zennit's generalized Gamma).

    R_in = a * Wg^T (R_out / stab(Wg a + bg)),  Wg = W + gamma W+,  bg = b + gamma b+.
    """

    def __init__(self, gamma=GAMMA, stabilizer=STAB):
        stabilizer_fn = Stabilizer.ensure(stabilizer)
        super().__init__(
            input_modifiers=[lambda input: input],
            param_modifiers=[GammaMod(gamma, min=0.)],  # applied to weight and bias
            output_modifiers=[lambda output: output],
            gradient_mapper=(lambda out_grad, outputs: out_grad / stabilizer_fn(outputs[0])),
            reducer=(lambda inputs, gradients: inputs[0] * gradients[0]),
        )


class ExactSequentialMergeBatchNorm(SequentialMergeBatchNorm):
    """SequentialMergeBatchNorm whose neutralised BN is *exactly* the identity.

    Zennit sets the merged BN to running_var=1, which leaves a residual factor
    1/sqrt(1 + bn.eps) in the forward pass (~5e-6 relative per BN).  We set
    running_var = 1 - eps instead so the BN computes x / sqrt(1) = x.
    """

    @staticmethod
    def merge_batch_norm(modules, batch_norm):
        SequentialMergeBatchNorm.merge_batch_norm(modules, batch_norm)
        batch_norm.running_var.data = torch.ones_like(batch_norm.running_var.data) - batch_norm.eps


def _residual_forward(self, x):
    """Canonized BasicBlock.forward: residual add through zennit.layer.Sum (gets Norm rule)."""
    identity, out = self._branches(x)
    out = self.canonizer_sum(torch.stack([identity, out], dim=-1))
    return self.relu2(out)


def make_canonizers():
    return [ExactSequentialMergeBatchNorm(), residual_sum_canonizer(BasicBlock, _residual_forward)]


def _base_layer_map(norm_stab=NORM_STAB):
    return [
        (Activation, Pass()),
        (Sum, Norm(stabilizer=norm_stab)),
        (AvgPool, Norm(stabilizer=norm_stab)),
        (BatchNorm, Pass()),  # only BNs that could not be merged (none in these models)
    ]


COMPOSITE_NAMES = [
    "EpsilonGammaBox",
    "EpsilonPlus",
    "EpsilonAlpha2Beta1",
    "EpsilonPlusFlat",
    "EpsilonAlpha2Beta1Flat",
    "EpsilonGammaBox_generalized",
]


def make_composite(name: str):
    """Build a fresh composite with our (RelevancePropagation.jl) semantics."""
    conv_rules = {
        "EpsilonGammaBox": lambda: PlainGamma(gamma=GAMMA, stabilizer=STAB),
        "EpsilonGammaBox_generalized": lambda: Gamma(gamma=GAMMA, stabilizer=STAB),
        "EpsilonPlus": lambda: ZPlus(stabilizer=STAB),
        "EpsilonPlusFlat": lambda: ZPlus(stabilizer=STAB),
        "EpsilonAlpha2Beta1": lambda: AlphaBeta(alpha=2., beta=1., stabilizer=STAB),
        "EpsilonAlpha2Beta1Flat": lambda: AlphaBeta(alpha=2., beta=1., stabilizer=STAB),
    }
    first_conv_rules = {
        "EpsilonGammaBox": lambda: ZBox(low=ZBOX_LOW, high=ZBOX_HIGH, stabilizer=STAB),
        "EpsilonGammaBox_generalized": lambda: ZBox(low=ZBOX_LOW, high=ZBOX_HIGH, stabilizer=STAB),
        "EpsilonPlusFlat": lambda: Flat(stabilizer=STAB),
        "EpsilonAlpha2Beta1Flat": lambda: Flat(stabilizer=STAB),
    }
    layer_map = _base_layer_map() + [
        (Convolution, conv_rules[name]()),
        (nn.Linear, Epsilon(epsilon=EPSILON)),
    ]
    if name in first_conv_rules:
        # first_map only matches Convolution -> a first Linear layer is never special
        return SpecialFirstLayerMapComposite(
            layer_map=layer_map,
            first_map=[(Convolution, first_conv_rules[name]())],
            canonizers=make_canonizers(),
        )
    return LayerMapComposite(layer_map=layer_map, canonizers=make_canonizers())


def _lrp0_stabilizer(z):
    """No stabilization except z == 0 -> 1 (so dead units give 0/1 = 0 instead of 0/0 = nan)."""
    return torch.where(z == 0, torch.ones_like(z), z)


def make_lrp0_composite():
    """LRP-0 everywhere (Epsilon(0) on conv/linear, Norm(0) on sums/avg pools)."""
    layer_map = _base_layer_map(norm_stab=_lrp0_stabilizer) + [
        (Convolution, Epsilon(epsilon=_lrp0_stabilizer)),
        (nn.Linear, Epsilon(epsilon=_lrp0_stabilizer)),
    ]
    return LayerMapComposite(layer_map=layer_map, canonizers=make_canonizers())


def attribute(model: nn.Module, x: torch.Tensor, composite, out_relevance: torch.Tensor) -> torch.Tensor:
    xg = x.clone().requires_grad_(True)
    with composite.context(model) as modified:
        out = modified(xg)
        (rel,) = torch.autograd.grad(out, xg, grad_outputs=out_relevance)
    return rel.detach()


COMPOSITE_KEYS = [c + suffix for c in COMPOSITE_NAMES for suffix in ("", "_unnormalized")]


def composite_relevances(model: nn.Module, x32: np.ndarray, dtype: torch.dtype) -> tuple[dict, torch.Tensor]:
    """All COMPOSITE_KEYS relevances of ``model`` converted to ``dtype`` (inputs ``x32``).

    The whole computation (logits, selection, output relevance, rules) runs in ``dtype``.
    Returns ({key: float64 numpy array}, logits).
    """
    model = copy.deepcopy(model).to(dtype).eval()
    x = torch.from_numpy(x32).to(dtype)
    with torch.no_grad():
        logits = model(x)
    selection = logits.argmax(dim=1)
    onehot = torch.nn.functional.one_hot(selection, NUM_CLASSES).to(dtype)
    selected_logit = logits.gather(1, selection[:, None])
    rels = {}
    for cname in COMPOSITE_NAMES:
        rels[cname] = attribute(model, x, make_composite(cname), onehot).double().numpy()
        rels[cname + "_unnormalized"] = attribute(
            model, x, make_composite(cname), onehot * selected_logit).double().numpy()
    return rels, logits


def per_sample_rel_l2(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """||a[i] - ref[i]|| / ||ref[i]|| for every sample i (L2 over all non-batch axes)."""
    a = a.reshape(len(a), -1)
    ref = ref.reshape(len(ref), -1)
    return np.linalg.norm(a - ref, axis=1) / np.linalg.norm(ref, axis=1)


def float32_consistency(model32: nn.Module, x32: np.ndarray, rels64: dict, logits64: torch.Tensor) -> dict:
    """Worst per-sample relative L2 of the float32 zennit result vs the float64 reference.

    Same machinery (composites, canonizers, hooks), only ``model.float()`` and float32
    inputs / output relevance.  A float32 selection differing from the float64 one counts
    as a failure (inf).
    """
    rels32, logits32 = composite_relevances(model32, x32, torch.float32)
    if not torch.equal(logits32.argmax(dim=1), logits64.argmax(dim=1)):
        return {k: float("inf") for k in COMPOSITE_KEYS}
    return {k: float(per_sample_rel_l2(rels32[k], rels64[k]).max()) for k in COMPOSITE_KEYS}


def seed_candidates(name: str) -> list[int]:
    preferred = MODEL_SEEDS[name]
    return [preferred] + [s for s in range(1, SEED_SEARCH_MAX + 1) if s != preferred]


def gamma_discrimination(rels64: dict) -> float:
    """min over samples of the relative L2 between plain and generalized Gamma references."""
    return float(per_sample_rel_l2(rels64["EpsilonGammaBox_generalized"], rels64["EpsilonGammaBox"]).min())


def choose_seed(name: str):
    """Deterministic seed search (see module docstring, "Seed choice").

    Tries ``seed_candidates(name)`` in order; returns the first seed for which the float32
    reproduction of every composite key is within FLOAT32_TARGET (and, for models listed in
    GAMMA_DISCRIMINATION, plain and generalized Gamma references differ by at least that
    much); if no candidate qualifies, the discriminating seed (if any) with the smallest
    worst float32 error.  Returns (seed, model32, x32, rels64, logits64, consistency, tried)
    with ``tried`` = [(seed, worst float32 error, gamma discrimination), ...] in search order.
    """
    min_disc = GAMMA_DISCRIMINATION.get(name, 0.0)
    tried = []
    best = None
    for seed in seed_candidates(name):
        model32 = build_model(name, seed)
        x32 = make_inputs(name, seed)
        rels64, logits64 = composite_relevances(model32, x32, torch.float64)
        cons = float32_consistency(model32, x32, rels64, logits64)
        worst = max(cons.values())
        disc = gamma_discrimination(rels64)
        tried.append((seed, worst, disc))
        rank = (disc < min_disc, worst)
        if best is None or rank < best[-1]:
            best = (seed, model32, x32, rels64, logits64, cons, rank)
        if worst <= FLOAT32_TARGET and disc >= min_disc:
            break
    seed, model32, x32, rels64, logits64, cons, _ = best
    return seed, model32, x32, rels64, logits64, cons, tried


def compute_references(model32: nn.Module, x32: np.ndarray, rels64: dict, logits64: torch.Tensor,
                       consistency: dict) -> tuple[dict, dict]:
    model = copy.deepcopy(model32).double().eval()
    x = torch.from_numpy(x32).double()
    with torch.no_grad():
        logits = model(x)
    assert torch.equal(logits, logits64)
    selection = logits.argmax(dim=1)
    onehot = torch.nn.functional.one_hot(selection, NUM_CLASSES).double()
    selected_logit = logits.gather(1, selection[:, None])

    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg), xg, grad_outputs=onehot)

    refs = {
        "x": x32.astype(np.float32),
        "logits": logits.numpy(),
        "output_selection": selection.numpy().astype(np.int64),
        "grad_x_input": (grad * x).numpy(),
    }
    for key in COMPOSITE_KEYS:
        refs[key] = rels64[key]
    refs["float32_consistency"] = np.array([consistency[k] for k in COMPOSITE_KEYS], dtype=np.float64)

    # --- sanity checks (printed, not asserted unless noted) ---
    lrp0 = attribute(model, x, make_lrp0_composite(), onehot * selected_logit).numpy()
    with torch.no_grad():
        logits_after = model(x)
    assert torch.equal(logits_after, logits), "composite/canonizer did not restore the model"
    sel = selected_logit.numpy()[:, 0]
    reduce_axes = tuple(range(1, x32.ndim))
    checks = {
        "lrp0_vs_gxi_maxdiff": float(np.abs(lrp0 - refs["grad_x_input"]).max()),
        "gxi_sum_minus_logit": np.abs(refs["grad_x_input"].sum(reduce_axes) - sel).max(),
        "eplus_sum": refs["EpsilonPlus"].sum(reduce_axes),
        "eplus_unnorm_sum_vs_logit": np.stack([refs["EpsilonPlus_unnormalized"].sum(reduce_axes), sel]),
        "gamma_plain_vs_generalized_maxdiff": float(
            np.abs(refs["EpsilonGammaBox"] - refs["EpsilonGammaBox_generalized"]).max()),
        "unnorm_consistency_maxdiff": max(
            float(np.abs(refs[c + "_unnormalized"] - refs[c] * sel.reshape((-1,) + (1,) * (x32.ndim - 1))).max())
            for c in COMPOSITE_NAMES),
        "f32_rel_l2": consistency,
    }
    for k, v in refs.items():
        assert np.all(np.isfinite(v)), f"non-finite values in {k}"
    return refs, checks


# ----------------------------------------------------------------------------------------
# ONNX export
# ----------------------------------------------------------------------------------------
def _export_module(name: str, model32: nn.Module) -> nn.Module:
    return WithOutputSoftmax(model32).eval() if MODEL_SPECS[name][2] else model32


def _assert_self_contained(path: Path) -> None:
    m = onnx.load(str(path), load_external_data=False)
    for init in m.graph.initializer:
        assert init.data_location != onnx.TensorProto.EXTERNAL, f"{path.name}: external data in {init.name}"


def export_legacy(model: nn.Module, dummy: torch.Tensor, path: Path, **kwargs) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), str(path),
            dynamo=False,
            opset_version=LEGACY_OPSET,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            **kwargs,
        )


def export_dynamo(model: nn.Module, dummy: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), str(path),
            dynamo=True,
            opset_version=DYNAMO_OPSET,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: batch},),
            external_data=False,
            optimize=True,
        )
    strip_stack_traces(path)


def onnx_summary(path: Path) -> dict:
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    ops = sorted({n.op_type for n in m.graph.node})
    opsets = {imp.domain or "ai.onnx": imp.version for imp in m.opset_import}
    return {
        "ops": ops,
        "opsets": opsets,
        "size": path.stat().st_size,
        "n_nodes": len(m.graph.node),
        "input_shape": [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim],
    }


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "models_fixtures"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    summary_rows = []
    export_notes = []
    meta = {
        "composites": {
            "EpsilonGammaBox": "first conv ZBox(-3,3,stab=1e-9); convs plain Gamma(0.25, stab=1e-9) "
                               "(RelevancePropagation.jl); Linear Epsilon(1e-6)",
            "EpsilonGammaBox_generalized": "as EpsilonGammaBox but convs zennit generalized Gamma(0.25, stab=1e-9)",
            "EpsilonPlus": "convs ZPlus(stab=1e-9); Linear Epsilon(1e-6)",
            "EpsilonAlpha2Beta1": "convs AlphaBeta(2,1,stab=1e-9); Linear Epsilon(1e-6)",
            "EpsilonPlusFlat": "first conv Flat(stab=1e-9); other convs ZPlus(stab=1e-9); Linear Epsilon(1e-6)",
            "EpsilonAlpha2Beta1Flat": "first conv Flat(stab=1e-9); other convs AlphaBeta(2,1,stab=1e-9); "
                                      "Linear Epsilon(1e-6)",
        },
        "common": "ReLU/ReLU6 Pass; residual Sum + AvgPool Norm(1e-6); MaxPool gradient; BN merged into "
                  "preceding conv; stabilizer z + eps*sign(z), sign(0)=+1; float64",
        "output_relevance": "one-hot(argmax) with value 1; *_unnormalized: one-hot * selected logit",
        "references_on": "logits (model without output softmax)",
        "float32_consistency_keys": COMPOSITE_KEYS,
        "float32_consistency": "per key (order of float32_consistency_keys): worst per-sample relative L2 "
                               "||R32 - R64|| / ||R64|| of the same zennit computation run in float32 "
                               "(model.float()) vs the stored float64 reference",
    }

    for name in MODEL_SPECS:
        print(f"=== {name} ===", flush=True)
        seed, model32, x32, rels64, logits64, consistency, tried = choose_seed(name)
        print("  seed search (seed: worst float32 rel L2 / plain-vs-generalized Gamma rel L2): "
              + ", ".join(f"{s}: {w:.2e}/{d:.1e}" for s, w, d in tried) + f"  -> seed {seed}", flush=True)
        refs, checks = compute_references(model32, x32, rels64, logits64, consistency)
        seed_info = {
            "seed": seed,
            "seed_search": {
                "candidates": f"{MODEL_SEEDS[name]}, then 1..{SEED_SEARCH_MAX}",
                "float32_target": FLOAT32_TARGET,
                "min_gamma_plain_vs_generalized": GAMMA_DISCRIMINATION.get(name, 0.0),
                "tried [seed, worst float32 rel L2, plain-vs-generalized Gamma rel L2]":
                    [[s, float(f"{w:.2e}"), float(f"{d:.2e}")] for s, w, d in tried],
            },
        }
        refs["meta_json"] = np.array(json.dumps(dict(meta, model=name, **seed_info)))
        np.savez_compressed(out / f"{name}_ref.npz", **refs)

        export_model = _export_module(name, model32)
        shape = MODEL_SPECS[name][1]
        has_softmax = MODEL_SPECS[name][2]
        expected = softmax(refs["logits"]) if has_softmax else refs["logits"]

        variants = [(f"{name}.onnx", "legacy", {})]
        if name == "vgg":
            variants.append((f"{name}_bn_preserved.onnx", "legacy",
                             {"training": torch.onnx.TrainingMode.PRESERVE}))
        variants.append((f"{name}_dynamo.onnx", "dynamo", {}))

        for fname, kind, kwargs in variants:
            path = out / fname
            if path.exists():
                path.unlink()
            try:
                if kind == "legacy":
                    export_legacy(export_model, torch.randn((1,) + shape), path, **kwargs)
                    if "training" in kwargs:
                        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
                        if "BatchNormalization" not in ops:
                            print("  BN folded despite PRESERVE; retrying with do_constant_folding=False")
                            export_legacy(export_model, torch.randn((1,) + shape), path,
                                          do_constant_folding=False, **kwargs)
                        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
                        assert "BatchNormalization" in ops, f"{fname}: no BatchNormalization nodes"
                else:
                    export_dynamo(export_model, torch.randn((2,) + shape), path)
            except Exception as exc:  # keep going, note why
                note = f"{fname}: {kind} export FAILED: {type(exc).__name__}: {exc}"
                print("  " + note)
                traceback.print_exc(limit=3)
                export_notes.append(note)
                if path.exists():
                    path.unlink()
                continue
            _assert_self_contained(path)
            info = onnx_summary(path)
            assert info["size"] < 1_000_000, f"{fname} too large: {info['size']}"
            y = run_ort(path, x32)
            err = float(np.abs(y - expected).max())
            assert np.allclose(y, expected, rtol=1e-4, atol=1e-5), f"{fname}: ORT mismatch {err}"
            y1 = run_ort(path, x32[:1])
            assert np.allclose(y1, expected[:1], rtol=1e-4, atol=1e-5), f"{fname}: batch-1 mismatch"
            print(f"  {fname:28s} {kind:6s} opsets={info['opsets']} nodes={info['n_nodes']} "
                  f"size={info['size']}B input={info['input_shape']} ort_maxerr={err:.2e}")
            print(f"    ops: {' '.join(info['ops'])}")

        # sanity prints
        print(f"  logits[sel]         : {np.round(refs['logits'][np.arange(BATCH), refs['output_selection']], 4)}")
        print(f"  sum grad_x_input - logit (max |.|)      : {checks['gxi_sum_minus_logit']:.3e}")
        print(f"  LRP-0 (unnorm) vs grad_x_input max diff : {checks['lrp0_vs_gxi_maxdiff']:.3e}")
        print(f"  EpsilonPlus sum (target 1)              : {np.round(checks['eplus_sum'], 4)}")
        print(f"  EpsilonPlus_unnormalized sum vs logit   : {np.round(checks['eplus_unnorm_sum_vs_logit'], 4).tolist()}")
        print(f"  plain vs generalized Gamma max diff     : {checks['gamma_plain_vs_generalized_maxdiff']:.3e}")
        print(f"  unnormalized == logit * normalized      : {checks['unnorm_consistency_maxdiff']:.3e}")
        print("  float32 zennit vs float64 reference (worst per-sample rel L2): "
              + ", ".join(f"{k}={v:.1e}" for k, v in checks["f32_rel_l2"].items()))
        summary_rows.append((name, seed, x32.shape, "".join(map(str, refs["output_selection"])), checks))

    print("\n=== summary ===")
    hdr = (f"{'model':10s} {'seed':>4s} {'x shape':16s} {'selection':12s} {'LRP0-GxI':>9s} {'EPlus sum (mean)':>17s} "
           f"{'Gamma plain-gen':>16s} {'worst f32 rel L2':>17s}")
    print(hdr)
    print("-" * len(hdr))
    for name, seed, shape, sel, c in summary_rows:
        worst = max(c["f32_rel_l2"].items(), key=lambda kv: kv[1])
        print(f"{name:10s} {seed:4d} {str(shape):16s} {str(sel):12s} {c['lrp0_vs_gxi_maxdiff']:9.1e} "
              f"{np.mean(c['eplus_sum']):17.4f} {c['gamma_plain_vs_generalized_maxdiff']:16.3e} "
              f"{worst[1]:9.1e} ({worst[0]})")
    files = sorted(out.iterdir())
    total = sum(f.stat().st_size for f in files if f.is_file())
    print(f"\nfiles in {out}:")
    for f in files:
        print(f"  {f.name:32s} {f.stat().st_size:9d} B")
    print(f"total: {total / 1e6:.2f} MB")
    if export_notes:
        print("\nexport notes:")
        for n in export_notes:
            print("  " + n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
