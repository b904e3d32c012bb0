"""Drift: an audit against a stored earlier one (``regression``) and two exports against each other (``compare``).

A baseline is one JSON file that CI keeps next to the model: the audit's report (each check's status and
figures), the inputs it ran on, the explained outputs, the selected classes and the relevance (each array
zlib-compressed and base64-encoded, so that the file stays one diffable, greppable document), and a
fingerprint of every layer's parameters. A later audit runs on the baseline's inputs and explains the
baseline's classes, so that what moved is the model or the runtime, never the inputs.

Both checks compare (output, relevance) pairs the same way, per sample:
- the outputs' largest difference relative to the largest output (``drift_output_rtol``),
- the relevance's relative L2 distance (``drift_rtol``),
- the overlap of the most relevant 1 % of the input features (``drift_topk_overlap``): a map can keep its L2
  distance small and still move its few hottest pixels, which are what a person reads in a heatmap.

A baseline is read like any file from a stranger: its size is bounded, every array's dtype and shape are
checked, and no array decompresses to more than its declared shape holds.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import zlib

import numpy as np

from ..errors import InputError

FORMAT = "onnxlrp-audit-baseline"
FORMAT_VERSION = 1
#: A baseline file above this size is refused before it is parsed (a 224x224 RGB batch of 4 takes ~7 MB).
MAX_BASELINE_BYTES = 256 << 20
#: Fraction of the input features compared by the top-k overlap (at least one feature).
TOPK_FRACTION = 0.01
_DTYPES = ("float16", "float32", "float64", "int32", "int64", "uint8", "bool")


class BaselineError(InputError):
    """A baseline file that cannot be used: missing, not a baseline, damaged, or made for other inputs."""


# -- arrays in JSON -------------------------------------------------------------------------------------------
def encode_array(a) -> dict:
    a = np.ascontiguousarray(a)
    if a.dtype.name not in _DTYPES:
        raise TypeError(f"cannot store a {a.dtype} array in a baseline (one of {', '.join(_DTYPES)})")
    raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    return {"dtype": a.dtype.name, "shape": list(a.shape),
            "zlib_base64": base64.b64encode(zlib.compress(raw, 6)).decode("ascii")}


def decode_array(obj, what, path) -> np.ndarray:
    """The array ``obj`` describes; BaselineError naming ``what`` when it is not a well-formed one."""
    def bad(why):
        return BaselineError(f"{path}: {what}: {why}")
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "zlib_base64"}:
        raise bad("not an encoded array (dtype, shape, zlib_base64)")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["zlib_base64"]
    if dtype not in _DTYPES:
        raise bad(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 31
                                              for d in shape):
        raise bad(f"shape {shape!r} is not a list of dims")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if expected > MAX_BASELINE_BYTES * 8:
        raise bad(f"shape {shape} declares {expected / 2 ** 30:.1f} GiB")
    if not isinstance(data, str):
        raise bad("zlib_base64 is not a string")
    try:
        packed = base64.b64decode(data, validate=True)
        inflate = zlib.decompressobj()
        raw = inflate.decompress(packed, expected + 1)  # never more than the shape holds, plus one to tell
    except (ValueError, zlib.error) as exc:
        raise bad(f"damaged data ({exc})") from None
    if len(raw) != expected or not inflate.eof or inflate.unconsumed_tail:
        raise bad(f"the data does not hold a {dtype} array of shape {tuple(shape)}")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).astype(dtype)


# -- what a baseline holds ------------------------------------------------------------------------------------
def layer_fingerprints(analyzer) -> list:
    """Per layer of the canonized model: index, name, op, its rule and a hash of its parameters (the constant
    operands of its nodes, after canonization, so a fused BatchNorm counts in its convolution)."""
    import onnx_graphsurgeon as gs
    out = []
    for layer, rule in zip(analyzer.layers, analyzer.rules):
        digest = hashlib.sha256()
        for node in layer.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    values = np.ascontiguousarray(np.asarray(t.values))
                    digest.update(f"{values.dtype.str}{values.shape}".encode())
                    digest.update(values.tobytes())
        out.append({"index": layer.index, "name": layer.name, "op": layer.op_type,
                    "params": digest.hexdigest()[:16], "rule": repr(rule)})
    return out


def _file_sha256(model):
    if isinstance(model, (str, os.PathLike)) and os.path.isfile(model):
        digest = hashlib.sha256()
        with open(model, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    return None


def baseline_document(report) -> dict:
    """The JSON document of a baseline made from ``report`` (an AuditReport with its ``data``)."""
    from .. import __version__
    data = report.data
    arrays = {"inputs": data["inputs"], "output": data["output"], "output_selection": data["output_selection"],
              "relevance": data["relevance"]}
    arrays.update({f"other_input:{k}": v for k, v in data.get("other_inputs", {}).items()})
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "onnxlrp": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": report.model, "model_sha256": data.get("model_sha256"), "rules": report.rules,
            "inputs_description": report.inputs, "layers": data.get("layers", []),
            "report": report.to_dict(), "arrays": {k: encode_array(np.asarray(v)) for k, v in arrays.items()}}


def save_baseline(report, path):
    from ..files import atomic_write
    text = json.dumps(baseline_document(report), indent=1, allow_nan=False)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


class Baseline:
    """A loaded baseline: ``inputs``, ``other_inputs``, ``output``, ``output_selection``, ``relevance``,
    ``layers``, ``rules``, ``report`` (the earlier report's dict) and ``path``."""

    def __init__(self, path, doc):
        self.path, self.doc = str(path), doc
        arrays = doc["arrays"]
        for key in ("inputs", "output", "output_selection", "relevance"):
            if key not in arrays:
                raise BaselineError(f"{path}: has no '{key}' array")
        decoded = {k: decode_array(v, f"array '{k}'", path) for k, v in arrays.items()}
        self.inputs, self.output = decoded["inputs"], decoded["output"]
        self.output_selection, self.relevance = decoded["output_selection"].astype(np.int64), decoded["relevance"]
        self.other_inputs = {k.split(":", 1)[1]: v for k, v in decoded.items() if k.startswith("other_input:")}
        n = len(self.inputs)
        if not (len(self.output) == len(self.output_selection) == len(self.relevance) == n):
            raise BaselineError(f"{path}: its arrays disagree on the number of samples")
        self.rules = doc.get("rules")
        self.layers = doc.get("layers") or []
        self.report = doc.get("report") or {}

    def describe(self):
        made = self.doc.get("created", "an unknown date")
        return f"{os.path.basename(self.path)} ({made}, onnxlrp {self.doc.get('onnxlrp', '?')})"


def load_baseline(path) -> Baseline:
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise BaselineError(f"{path}: no such baseline; write one with --update-baseline (Python: "
                            "report.save_baseline(path))")
    if not os.path.isfile(path):
        raise BaselineError(f"{path}: is not a file")
    size = os.path.getsize(path)
    if size > MAX_BASELINE_BYTES:
        raise BaselineError(f"{path}: {size / 2 ** 20:.0f} MiB, above the {MAX_BASELINE_BYTES >> 20} MiB a "
                            "baseline may take (audit fewer or smaller inputs)")
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BaselineError(f"{path}: not an onnxlrp audit baseline (not JSON: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BaselineError(f"{path}: not an onnxlrp audit baseline (no \"format\": \"{FORMAT}\")")
    if doc.get("format_version") != FORMAT_VERSION:
        raise BaselineError(f"{path}: baseline format version {doc.get('format_version')!r}; this onnxlrp reads "
                            f"version {FORMAT_VERSION} (write a new one with --update-baseline)")
    if not isinstance(doc.get("arrays"), dict):
        raise BaselineError(f"{path}: has no arrays")
    return Baseline(path, doc)


# -- comparing two explanations -------------------------------------------------------------------------------
def topk_overlap(a, b, fraction=TOPK_FRACTION):
    """Per sample: the share of the ``fraction`` most relevant features of ``a`` that are among ``b``'s."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    k = max(1, int(round(a.shape[1] * fraction)))
    top_a = np.argpartition(-a, k - 1, axis=1)[:, :k]
    top_b = np.argpartition(-b, k - 1, axis=1)[:, :k]
    return np.array([len(np.intersect1d(x, y)) / k for x, y in zip(top_a, top_b)])


def compare_explanations(ours, theirs, limits):
    """Figures and failures of ``ours`` against ``theirs``: dicts with output, output_selection, relevance."""
    from .checks import _rel_l2
    n = len(ours["relevance"])
    a_out = np.asarray(ours["output"], np.float64).reshape(n, -1)
    b_out = np.asarray(theirs["output"], np.float64).reshape(len(theirs["output"]), -1)
    failures = []
    if a_out.shape != b_out.shape:
        return {"output_shapes": [list(a_out.shape), list(b_out.shape)]}, \
            [f"the outputs have {a_out.shape[1]} and {b_out.shape[1]} values per sample"]
    ra = np.asarray(ours["relevance"], np.float64)
    rb = np.asarray(theirs["relevance"], np.float64)
    if ra.size != rb.size:
        return {"relevance_shapes": [list(ra.shape), list(rb.shape)]}, \
            [f"the relevance has shapes {ra.shape} and {rb.shape}"]
    rb = rb.reshape(ra.shape)
    out_err = float(np.abs(a_out - b_out).max() / max(float(np.abs(b_out).max()), 1e-30))
    rel = _rel_l2(ra, rb)
    overlap = topk_overlap(ra, rb)
    top_a, top_b = a_out.argmax(1), b_out.argmax(1)
    figures = {"output_max_rel_error": out_err, "relevance_rel_l2": rel.tolist(), "topk_overlap": overlap.tolist(),
               "topk_fraction": TOPK_FRACTION, "top_class_changed": np.flatnonzero(top_a != top_b).tolist(),
               "drift_rtol": limits["drift_rtol"], "drift_output_rtol": limits["drift_output_rtol"],
               "drift_topk_overlap": limits["drift_topk_overlap"]}
    if not out_err <= limits["drift_output_rtol"]:
        failures.append(f"outputs differ by {out_err:.3g} of the largest (bound {limits['drift_output_rtol']:g})")
    if not np.all(rel <= limits["drift_rtol"]):
        worst = int(np.nanargmax(np.where(np.isfinite(rel), rel, np.inf)))
        failures.append(f"relevance differs by {rel[worst]:.3g} relative L2 on sample {worst} "
                        f"(bound {limits['drift_rtol']:g})")
    if not np.all(overlap >= limits["drift_topk_overlap"]):
        worst = int(np.argmin(overlap))
        failures.append(f"only {overlap[worst]:.0%} of sample {worst}'s most relevant {TOPK_FRACTION:.0%} of "
                        f"features are shared (bound {limits['drift_topk_overlap']:.0%})")
    return figures, failures


def _agreement(rel, overlap, out_err):
    return (f"relevance within {np.max(rel):.2g} relative L2, top-{TOPK_FRACTION:.0%} overlap {np.min(overlap):.0%}, "
            f"outputs within {out_err:.2g}")


def _changed_layers(before, now):
    """(what changed, the first layer it names) between two layer fingerprint lists."""
    if not before:
        return [], None
    ops_before = [(l["name"], l["op"]) for l in before]
    ops_now = [(l["name"], l["op"]) for l in now]
    if ops_before != ops_now:
        first = next((i for i, (a, b) in enumerate(zip(ops_before, ops_now)) if a != b), min(len(before), len(now)))
        where = (f"{now[first]['index']} {now[first]['name']}" if first < len(now) else None)
        return [f"the canonized graph has {len(now)} layers, the baseline's {len(before)}; they part at layer "
                f"{first}"], where
    changes, first = [], None
    for key, what in (("params", "parameters"), ("rule", "rules")):
        changed = [l for l, b in zip(now, before) if key in b and l.get(key) != b[key]]
        if changed:
            names = ", ".join(f"{l['index']} '{l['name']}' ({l['op']})" for l in changed[:3])
            changes.append(f"{len(changed)} layer(s) have other {what} than in the baseline: {names}"
                           + (" ..." if len(changed) > 3 else ""))
            if first is None or changed[0]["index"] < first["index"]:
                first = changed[0]
    return changes, None if first is None else f"{first['index']} {first['name']}"


def regression_check(report, baseline, limits):
    """The ``regression`` check: this audit's explanations against ``baseline``'s."""
    from .checks import CheckResult
    data = report.data
    x = np.asarray(data["inputs"])
    if x.shape != baseline.inputs.shape or not np.array_equal(x.astype(np.float64), baseline.inputs.astype(np.float64)):
        return CheckResult("regression", "fail", f"the audit ran on other inputs than the baseline "
                           f"{baseline.describe()} ({x.shape} against {baseline.inputs.shape}); audit without "
                           "--inputs to use the baseline's, or write a new baseline", {"baseline": baseline.path})
    figures, failures = compare_explanations(data, {"output": baseline.output, "relevance": baseline.relevance,
                                                    "output_selection": baseline.output_selection}, limits)
    figures["baseline"] = baseline.path
    figures["model_changed"] = (data.get("model_sha256") is not None and baseline.doc.get("model_sha256") is not None
                                and data["model_sha256"] != baseline.doc["model_sha256"])
    layer_changes, layer = _changed_layers(baseline.layers, data.get("layers", []))
    figures["layer_changes"] = layer_changes
    before = {c["name"]: c["status"] for c in baseline.report.get("checks", [])}
    figures["checks_changed"] = {c.name: f"{before[c.name]} -> {c.status}" for c in report.checks
                                 if c.name in before and before[c.name] != c.status}
    if failures:
        return CheckResult("regression", "fail", f"against the baseline {baseline.describe()}: " + "; ".join(failures)
                           + "".join("; " + c for c in layer_changes), figures, layer=layer)
    rel, overlap = np.asarray(figures["relevance_rel_l2"]), np.asarray(figures["topk_overlap"])
    return CheckResult("regression", "pass", f"against the baseline {baseline.describe()}: "
                       + _agreement(rel, overlap, figures["output_max_rel_error"])
                       + "".join(f"; {c} (within the bounds)" for c in layer_changes), figures)


def compare_check(analyzer, other, rules, x, feeds_inputs, expl, limits):
    """The ``compare`` check: ``other`` (another export of the same model) explained on the same inputs and
    classes under the same rules."""
    import warnings
    from ..analyzer import LRP
    from ..errors import LRPError, LRPWarning
    from .checks import CheckResult, _twin_kwargs
    name = str(other) if not hasattr(other, "SerializeToString") else "<ModelProto>"
    kw = dict(_twin_kwargs(analyzer), normalize_output_relevance=analyzer.normalize_output_relevance,
              precision=analyzer.precision, output_name=None, input_name=None)
    try:
        twin = LRP(other, rules, **kw)
    except LRPError as exc:
        return CheckResult("compare", "fail", f"{name}: cannot be explained: {str(exc).splitlines()[0]}",
                           {"other": name})
    want, got = tuple(analyzer.input_shape or ()), tuple(twin.input_shape or ())
    if len(want) != len(got) or any(isinstance(a, int) and isinstance(b, int) and a != b
                                    for a, b in zip(want[1:], got[1:])):
        return CheckResult("compare", "fail", f"{name}: its input {got} does not take this model's {want} inputs",
                           {"other": name})
    xo = x.astype(twin.input_dtype) if np.asarray(x).dtype.kind == "f" else x
    others = {k: (np.asarray(v).astype(twin.input_dtype) if np.asarray(v).dtype.kind == "f" else v)
              for k, v in feeds_inputs.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LRPWarning)
            theirs = twin.analyze(xo, expl.output_selection, inputs=others)
    except LRPError as exc:
        return CheckResult("compare", "fail", f"{name}: {str(exc).splitlines()[0]}", {"other": name})
    figures, failures = compare_explanations(
        {"output": expl.output, "relevance": expl.val, "output_selection": expl.output_selection},
        {"output": theirs.output, "relevance": theirs.val, "output_selection": theirs.output_selection}, limits)
    figures["other"] = name
    if failures:
        return CheckResult("compare", "fail", f"against {name}: " + "; ".join(failures), figures)
    return CheckResult("compare", "pass", f"against {name}: " + _agreement(
        np.asarray(figures["relevance_rel_l2"]), np.asarray(figures["topk_overlap"]), figures["output_max_rel_error"]),
        figures)
