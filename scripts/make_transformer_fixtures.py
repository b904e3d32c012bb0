#!/usr/bin/env python
"""Generate small random-weight TRANSFORMER fixtures (ONNX) and LXT reference relevances.

Writes into ``models_fixtures/transformers/`` (or ``--out``), for each family in FAMILIES:

* ``{family}_legacy14.onnx``   ``torch.onnx.export(dynamo=False, opset_version=14)``
* ``{family}_legacy17.onnx``   ``dynamo=False, opset_version=17``
* ``{family}_dynamo18.onnx``   ``dynamo=True, opset 18``; torch 2.13 writes the weights to
                               ``{family}_dynamo18.onnx.data`` (external data, relative location,
                               same folder): kept as the exporter wrote it, on purpose
* ``{family}_ref.npz``         inputs, targets, float64 logits and relevances (see below)
* ``manifest.json``            per family: files, inputs, targets, checks, op counts

Every export has a single graph output (the logits), dynamic batch (and, for token models,
sequence) axes and is checked with onnxruntime against the float32 torch forward, on the
fixture inputs and on inputs of another batch size / sequence length.

Families
--------
``bert``          BertForSequenceClassification (eager attention), 3 labels, inputs
                  (input_ids, attention_mask, token_type_ids)
``distilbert``    DistilBertForSequenceClassification, inputs (input_ids, attention_mask)
``roberta``       RobertaForSequenceClassification (position ids from input_ids via CumSum)
``gpt2``          GPT2LMHeadModel (tied embeddings, gelu_new, use_cache=False), output [N, T, V]
``vit``           HF ViTForImageClassification, 10 labels, input pixel_values [N, 3, 32, 32]
``timm_vit``      timm VisionTransformer (class token), 10 classes
``torch_encoder`` nn.Embedding + learned positions + nn.TransformerEncoder (post-LN, GELU) +
                  Linear on h[:, 0]; input input_ids only

References (LXT 2.1, all in float64 from the float32 weights; ``*_ref.npz``)
-------------------------------------------------------------------------------
relevance = x * d(sum_i logit[i, target_i]) / dx with the LXT patches installed (LXT's
"efficient" input x modified-gradient form, i.e. seeded with the logit VALUE), taken at the
word-embedding output (text, [N, T, H]; position / token-type embeddings are parameters and
carry none) or at pixel_values (vision, [N, 3, 32, 32]).  target_i = argmax of the float64
logits of sample i (gpt2: at the last position, ``target_position`` = T - 1).

``attnlrp``       LXT AttnLRP: LayerNorm with std detached (patches.layer_norm_forward), identity
                  rule on element-wise non-linearities (GELU, tanh, ReLU; identity_rule_implicit),
                  uniform rule on both attention matmuls (q, k gradients / 4, v / 2 as
                  patches.wrap_attention_forward; BERT: LXT's own module, scores / 2 and
                  context / 2), dropout off, linear layers / adds / softmax plain gradient.
``cplrp``         LXT CP-LRP: as attnlrp, but q and k detached and v with its full gradient.
``grad_x_input``  plain autograd gradient x input, no patches.
``logits``        float64 forward of the unpatched model.

Where LXT ships a patch map it is used as is (``lxt.efficient.models.bert.attnLRP``,
``gpt2.attnLRP`` / ``gpt2.cp_LRP``); HF ViT gets LXT's ``patch_attention`` /
``patch_cp_attention`` (it has an ``eager_attention_forward``); BERT's CP-LRP, DistilBERT and
RoBERTa get the same LXT primitives through forward hooks on their separate q/k/v
projections (divide_gradient / stop_gradient on the projection outputs, which feed nothing but
the two attention matmuls: exactly what wrap_attention_forward does to query/key/value);
timm's fused Attention and nn.MultiheadAttention get an explicit attention forward with the
same weights, checked against the unpatched module to 1e-10 in float64.  BERT's AttnLRP is
computed both with LXT's map and with the hook patch; the two must agree (cross-check of the
hook construction).  LXT's patches are process-global monkey-patches, so each (family, rule)
is computed in its own subprocess (``--_child``).

Two numerically neutral deviations, both only affecting float64 runs: HF ViT's
``eager_attention_forward`` computes its softmax in float32 (``dtype=torch.float32``) even
for a float64 model; the children replace it by the same function with the softmax in the
input dtype (identical in float32) so that the float64 reference really is float64.  The
native fast path of nn.TransformerEncoderLayer (``torch._transformer_encoder_layer_fwd``, one
fused op without an ONNX symbolic) is switched off globally
(``torch.backends.mha.set_fastpath_enabled(False)``), for the exports and the references.

Weights and inputs
------------------
Random, seeded, not HF's std-0.02 init (which makes attention nearly uniform and the logits
almost input-independent): Linear / Conv1D / Conv2d weights N(0, 1/fan_in), biases
U(-0.1, 0.1), q and k projection weights N(0, QK_STD^2) (peaked attention; the manifest
reports the mean max attention probability next to its uniform value), embeddings N(0, 1)
(position / cls embeddings N(0, 0.5^2)), LayerNorm weight 1 + 0.1 N(0, 1), bias 0.1 N(0, 1).
The padding rows of the word embeddings are random too (not zero), so that relevance vanishing
at masked positions is the mask's doing, not a zero embedding.
Text inputs: 3 samples, token ids from [FIRST_TOKEN, vocab - 1) (no special / pad id);
encoders (bert, distilbert, roberta): sample 1 has its last 3 positions masked
(attention_mask 0, input id = pad id); gpt2: LEFT padding, sample 1 has its first 2 positions
masked (input id = eos id; HF does not shift the position ids for it), the other samples all
ones; bert: token_type_ids of sample 2 are 1 on the second half.  Images: N(0, 1) pixels.

Seed choice
-----------
As make_fixtures.py: the preferred seed FAMILY_SEEDS[family] first, then 1, 2, ...,
SEED_SEARCH_MAX (in batches of SEED_BATCH per child run); the first seed for which (a) the
float32 LXT result (same patches, ``model.float()``, float32 inputs) reproduces the float64
reference of attnlrp and cplrp within FLOAT32_TARGET (worst per-sample relative L2), (b) every
sample's attnlrp is at least DISCRIMINATION (per-sample relative L2) away from grad_x_input
and from cplrp, and (c) every target logit beats the runner-up by TARGET_MARGIN, is taken;
else the candidate with the best such ranking.

Run:  python scripts/make_transformer_fixtures.py [--out DIR] [--only FAMILY]
Requires torch, transformers 4.52.x, timm, lxt 2.1, onnx, onnxruntime, onnxscript
(torchvision is stubbed: timm and lxt import it, see ``install_torchvision_stub_any``).
"""
from __future__ import annotations

import argparse
import collections
import importlib.abc
import importlib.machinery
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from onnx_files import iter_nodes, strip_stack_traces  # noqa: E402
from zennit_compat import install_torchvision_stub  # noqa: E402

FAMILIES = ["bert", "distilbert", "roberta", "gpt2", "vit", "timm_vit", "torch_encoder"]
TEXT_FAMILIES = {"bert", "distilbert", "roberta", "gpt2", "torch_encoder"}
VISION_FAMILIES = {"vit", "timm_vit"}
ENCODER_MASKED = {"bert", "distilbert", "roberta"}  # sample 1: last MASKED_TAIL positions masked

# --- sizes ---
HIDDEN = 32
LAYERS = 2
HEADS = 4
INTERMEDIATE = 64
VOCAB = 100
MAX_POS = 32
IMAGE = 32
PATCH = 8
NUM_LABELS_TEXT = 3
NUM_LABELS_VISION = 10
BATCH = 3
SEQ_LEN = {"bert": 12, "distilbert": 10, "roberta": 11, "gpt2": 10, "torch_encoder": 12}
MASKED_TAIL = 3          # encoders: sample 1, last 3 positions masked
GPT2_LEFT_PAD = 2        # gpt2: sample 1, first 2 positions masked (left padding)
FIRST_TOKEN = 4          # token ids drawn from [FIRST_TOKEN, VOCAB - 1): no pad/bos/eos/cls id
PAD_ID = {"bert": 0, "distilbert": 0, "roberta": 1, "gpt2": VOCAB - 1}

# --- weights ---
QK_STD = 0.35            # q/k projection weights: ~2x the N(0, 1/fan_in) scale -> peaked attention
BIAS_RANGE = 0.1
EMB_STD = 1.0
POS_STD = 0.5

# --- exports ---
EXPORTS = [  # (suffix, dynamo, opset)
    ("legacy14", False, 14),
    ("legacy17", False, 17),
    ("dynamo18", True, 18),
]
ORT_TOL = 1e-4
# Legacy (TorchScript-tracing) export of nn.MultiheadAttention bakes the traced sequence length
# into its Reshape targets (F.multi_head_attention_forward: q.view(tgt_len, bsz * num_heads,
# head_dim) with tgt_len a Python int from query.shape; the batch factor stays dynamic): a file
# declaring a dynamic sequence axis fails in onnxruntime at any other length.  Tried: fast path
# off (needed anyway), torch.jit.script before export (fails: aten::is_autocast_enabled has no
# symbolic).  So these files are exported with a dynamic batch axis only (the graph input says
# [batch, T]) and checked on another batch size at the fixture length.
LEGACY_STATIC_SEQUENCE = {
    "torch_encoder": "legacy export of nn.MultiheadAttention bakes the sequence length (tgt_len is a "
                     "Python int in F.multi_head_attention_forward's q.view(tgt_len, bsz * heads, d)); "
                     "exported with a dynamic batch axis only; torch.jit.script first fails "
                     "(aten::is_autocast_enabled has no ONNX symbolic)",
}

# --- seed search / checks ---
FAMILY_SEEDS = {f: i + 1 for i, f in enumerate(FAMILIES)}
SEED_SEARCH_MAX = 24
SEED_BATCH = 4
FLOAT32_TARGET = 1e-6
DISCRIMINATION = 3e-2
TARGET_MARGIN = 1e-2
EXPLICIT_ATTENTION_TOL = 1e-10
PATCHED_LOGITS_TOL = 1e-10
RULES = ["attnlrp", "cplrp"]

# The fused encoder-layer fast path has no ONNX symbolic (legacy export fails on
# aten::_transformer_encoder_layer_fwd) and bypasses every module-level patch: off, globally.
torch.backends.mha.set_fastpath_enabled(False)


# ----------------------------------------------------------------------------------------
# torchvision stub (timm and lxt.efficient import torchvision at import time)
# ----------------------------------------------------------------------------------------
class _AnyAttrMeta(type):
    """Metaclass of placeholder classes: any attribute is another placeholder class
    (timm evaluates e.g. ``InterpolationMode.BILINEAR`` at import time)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")


def _placeholder(name: str):
    # an nn.Module subclass, so that isinstance checks (FrozenBatchNorm2d) work; never instantiated
    return _AnyAttrMeta(name, (nn.Module,), {"__module__": "torchvision_stub"})


class _TorchvisionStubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves any ``torchvision.*`` submodule not already in sys.modules as an empty package
    whose attributes are placeholder classes (PEP 562 module ``__getattr__``)."""

    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision.") and fullname not in sys.modules:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)
        mod.__path__ = []

        def __getattr__(name, _prefix=spec.name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _placeholder(f"{_prefix}.{name}")

        mod.__getattr__ = __getattr__
        return mod

    def exec_module(self, module):
        pass


def install_torchvision_stub_any() -> None:
    """zennit_compat's stub (torchvision, .models, .models.resnet) plus on-demand placeholder
    submodules (timm: torchvision.ops.misc, .transforms, .datasets, ...; lxt:
    torchvision.models.vision_transformer, whose LXT patch map is never applied here)."""
    try:
        import torchvision  # noqa: F401  (a working build: use it)
        return
    except Exception:
        pass
    install_torchvision_stub()
    if not any(isinstance(f, _TorchvisionStubFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionStubFinder())


install_torchvision_stub_any()
import transformers  # noqa: E402
from transformers.models.bert import modeling_bert  # noqa: E402
from transformers.models.distilbert import modeling_distilbert  # noqa: E402
from transformers.models.gpt2 import modeling_gpt2  # noqa: E402
from transformers.models.roberta import modeling_roberta  # noqa: E402
from transformers.models.vit import modeling_vit  # noqa: E402
import timm  # noqa: E402
import timm.layers.norm  # noqa: E402
from timm.models import vision_transformer as timm_vision_transformer  # noqa: E402

transformers.logging.set_verbosity_error()


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------
class TorchEncoderClassifier(nn.Module):
    """Token embedding + learned positions + nn.TransformerEncoder (post-LN, GELU) + Linear(h[:, 0])."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.pos_embed = nn.Parameter(torch.zeros(1, MAX_POS, HIDDEN))
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, INTERMEDIATE, dropout=0.0,
                                           activation="gelu", batch_first=True)
        # enable_nested_tensor=False: no nested-tensor conversion (only used with padding masks
        # on the fast path anyway) and no warning about it
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.classifier = nn.Linear(HIDDEN, NUM_LABELS_TEXT)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        h = self.embed(input_ids) + self.pos_embed[:, : input_ids.shape[1]]
        h = self.encoder(h)
        return self.classifier(h[:, 0])


def _hf_common():
    return dict(attn_implementation="eager")


def build_architecture(family: str) -> nn.Module:
    """The untrained architecture (weights are set by init_weights or load_state_dict).

    The HF classes are looked up on their modules at call time, so that after LXT's
    ``replace_module`` patch (BERT) the LXT copies of the classes are built.
    """
    if family == "bert":
        cfg = modeling_bert.BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POS, type_vocab_size=2,
            hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_labels=NUM_LABELS_TEXT, pad_token_id=PAD_ID["bert"], **_hf_common())
        model = modeling_bert.BertForSequenceClassification(cfg)
    elif family == "distilbert":
        cfg = modeling_distilbert.DistilBertConfig(
            vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTERMEDIATE,
            max_position_embeddings=MAX_POS, activation="gelu", dropout=0.0, attention_dropout=0.0,
            seq_classif_dropout=0.0, num_labels=NUM_LABELS_TEXT, pad_token_id=PAD_ID["distilbert"],
            **_hf_common())
        model = modeling_distilbert.DistilBertForSequenceClassification(cfg)
    elif family == "roberta":
        # RoBERTa positions start at padding_idx + 1 = 2: room for MAX_POS tokens
        cfg = modeling_roberta.RobertaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POS + 2, type_vocab_size=1,
            hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_labels=NUM_LABELS_TEXT, pad_token_id=PAD_ID["roberta"], bos_token_id=0,
            eos_token_id=2, **_hf_common())
        model = modeling_roberta.RobertaForSequenceClassification(cfg)
    elif family == "gpt2":
        cfg = modeling_gpt2.GPT2Config(
            vocab_size=VOCAB, n_positions=MAX_POS, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
            n_inner=INTERMEDIATE, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=PAD_ID["gpt2"], eos_token_id=PAD_ID["gpt2"],
            use_cache=False, tie_word_embeddings=True, **_hf_common())
        model = modeling_gpt2.GPT2LMHeadModel(cfg)
    elif family == "vit":
        cfg = modeling_vit.ViTConfig(
            image_size=IMAGE, patch_size=PATCH, num_channels=3, hidden_size=HIDDEN,
            num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
            hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_labels=NUM_LABELS_VISION, **_hf_common())
        model = modeling_vit.ViTForImageClassification(cfg)
    elif family == "timm_vit":
        model = timm_vision_transformer.VisionTransformer(
            img_size=IMAGE, patch_size=PATCH, in_chans=3, num_classes=NUM_LABELS_VISION,
            embed_dim=HIDDEN, depth=LAYERS, num_heads=HEADS, mlp_ratio=INTERMEDIATE / HIDDEN,
            class_token=True, global_pool="token")
    elif family == "torch_encoder":
        model = TorchEncoderClassifier()
    else:
        raise ValueError(family)
    if family not in ("timm_vit", "torch_encoder"):
        assert model.config._attn_implementation == "eager", model.config._attn_implementation
    return model.eval()


def qk_projections(family: str, model: nn.Module):
    """(weight tensor, index) pairs of the query/key projection weights (re-drawn with QK_STD)."""
    out = []
    for name, m in model.named_modules():
        if family in ("bert", "roberta", "vit") and name.endswith((".query", ".key")):
            out.append((m.weight, slice(None)))
        elif family == "distilbert" and name.endswith((".q_lin", ".k_lin")):
            out.append((m.weight, slice(None)))
        elif family == "gpt2" and name.endswith(".c_attn"):
            # HF Conv1D weight is [in, 3 * hidden]: q | k | v along the output (column) axis
            out.append((m.weight, (slice(None), slice(0, 2 * HIDDEN))))
        elif family == "timm_vit" and name.endswith(".attn.qkv"):
            out.append((m.weight, slice(0, 2 * HIDDEN)))  # Linear [3H, H]: q | k | v rows
        elif family == "torch_encoder" and isinstance(m, nn.MultiheadAttention):
            out.append((m.in_proj_weight, slice(0, 2 * HIDDEN)))
    assert len(out) == LAYERS * (1 if family in ("gpt2", "timm_vit", "torch_encoder") else 2), (family, len(out))
    return out


def init_weights(family: str, model: nn.Module, seed: int) -> None:
    """Seeded random weights (see module docstring, "Weights and inputs")."""
    gen = torch.Generator().manual_seed(seed)

    def normal_(t, std):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * std)

    def uniform_(t, r):
        with torch.no_grad():
            t.copy_((torch.rand(t.shape, generator=gen, dtype=torch.float32) * 2 - 1) * r)

    done = set()  # tied parameters (gpt2 wte == lm_head) are drawn once, as the embedding
    for name, m in model.named_modules():
        params = dict(m.named_parameters(recurse=False))
        if not params or all(id(p) in done for p in params.values()):
            continue
        if isinstance(m, nn.Embedding):
            std = EMB_STD if m is _word_embeddings(family, model) else POS_STD
            normal_(m.weight, std)
        elif isinstance(m, (nn.LayerNorm,)):
            normal_(m.weight, 0.1)
            with torch.no_grad():
                m.weight.add_(1.0)
            normal_(m.bias, 0.1)
        elif isinstance(m, (nn.Linear, nn.Conv2d, transformers.pytorch_utils.Conv1D, nn.MultiheadAttention)):
            for pname, p in params.items():
                if id(p) in done:
                    continue
                if pname.endswith("bias"):
                    uniform_(p, BIAS_RANGE)
                else:
                    # fan_in: Linear/MHA [out, in], Conv2d [out, in, kh, kw], HF Conv1D [in, out]
                    fan_in = p.shape[0] if isinstance(m, transformers.pytorch_utils.Conv1D) else p[0].numel()
                    normal_(p, 1.0 / math.sqrt(fan_in))
        else:  # cls tokens, position embedding parameters, ...
            for p in params.values():
                normal_(p, POS_STD)
        done.update(id(p) for p in params.values())
    missing = [n for n, p in model.named_parameters() if id(p) not in done]
    assert not missing, f"uninitialized parameters: {missing}"
    for w, idx in qk_projections(family, model):
        with torch.no_grad():
            w[idx] = torch.randn(w[idx].shape, generator=gen) * QK_STD


def _word_embeddings(family: str, model: nn.Module):
    return model.get_input_embeddings() if family in TEXT_FAMILIES else None


def build_model(family: str, seed: int) -> nn.Module:
    model = build_architecture(family)
    init_weights(family, model, seed)
    return model.float().eval()


def make_inputs(family: str, seed: int, batch: int = BATCH, seq_len: int | None = None) -> dict:
    """Numpy inputs of a family (see module docstring); ``seq_len`` defaults to SEQ_LEN."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    if family in VISION_FAMILIES:
        return {"pixel_values": torch.randn((batch, 3, IMAGE, IMAGE), generator=gen).numpy()}
    T = SEQ_LEN[family] if seq_len is None else seq_len
    ids = torch.randint(FIRST_TOKEN, VOCAB - 1, (batch, T), generator=gen)
    if family == "torch_encoder":
        return {"input_ids": ids.numpy().astype(np.int64)}
    mask = torch.ones((batch, T), dtype=torch.int64)
    if batch > 1:
        if family in ENCODER_MASKED:
            mask[1, -MASKED_TAIL:] = 0
        elif family == "gpt2":
            mask[1, :GPT2_LEFT_PAD] = 0
        ids[1][mask[1] == 0] = PAD_ID[family]
    inputs = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy()}
    if family == "bert":
        tt = torch.zeros((batch, T), dtype=torch.int64)
        if batch > 2:
            tt[2, T // 2:] = 1
        inputs["token_type_ids"] = tt.numpy()
    return inputs


INPUT_NAMES = {
    "bert": ["input_ids", "attention_mask", "token_type_ids"],
    "distilbert": ["input_ids", "attention_mask"],
    "roberta": ["input_ids", "attention_mask"],
    "gpt2": ["input_ids", "attention_mask"],
    "vit": ["pixel_values"],
    "timm_vit": ["pixel_values"],
    "torch_encoder": ["input_ids"],
}


class _Logits(nn.Module):
    """Export/forward wrapper: inputs in INPUT_NAMES order (explicit signatures, so that both
    exporters see named inputs), returns the logits only (HF: ``.logits``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class _BertLogits(_Logits):
    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).logits


class _MaskedTextLogits(_Logits):
    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class _HFPixelLogits(_Logits):
    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


class _Plain(_Logits):  # timm / torch_encoder return the logits tensor themselves
    def forward(self, x):
        return self.model(x)


def LogitsOnly(family: str, model: nn.Module) -> nn.Module:
    cls = {"bert": _BertLogits, "distilbert": _MaskedTextLogits, "roberta": _MaskedTextLogits,
           "gpt2": _MaskedTextLogits, "vit": _HFPixelLogits}.get(family, _Plain)
    return cls(model).eval()


def torch_inputs(family: str, inputs: dict, dtype=torch.float32):
    out = []
    for n in INPUT_NAMES[family]:
        t = torch.from_numpy(inputs[n])
        out.append(t.to(dtype) if t.is_floating_point() else t)
    return out


def select_logits(family: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logit[i, target_i] (gpt2: at the last position)."""
    idx = torch.arange(logits.shape[0])
    if family == "gpt2":
        return logits[idx, -1, target]
    return logits[idx, target]


def target_logits_2d(family: str, logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1] if family == "gpt2" else logits


# ----------------------------------------------------------------------------------------
# LXT patches (child processes only)
# ----------------------------------------------------------------------------------------
def _vit_eager_attention_forward_native_dtype(module, query, key, value, attention_mask, scaling,
                                              dropout=0.0, **kwargs):
    """HF ViT's eager_attention_forward with the softmax in the input dtype (HF forces float32,
    which would round the float64 reference); identical in float32."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    if attention_mask is not None:
        attn_weights = attn_weights * attention_mask
    attn_output = torch.matmul(attn_weights, value)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _explicit_attention(q, k, v, scale, rule, additive_mask=None):
    """softmax(q kᵀ · scale + mask) v with LXT's attention rule on the operands.

    attnlrp: q, k gradients / 4 and v / 2 (patches.wrap_attention_forward: uniform rule on both
    matmuls); cplrp: q, k detached (patches.cp_wrap_attention_forward); None: no rule.
    """
    from lxt.efficient.rules import divide_gradient, stop_gradient
    if rule == "attnlrp":
        q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
    elif rule == "cplrp":
        q, k = stop_gradient(q), stop_gradient(k)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if additive_mask is not None:
        scores = scores + additive_mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v), probs


def timm_attention_forward_factory(rule):
    def forward(self, x, attn_mask=None, is_causal=False):
        assert attn_mask is None and not is_causal and getattr(self, "gate", None) is None
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out, _ = _explicit_attention(q, k, v, self.scale, rule)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.norm(out)
        return self.proj_drop(self.proj(out))
    return forward


def mha_forward_factory(rule):
    """Explicit nn.MultiheadAttention forward (self-attention, batch_first, no masks)."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        assert self.batch_first and key_padding_mask is None and attn_mask is None and not is_causal
        assert query is key is value and self._qkv_same_embed_dim and self.bias_k is None
        B, T, E = query.shape
        H, D = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def heads(t):
            return t.reshape(B, T, H, D).transpose(1, 2)

        q = heads(nn.functional.linear(query, w_q, b_q))
        k = heads(nn.functional.linear(query, w_k, b_k))
        v = heads(nn.functional.linear(query, w_v, b_v))
        out, probs = _explicit_attention(q, k, v, 1.0 / math.sqrt(D), rule)
        out = self.out_proj(out.transpose(1, 2).reshape(B, T, E))
        return out, (probs.mean(1) if need_weights else None)
    return forward


def torch_encoder_ff_block(self, x):
    """TransformerEncoderLayer._ff_block with the identity rule on the (functional) activation."""
    from lxt.efficient.rules import identity_rule_implicit
    x = self.linear2(self.dropout(identity_rule_implicit(self.activation, self.linear1(x))))
    return self.dropout2(x)


def roberta_head_forward(self, features, **kwargs):
    """RobertaClassificationHead.forward with the identity rule on its (functional) tanh."""
    from lxt.efficient.rules import identity_rule_implicit
    x = self.dropout(features[:, 0, :])
    x = identity_rule_implicit(torch.tanh, self.dense(x))
    return self.out_proj(self.dropout(x))


QKV_HOOK_NAMES = {  # families whose separate q/k/v Linear outputs get the rule by forward hooks
    "bert": (".attention.self.query", ".attention.self.key", ".attention.self.value"),
    "roberta": (".attention.self.query", ".attention.self.key", ".attention.self.value"),
    "distilbert": (".attention.q_lin", ".attention.k_lin", ".attention.v_lin"),
}


def add_qkv_hooks(family: str, model: nn.Module, rule: str) -> int:
    """Forward hooks applying LXT's attention rule to the q/k/v projection outputs (they feed
    only the two attention matmuls, so this is wrap_attention_forward / cp_wrap_attention_forward
    applied to query, key and value)."""
    from lxt.efficient.rules import divide_gradient, stop_gradient
    qn, kn, vn = QKV_HOOK_NAMES[family]
    if rule == "attnlrp":
        fns = {qn: lambda t: divide_gradient(t, 4), kn: lambda t: divide_gradient(t, 4),
               vn: lambda t: divide_gradient(t, 2)}
    else:
        fns = {qn: stop_gradient, kn: stop_gradient}
    n = 0
    for name, m in model.named_modules():
        for suffix, fn in fns.items():
            if name.endswith(suffix):
                m.register_forward_hook(lambda mod, args, out, fn=fn: fn(out))
                n += 1
    assert n == LAYERS * len(fns), (family, n)
    return n


def install_common_patches():
    """LayerNorm (std detached), dropout off, identity rule on element-wise activation modules."""
    from lxt.efficient.patches import dropout_forward, layer_norm_forward, non_linear_forward, patch_method
    patch_method(layer_norm_forward, nn.LayerNorm)
    patch_method(layer_norm_forward, timm.layers.norm.LayerNorm)  # timm's subclass has its own forward
    patch_method(dropout_forward, nn.Dropout)
    for cls in (transformers.activations.GELUActivation, transformers.activations.NewGELUActivation,
                nn.GELU, nn.Tanh, nn.ReLU):
        patch_method(non_linear_forward, cls, keep_original=True)


def install_patches(family: str, mode: str) -> dict:
    """Install the LXT patches of ``mode`` for ``family`` (process-global).  Returns info with
    model-level hooks to add after building (``per_model``) and the patched attention classes
    with their original forwards (for the 1e-10 check of explicit attention forwards)."""
    from lxt.efficient import monkey_patch
    from lxt.efficient import patches as lxt_patches
    info = {"per_model": None, "explicit": None, "how": ""}
    if family == "vit":  # float64-faithful eager attention (see module docstring), in every mode
        modeling_vit.eager_attention_forward = _vit_eager_attention_forward_native_dtype
    if mode == "plain":
        return info
    rule = "attnlrp" if mode.startswith("attnlrp") else "cplrp"
    if family == "bert" and mode == "attnlrp":
        from lxt.efficient.models import bert as lxt_bert
        monkey_patch(modeling_bert, lxt_bert.attnLRP)
        info["how"] = "lxt.efficient.models.bert.attnLRP via monkey_patch (LXT's BERT module)"
        return info
    if family == "gpt2":
        from lxt.efficient.models import gpt2 as lxt_gpt2
        monkey_patch(modeling_gpt2, lxt_gpt2.attnLRP if rule == "attnlrp" else lxt_gpt2.cp_LRP)
        info["how"] = f"lxt.efficient.models.gpt2.{'attnLRP' if rule == 'attnlrp' else 'cp_LRP'} via monkey_patch"
        return info
    install_common_patches()
    how = "LayerNorm layer_norm_forward, Dropout off, identity rule on GELU/tanh/ReLU modules; "
    if family == "vit":
        (lxt_patches.patch_attention if rule == "attnlrp" else lxt_patches.patch_cp_attention)(modeling_vit)
        how += f"{'patch_attention' if rule == 'attnlrp' else 'patch_cp_attention'}(modeling_vit)"
    elif family in QKV_HOOK_NAMES:
        info["per_model"] = lambda model: add_qkv_hooks(family, model, rule)
        how += ("q/k/v projection forward hooks: " +
                ("divide_gradient q/4 k/4 v/2" if rule == "attnlrp" else "stop_gradient on q, k"))
        if family == "roberta":
            lxt_patches.patch_method(roberta_head_forward, modeling_roberta.RobertaClassificationHead)
            how += "; identity rule on the classification head's tanh"
    elif family == "timm_vit":
        cls = timm_vision_transformer.Attention
        info["explicit"] = (cls, cls.forward)
        lxt_patches.patch_method(timm_attention_forward_factory(rule), cls)
        how += f"explicit timm Attention forward with {rule} rule on q/k/v"
    elif family == "torch_encoder":
        cls = nn.MultiheadAttention
        info["explicit"] = (cls, cls.forward)
        lxt_patches.patch_method(mha_forward_factory(rule), cls)
        lxt_patches.patch_method(torch_encoder_ff_block, nn.TransformerEncoderLayer, "_ff_block")
        how += f"explicit nn.MultiheadAttention forward with {rule} rule on q/k/v; identity rule on F.gelu"
    info["how"] = how
    return info


# ----------------------------------------------------------------------------------------
# Child: relevances of one (family, mode) for a list of seeds
# ----------------------------------------------------------------------------------------
def _attention_stats(family: str, model: nn.Module, args: list, inputs: dict) -> dict:
    """Mean max attention probability over layers, heads and valid query rows (>= 2 valid
    keys), and the same mean for uniform attention (1 / #valid keys), float64."""
    probs = []
    if family in ("timm_vit", "torch_encoder"):
        mods = [m for m in model.modules()
                if isinstance(m, (timm_vision_transformer.Attention, nn.MultiheadAttention))]

        def hook(m, a, kw, out):
            x = a[0] if a else kw["x"]
            if isinstance(m, nn.MultiheadAttention):
                B, T, E = x.shape
                wq, wk, _ = m.in_proj_weight.chunk(3)
                bq, bk, _ = m.in_proj_bias.chunk(3)
                q = nn.functional.linear(x, wq, bq).reshape(B, T, HEADS, -1).transpose(1, 2)
                k = nn.functional.linear(x, wk, bk).reshape(B, T, HEADS, -1).transpose(1, 2)
                scale = 1.0 / math.sqrt(q.shape[-1])
            else:
                B, T, _ = x.shape
                qkv = m.qkv(x).reshape(B, T, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
                q, k, scale = qkv[0], qkv[1], m.scale
            probs.append(torch.softmax(q @ k.transpose(-2, -1) * scale, -1))

        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in mods]
        with torch.no_grad():
            model(*args)
        for h in handles:
            h.remove()
    else:
        kwargs = dict(zip(INPUT_NAMES[family], args))
        with torch.no_grad():
            probs = list(model(**kwargs, output_attentions=True).attentions)
    assert len(probs) == LAYERS
    P = torch.stack(probs)  # [L, N, H, Tq, Tk]
    Tq, Tk = P.shape[-2:]
    valid = torch.ones(P.shape[1], Tq, Tk, dtype=torch.bool)  # [N, Tq, Tk]
    if "attention_mask" in inputs:
        am = torch.from_numpy(inputs["attention_mask"]).bool()
        valid &= am[:, None, :] & am[:, :, None]
    if family == "gpt2":
        valid &= torch.ones(Tq, Tk, dtype=torch.bool).tril()
    nvalid = valid.sum(-1)  # [N, Tq]
    rows = nvalid >= 2
    pmax = P.masked_fill(~valid[None, :, None], 0).amax(-1)  # [L, N, H, Tq]
    sel = rows[None, :, None].expand_as(pmax)
    uniform = (1.0 / nvalid.double())[None, :, None].expand_as(pmax)
    return {"mean_max_attention_prob": float(pmax[sel].mean()),
            "uniform_mean_max_attention_prob": float(uniform[sel].mean())}


def child_compute(family: str, mode: str, seeds: list[int], work: Path) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    info = install_patches(family, mode)
    rule = None if mode == "plain" else ("attnlrp" if mode.startswith("attnlrp") else "cplrp")
    for seed in seeds:
        state = torch.load(work / f"{family}_seed{seed}.pt", weights_only=True)
        inputs = dict(np.load(work / f"{family}_seed{seed}_inputs.npz"))
        targets = None
        if mode != "plain":
            targets = torch.from_numpy(np.load(work / f"{family}_seed{seed}_plain.npz")["target"])
        result = {"how": np.array(info["how"])}
        for dtype, tag in ((torch.float64, "64"), (torch.float32, "32")):
            model = build_architecture(family)
            model.load_state_dict(state)
            model = model.to(dtype).eval()
            if info["per_model"] is not None:
                info["per_model"](model)
            explicit_checks = []
            if info["explicit"] is not None and dtype == torch.float64:
                cls, original = info["explicit"]

                def check(m, a, kw, out, original=original):
                    with torch.no_grad():
                        ref = original(m, *a, **kw)
                    ref, got = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
                    explicit_checks.append(float((ref - got).abs().max()))

                for m in model.modules():
                    if isinstance(m, cls):
                        m.register_forward_hook(check, with_kwargs=True)
            args = torch_inputs(family, inputs, dtype)
            wrapper = LogitsOnly(family, model)
            if family in TEXT_FAMILIES:
                # relevance at the word-embedding output: the module's output is replaced by a
                # leaf tensor of the same value (input_ids still flow everywhere else: masks,
                # RoBERTa position ids), so position/token-type embeddings carry no relevance
                emb = model.get_input_embeddings()
                with torch.no_grad():
                    leaf = emb(args[0]).clone().requires_grad_(True)
                calls = []
                handle = emb.register_forward_hook(lambda m, a, o: calls.append(1) or leaf)
                logits = wrapper(*args)
                handle.remove()
                assert len(calls) == 1, f"word embedding called {len(calls)} times"
            else:
                leaf = args[0].clone().requires_grad_(True)
                logits = wrapper(leaf, *args[1:])
            if targets is None:  # plain float64 pass decides the targets
                targets = target_logits_2d(family, logits.detach()).argmax(-1)
            (grad,) = torch.autograd.grad(select_logits(family, logits, targets).sum(), leaf)
            result[f"relevance{tag}"] = (leaf * grad).detach().double().numpy()
            result[f"logits{tag}"] = logits.detach().double().numpy()
            result[f"target{tag}"] = target_logits_2d(family, logits.detach()).argmax(-1).numpy()
            if family in TEXT_FAMILIES:
                result[f"embeddings{tag}"] = leaf.detach().double().numpy()
            if explicit_checks:
                result["explicit_attention_maxdiff"] = np.array(max(explicit_checks))
            if mode == "plain" and dtype == torch.float64:
                stats = _attention_stats(family, model, args, inputs)
                result["attention_stats"] = np.array(json.dumps(stats))
        result["target"] = targets.numpy().astype(np.int64)
        np.savez(work / f"{family}_seed{seed}_{mode}.npz", **result)


def run_children(family: str, seeds: list[int], work: Path, modes: list[str]) -> None:
    """plain first (decides the targets), then the LRP modes, two at a time (2 cores)."""

    def run(mode):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", mode, "--only", family,
               "--_work", str(work), "--_seeds", ",".join(map(str, seeds))]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"child {family}/{mode} failed:\n{p.stdout}\n{p.stderr}")

    run("plain")
    with ThreadPoolExecutor(max_workers=2) as ex:
        list(ex.map(run, modes))


# ----------------------------------------------------------------------------------------
# Metrics and seed search (parent)
# ----------------------------------------------------------------------------------------
def per_sample_rel_l2(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """||a[i] - ref[i]|| / ||ref[i]|| per sample (L2 over all non-batch axes)."""
    a = a.reshape(len(a), -1)
    ref = ref.reshape(len(ref), -1)
    return np.linalg.norm(a - ref, axis=1) / np.linalg.norm(ref, axis=1)


def lrp_modes(family: str) -> list[str]:
    # bert: LXT's own AttnLRP map, and the hook construction as a cross-check of it
    return RULES + (["attnlrp_hooks"] if family == "bert" else [])


def evaluate_seed(family: str, seed: int, work: Path) -> dict:
    res = {m: dict(np.load(work / f"{family}_seed{seed}_{m}.npz")) for m in ["plain"] + lrp_modes(family)}
    plain = res["plain"]
    target = plain["target"]
    logits2d = target_logits_2d(family, torch.from_numpy(plain["logits64"])).numpy()
    srt = np.sort(logits2d, axis=-1)
    target_logit = logits2d[np.arange(len(target)), target]
    m = {
        "seed": seed,
        "target": target.tolist(),
        "target_logit": target_logit.tolist(),
        "target_margin_min": float((srt[:, -1] - srt[:, -2]).min()),
        "attention": json.loads(str(plain["attention_stats"])),
        "float32_rel_l2": {},
        "patched_logits_maxdiff": {},
        "float32_target_agrees": bool(np.array_equal(plain["target32"], target)),
    }
    m["float32_rel_l2"]["grad_x_input"] = per_sample_rel_l2(plain["relevance32"], plain["relevance64"]).tolist()
    for mode in lrp_modes(family):
        r = res[mode]
        assert np.array_equal(r["target"], target)
        m["patched_logits_maxdiff"][mode] = float(np.abs(r["logits64"] - plain["logits64"]).max())
        m["float32_rel_l2"][mode] = per_sample_rel_l2(r["relevance32"], r["relevance64"]).tolist()
        m["float32_target_agrees"] &= bool(np.array_equal(r["target32"], target))
        if "explicit_attention_maxdiff" in r:
            m.setdefault("explicit_attention_maxdiff", {})[mode] = float(r["explicit_attention_maxdiff"])
        m.setdefault("patches", {})[mode] = str(r["how"])
    att, cp, gxi = res["attnlrp"]["relevance64"], res["cplrp"]["relevance64"], plain["relevance64"]
    m["attnlrp_vs_grad_x_input"] = per_sample_rel_l2(gxi, att).tolist()
    m["attnlrp_vs_cplrp"] = per_sample_rel_l2(cp, att).tolist()
    red = tuple(range(1, att.ndim))
    m["conservation_attnlrp"] = (att.sum(red) / target_logit).tolist()
    m["conservation_cplrp"] = (cp.sum(red) / target_logit).tolist()
    m["conservation_grad_x_input"] = (gxi.sum(red) / target_logit).tolist()
    if family == "bert":
        m["bert_lxt_map_vs_hooks_rel_l2"] = per_sample_rel_l2(res["attnlrp_hooks"]["relevance64"], att).tolist()
    m["worst_float32_rel_l2"] = max(max(m["float32_rel_l2"][r]) for r in RULES)
    m["min_discrimination"] = min(min(m["attnlrp_vs_grad_x_input"]), min(m["attnlrp_vs_cplrp"]))
    m["ok"] = (m["worst_float32_rel_l2"] <= FLOAT32_TARGET and m["min_discrimination"] >= DISCRIMINATION
               and m["target_margin_min"] >= TARGET_MARGIN and m["float32_target_agrees"])
    # hard sanity checks, independent of the seed
    for mode, d in m["patched_logits_maxdiff"].items():
        assert d <= PATCHED_LOGITS_TOL, f"{family} seed {seed}: patched ({mode}) logits differ by {d}"
    for mode, d in m.get("explicit_attention_maxdiff", {}).items():
        assert d <= EXPLICIT_ATTENTION_TOL, f"{family} seed {seed}: explicit attention ({mode}) off by {d}"
    if family == "bert":
        assert max(m["bert_lxt_map_vs_hooks_rel_l2"]) <= 1e-10, m["bert_lxt_map_vs_hooks_rel_l2"]
    return m


def seed_rank(m: dict):
    return (not m["ok"], m["min_discrimination"] < DISCRIMINATION, m["target_margin_min"] < TARGET_MARGIN,
            m["worst_float32_rel_l2"])


def choose_seed(family: str, work: Path):
    preferred = FAMILY_SEEDS[family]
    candidates = [preferred] + [s for s in range(1, SEED_SEARCH_MAX + 1) if s != preferred]
    tried, best = [], None
    for start in range(0, len(candidates), SEED_BATCH):
        batch = candidates[start:start + SEED_BATCH]
        for seed in batch:
            torch.save(build_model(family, seed).state_dict(), work / f"{family}_seed{seed}.pt")
            np.savez(work / f"{family}_seed{seed}_inputs.npz", **make_inputs(family, seed))
        run_children(family, batch, work, lrp_modes(family))
        for seed in batch:  # in candidate order: the first qualifying seed wins
            m = evaluate_seed(family, seed, work)
            tried.append([seed, float(f"{m['worst_float32_rel_l2']:.2e}"), float(f"{m['min_discrimination']:.2e}"),
                          float(f"{m['target_margin_min']:.2e}")])
            if best is None or seed_rank(m) < seed_rank(best):
                best = m
            if m["ok"]:
                return m, tried
    return best, tried


# ----------------------------------------------------------------------------------------
# Export and verification (parent)
# ----------------------------------------------------------------------------------------
def dynamic_axes(family: str, static_sequence: bool = False) -> dict:
    batch_only = family in VISION_FAMILIES or static_sequence
    axes = {n: ({0: "batch"} if batch_only else {0: "batch", 1: "sequence"}) for n in INPUT_NAMES[family]}
    axes["logits"] = {0: "batch", 1: "sequence"} if family == "gpt2" else {0: "batch"}
    return axes


def export(family: str, model: nn.Module, args: list, path: Path, dynamo: bool, opset: int) -> None:
    wrapper = LogitsOnly(family, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not dynamo:
            torch.onnx.export(wrapper, tuple(args), str(path), dynamo=False, opset_version=opset,
                              input_names=INPUT_NAMES[family], output_names=["logits"],
                              dynamic_axes=dynamic_axes(family, family in LEGACY_STATIC_SEQUENCE))
            return
        batch = torch.export.Dim("batch", min=1, max=1024)
        seq = torch.export.Dim("sequence", min=2, max=MAX_POS)
        names = ["x"] if family in ("timm_vit", "torch_encoder") else INPUT_NAMES[family]
        shapes = {n: ({0: batch} if family in VISION_FAMILIES else {0: batch, 1: seq}) for n in names}
        torch.onnx.export(wrapper, tuple(args), str(path), dynamo=True, opset_version=opset,
                          input_names=INPUT_NAMES[family], output_names=["logits"],
                          dynamic_shapes=shapes, optimize=True)
    strip_stack_traces(path)


def external_data_files(path: Path) -> list[str]:
    """Locations of external-data initializers; each must be a bare file name next to the model."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    locs = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in init.external_data}["location"]
            assert os.path.basename(loc) == loc and not os.path.isabs(loc), f"{path.name}: location {loc!r}"
            assert (path.parent / loc).exists(), f"{path.name}: missing {loc}"
            locs.add(loc)
    return sorted(locs)


def op_counts(path: Path) -> dict:
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    counts = collections.Counter()
    for node in iter_nodes(model.graph):
        counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
    for fn in model.functions:  # none expected (dynamo's optimizer inlines), listed if present
        for node in fn.node:
            counts[f"{fn.name}/{node.op_type}"] += 1
    return dict(sorted(counts.items()))


def onnx_io(path: Path) -> dict:
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)  # path form: resolves external data

    def desc(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    return {"inputs": [desc(v) for v in model.graph.input],
            "outputs": [desc(v) for v in model.graph.output],
            "opset": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
            "n_nodes": len(model.graph.node)}


def ort_check(path: Path, family: str, model32: nn.Module, feeds: list[dict]) -> list[float]:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == INPUT_NAMES[family]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    diffs = []
    for inputs in feeds:
        with torch.no_grad():
            ref = LogitsOnly(family, model32)(*torch_inputs(family, inputs)).numpy()
        (got,) = sess.run(None, {n: inputs[n] for n in INPUT_NAMES[family]})
        assert got.shape == ref.shape, (path.name, got.shape, ref.shape)
        diffs.append(float(np.abs(got - ref).max()))
    return diffs


def export_family(family: str, model32: nn.Module, inputs: dict, seed: int, out: Path) -> dict:
    args = torch_inputs(family, inputs)
    # another batch size and (token models) sequence length: proves the dynamic axes work
    alt = make_inputs(family, seed + 500, batch=2,
                      seq_len=None if family in VISION_FAMILIES else SEQ_LEN[family] + 3)
    alt_same_len = make_inputs(family, seed + 500, batch=2)
    files = {}
    for suffix, dynamo, opset in EXPORTS:
        path = out / f"{family}_{suffix}.onnx"
        static_sequence = not dynamo and family in LEGACY_STATIC_SEQUENCE
        for p in (path, path.with_name(path.name + ".data")):
            if p.exists():
                p.unlink()
        entry = {"exporter": "dynamo" if dynamo else "legacy (TorchScript)", "opset": opset}
        if static_sequence:
            entry["static_sequence_axis"] = LEGACY_STATIC_SEQUENCE[family]
        t0 = time.time()
        try:
            export(family, model32, args, path, dynamo, opset)
        except Exception as exc:
            entry["missing"] = f"export failed: {type(exc).__name__}: {str(exc)[:2000]}"
            print(f"  {path.name}: EXPORT FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc(limit=2)
            for p in (path, path.with_name(path.name + ".data")):
                if p.exists():
                    p.unlink()
            files[path.name] = entry
            continue
        export_s = time.time() - t0  # printed only: the manifest must be reproducible
        entry["external_data"] = external_data_files(path)
        entry.update(onnx_io(path))
        entry["size_bytes"] = path.stat().st_size + sum((out / f).stat().st_size for f in entry["external_data"])
        other = alt_same_len if static_sequence else alt
        d_fix, d_alt = ort_check(path, family, model32, [inputs, other])
        entry["ort_vs_torch_maxabs"] = d_fix
        entry["ort_vs_torch_maxabs_other_shape"] = d_alt
        entry["other_shape"] = {k: list(v.shape) for k, v in other.items()}
        entry["op_counts"] = op_counts(path)
        assert d_fix <= ORT_TOL and d_alt <= ORT_TOL, f"{path.name}: ORT vs torch {d_fix:.2e} / {d_alt:.2e}"
        print(f"  {path.name:28s} nodes={entry['n_nodes']:4d} size={entry['size_bytes']:7d}B "
              f"ext={entry['external_data']} ort-torch={d_fix:.1e} (other shape {d_alt:.1e}) "
              f"[{export_s:.1f}s]", flush=True)
        files[path.name] = entry
    return files


# ----------------------------------------------------------------------------------------
def process_family(family: str, out: Path, work: Path) -> dict:
    t0 = time.time()
    print(f"=== {family} ===", flush=True)
    m, tried = choose_seed(family, work)
    seed = m["seed"]
    print(f"  seed search [seed, worst f32 rel L2, min discrimination, min target margin]: {tried} -> {seed}"
          f"{'' if m['ok'] else '  (NO seed met every criterion: best taken)'}", flush=True)
    model32 = build_model(family, seed)
    inputs = make_inputs(family, seed)
    res = {k: dict(np.load(work / f"{family}_seed{seed}_{k}.npz")) for k in ["plain"] + RULES}

    ref = {k: v for k, v in inputs.items()}
    ref["target"] = res["plain"]["target"].astype(np.int64)
    if family == "gpt2":
        ref["target_position"] = np.array(SEQ_LEN[family] - 1, dtype=np.int64)
    ref["logits"] = res["plain"]["logits64"]
    ref["attnlrp"] = res["attnlrp"]["relevance64"]
    ref["cplrp"] = res["cplrp"]["relevance64"]
    ref["grad_x_input"] = res["plain"]["relevance64"]
    if family in TEXT_FAMILIES:
        emb = res["plain"]["embeddings64"]
        assert np.array_equal(emb.astype(np.float32).astype(np.float64), emb)  # exact float32 values
        ref["embeddings"] = emb.astype(np.float32)
    for k, v in ref.items():
        assert np.all(np.isfinite(v)), f"{family}: non-finite {k}"
    with torch.no_grad():  # the stored logits are those of this float32 model, run in float64
        lg = LogitsOnly(family, build_model(family, seed).double())(*torch_inputs(family, inputs, torch.float64))
    # (not for vit: this parent process runs HF's own eager attention, softmax in float32)
    assert family == "vit" or np.abs(lg.numpy() - ref["logits"]).max() <= 1e-12
    np.savez_compressed(out / f"{family}_ref.npz", **ref)

    files = export_family(family, model32, inputs, seed, out)
    entry = {
        "seed": seed,
        "seed_search": {"candidates": f"{FAMILY_SEEDS[family]}, then 1..{SEED_SEARCH_MAX}",
                        "criteria": {"float32_target": FLOAT32_TARGET, "discrimination": DISCRIMINATION,
                                     "target_margin": TARGET_MARGIN},
                        "all_criteria_met": m["ok"],
                        "tried [seed, worst f32 rel L2, min discrimination, min target margin]": tried},
        "inputs": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in inputs.items()},
        "input_names": INPUT_NAMES[family],
        "relevance_at": "word-embedding output [N, T, H]" if family in TEXT_FAMILIES else "pixel_values [N, 3, 32, 32]",
        "files": files,
        "ref_npz": f"{family}_ref.npz",
        "ref_keys": sorted(ref),
    }
    for k in ("target", "target_logit", "target_margin_min", "attention", "patches", "float32_rel_l2",
              "float32_target_agrees", "patched_logits_maxdiff", "explicit_attention_maxdiff",
              "attnlrp_vs_grad_x_input", "attnlrp_vs_cplrp", "conservation_attnlrp", "conservation_cplrp",
              "conservation_grad_x_input", "bert_lxt_map_vs_hooks_rel_l2"):
        if k in m:
            entry[k] = m[k]
    if family == "gpt2":
        entry["target_position"] = SEQ_LEN[family] - 1
    a = m["attention"]
    print(f"  target={m['target']} margin>={m['target_margin_min']:.2e}  attention mean max prob "
          f"{a['mean_max_attention_prob']:.3f} (uniform {a['uniform_mean_max_attention_prob']:.3f})")
    print("  float32 vs float64 (per-sample rel L2): " + ", ".join(
        f"{k}={max(v):.1e}" for k, v in m["float32_rel_l2"].items()))
    print(f"  attnlrp vs gxi {np.round(m['attnlrp_vs_grad_x_input'], 3).tolist()}  attnlrp vs cplrp "
          f"{np.round(m['attnlrp_vs_cplrp'], 3).tolist()}")
    print(f"  conservation sum(R)/logit: attnlrp {np.round(m['conservation_attnlrp'], 4).tolist()} "
          f"cplrp {np.round(m['conservation_cplrp'], 4).tolist()}  [{time.time() - t0:.0f}s]", flush=True)
    return entry


COMMON_MANIFEST = {
    "relevance": "x * d(sum_i logit[i, target_i])/dx (LXT input x modified gradient, seeded with the "
                 "logit value), float64 from the float32 weights; text: at the word-embedding output "
                 "(key 'embeddings' holds its float32 values), vision: at pixel_values",
    "target": "argmax of the float64 logits per sample (gpt2: at target_position = T - 1)",
    "keys": {"attnlrp": "LXT AttnLRP (LayerNorm std detached, identity rule on element-wise "
                        "non-linearities, uniform rule on the attention matmuls: q,k grad/4, v grad/2)",
             "cplrp": "LXT CP-LRP (as attnlrp, q and k detached, v full gradient)",
             "grad_x_input": "plain gradient x input", "logits": "float64 logits of the unpatched model"},
    "float32_rel_l2": "per sample ||R32 - R64|| / ||R64|| of the same LXT computation in float32",
    "attnlrp_vs_*": "per sample ||R_other - R_attnlrp|| / ||R_attnlrp||",
    "conservation_*": "per sample sum(R) / target logit",
    "attention": "mean over layers, heads and valid query rows (>= 2 valid keys) of the max attention "
                 "probability; uniform_*: the same for uniform attention",
    "inputs": {"encoders": f"sample 1: last {MASKED_TAIL} positions masked (attention_mask 0, pad id)",
               "gpt2": f"left padding: sample 1 first {GPT2_LEFT_PAD} positions masked (eos id), "
                       "position ids not shifted (HF default without position_ids)",
               "bert": "token_type_ids: sample 2 second half = 1",
               "token_ids": f"uniform in [{FIRST_TOKEN}, {VOCAB - 1})", "images": "N(0, 1)"},
    "weights": f"Linear/Conv N(0, 1/fan_in), bias U(-{BIAS_RANGE}, {BIAS_RANGE}), q/k N(0, {QK_STD}^2), "
               f"embeddings N(0, {EMB_STD}^2) (positions/cls N(0, {POS_STD}^2)), LN 1 + 0.1 N / 0.1 N",
    "deviations": ["HF ViT: float64 runs use eager_attention_forward with the softmax in float64 (HF "
                   "computes it in float32; identical for float32)",
                   "nn.TransformerEncoderLayer fast path disabled (torch.backends.mha.set_fastpath_enabled"
                   "(False)): legacy export has no symbolic for aten::_transformer_encoder_layer_fwd"],
    "versions": {},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "models_fixtures" / "transformers"))
    ap.add_argument("--only", choices=FAMILIES, action="append",
                    help="only this family (repeatable); other manifest entries are kept")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_work", help=argparse.SUPPRESS)
    ap.add_argument("--_seeds", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        child_compute(args.only[0], args._child, [int(s) for s in args._seeds.split(",")], Path(args._work))
        return 0

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    families = args.only or FAMILIES
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() and args.only else {}
    import lxt
    import onnx
    import onnxruntime
    import onnxscript
    common = dict(COMMON_MANIFEST)
    common["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "timm": timm.__version__, "lxt": getattr(lxt, "__version__", "2.1"),
                          "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                          "onnxscript": onnxscript.__version__}
    manifest["_common"] = common
    manifest.setdefault("families", {})
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="tfx_") as tmp:
        for family in families:
            manifest["families"][family] = process_family(family, out, Path(tmp))
            manifest["families"] = {f: manifest["families"][f] for f in FAMILIES if f in manifest["families"]}
            manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")

    print("\n=== summary ===")
    hdr = (f"{'family':14s} {'seed':>4s} {'exports':8s} {'ORT-torch':>9s} {'f32 attn':>9s} {'f32 cp':>9s} "
           f"{'attn-gxi':>9s} {'attn-cp':>9s} {'conserv (attnlrp)':>24s} {'att max p':>10s}")
    print(hdr)
    print("-" * len(hdr))
    for f, e in manifest["families"].items():
        present = [n for n, d in e["files"].items() if "missing" not in d]
        ort_d = max(max(d["ort_vs_torch_maxabs"], d["ort_vs_torch_maxabs_other_shape"])
                    for n, d in e["files"].items() if "missing" not in d) if present else float("nan")
        print(f"{f:14s} {e['seed']:4d} {len(present)}/{len(e['files'])}      {ort_d:9.1e} "
              f"{max(e['float32_rel_l2']['attnlrp']):9.1e} {max(e['float32_rel_l2']['cplrp']):9.1e} "
              f"{min(e['attnlrp_vs_grad_x_input']):9.3f} {min(e['attnlrp_vs_cplrp']):9.3f} "
              f"{str(np.round(e['conservation_attnlrp'], 3).tolist()):>24s} "
              f"{e['attention']['mean_max_attention_prob']:.2f}/{e['attention']['uniform_mean_max_attention_prob']:.2f}")
        for n, d in e["files"].items():
            if "missing" in d:
                print(f"    missing {n}: {d['missing'][:200]}")
    files = sorted(p for p in out.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"\n{len(files)} files in {out}, total {total / 1e6:.2f} MB; {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
