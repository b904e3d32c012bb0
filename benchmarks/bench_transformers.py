#!/usr/bin/env python
"""CPU benchmark for transformers: plain onnxruntime forward vs onnxlrp AttnLRP vs LXT AttnLRP, ViT-B/16 / BERT-base.

Models (HF transformers 4.52, random weights from HF's own init under a fixed seed, eval mode):

  vit   ``ViTForImageClassification(ViTConfig())``: 224x224, patch 16, hidden 768, 12 layers, 12 heads,
        1000 labels (HF's default attention implementation, sdpa); input ``pixel_values`` N(0, 1)
  bert  ``BertForSequenceClassification(BertConfig(num_labels=2))`` with eager attention, seq 128, inputs
        ``input_ids`` / ``attention_mask`` / ``token_type_ids``: sample i has its last 16 * (i % 4) positions
        padded (mask 0, id 0), [CLS] first, [SEP] last, token type 1 on the second half of its tokens

Each model is exported once (``torch.onnx.export(dynamo=False, opset_version=17)``, dynamic batch (and
sequence) axes, the logits as the only output) to benchmarks/.cache/ (``--cache-dir``), together with the
state dict, which the LXT phase loads, so all phases run on the same weights and inputs.  Phases:

  fwd      plain onnxruntime forward of the exported .onnx (CPUExecutionProvider, ORT_ENABLE_ALL)
  onnxlrp  ``onnxlrp.LRP(path, AttnLRP(), verbose=False, device="cpu", cache=False).analyze(x)`` (BERT:
           the token ids, ``inputs={"attention_mask": ..., "token_type_ids": ...}``); construction = load +
           canonize + emit the graph for the input shape + session creation, reported separately
  paired   the two above in one process, called in turn round after round: each round's ratio, the
           first table (``--skip-paired`` leaves it out; LXT keeps its own process, as Zennit does in
           bench_cpu.py)
  lxt      LXT 2.1 AttnLRP in torch: forward + backward of each sample's top logit, relevance = input x
           gradient at ``pixel_values`` (ViT) or at the word-embedding output (BERT, ``inputs_embeds``);
           parameters with ``requires_grad=False`` (no weight gradients), ``torch.set_num_threads(cpus)``.
           BERT: ``monkey_patch(modeling_bert, lxt.efficient.models.bert.attnLRP)`` before the model is built;
           ViT (LXT ships no map for HF ViT): ``layer_norm_forward`` on nn.LayerNorm, ``dropout_forward`` on
           nn.Dropout, ``non_linear_forward`` (identity rule) on GELUActivation and
           ``patch_attention(modeling_vit)`` (``wrap_attention_forward``: q/4, k/4, v/2 gradients)

Every phase runs in a fresh spawn child (bench_cpu.run_phase), so its peak RSS is its own.  Latency = median of
``--repeats`` calls after ``--warmup`` (``--repeats-large`` for batches >= 8).  Exactness: after the timed calls
each relevance phase runs once more -- onnxlrp with ``normalize_output_relevance=False`` (seed = the logit's
value, LXT's input x gradient form), LXT also in float64 (``--no-float64`` skips it) -- and the driver prints
the per-sample relative L2 of onnxlrp's relevance against LXT's (and of both against LXT in float64: the
float32 noise floor), and the logits' agreement.  ``--profile`` runs onnxruntime's profiler on the relevance graph and
the forward graph (``--profile-batch``, default the largest) and prints the top ops by time.

Usage:
  python benchmarks/bench_transformers.py                              # vit,bert x batch 1,8
  python benchmarks/bench_transformers.py --models bert --batches 1 --repeats 2
  python benchmarks/bench_transformers.py --markdown --profile
Needs torch, transformers 4.52.x, lxt 2.1, onnx, onnxruntime (torchvision is stubbed, see _prepare_hf).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE.parent / "scripts"), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_cpu as bc  # noqa: E402  (helpers: timing, RSS, ORT session, profile, tables, spawn children)

MODEL_SEEDS = {"vit": 16, "bert": 128}
UNITS = {"vit": "img", "bert": "seq"}
INPUTS = {"vit": ["pixel_values"], "bert": ["input_ids", "attention_mask", "token_type_ids"]}
SEQ_LEN = 128
PAD_STEP = 16                 # BERT sample i: last PAD_STEP * (i % 4) positions padded
CLS_ID, SEP_ID, PAD_ID, FIRST_WORD_ID = 101, 102, 0, 1000
OUTPUT_NAME = "logits"
#: the relevance graph's matrix products: its floor (see bench_cpu.print_profile)
MATMUL_FLOOR = (("MatMul", "FusedMatMul", "Gemm", "Conv", "Attention", "MultiHeadAttention"),
                "matrix products (MatMul/FusedMatMul/Gemm/Conv/Attention)")
TARGETS = {"ratio": 3.0, "speedup": 3.0, "memory": 1.0}


# ------------------------------------------------------------------------------------------------
# models and inputs
# ------------------------------------------------------------------------------------------------
def _prepare_hf(threads=None):
    """torch (with ``threads`` intra-op threads), a torchvision stub (the installed build is broken; LXT
    imports ``torchvision.models.vision_transformer`` and uses only its ``nn``), transformers told so."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    from zennit_compat import install_torchvision_stub
    tv = install_torchvision_stub()
    name = "torchvision.models.vision_transformer"
    if name not in sys.modules:
        vt = types.ModuleType(name)
        vt.nn = torch.nn
        sys.modules[name] = tv.models.vision_transformer = vt
    import transformers.utils.import_utils as iu
    iu._torchvision_available = False
    import transformers
    transformers.logging.set_verbosity_error()
    return torch


def build_model(name):
    """The seeded eval-mode model ``name`` from the (possibly LXT-patched) transformers modules."""
    import torch
    from transformers import BertConfig, ViTConfig
    from transformers.models.bert import modeling_bert
    from transformers.models.vit import modeling_vit
    torch.manual_seed(MODEL_SEEDS[name])
    if name == "vit":
        model = modeling_vit.ViTForImageClassification(ViTConfig())
    elif name == "bert":
        model = modeling_bert.BertForSequenceClassification(BertConfig(num_labels=2, attn_implementation="eager"))
    else:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODEL_SEEDS)}")
    return model.float().eval()


def make_feeds(name, batch):
    """The model's inputs as numpy arrays, by ONNX input name (deterministic)."""
    import numpy as np
    if name == "vit":
        return {"pixel_values": bc.make_input(batch)}  # N(0, 1), 3x224x224
    from transformers import BertConfig
    rng = np.random.default_rng(bc.INPUT_SEED)
    ids = rng.integers(FIRST_WORD_ID, BertConfig().vocab_size, size=(batch, SEQ_LEN), dtype=np.int64)
    mask, types_ = np.ones_like(ids), np.zeros_like(ids)
    for i in range(batch):
        n = SEQ_LEN - PAD_STEP * (i % 4)
        ids[i, 0], ids[i, n - 1], ids[i, n:], mask[i, n:] = CLS_ID, SEP_ID, PAD_ID, 0
        types_[i, n // 2:n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types_}


def cache_paths(name, cache_dir):
    return Path(cache_dir) / f"tf_{name}.onnx", Path(cache_dir) / f"tf_{name}.pt"


def phase_export(cfg):
    """Export the model (logits only, dynamic axes) and save its state dict next to it."""
    torch = _prepare_hf()
    name = cfg["model"]
    onnx_path, pt_path = cache_paths(name, cfg["cache_dir"])
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    model = build_model(name)
    names = INPUTS[name]

    class LogitsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            return self.model(**dict(zip(names, args))).logits

    feeds = make_feeds(name, 2)
    axes = {0: "batch"} if name == "vit" else {0: "batch", 1: "seq"}
    tmp = onnx_path.with_suffix(f".tmp{os.getpid()}.onnx")
    with torch.no_grad():
        torch.onnx.export(LogitsOnly().eval(), tuple(torch.from_numpy(feeds[n]) for n in names), str(tmp),
                          dynamo=False, opset_version=17, input_names=names, output_names=[OUTPUT_NAME],
                          dynamic_axes={**{n: axes for n in names}, OUTPUT_NAME: {0: "batch"}})
    torch.save(model.state_dict(), str(pt_path))
    os.replace(tmp, onnx_path)
    return {"onnx": str(onnx_path), "attn_implementation": model.config._attn_implementation}


# ------------------------------------------------------------------------------------------------
# phases (each runs in its own spawn child, through bench_cpu.run_phase)
# ------------------------------------------------------------------------------------------------
def _save(cfg, kind, **arrays):
    import numpy as np
    np.savez(Path(cfg["cache_dir"]) / f"out_{cfg['model']}_b{cfg['batch']}_{kind}.npz", **arrays)


def phase_fwd(cfg):
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    base = bc._maxrss_mib()
    feeds = make_feeds(cfg["model"], cfg["batch"])

    def setup():
        t0 = time.perf_counter()
        return bc._ort_session(cfg["onnx"]), time.perf_counter() - t0

    sess, res = bc._measure(setup, lambda s: s.run(None, feeds), cfg["warmup"], cfg["repeats"], base)
    _save(cfg, "fwd", logits=sess.run(None, feeds)[0])
    return res


def _lrp_setup(cfg, feeds):
    """onnxlrp.LRP(AttnLRP) with the relevance graph for this input shape emitted (dynamic axes: lazily,
    in the first analyze otherwise); returns (analyzer, data input, other inputs). Built without onnxlrp's
    cache: a cold construction every time, not a hit on an entry an earlier phase or run left."""
    import onnxlrp
    analyzer = onnxlrp.LRP(cfg["onnx"], onnxlrp.AttnLRP(), verbose=False, device="cpu", cache=False)
    x = feeds[analyzer.data_input]
    analyzer._build(tuple(x.shape[1:]))
    others = {k: v for k, v in feeds.items() if k != analyzer.data_input} or None
    return analyzer, x, others


def phase_onnxlrp(cfg):
    import onnxlrp  # noqa: F401
    base = bc._maxrss_mib()
    feeds = make_feeds(cfg["model"], cfg["batch"])

    def setup():
        t0 = time.perf_counter()
        state = _lrp_setup(cfg, feeds)
        return state, time.perf_counter() - t0

    (an, x, others), res = bc._measure(setup, lambda st: st[0].analyze(st[1], inputs=st[2]),
                                       cfg["warmup"], cfg["repeats"], base)
    res["relevance_nodes"] = len(an.relevance_model.graph.node)
    # exactness check: seed the logit's value, as LXT's input x gradient does (a feed, same graph)
    an.normalize_output_relevance = False
    e = an.analyze(x, inputs=others)
    _save(cfg, "onnxlrp", relevance=e.val, logits=e.output, selection=e.output_selection)
    return res


def _lxt_model(cfg):
    """Install the LXT AttnLRP patches (process-global), build the model, load the exported weights."""
    import torch
    from lxt.efficient import monkey_patch
    from lxt.efficient import patches as lp
    from transformers.models.bert import modeling_bert
    from transformers.models.vit import modeling_vit
    if cfg["model"] == "bert":
        from lxt.efficient.models.bert import attnLRP
        monkey_patch(modeling_bert, attnLRP)
    else:
        from transformers.activations import GELUActivation
        lp.patch_method(lp.layer_norm_forward, torch.nn.LayerNorm)
        lp.patch_method(lp.dropout_forward, torch.nn.Dropout)
        lp.patch_method(lp.non_linear_forward, GELUActivation, keep_original=True)
        lp.patch_attention(modeling_vit)
    model = build_model(cfg["model"])
    model.load_state_dict(torch.load(cache_paths(cfg["model"], cfg["cache_dir"])[1], weights_only=True))
    model.requires_grad_(False)  # only the input gradient is needed
    return model


def _lxt_call(model, kind, tensors):
    """Forward + backward of each sample's top logit; returns (input x gradient, logits, selection)."""
    if kind == "vit":
        x = tensors["pixel_values"].clone().requires_grad_()
        logits = model(pixel_values=x).logits
    else:
        x = model.bert.embeddings.word_embeddings(tensors["input_ids"]).detach().requires_grad_()
        logits = model(inputs_embeds=x, attention_mask=tensors["attention_mask"],
                       token_type_ids=tensors["token_type_ids"]).logits
    sel = logits.argmax(1)
    logits.gather(1, sel[:, None]).sum().backward()
    return (x * x.grad).detach(), logits.detach(), sel


def phase_lxt(cfg):
    torch = _prepare_hf(cfg["threads"])
    import lxt.efficient  # noqa: F401
    base = bc._maxrss_mib()
    tensors = {k: torch.from_numpy(v) for k, v in make_feeds(cfg["model"], cfg["batch"]).items()}

    def setup():  # patch + build + load the weights
        t0 = time.perf_counter()
        model = _lxt_model(cfg)
        return model, time.perf_counter() - t0

    model, res = bc._measure(setup, lambda m: _lxt_call(m, cfg["model"], tensors), cfg["warmup"], cfg["repeats"],
                             base)
    rel, logits, sel = _lxt_call(model, cfg["model"], tensors)
    out = dict(relevance=rel.numpy(), logits=logits.numpy(), selection=sel.numpy())
    if cfg.get("float64"):  # the float32 noise floor: the same LXT computation in float64 (after the timing)
        t64 = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
        rel64, _, sel64 = _lxt_call(model.double(), cfg["model"], t64)
        out.update(relevance64=rel64.numpy(), selection64=sel64.numpy())
    _save(cfg, "lxt", **out)
    res["threads"] = torch.get_num_threads()
    return res


def phase_profile(cfg):
    """ORT per-op profile of the emitted relevance graph vs the plain forward graph."""
    feeds = make_feeds(cfg["model"], cfg["batch"])
    an, x, others = _lrp_setup(cfg, feeds)
    fs = tuple(x.shape[1:])
    rel_feeds = an._feeds(x, None, others, an._out_shapes.get(fs))  # -1: each sample's top output
    rel_bytes = an.relevance_model.SerializeToString()
    del an
    return bc.profile_sessions([("forward", cfg["onnx"], feeds), ("relevance", rel_bytes, rel_feeds)],
                               cfg["profile_runs"], cfg["cache_dir"], warmup=cfg["warmup"])


def phase_paired(cfg):
    """The forward session and onnxlrp in one process, called in turn round after round (bench_cpu's
    paired phase): each round's ratio shares the machine's drift."""
    feeds = make_feeds(cfg["model"], cfg["batch"])
    sess = bc._ort_session(cfg["onnx"])
    an, x, others = _lrp_setup(cfg, feeds)
    return {"times": bc.calls_in_turn({"fwd": lambda: sess.run(None, feeds),
                                       "onnxlrp": lambda: an.analyze(x, inputs=others)},
                                      cfg["warmup"], cfg["repeats"])}


PHASES = {"tf_export": phase_export, "tf_fwd": phase_fwd, "tf_onnxlrp": phase_onnxlrp, "tf_lxt": phase_lxt,
          "tf_profile": phase_profile, "tf_paired": phase_paired}
bc.PHASES.update(PHASES)  # the spawn child re-imports this file as __mp_main__ and registers them again


# ------------------------------------------------------------------------------------------------
# exactness (in the driver, from the arrays the phases saved)
# ------------------------------------------------------------------------------------------------
def compare(model, batch, cache_dir):
    import numpy as np
    load = (lambda kind: np.load(Path(cache_dir) / f"out_{model}_b{batch}_{kind}.npz"))
    try:
        lrp, ref, fwd = load("onnxlrp"), load("lxt"), load("fwd")
    except OSError as exc:
        return {"error": f"missing outputs ({exc})"}
    a = lrp["relevance"].astype(np.float64).reshape(batch, -1)
    b = ref["relevance"].astype(np.float64).reshape(batch, -1)
    if a.shape != b.shape:
        return {"error": f"relevance shapes differ: onnxlrp {lrp['relevance'].shape}, LXT {ref['relevance'].shape}"}
    rel_l2 = (lambda u, v: (np.linalg.norm(u - v, axis=1) / np.maximum(np.linalg.norm(v, axis=1), 1e-30)).tolist())
    lo, lt = lrp["logits"], ref["logits"]
    sel = ref["selection"]
    target = lt[np.arange(batch), sel]
    out = dict(rel_l2=rel_l2(a, b), finite=bool(np.isfinite(a).all()),
               same_selection=bool((lrp["selection"] == sel).all()), logits_max_abs_diff=float(np.abs(lo - lt).max()),
               fwd_logits_max_abs_diff=float(np.abs(fwd["logits"] - lt).max()), logits_scale=float(np.abs(lt).max()),
               conservation_onnxlrp=(a.sum(1) / target).tolist(), conservation_lxt=(b.sum(1) / target).tolist())
    if "relevance64" in ref.files:
        r64 = ref["relevance64"].reshape(batch, -1)
        out.update(rel_l2_onnxlrp_vs_lxt64=rel_l2(a, r64), rel_l2_lxt32_vs_lxt64=rel_l2(b, r64),
                   same_selection64=bool((ref["selection64"] == sel).all()))
    return out


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
def matmul_gflops(reps=5):
    """The driver's float32 matmul speed (numpy, [1024, 768] x [768, 3072]) just before a phase starts: a
    probe for a machine slowed by something else (a shared host shows it here, not as steal time)."""
    import numpy as np
    a, b = np.ones((1024, 768), np.float32), np.ones((768, 3072), np.float32)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * 1024 * 768 * 3072 * reps / (time.perf_counter() - t0) / 1e9


def _mark(value, target, at_most):
    if value is None:
        return "-"
    ok = value <= target if at_most else value >= target
    return f"{value:.2f}x {'ok' if ok else 'MISS'}"


def build_rows(results):
    rows = []
    for (model, batch), res in results.items():
        f, l, z = (bc._med_ms(res.get(k)) for k in ("fwd", "onnxlrp", "lxt"))
        ips = (lambda ms: None if ms is None else batch / (ms / 1000.0))
        peak = (lambda k: (res.get(k) or {}).get("peak_rss"))
        mem = peak("onnxlrp") / peak("lxt") if peak("onnxlrp") and peak("lxt") else None
        rows.append([f"{model} ({UNITS[model]})", str(batch), bc._fmt(f, ".1f"), bc._fmt(l, ".1f"), bc._fmt(z, ".1f"),
                     _mark(l / f if f and l else None, TARGETS["ratio"], True),
                     _mark(z / l if z and l else None, TARGETS["speedup"], False),
                     bc._fmt(ips(f), ".2f"), bc._fmt(ips(l), ".2f"), bc._fmt(ips(z), ".2f"),
                     bc._fmt(peak("fwd"), ".0f"), bc._fmt(peak("onnxlrp"), ".0f"), bc._fmt(peak("lxt"), ".0f"),
                     _mark(mem, TARGETS["memory"], True), bc._get(res, "onnxlrp", "setup", spec=".1f")])
    return rows


HEADERS = ["model (unit)", "batch", "ORT fwd ms", "onnxlrp ms", "LXT ms", "onnxlrp/fwd (target <= 3x)",
           "LXT/onnxlrp (target >= 3x)", "fwd unit/s", "onnxlrp unit/s", "LXT unit/s", "fwd peak MiB",
           "onnxlrp peak MiB", "LXT peak MiB", "onnxlrp/LXT peak (target <= 1x)", "onnxlrp construct s"]


def detail_rows(results):
    rows = []
    for (model, batch), res in results.items():
        rows.append([model, str(batch), bc._get(res, "fwd", "setup"), bc._get(res, "onnxlrp", "setup"),
                     bc._get(res, "lxt", "setup"), bc._get(res, "onnxlrp", "first", 1e3, ".0f"),
                     bc._spread(res, "fwd"), bc._spread(res, "onnxlrp"), bc._spread(res, "lxt")]
                    + [bc._get(res, k, f, 1, ".0f") for k in ("onnxlrp", "lxt") for f in ("base_rss", "run_rss")]
                    + [str((res.get("onnxlrp") or {}).get("relevance_nodes", "-"))]
                    + ["/".join(bc._get(res, k, "probe_gflops", 1, ".0f") for k in ("fwd", "onnxlrp", "lxt"))])
    return rows


DETAIL_HEADERS = ["model", "batch", "ORT session s", "onnxlrp construct s", "LXT patch+build s",
                  "onnxlrp 1st call ms", "fwd min-max ms", "onnxlrp min-max ms", "LXT min-max ms",
                  "onnxlrp base MiB", "onnxlrp calls peak MiB", "LXT base MiB", "LXT calls peak MiB",
                  "relevance graph nodes", "probe GFLOPS fwd/onnxlrp/LXT"]


def print_checks(checks):
    print("\nExactness (onnxlrp AttnLRP with normalize_output_relevance=False vs LXT AttnLRP, same weights/inputs; "
          "per-sample relative L2 = |R_onnxlrp - R_lxt| / |R_lxt|, expected <= ~1e-5):")
    for (model, batch), c in checks.items():
        if "error" in c:
            print(f"  {model} b{batch}: ERROR {c['error']}")
            continue
        print(f"  {model} b{batch}: rel L2 max {max(c['rel_l2']):.2e} (per sample "
              f"{', '.join(f'{v:.1e}' for v in c['rel_l2'])}); finite={c['finite']}, same selection="
              f"{c['same_selection']}; logits max|diff| onnxlrp vs torch {c['logits_max_abs_diff']:.1e}, ORT fwd vs "
              f"torch {c['fwd_logits_max_abs_diff']:.1e} (scale {c['logits_scale']:.1e}); sum R / logit: onnxlrp "
              f"{', '.join(f'{v:.3f}' for v in c['conservation_onnxlrp'])}; LXT "
              f"{', '.join(f'{v:.3f}' for v in c['conservation_lxt'])}")
        if "rel_l2_lxt32_vs_lxt64" in c:
            print(f"      vs LXT in float64 (the float32 noise floor): onnxlrp max "
                  f"{max(c['rel_l2_onnxlrp_vs_lxt64']):.2e}, LXT float32 max {max(c['rel_l2_lxt32_vs_lxt64']):.2e} "
                  f"(per sample onnxlrp "
                  f"{', '.join(f'{v:.1e}' for v in c['rel_l2_onnxlrp_vs_lxt64'])}; LXT32 "
                  f"{', '.join(f'{v:.1e}' for v in c['rel_l2_lxt32_vs_lxt64'])}); same selection in float64="
                  f"{c['same_selection64']}")


def report(info, results, checks, profiles, markdown, top):
    bc.print_paired(results, markdown)
    print()
    bc.print_table(HEADERS, build_rows(results), markdown)
    print()
    bc.print_table(DETAIL_HEADERS, detail_rows(results), markdown)
    print("\nlatency = median per call after warmup; unit/s = batch / median latency (img for ViT, seq for BERT). "
          "Each phase runs in its own spawned process: peak MiB = its ru_maxrss (imports + setup + calls); base = "
          "after imports; calls peak = high-water mark during warmup + timed calls (reset via /proc/self/clear_refs). "
          "onnxlrp construct = LRP() + emitting the graph for the input shape + its session; LXT patch+build = "
          "patches + model build + load_state_dict. Setup is excluded from the latencies. probe GFLOPS = numpy "
          "float32 matmul speed in the driver just before each phase (a drop = the machine was busy).")
    print_checks(checks)
    for (model, batch), p in profiles.items():
        if "error" in p:
            print(f"\nORT profile {model} b{batch}: ERROR {p['error']}")
        else:
            bc.print_profile(model, batch, p, top, floor=MATMUL_FLOOR)
    if info.get("loadavg_end"):
        print(f"\nload average (1/5/15 min): {info.get('loadavg')} at the start, {info['loadavg_end']} at the end, "
              f"on {info.get('logical_cpus')} logical CPUs")


def _keyed(d):
    return {(m, int(b)): v for m, b, v in d}


def report_from_json(path, markdown):
    with open(path) as f:
        data = json.load(f)
    bc.print_machine(data["machine"], markdown)
    report(data["machine"], _keyed(data["results"]), _keyed(data["checks"]), _keyed(data["profiles"]), markdown,
           data["args"]["profile_top"])
    return 0


# ------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit,bert")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--repeats-large", type=int, default=4, help="repeats for batches >= 8")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed calls first (onnxruntime's arena still grows, with page faults, in call 2)")
    ap.add_argument("--skip-lxt", action="store_true", help="skip the LXT phase (and the exactness check)")
    ap.add_argument("--skip-paired", action="store_true",
                    help="skip the phase that calls the forward session and onnxlrp in turn in one process")
    ap.add_argument("--no-float64", action="store_true",
                    help="skip the float64 LXT run (after the timing) that gives the check its float32 noise floor")
    ap.add_argument("--profile", action="store_true",
                    help="ORT per-op profile of the relevance graph vs the forward graph")
    ap.add_argument("--profile-batch", type=int, help="batch of the profile (default: the largest)")
    ap.add_argument("--profile-runs", type=int, default=2)
    ap.add_argument("--profile-top", type=int, default=12)
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results to this file")
    ap.add_argument("--from-json", metavar="FILE", help="only re-print the tables of a run saved with --json")
    ap.add_argument("--cache-dir", default=str(HERE / ".cache"))
    args = ap.parse_args(argv)
    if args.from_json:
        return report_from_json(args.from_json, args.markdown)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    unknown = sorted(set(models) - set(MODEL_SEEDS))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {sorted(MODEL_SEEDS)}")
    threads = os.cpu_count()
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)

    info = bc.machine_info()
    info.pop("zennit", None)
    try:
        from importlib.metadata import version
        info.update(transformers=version("transformers"), lxt=version("lxt"))
    except Exception:  # noqa: BLE001
        pass
    info.update(torch_threads=threads, physical_cores=bc.physical_cores(),
                ort_intra_op_threads="default (onnxruntime: one per physical core)")
    bc.print_machine(info, args.markdown)
    print(f"Config: models={models} batches={batches} warmup={args.warmup} repeats={args.repeats} (batches >= 8: "
          f"{args.repeats_large}) (median), onnxlrp AttnLRP, LXT={'skipped' if args.skip_lxt else 'AttnLRP'}")
    sys.stdout.flush()

    paths = {}
    for m in models:
        onnx_path, pt_path = cache_paths(m, cache_dir)
        if not (onnx_path.exists() and pt_path.exists()):
            t0 = time.perf_counter()
            res = bc.run_phase("tf_export", {"model": m, "cache_dir": str(cache_dir)})
            if "error" in res:
                raise SystemExit(f"export of {m} failed: {res['error']}")
            print(f"[{m}] exported {res} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        paths[m] = str(onnx_path)
        print(f"[{m}] onnx: {onnx_path} ({onnx_path.stat().st_size / 2**20:.0f} MiB)", file=sys.stderr)

    results, checks, profiles = {}, {}, {}
    phases = ("fwd", "onnxlrp") + (() if args.skip_lxt else ("lxt",))
    for m in models:
        for b in batches:
            cfg = dict(model=m, batch=b, onnx=paths[m], threads=threads, warmup=args.warmup,
                       repeats=args.repeats_large if b >= 8 else args.repeats, cache_dir=str(cache_dir),
                       float64=not args.no_float64)
            res = {}
            for phase in phases:
                gflops = matmul_gflops()
                t0 = time.perf_counter()
                res[phase] = bc.run_phase("tf_" + phase, cfg)
                res[phase]["probe_gflops"] = gflops
                print(f"[{m} b{b}] {phase}: median {bc._fmt(bc._med_ms(res[phase]), '.1f')} ms "
                      f"(phase wall {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
            if not args.skip_paired:
                res["paired"] = bc.run_paired("tf_paired", cfg, f"{m} b{b}")
            results[(m, b)] = res
            if not args.skip_lxt:
                checks[(m, b)] = compare(m, b, cache_dir)
        if args.profile:
            pb = args.profile_batch or max(batches)
            profiles[(m, pb)] = bc.run_phase("tf_profile", dict(model=m, batch=pb, onnx=paths[m],
                                                                cache_dir=str(cache_dir), warmup=args.warmup,
                                                                profile_runs=args.profile_runs))

    info["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    report(info, results, checks, profiles, args.markdown, args.profile_top)
    if args.json:
        flat = (lambda d: [[m, b, v] for (m, b), v in d.items()])
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "results": flat(results), "checks": flat(checks),
                       "profiles": flat(profiles)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
