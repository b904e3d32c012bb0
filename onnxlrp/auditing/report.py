"""``onnxlrp audit --report DIR``: the audit as pictures and one HTML page a person reads after CI ran.

DIR/index.html       the checks (status, summary, figures), the model, rules and inputs, and the pictures:
DIR/relevance.png    each audit input beside its relevance (images: heatmaps, red positive, blue negative,
                     one color bar each; vectors and token sequences: bars per feature or token)
DIR/faithfulness.png region perturbation: the explained logit (over f(x)) as patches are removed, most-relevant
                     first and least-relevant first, for the relevance, gradient x input and random orders
DIR/conservation.png per layer: the share of the relevance the rules absorb (biases, stabilizers), and the
                     conservative twin's error against the check's bound
DIR/report.json      the report as ``--json`` prints it

Every file is written under a temporary name and renamed, so a link planted in DIR is replaced, never
written through. Pictures are drawn with matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import html
import json
import os

import numpy as np

from ..files import atomic_write

MAX_SAMPLES_SHOWN = 8
_STATUS_COLORS = {"pass": "#1a7f37", "fail": "#cf222e", "skip": "#6e7781"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def _sample_title(data, i, labels=None):
    sel = int(np.asarray(data["output_selection"]).reshape(-1)[i])
    out = np.asarray(data["output"]).reshape(len(data["output"]), -1)
    score = out[i, sel % out.shape[1]] if out.size else float("nan")
    total = float(np.asarray(data["relevance"][i], np.float64).sum())
    return f"sample {i}: output {sel} = {score:.3g}\nsum R = {total:.3g}"


def _display(sample):
    """An (H, W, C) normalized input scaled to [0, 1] for display (the audit's inputs are standardized)."""
    v = np.asarray(sample, np.float64)
    v = (v - v.min()) / max(float(v.max() - v.min()), 1e-12)
    return np.repeat(v, 3, axis=2) if v.shape[2] == 1 else v[:, :, :3]


def plot_relevance(data, path):
    """Inputs beside their relevance; True when a picture was written."""
    from ..heatmaps import heatmap, value_range
    plt = _pyplot()
    rel = np.asarray(data["relevance"], np.float64)
    x = np.asarray(data["inputs"])
    n = min(len(rel), MAX_SAMPLES_SHOWN)
    layout = data.get("layout")
    if layout and rel.ndim == 4:  # images: the input and its heatmap, per sample
        fig, axes = plt.subplots(n, 2, figsize=(7.5, 3.4 * n), squeeze=False, layout="constrained")
        for i in range(n):
            lo, hi = value_range(rel[i:i + 1], "centered")
            img = heatmap(rel[i:i + 1], layout=layout)[0]
            axes[i, 0].imshow(_display(x[i] if layout == "NHWC" else np.moveaxis(x[i], 0, -1)))
            axes[i, 0].set_title(f"input {i} (min-max scaled)")
            axes[i, 1].imshow(np.asarray(img))
            axes[i, 1].set_title(_sample_title(data, i))
            sm = plt.cm.ScalarMappable(cmap="seismic", norm=plt.Normalize(float(lo), float(hi)))
            fig.colorbar(sm, ax=axes[i, 1], fraction=0.046, pad=0.04, label="relevance (summed over channels)")
            for ax in axes[i]:
                ax.set_xticks([])
                ax.set_yticks([])
    else:  # vectors (features) or token sequences (the sum over the embedding)
        per_feature = rel.reshape(len(rel), rel.shape[1], -1).sum(-1) if data.get("token_input") else \
            rel.reshape(len(rel), -1)
        what = "token" if data.get("token_input") else "input feature"
        fig, axes = plt.subplots(n, 1, figsize=(9, 2.6 * n), squeeze=False, layout="constrained")
        for i in range(n):
            v = per_feature[i]
            ax = axes[i, 0]
            ax.bar(np.arange(len(v)), v, color=np.where(v >= 0, "#d62728", "#1f77b4"), width=0.9)
            ax.axhline(0, color="black", linewidth=0.6)
            ax.set_title(_sample_title(data, i).replace("\n", "; "), fontsize=9)
            ax.set_ylabel("relevance")
            if data.get("token_input") and len(v) <= 64:  # which token each bar is: position and id
                ax.set_xticks(np.arange(len(v)), [f"{t}\n{int(tok)}" for t, tok in enumerate(x[i])], fontsize=7)
        axes[-1, 0].set_xlabel(what + (" (position, id)" if data.get("token_input") else ""))
    fig.suptitle("Relevance of the audit inputs" + (f" (first {n} of {len(rel)})" if len(rel) > n else ""))
    _save(fig, path)
    return True


def plot_faithfulness(figures, path):
    if "relevance" not in figures:
        return False
    plt = _pyplot()
    steps = figures["steps"]
    t = np.linspace(0, 1, steps + 1)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    styles = {"relevance": ("#d62728", "relevance"), "gradient_x_input": ("#2ca02c", "gradient x input")}
    for key, (color, label) in styles.items():
        if key in figures:
            ax.plot(t, figures[key]["morf_curve"], "-", color=color, label=f"{label}, most relevant first "
                    f"(ABPC {figures[key]['abpc']:.3g})")
            ax.plot(t, figures[key]["lerf_curve"], "--", color=color, label=f"{label}, least relevant first")
    ax.plot(t, figures["random"]["curve"], ":", color="#555555", label=f"random orders (ABPC "
            f"{figures['random']['abpc']:.3g})")
    ax.set_xlabel(f"share of the {figures['patches']} patches removed (fill {figures['fill']})")
    ax.set_ylabel("explained output (mean over samples)")
    ax.set_title("Region perturbation: a faithful explanation drops the output fastest when the most relevant "
                 "patches go first", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)
    return True


def plot_conservation(figures, path):
    shares = figures.get("absorbed_share_per_layer") or {}
    errors = figures.get("twin_error_per_layer") or {}
    if not shares and not errors:
        return False
    plt = _pyplot()
    names = list(dict.fromkeys(list(errors) + list(shares)))
    names.sort(key=lambda s: int(s.split(" ", 1)[0]))
    y = np.arange(len(names))
    height = max(3.0, 0.22 * len(names) + 1.5)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, height), sharey=True)
    share = np.array([np.nan if shares.get(k) is None else shares[k] for k in names], float)
    left.barh(y, np.nan_to_num(share), color=np.where(np.nan_to_num(share) >= 0, "#1f77b4", "#ff7f0e"))
    left.axvline(0, color="black", linewidth=0.6)
    left.set_xlabel("share of the relevance absorbed (rules as given)")
    left.set_yticks(y, [n if len(n) < 40 else n[:37] + "..." for n in names], fontsize=7)
    left.invert_yaxis()
    err = np.array([np.nan if errors.get(k) is None else errors[k] for k in names], float)
    tol = figures.get("tol", 1e-3)
    shown = np.where(np.isfinite(err), np.maximum(err, 1e-17), np.nan)
    right.barh(y, np.nan_to_num(shown, nan=0.0), color=np.where(err > tol, "#cf222e", "#2ca02c"), log=True)
    right.axvline(tol, color="#cf222e", linestyle="--", label=f"bound {tol:g}")
    right.set_xlabel("conservative twin: |sum R_in - sum R_out| / sum |R| (log; 0 drawn at 1e-17)")
    right.legend(fontsize=8)
    fig.suptitle("Conservation per layer (output at the bottom)")
    _save(fig, path)
    return True


def _figures_html(figures):
    small = {k: v for k, v in figures.items() if not (isinstance(v, dict) and len(v) > 12)}
    return html.escape(json.dumps(small, indent=1, allow_nan=False, default=str)[:20000])


def write_report(report, directory) -> list:
    """Write the report's pictures and page into ``directory`` (made if missing); returns the files."""
    from .checks import _jsonable
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory}: is not a folder")
    os.makedirs(directory, exist_ok=True)
    written, images = [], []
    data = report.data

    def target(name):
        return os.path.join(directory, name)
    if data and data.get("relevance") is not None and plot_relevance(data, target("relevance.png")):
        images.append(("relevance.png", "Relevance of the audit inputs"))
    for name, plot, title in (("faithfulness", plot_faithfulness, "Faithfulness: region perturbation"),
                              ("conservation", plot_conservation, "Conservation per layer")):
        try:
            figures = _jsonable(report.check(name).figures)
        except StopIteration:
            continue
        if plot(figures, target(f"{name}.png")):
            images.append((f"{name}.png", title))
    with atomic_write(target("report.json"), "w", encoding="utf-8") as f:
        f.write(report.to_json())
    written += [target(name) for name, _ in images] + [target("report.json")]
    rows = "\n".join(
        f"<tr><td>{html.escape(c.name)}</td><td style='color:{_STATUS_COLORS[c.status]};font-weight:bold'>"
        f"{c.status.upper()}{'' if c.name in report.fail_on or c.status != 'fail' else ' (not gating)'}</td>"
        f"<td>{html.escape(c.summary)}{'<br><i>layer ' + html.escape(c.layer) + '</i>' if c.layer else ''}</td>"
        f"<td>{c.seconds:.2f} s</td></tr>" for c in report.checks)
    details = "\n".join(f"<details><summary>{html.escape(c.name)} figures</summary><pre>"
                        f"{_figures_html(_jsonable(c.figures))}</pre></details>" for c in report.checks if c.figures)
    pictures = "\n".join(f"<h2>{html.escape(title)}</h2><img src='{name}' alt='{html.escape(title)}'>"
                         for name, title in images)
    verdict = "passed" if report.passed else "failed: " + ", ".join(c.name for c in report.failed)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>onnxlrp audit: {html.escape(os.path.basename(report.model))}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}}
img{{max-width:100%;border:1px solid #ddd}}pre{{font-size:11px;background:#f6f8fa;padding:6px;overflow:auto}}</style>
</head><body>
<h1>onnxlrp audit {html.escape(verdict)}</h1>
<p><b>model</b> {html.escape(report.model)}<br><b>rules</b> {html.escape(str(report.rules))}<br>
<b>inputs</b> {html.escape(report.inputs)}</p>
<table><tr><th>check</th><th>status</th><th>summary</th><th>time</th></tr>
{rows}
</table>
{pictures}
<h2>Figures</h2>
{details}
<p><a href="report.json">report.json</a></p>
</body></html>
"""
    with atomic_write(target("index.html"), "w", encoding="utf-8") as f:
        f.write(page)
    return [target("index.html")] + written
