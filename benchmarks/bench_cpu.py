#!/usr/bin/env python
"""CPU benchmark: plain onnxruntime forward vs onnxlrp EpsilonGammaBox(-3, 3) vs Zennit, VGG16 / ResNet50.

For every model and batch size (224x224 inputs) these phases are measured:

  fwd      plain onnxruntime forward of the exported .onnx (CPUExecutionProvider, ORT_ENABLE_ALL,
           default intra-op threads)
  onnxlrp  ``onnxlrp.LRP(path, EpsilonGammaBox(-3, 3)).analyze(x)`` (construction = load + canonize +
           emit + session creation, reported separately, not in the per-call latency); ``--composite``
           times another composite (with --skip-zennit); with the cache off: a cold start
  onnxlrp_cached  the same, constructed again from onnxlrp's on-disk cache (an entry written beforehand
           in a temporary folder): the second start's construction time and memory
  zennit   Zennit ``EpsilonGammaBox(low=-3, high=3)`` (ZBox on the first conv, Gamma(0.25) on the other
           convs, Epsilon on Linear, Norm on avgpool and residual sums, Pass on activations; BN merged by
           an exact SequentialMergeBatchNorm, residual adds routed through zennit.layer.Sum; stabilizers as
           onnxlrp's: 1e-9 on Gamma/ZBox, 1e-6 on Norm/Epsilon) on the same weights,
           ``with Gradient(model, composite) as attributor: attributor(x, onehot_of_argmax)``,
           torch.set_num_threads(os.cpu_count())

  paired   the forward session and onnxlrp in one process on the same input, called in turn round
           after round: the ratio of each round's calls, whose median and range make the first table
           (``--skip-paired`` leaves it out). The machine's speed drifts between phases minutes apart;
           calls seconds apart share the drift. Zennit stays in its own process: beside onnxruntime's
           sessions its calls were 6-16 % slower (ResNet50, batch 2), which would flatter onnxlrp.

One driver process runs every phase in a fresh ``multiprocessing`` spawn child, so a phase's peak RSS
(``ru_maxrss``) is its own; the child's RSS after its imports, the high-water mark through setup and the
high-water mark during the calls alone (reset through /proc/self/clear_refs) are reported too.
Latency = median of ``--repeats`` timed calls after ``--warmup`` untimed calls.  Once per model a sanity
check (batch 2) compares the onnxlrp relevance with Zennit's (both gamma variants): finiteness, logits
agreement, per-sample Pearson correlation and sign agreement.

Zennit's ``Gamma`` is the *generalized* gamma rule (5 modified forward passes per conv) while onnxlrp's
``GammaRule`` is the plain one (RelevancePropagation.jl); ``--zennit-gamma plain`` swaps in a plain-gamma
hook (one modified forward per conv, the same semantics as onnxlrp) for a like-for-like comparison.

Usage:
  python benchmarks/bench_cpu.py                                   # vgg16,resnet50 x batch 2,16
  python benchmarks/bench_cpu.py --models resnet50 --batches 2 --repeats 2 --warmup 1
  python benchmarks/bench_cpu.py --markdown                         # Markdown table for the README
  python benchmarks/bench_cpu.py --profile --skip-zennit --batches 2  # + ORT per-op profile

The exported models are cached in benchmarks/.cache/ (``--cache-dir``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import shutil
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(REPO / "scripts"), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

ZBOX_LOW, ZBOX_HIGH = -3.0, 3.0

#: --composite choices for the onnxlrp phases. Zennit is compared with EpsilonGammaBox only; the others show
#: what the rules cost: Zero (LRP(model) alone) and Epsilon reuse the forward pre-activations (two
#: convolution passes per layer), Gamma and ZBox re-run each convolution with modified weights (three).
COMPOSITES = {
    "EpsilonGammaBox": lambda onnxlrp: onnxlrp.EpsilonGammaBox(ZBOX_LOW, ZBOX_HIGH),
    "EpsilonPlus": lambda onnxlrp: onnxlrp.EpsilonPlus(),
    "Epsilon": lambda onnxlrp: onnxlrp.Composite(onnxlrp.GlobalTypeMap({
        "ConvLayer": onnxlrp.EpsilonRule(), "DenseLayer": onnxlrp.EpsilonRule()})),
    "Zero": lambda onnxlrp: None,
}


def _composite(cfg):
    import onnxlrp
    return COMPOSITES[cfg.get("composite", "EpsilonGammaBox")](onnxlrp)
GAMMA = 0.25
EPSILON = 1e-6          # Epsilon on Linear (onnxlrp DEFAULT_EPSILON)
STABILIZER = 1e-9       # Gamma / ZBox (onnxlrp DEFAULT_STABILIZER)
NORM_STABILIZER = 1e-6  # Norm on residual sums / average pools (onnxlrp: Epsilon(1e-6))
INPUT_SEED = 1234


# ------------------------------------------------------------------------------------------------
# helpers shared by the children
# ------------------------------------------------------------------------------------------------
def _maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _reset_peak_rss():
    """Reset the kernel's RSS high-water mark (Linux >= 4.0: echo 5 > /proc/self/clear_refs); after it,
    ru_maxrss / VmHWM report the peak from here on. Returns whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _measure(setup, call, warmup, repeats, base_rss):
    """setup() -> (state, seconds); then time call(state). Peak RSS of setup and of the calls separately."""
    state, setup_s = setup()
    setup_rss = _maxrss_mib()
    reset = _reset_peak_rss()
    times, first = _time_calls(lambda: call(state), warmup, repeats)
    run_rss = _maxrss_mib() if reset else None
    return state, dict(times=times, first=first, setup=setup_s, base_rss=base_rss, setup_rss=setup_rss,
                       run_rss=run_rss, peak_rss=max(setup_rss, run_rss or 0.0))


def make_input(batch):
    import numpy as np
    from models import INPUT_SHAPE
    rng = np.random.default_rng(INPUT_SEED)
    return rng.standard_normal((batch,) + INPUT_SHAPE, dtype=np.float32)


def _time_calls(fn, warmup, repeats):
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    if first is None:
        first = times[0]
    return times, first


def _ort_options(profile_prefix=None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def _ort_session(model, profile_prefix=None):
    import onnxruntime as ort
    return ort.InferenceSession(model, _ort_options(profile_prefix), providers=["CPUExecutionProvider"])


def _import_torch_zennit(threads):
    import torch
    torch.set_num_threads(threads)
    from zennit_compat import import_zennit
    import_zennit()
    return torch


def _zennit_composite(model_name, gamma_variant):
    """zennit's EpsilonGammaBox with onnxlrp's parameters: stabilizer 1e-9 on Gamma/ZBox, Norm(1e-6) on
    residual sums and average pools, Epsilon(1e-6) on Linear, Pass on activations; BN merged exactly."""
    from zennit.composites import EpsilonGammaBox
    from zennit.layer import Sum
    from zennit.rules import Gamma, Norm
    from zennit.types import AvgPool, Convolution
    from models import residual_sum_canonizer

    canonizers = [_exact_merge_batch_norm()]
    if model_name == "resnet50":
        canonizers.append(residual_sum_canonizer())
    if gamma_variant == "generalized":
        conv = Gamma(gamma=GAMMA, stabilizer=STABILIZER)
    else:
        conv = _plain_gamma_hook()
    # layer_map entries are prepended to EpsilonGammaBox's own map, so they win; the first conv gets
    # EpsilonGammaBox's ZBox(low, high, stabilizer)
    layer_map = [(Sum, Norm(stabilizer=NORM_STABILIZER)), (AvgPool, Norm(stabilizer=NORM_STABILIZER)),
                 (Convolution, conv)]
    return EpsilonGammaBox(low=ZBOX_LOW, high=ZBOX_HIGH, epsilon=EPSILON, gamma=GAMMA, stabilizer=STABILIZER,
                           layer_map=layer_map, canonizers=canonizers)


def _exact_merge_batch_norm():
    """SequentialMergeBatchNorm whose neutralised BN is exactly the identity (zennit leaves a factor
    1/sqrt(1 + eps) per BN, which the ill-conditioned plain gamma rule on ResNet50 amplifies into
    uncorrelated relevances -- same cost, so it does not change the timing)."""
    import torch
    from zennit.canonizers import SequentialMergeBatchNorm

    class ExactSequentialMergeBatchNorm(SequentialMergeBatchNorm):
        @staticmethod
        def merge_batch_norm(modules, batch_norm):
            SequentialMergeBatchNorm.merge_batch_norm(modules, batch_norm)
            batch_norm.running_var.data = torch.ones_like(batch_norm.running_var.data) - batch_norm.eps

    return ExactSequentialMergeBatchNorm()


def _plain_gamma_hook():
    """Plain gamma (onnxlrp / RelevancePropagation.jl): R_in = a * Wg^T (R_out / stab(Wg a + bg))."""
    from zennit.core import BasicHook, Stabilizer
    from zennit.rules import GammaMod
    stab = Stabilizer.ensure(STABILIZER)
    return BasicHook(
        input_modifiers=[lambda input: input],
        param_modifiers=[GammaMod(GAMMA, min=0.)],
        output_modifiers=[lambda output: output],
        gradient_mapper=(lambda out_grad, outputs: out_grad / stab(outputs[0])),
        reducer=(lambda inputs, gradients: inputs[0] * gradients[0]),
    )


def _onehot_of_argmax(out):
    import torch
    return torch.nn.functional.one_hot(out.argmax(1), out.shape[1]).to(out.dtype)


# ------------------------------------------------------------------------------------------------
# phases (each runs in its own spawn child)
# ------------------------------------------------------------------------------------------------
def phase_fwd(cfg):
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    base = _maxrss_mib()
    x = make_input(cfg["batch"])

    def setup():
        t0 = time.perf_counter()
        sess = _ort_session(cfg["onnx"])
        return (sess, {sess.get_inputs()[0].name: x}), time.perf_counter() - t0

    _, res = _measure(setup, lambda st: st[0].run(None, st[1]), cfg["warmup"], cfg["repeats"], base)
    return res


def phase_onnxlrp(cfg):
    import onnxlrp
    base = _maxrss_mib()
    x = make_input(cfg["batch"])

    def setup():  # load + canonize + emit the relevance graph + create its session (no cache: a cold start)
        t0 = time.perf_counter()
        analyzer = onnxlrp.LRP(cfg["onnx"], _composite(cfg), verbose=False, device="cpu", cache=False)
        return analyzer, time.perf_counter() - t0

    analyzer, res = _measure(setup, lambda an: an.analyze(x), cfg["warmup"], cfg["repeats"], base)
    res["relevance_nodes"] = len(analyzer.relevance_model.graph.node)
    res["construction_phases"] = {k: round(v, 2) for k, v in analyzer.construction_times.items()}
    return res


def phase_onnxlrp_cached(cfg):
    """onnxlrp constructed a second time: the relevance graph from onnxlrp's cache (written beforehand in
    another process, outside the timing), then the same calls."""
    import onnxlrp
    base = _maxrss_mib()
    x = make_input(cfg["batch"])

    def setup():
        t0 = time.perf_counter()
        analyzer = onnxlrp.LRP(cfg["onnx"], _composite(cfg), verbose=False, device="cpu", cache=cfg["lrp_cache"])
        return analyzer, time.perf_counter() - t0

    analyzer, res = _measure(setup, lambda an: an.analyze(x), cfg["warmup"], cfg["repeats"], base)
    res["cache_status"] = analyzer.cache_status
    return res


def phase_write_cache(cfg):
    import onnxlrp
    analyzer = onnxlrp.LRP(cfg["onnx"], _composite(cfg), verbose=False, device="cpu", cache=cfg["lrp_cache"])
    for pending in analyzer._cache_writes:
        pending.wait()
    return {"cache_status": analyzer.cache_status}


def phase_zennit(cfg):
    torch = _import_torch_zennit(cfg["threads"])
    from zennit.attribution import Gradient
    from models import build_model
    base = _maxrss_mib()
    x = torch.from_numpy(make_input(cfg["batch"]))
    model = build_model(cfg["model"])
    attributor = Gradient(model, _zennit_composite(cfg["model"], cfg["zennit_gamma"]))

    def setup():  # canonize (merge BN, residual Sum modules) + register the rule hooks
        t0 = time.perf_counter()
        attributor.__enter__()
        return attributor, time.perf_counter() - t0

    try:
        _, res = _measure(setup, lambda at: at(x, _onehot_of_argmax), cfg["warmup"], cfg["repeats"], base)
    finally:
        attributor.__exit__(None, None, None)
    return res


#: seconds between two calls in the paired phase: onnxruntime's threads spin for a while after a run, and
#: would take the cores from the start of the other session's run
PAIR_GAP_S = 0.1


def phase_paired(cfg):
    """The ratio in one process: the plain forward session and onnxlrp (built without the cache) on the same
    input, called in turn: ``warmup`` rounds, then ``repeats`` timed rounds of one call each. This shared
    machine's speed drifts (ResNet50's forward pass took 42 ms in one phase and 86 ms in another minutes
    later); calls seconds apart share the drift, so each round gives its own ratio. Beside onnxlrp's
    session, the forward pass was 1-5 % slower than alone. No memory figures: the sessions share the
    process."""
    import onnxlrp
    x = make_input(cfg["batch"])
    sess = _ort_session(cfg["onnx"])
    feeds = {sess.get_inputs()[0].name: x}
    analyzer = onnxlrp.LRP(cfg["onnx"], _composite(cfg), verbose=False, device="cpu", cache=False)
    return {"times": calls_in_turn({"fwd": lambda: sess.run(None, feeds), "onnxlrp": lambda: analyzer.analyze(x)},
                                   cfg["warmup"], cfg["repeats"])}


def calls_in_turn(calls, warmup, repeats):
    """{name: seconds of each timed call}: ``calls`` (name -> function) called in turn, one call each per
    round, a pause before each; ``warmup`` untimed rounds, then ``repeats`` timed ones."""
    times = {k: [] for k in calls}
    for r in range(warmup + repeats):
        for name, call in calls.items():
            time.sleep(PAIR_GAP_S)
            t0 = time.perf_counter()
            call()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def phase_sanity(cfg):
    """onnxlrp vs Zennit relevances on one batch: finiteness, logits agreement, correlations."""
    import numpy as np
    import onnxlrp
    torch = _import_torch_zennit(cfg["threads"])
    from zennit.attribution import Gradient
    from models import build_model
    x = make_input(cfg["batch"])
    expl = onnxlrp.LRP(cfg["onnx"], onnxlrp.EpsilonGammaBox(ZBOX_LOW, ZBOX_HIGH), verbose=False,
                       device="cpu").analyze(x)
    r_lrp = np.asarray(expl.val, dtype=np.float64)
    out = {"onnxlrp_finite": bool(np.isfinite(r_lrp).all()),
           "selection": np.asarray(expl.output_selection).tolist()}
    model = build_model(cfg["model"])
    with torch.no_grad():
        logits_t = model(torch.from_numpy(x)).numpy()
    logits_o = np.asarray(expl.output)
    out["logits_max_abs_diff"] = float(np.abs(logits_t - logits_o).max())
    out["logits_scale"] = float(np.abs(logits_t).max())
    out["same_argmax"] = bool((logits_t.argmax(1) == logits_o.argmax(1)).all())
    out["conservation_onnxlrp"] = r_lrp.reshape(len(x), -1).sum(1).tolist()
    for variant in cfg["variants"]:
        model = build_model(cfg["model"])
        with Gradient(model, _zennit_composite(cfg["model"], variant)) as attributor:
            _, rel = attributor(torch.from_numpy(x), _onehot_of_argmax)
        r_z = rel.detach().double().numpy()
        a, b = r_lrp.reshape(len(x), -1), r_z.reshape(len(x), -1)
        corr = [float(np.corrcoef(a[i], b[i])[0, 1]) for i in range(len(x))]
        nz = (a != 0) | (b != 0)
        sign = [float((np.sign(a[i]) == np.sign(b[i]))[nz[i]].mean()) for i in range(len(x))]
        out[variant] = dict(finite=bool(np.isfinite(r_z).all()), pearson=corr, sign_agreement=sign,
                            conservation=b.sum(1).tolist(),
                            max_rel_diff=float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)))
    return out


def phase_profile(cfg):
    """ORT per-op profile of the emitted relevance graph vs the plain forward graph."""
    import numpy as np
    import onnxlrp
    x = make_input(cfg["batch"])
    analyzer = onnxlrp.LRP(cfg["onnx"], _composite(cfg), verbose=False, device="cpu")
    # the emitted graph's extra inputs (see onnxlrp/rewriter.py): -1 = explain each sample's top output
    feeds_rel = {analyzer.data_input: x, "output_selection": np.full(len(x), -1, dtype=np.int64),
                 "normalize_output_relevance": np.asarray(True)}
    rel_bytes = analyzer.relevance_model.SerializeToString()
    del analyzer
    return profile_sessions([("forward", cfg["onnx"], lambda sess: {sess.get_inputs()[0].name: x}),
                             ("relevance", rel_bytes, feeds_rel)], cfg["profile_runs"], cfg["cache_dir"])


def profile_sessions(cases, runs, tmp_parent, warmup=1):
    """ORT per-op profile of each ``(key, model, feeds)`` case (feeds: a dict, or a function of the
    session returning one): ``warmup`` runs, then ``runs`` profiled runs, the cases' runs taken in turn
    (one of each, a pause, again), so that the machine's drift reaches every case alike;
    {key: _summarize_profile}."""
    result, sessions = {}, {}
    tmp = tempfile.mkdtemp(prefix="onnxlrp_prof_", dir=tmp_parent)
    for key, model, feeds in cases:
        sess = _ort_session(model, profile_prefix=os.path.join(tmp, key))
        sessions[key] = (sess, feeds(sess) if callable(feeds) else feeds)
    # the warm-up runs are profiled too; _summarize_profile drops them
    calls_in_turn({key: (lambda s=sess, f=feeds: s.run(None, f)) for key, (sess, feeds) in sessions.items()},
                  0, warmup + runs)
    for key, (sess, _) in sessions.items():
        prof = sess.end_profiling()
        with open(prof) as f:
            events = json.load(f)
        result[key] = _summarize_profile(events, runs)
        os.remove(prof)
    sessions.clear()
    os.rmdir(tmp)
    return result


def _summarize_profile(events, runs):
    """Per-op-type and per-node kernel time (ms) of the last ``runs`` model_run events: the median over the
    runs, and each run's per-op times (``per_run``)."""
    keep = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[-runs:]
    per_run = [defaultdict(float) for _ in keep]
    per_run_nodes = [defaultdict(float) for _ in keep]
    per_run_origin = [defaultdict(float) for _ in keep]
    node_info = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = next((i for i, r in enumerate(keep) if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]), None)
        if i is None:
            continue
        op = e.get("args", {}).get("op_name", "?")
        node = e["name"][: -len("_kernel_time")]
        ms = e["dur"] / 1000.0
        per_run[i][op] += ms
        per_run_nodes[i][node] += ms
        per_run_origin[i]["lrp (emitted)" if node.startswith("lrp/") else "original"] += ms
        if node not in node_info:
            shapes = e.get("args", {}).get("output_type_shape") or []
            shape = next((list(d.values())[0] for d in shapes if isinstance(d, dict) and d), None)
            node_info[node] = (op, shape)

    def median_of(dicts):
        return {k: statistics.median(d.get(k, 0.0) for d in dicts) for k in set().union(*dicts)}

    by_op, by_node = median_of(per_run), median_of(per_run_nodes)
    top_nodes = [(n, node_info[n][0], node_info[n][1], ms) for n, ms in sorted(by_node.items(), key=lambda kv: -kv[1])]
    return dict(run_ms=statistics.median(e["dur"] for e in keep) / 1000.0,
                kernel_ms=statistics.median(sum(d.values()) for d in per_run), nodes=len(node_info),
                by_op=sorted(by_op.items(), key=lambda kv: -kv[1]), by_origin=median_of(per_run_origin),
                top_nodes=top_nodes, per_run=[dict(d) for d in per_run])


PHASES = {"fwd": phase_fwd, "onnxlrp": phase_onnxlrp, "onnxlrp_cached": phase_onnxlrp_cached,
          "write_cache": phase_write_cache, "zennit": phase_zennit, "sanity": phase_sanity,
          "profile": phase_profile, "paired": phase_paired}


def _child(phase, cfg, conn):
    try:
        conn.send(("ok", PHASES[phase](cfg)))
    except BaseException as exc:  # noqa: BLE001 -- report everything to the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_phase(phase, cfg):
    """Run one phase in a fresh spawn child; returns its result dict (or {'error': ...})."""
    # The kernel writes dirty pages back some 30 s after they were written: the cache entry a phase wrote
    # (hundreds of MB) took the cores from a later phase (ResNet50's forward pass: 86 instead of 42 ms).
    os.sync()
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(phase, cfg, child))
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        status, payload = "error", "child died without a result"
    proc.join()
    if status == "error" or proc.exitcode not in (0, None):
        msg = payload if status == "error" else f"exit code {proc.exitcode}"
        if proc.exitcode and proc.exitcode < 0:
            msg += f" (killed by signal {-proc.exitcode}; out of memory?)"
        print(f"  [{phase}] FAILED: {msg}", file=sys.stderr)
        return {"error": msg.splitlines()[0] if msg else "failed"}
    return payload


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
def machine_info():
    import numpy
    import onnxruntime
    info = {}
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu"] = cpu
    info["logical_cpus"] = os.cpu_count()
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        mem_kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
        info["memory_gib"] = round(mem_kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        info["loadavg"] = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        pass
    info["python"] = platform.python_version()
    info["platform"] = platform.platform()
    info["onnxruntime"] = onnxruntime.__version__
    info["numpy"] = numpy.__version__
    try:
        from importlib.metadata import version
        info["torch"] = version("torch")
        info["zennit"] = version("zennit")
        info["onnx"] = version("onnx")
    except Exception:  # noqa: BLE001
        pass
    info["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return info


def physical_cores():
    cores, phys, core = set(), None, None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
            elif not line.strip():
                cores.add((phys, core))
    except OSError:
        return None
    return len(cores) or None


def _med_ms(r):
    return statistics.median(r["times"]) * 1000.0 if r and "times" in r else None


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def build_rows(results):
    rows = []
    for (model, batch), res in results.items():
        f, l, z = (_med_ms(res.get(k)) for k in ("fwd", "onnxlrp", "zennit"))
        ips = (lambda ms: None if ms is None else batch / (ms / 1000.0))
        peak = (lambda k: res.get(k, {}).get("peak_rss"))
        rows.append([
            model, str(batch), _fmt(f, ".1f"), _fmt(l, ".1f"), _fmt(z, ".1f"),
            _fmt(None if f is None or l is None else l / f, ".2f") + ("x" if f and l else ""),
            _fmt(None if z is None or l is None else z / l, ".2f") + ("x" if z and l else ""),
            _fmt(ips(f), ".1f"), _fmt(ips(l), ".1f"), _fmt(ips(z), ".1f"),
            _fmt(peak("fwd"), ".0f"), _fmt(peak("onnxlrp"), ".0f"), _fmt(peak("zennit"), ".0f"),
        ])
    return rows


HEADERS = ["model", "batch", "ORT fwd ms", "onnxlrp ms", "zennit ms", "onnxlrp/fwd", "speedup vs zennit",
           "fwd img/s", "onnxlrp img/s", "zennit img/s", "fwd peak MiB", "onnxlrp peak MiB",
           "zennit peak MiB"]


def _ratios(times, num, den):
    """'median (min-max)' of the per-round ratios times[num] / times[den]."""
    if num not in times or den not in times:
        return "-"
    rs = [a / b for a, b in zip(times[num], times[den])]
    return f"{statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})"


def paired_rows(results):
    rows = []
    for (model, batch), res in results.items():
        t = (res.get("paired") or {}).get("times")
        if not t:
            continue
        med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        rows.append([model, str(batch), str(len(t["fwd"])), _fmt(med.get("fwd"), ".1f"),
                     _fmt(med.get("onnxlrp"), ".1f"), _ratios(t, "onnxlrp", "fwd")])
    return rows


PAIRED_HEADERS = ["model", "batch", "rounds", "ORT fwd ms", "onnxlrp ms", "onnxlrp/fwd (min-max)"]


def run_paired(phase, cfg, label):
    """The one-process phase ``phase`` (bench_cpu's or bench_transformers' paired phase), its line on stderr."""
    t0 = time.perf_counter()
    res = run_phase(phase, cfg)
    print(f"[{label}] paired: " + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms"
                                           for k, v in res.get("times", {}).items())
          + f", {_ratios(res.get('times', {}), 'onnxlrp', 'fwd')} (phase wall {time.perf_counter() - t0:.1f} s)",
          file=sys.stderr)
    return res


def print_paired(results, markdown):
    """The one-process table, first, when the run has one."""
    paired = paired_rows(results)
    if paired:
        print("\nIn one process (the forward session and onnxlrp called in turn, round after round; the ratio of "
              "each round's calls, median and range over the rounds):")
        print_table(PAIRED_HEADERS, paired, markdown)
        print("\nEach engine in its own process (its peak memory its own):")


def _get(res, k, field, scale=1.0, spec=".2f"):
    r = res.get(k) or {}
    return _fmt(r[field] * scale if r.get(field) is not None else None, spec)


def _spread(res, k):
    r = res.get(k) or {}
    if "times" not in r:
        return "-"
    return f"{min(r['times']) * 1e3:.0f}-{max(r['times']) * 1e3:.0f}"


def setup_rows(results):
    return [[model, str(batch), _get(res, "fwd", "setup"), _get(res, "onnxlrp", "setup"),
             _get(res, "onnxlrp_cached", "setup"), _get(res, "zennit", "setup", spec=".3f"), _get(res, "onnxlrp", "first", 1e3, ".0f"),
             _spread(res, "fwd"), _spread(res, "onnxlrp"), _spread(res, "zennit")]
            for (model, batch), res in results.items()]


SETUP_HEADERS = ["model", "batch", "ORT session s", "onnxlrp construct s", "onnxlrp cached construct s",
                 "zennit register s",
                 "onnxlrp 1st call ms", "fwd min-max ms", "onnxlrp min-max ms", "zennit min-max ms"]


def memory_rows(results):
    rows = []
    for (model, batch), res in results.items():
        row = [model, str(batch)]
        for k in ("fwd", "onnxlrp", "onnxlrp_cached", "zennit"):
            row += [_get(res, k, f, 1, ".0f") for f in ("base_rss", "setup_rss", "run_rss")]
        rows.append(row)
    return rows


MEMORY_HEADERS = ["model", "batch"] + [f"{k} {f} MiB" for k in ("fwd", "onnxlrp", "onnxlrp_cached", "zennit")
                                       for f in ("base", "setup peak", "calls peak")]


def print_table(headers, rows, markdown):
    if markdown:
        print("| " + " | ".join(headers) + " |")
        print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(headers))) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) if i >= 2 else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


#: ops whose time bounds the relevance graph from below in --profile (VGG16 / ResNet50: convolutions)
CONV_FLOOR = (("Conv", "ConvTranspose"), "convolutions")


def print_profile(model, batch, prof, top, floor=CONV_FLOOR):
    print(f"\nORT profile, {model}, batch {batch} (kernel ms per run, CPU provider):")
    for key in ("forward", "relevance"):
        p = prof.get(key)
        if not p:
            continue
        print(f"  {key}: model_run {p['run_ms']:.1f} ms, kernels {p['kernel_ms']:.1f} ms, {p['nodes']} nodes"
              + (f"; by origin: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(p['by_origin'].items()))
                 if key == "relevance" else ""))
        for op, ms in p["by_op"][:top]:
            print(f"      {op:<28} {ms:9.1f} ms  {100 * ms / max(p['kernel_ms'], 1e-9):5.1f}%")
        print(f"    top {top} nodes:")
        for node, op, shape, ms in p["top_nodes"][:top]:
            print(f"      {ms:9.1f} ms  {op:<18} {str(shape):<22} {node}")
    fwd, rel = prof.get("forward"), prof.get("relevance")
    if fwd and rel:
        # No graph of plain ONNX ops can be faster than its convolutions at forward-pass efficiency.
        conv = sum(ms for op, ms in rel["by_op"] if op in floor[0])
        line = (f"  floor: the relevance graph's {floor[1]} alone take {conv:.1f} ms = "
                f"{conv / fwd['kernel_ms']:.2f}x the whole forward pass; all other ops "
                f"{rel['kernel_ms'] - conv:.1f} ms = {(rel['kernel_ms'] - conv) / fwd['kernel_ms']:.2f}x")
        runs = list(zip(fwd.get("per_run", []), rel.get("per_run", [])))
        if runs:  # each round's relevance run over the forward run beside it
            ratios = [sum(ms for op, ms in r.items() if op in floor[0]) / sum(f.values()) for f, r in runs]
            line += f" (medians of {len(runs)} runs; {floor[1]} per round {min(ratios):.2f}-{max(ratios):.2f}x)"
        print(line)


def report(info, results, sanity, profiles, markdown, profile_batch, profile_top):
    print_paired(results, markdown)
    print()
    print_table(HEADERS, build_rows(results), markdown)
    print()
    print_table(SETUP_HEADERS, setup_rows(results), markdown)
    print()
    print_table(MEMORY_HEADERS, memory_rows(results), markdown)
    print("\nonnxlrp construction phases (s): " + "; ".join(
        f"{m} b{b}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["onnxlrp"].get("construction_phases", {}).items())
        for (m, b), r in results.items() if isinstance(r.get("onnxlrp"), dict)))
    print("\nlatency = median per call after warmup; img/s = batch / median latency. Each phase runs in its own "
          "spawned process: peak MiB = its ru_maxrss (whole phase); base = after imports; setup peak = high-water "
          "mark through setup (ORT: session creation; onnxlrp: load + canonize + emit + session; zennit: model "
          "build + canonizers + hooks); calls peak = high-water mark during warmup + timed calls only (reset via "
          "/proc/self/clear_refs; includes the resident model). Setup is excluded from the latencies.")

    if sanity:
        print("\nSanity (batch 2, onnxlrp EpsilonGammaBox vs Zennit on the same weights):")
        for m, s in sanity.items():
            if "error" in s:
                print(f"  {m}: ERROR {s['error']}")
                continue
            print(f"  {m}: onnxlrp finite={s['onnxlrp_finite']}, logits max|diff| ORT vs torch "
                  f"{s['logits_max_abs_diff']:.2e} (scale {s['logits_scale']:.2e}), same argmax={s['same_argmax']}")
            for v in ("generalized", "plain"):
                if v in s:
                    r = s[v]
                    print(f"    zennit {v:<11} gamma: finite={r['finite']}, pearson per sample "
                          f"{', '.join(f'{c:.4f}' for c in r['pearson'])}, sign agreement "
                          f"{', '.join(f'{c:.3f}' for c in r['sign_agreement'])}, max|diff|/max|R| "
                          f"{r['max_rel_diff']:.2e}")
    for m, p in profiles.items():
        if "error" in p:
            print(f"\nORT profile {m}: ERROR {p['error']}")
        else:
            print_profile(m, profile_batch, p, profile_top)
    if info.get("loadavg_end"):
        print(f"\nload average (1/5/15 min): {info.get('loadavg')} at the start, {info['loadavg_end']} at the end, "
              f"on {info.get('logical_cpus')} logical CPUs")


def print_machine(info, markdown):
    if markdown:
        print("**Machine:** " + ", ".join(f"{k}={v}" for k, v in info.items()) + "\n")
    else:
        print("Machine:")
        for k, v in info.items():
            print(f"  {k:<22} {v}")


def report_from_json(path, markdown):
    """Re-print the tables of a run saved with --json (e.g. as Markdown for the README)."""
    with open(path) as f:
        data = json.load(f)
    a = data["args"]
    print_machine(data["machine"], markdown)
    print(f"Config: models={a['models']} batches={a['batches']} warmup={a['warmup']} repeats={a['repeats']} "
          f"(median), zennit={'skipped' if a['skip_zennit'] else a['zennit_gamma'] + ' gamma'}, input 3x224x224")
    results = {(r["model"], r["batch"]): r for r in data["results"]}
    batches = [int(b) for b in a["batches"].split(",") if b.strip()]
    report(data["machine"], results, data["sanity"], data["profiles"], markdown, min(batches), a["profile_top"])
    return 0


# ------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vgg16,resnet50")
    ap.add_argument("--batches", default="2,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--skip-zennit", action="store_true", help="skip the Zennit phase and sanity check")
    ap.add_argument("--skip-sanity", action="store_true", help="skip the onnxlrp-vs-Zennit sanity check")
    ap.add_argument("--skip-paired", action="store_true",
                    help="skip the phase that calls the forward session and onnxlrp in turn in one process")
    ap.add_argument("--zennit-gamma", choices=["generalized", "plain"], default="generalized",
                    help="zennit's (generalized) Gamma rule, or a plain-gamma hook matching onnxlrp's GammaRule")
    ap.add_argument("--composite", choices=list(COMPOSITES), default="EpsilonGammaBox",
                    help="onnxlrp's composite (Zennit runs EpsilonGammaBox only, so other choices need "
                         "--skip-zennit)")
    ap.add_argument("--profile", action="store_true",
                    help="ORT per-op profile of the relevance graph vs the forward graph (smallest batch)")
    ap.add_argument("--profile-runs", type=int, default=5)
    ap.add_argument("--profile-top", type=int, default=10)
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results to this file")
    ap.add_argument("--cache-dir", default=str(HERE / ".cache"))
    ap.add_argument("--from-json", metavar="FILE", help="only re-print the tables of a run saved with --json")
    args = ap.parse_args(argv)
    if args.from_json:
        return report_from_json(args.from_json, args.markdown)
    if args.composite != "EpsilonGammaBox" and not args.skip_zennit:
        ap.error(f"Zennit is compared with EpsilonGammaBox only: add --skip-zennit to time {args.composite}")

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    threads = os.cpu_count()
    cache_dir = Path(args.cache_dir)

    info = machine_info()
    info["torch_threads"] = threads
    info["physical_cores"] = physical_cores()
    info["ort_intra_op_threads"] = "default (onnxruntime: one per physical core)"
    print_machine(info, args.markdown)
    print(f"Config: models={models} batches={batches} warmup={args.warmup} repeats={args.repeats} "
          f"(median), onnxlrp composite={args.composite}, "
          f"zennit={'skipped' if args.skip_zennit else args.zennit_gamma + ' gamma'}, input 3x224x224")
    sys.stdout.flush()

    # export (in a child as well, so that this process stays small and torch-free)
    paths = {}
    for m in models:
        t0 = time.perf_counter()
        res = run_phase_export(m, cache_dir)
        paths[m] = res
        print(f"[{m}] onnx: {res} ({os.path.getsize(res) / 2**20:.0f} MiB, {time.perf_counter() - t0:.1f} s)",
              file=sys.stderr)

    results, sanity, profiles = {}, {}, {}
    for m in models:
        base = dict(model=m, onnx=str(paths[m]), threads=threads, warmup=args.warmup, repeats=args.repeats,
                    zennit_gamma=args.zennit_gamma, cache_dir=str(cache_dir), composite=args.composite,
                    lrp_cache=tempfile.mkdtemp(prefix="onnxlrp_bench_cache_"))
        run_phase("write_cache", base)  # the entry the cached phase reads (the input shape is the model's)
        if not args.skip_zennit and not args.skip_sanity:
            variants = ["generalized", "plain"]
            sanity[m] = run_phase("sanity", dict(base, batch=2, variants=variants))
            print(f"[{m}] sanity: {json.dumps(sanity[m])}", file=sys.stderr)
        for b in batches:
            cfg = dict(base, batch=b)
            res = {}
            for phase in ("fwd", "onnxlrp", "onnxlrp_cached") + (() if args.skip_zennit else ("zennit",)):
                t0 = time.perf_counter()
                res[phase] = run_phase(phase, cfg)
                print(f"[{m} b{b}] {phase}: median {_fmt(_med_ms(res[phase]), '.1f')} ms "
                      f"(phase wall {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
            if not args.skip_paired:
                res["paired"] = run_paired("paired", cfg, f"{m} b{b}")
            results[(m, b)] = res
        if args.profile:
            profiles[m] = run_phase("profile", dict(base, batch=min(batches), profile_runs=args.profile_runs))
        shutil.rmtree(base["lrp_cache"], ignore_errors=True)

    info["loadavg_end"] = " ".join(open("/proc/loadavg").read().split()[:3])
    report(info, results, sanity, profiles, args.markdown, min(batches), args.profile_top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args),
                       "results": [{"model": m, "batch": b, **r} for (m, b), r in results.items()],
                       "sanity": sanity, "profiles": profiles}, f, indent=1)
    return 0


def _export(cfg):
    from models import export_onnx
    return str(export_onnx(cfg["model"], cfg["cache_dir"]))


PHASES["export"] = _export


def run_phase_export(model, cache_dir):
    path = Path(cache_dir) / f"{model}.onnx"
    if path.exists():
        return path
    res = run_phase("export", {"model": model, "cache_dir": str(cache_dir)})
    if isinstance(res, dict):
        raise SystemExit(f"export of {model} failed: {res.get('error')}")
    return Path(res)


if __name__ == "__main__":
    sys.exit(main())
