"""``onnxlrp audit``: the CI step for exported models (see onnxlrp.auditing for what each check does)."""
from __future__ import annotations

import os

import click

from ..files import atomic_write
from .app import (CLIError, CONTEXT_SETTINGS, RULE_HELP, ShapeType, build_rules, cli, debug_option, model_argument,
                  output_name_option, pop_rule_kwargs, rule_options, skip_checks_option)
from .explain import image_options

AUDIT_EPILOG = RULE_HELP + """\b
Checks (each PASS, FAIL or SKIP with figures; --fail-on chooses which gate the exit code):
  coverage      every node has an emitter and a rule (none passed through by --skip-checks)
  forward       the relevance graph's output against plain onnxruntime on the original file
  conservation  with biases and epsilons zeroed, every layer passes on what reaches it
  identity      piecewise-linear graphs: LRP-0 against the emitted gradient graph's gradient x input
  health        finite relevance, sum |R| below --explosion x the seed
  precision     float32 against float64 relevance
  faithfulness  removing the most relevant patches first lowers the logit faster than random orders
  regression    against --baseline FILE: relevance, top-1% features and outputs within --drift-* bounds
  compare       --compare OTHER.onnx, explained on the same inputs: the same agreement bounds
\b
Inputs: --inputs (repeatable) takes image files, folders of images and .npy arrays (preprocessed as
'explain' does: --mean/--std/--layout); with a baseline, its inputs; else --samples seeded synthetic
inputs of the declared shape (standard normal; token ids uniform over the vocabulary).
\b
--config audit.toml sets any option by its name (underscores or dashes), e.g.
  composite = "EpsilonGammaBox"
  low = -3.0
  high = 3.0
  fail_on = ["forward", "conservation", "health", "regression"]
  drift_rtol = 1e-3
  patch_size = 4
Options given on the command line win; paths in the file are relative to the file's folder.
\b
Exit codes: 0 every gating check passed, 1 one failed (or the model cannot be read), 2 usage error.
"""

#: Largest --config file read (a TOML file of thresholds is a few hundred bytes).
MAX_CONFIG_BYTES = 1 << 20
_PATH_KEYS = ("inputs", "baseline", "compare", "report", "junit")


def _csv_checks(ctx, param, value):
    from ..auditing import CHECKS
    if value is None:
        return CHECKS
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise click.BadParameter(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    return names


def _fill(value):
    """--fill as faithfulness_options takes it: 'mean' or a number, checked there (a usage error here)."""
    from ..auditing import faithfulness_options
    if value is None or value == "mean":
        return value
    try:
        number = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a number nor 'mean'", param_hint="--fill") from None
    try:
        return faithfulness_options({"fill": number})["fill"]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fill") from None


def _read_config(ctx, param, path):
    """Load --config into click's default_map, so that options given on the command line still win."""
    if path is None:
        return None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    if not os.path.isfile(path):
        raise click.BadParameter(f"{path}: no such file" if not os.path.exists(path) else f"{path}: is not a file")
    if os.path.getsize(path) > MAX_CONFIG_BYTES:
        raise click.BadParameter(f"{path}: over {MAX_CONFIG_BYTES >> 20} MiB; an audit config is a few lines")
    try:
        with open(path, "rb") as f:
            conf = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"{path}: not valid TOML ({exc})") from None
    known = {p.name for p in ctx.command.params if p.name not in ("model", "config")}
    flat = {}
    for key, value in conf.items():
        name = key.replace("-", "_")
        if isinstance(value, dict):
            raise click.BadParameter(f"{path}: [{key}] is a table; set options as top-level keys (e.g. "
                                     "forward_rtol = 1e-4)")
        if name not in known:
            raise click.BadParameter(f"{path}: unknown option {key!r}; known: {', '.join(sorted(known))}")
        if name == "fail_on" and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if name in _PATH_KEYS:  # relative to the config file, which lives beside the model in a repository
            values = value if isinstance(value, list) else [value]
            values = [v if os.path.isabs(str(v)) else os.path.join(os.path.dirname(os.path.abspath(path)), str(v))
                      for v in values]
            value = values if name == "inputs" else values[0]
        flat[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **flat}
    return path


@cli.command(context_settings=CONTEXT_SETTINGS, epilog=AUDIT_EPILOG)
@model_argument
@click.option("--config", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="FILE.toml",
              is_eager=True, expose_value=False, callback=_read_config,
              help="Read options from a TOML file (keys = option names); the command line overrides it.")
@rule_options
@click.option("--inputs", type=click.Path(path_type=str), default=None, multiple=True, metavar="PATH",
              help="Audit inputs: image files, folders of images, .npy arrays (a batch or one sample); "
                   "repeatable. Default: the baseline's inputs, else --samples synthetic ones.")
@image_options
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True,
              help="How many synthetic inputs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic inputs and random orders.")
@click.option("--input-shape", type=ShapeType(), default=None,
              help="The dims after the batch axis of synthetic inputs (and what images are resized to), where "
                   "the model's are dynamic.")
@click.option("--output-selection", "-k", type=click.IntRange(min=0), default=None, metavar="K",
              help="The output index to explain (default: each input's top output, or the baseline's).")
@click.option("--baseline", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="FILE",
              help="Compare with this earlier audit (the regression check), on its inputs and classes.")
@click.option("--update-baseline", is_flag=True,
              help="Write this audit to --baseline FILE (instead of comparing with it).")
@click.option("--compare", "compare_with", type=click.Path(dir_okay=False, path_type=str), default=None,
              metavar="OTHER.onnx", help="Another export of the same model to agree with (the compare check).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout instead of a table.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="FILE",
              help="Also write the report as JUnit XML (one testcase per check) for CI systems to display.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=str), default=None, metavar="DIR",
              help="Also write pictures (relevance, faithfulness curves, conservation per layer) and index.html.")
@click.option("--fail-on", callback=_csv_checks, default=None, metavar="CHECKS",
              help="Comma-separated checks whose failure fails the audit (default: all).")
@click.option("--no-precision", is_flag=True, help="Skip the float64 comparison (the slowest check).")
@click.option("--forward-rtol", type=click.FloatRange(min=0), default=None, help="Bound of the forward check (1e-4).")
@click.option("--conservation-tol", type=click.FloatRange(min=0), default=None,
              help="Bound of the per-layer conservation error (1e-3).")
@click.option("--identity-rtol", type=click.FloatRange(min=0), default=None,
              help="Bound of LRP-0 against gradient x input, relative L2 per sample (1e-3).")
@click.option("--explosion", type=click.FloatRange(min=0, min_open=True), default=None,
              help="sum |R| above this many times the seed is an explosion (1e3).")
@click.option("--precision-rtol", type=click.FloatRange(min=0), default=None,
              help="Bound of float32 against float64, relative L2 per sample (1e-2).")
@click.option("--faithfulness-margin", type=float, default=None,
              help="How much the relevance's ABPC must beat random orders' (0, in units of |f(x)|).")
@click.option("--drift-rtol", type=click.FloatRange(min=0), default=None,
              help="regression/compare: relative L2 of the relevance per sample (1e-2).")
@click.option("--drift-output-rtol", type=click.FloatRange(min=0), default=None,
              help="regression/compare: largest output difference over the largest output (1e-4).")
@click.option("--drift-topk", "drift_topk_overlap", type=click.FloatRange(0, 1), default=None,
              help="regression/compare: share of the most relevant 1% of features both maps share (0.9).")
@click.option("--patch-size", type=click.IntRange(min=1), default=None,
              help="faithfulness: patch side in pixels (default 1/8 of the shorter image side; features for "
                   "vectors, default 1).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="faithfulness: removal steps (16).")
@click.option("--fill", default=None, metavar="VALUE|mean",
              help="faithfulness: what removed patches become: a number (0, the mean of normalized inputs) or "
                   "'mean' (each input's own channel means).")
@click.option("--random-orders", type=click.IntRange(min=1), default=None,
              help="faithfulness: random orders to compare with (4; rounded up to an even count).")
@click.option("--quiet", "-q", is_flag=True, help="No progress or notices on stderr (the report still prints).")
@output_name_option
@skip_checks_option
@debug_option
def audit(model, inputs, mean, std, no_normalize, layout, samples, seed, input_shape, output_selection, baseline,
          update_baseline, compare_with, as_json, junit, report_dir, fail_on, no_precision, patch_size, steps, fill,
          random_orders, quiet, output_name, skip_checks, **kwargs):
    """Audit MODEL's explanations for CI: coverage, forward equivalence, conservation, the LRP-0 =
    gradient x input identity, numerical health, float32 vs float64, faithfulness, and drift against a
    baseline or another export, each a named check."""
    from ..auditing import DEFAULT_THRESHOLDS
    from ..auditing import audit as run_audit
    spec, desc = build_rules(**pop_rule_kwargs(kwargs))
    thresholds = {k: kwargs.pop(k) for k in list(kwargs) if k in DEFAULT_THRESHOLDS and kwargs[k] is not None}
    fill = _fill(fill)
    if update_baseline and baseline is None:
        raise click.UsageError("--update-baseline needs --baseline FILE: where to write it")
    if baseline is not None and not update_baseline and not os.path.lexists(baseline):
        raise click.BadParameter(f"{baseline}: no such file; write it first with --update-baseline",
                                 param_hint="--baseline")
    for path in (model, compare_with):
        if path is not None and not os.path.isfile(path):
            raise CLIError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: is not a file")
    for path, what in ((junit, "--junit"), (baseline, "--baseline")):
        if path is not None and os.path.isdir(path):
            raise CLIError(f"{path}: is a folder; give a file name with {what}")
    if report_dir is not None and os.path.lexists(report_dir) and not os.path.isdir(report_dir):
        raise CLIError(f"{report_dir}: is not a folder; --report takes a folder to write into")

    def load_inputs(analyzer):
        from .explain import load_input_batch
        return load_input_batch(list(inputs), analyzer, layout, input_shape, mean, std, no_normalize)

    def progress(name):
        if not quiet:
            click.echo(f"onnxlrp: audit: {name}...", err=True)
    report = run_audit(model, spec, inputs=load_inputs if inputs else None, samples=samples, seed=seed,
                       input_shape=input_shape, output_selection=output_selection, output_name=output_name,
                       thresholds=thresholds, precision_check=not no_precision, fail_on=fail_on,
                       skip_checks=skip_checks, rules_description=desc, compare=compare_with,
                       baseline=None if update_baseline else baseline, on_check=progress,
                       faithfulness=dict(patch_size=patch_size, steps=steps, fill=fill, random_orders=random_orders))
    if junit is not None:
        with atomic_write(junit) as f:
            f.write(report.to_junit().encode())
    if update_baseline and report.data:
        report.save_baseline(baseline)
        if not quiet:
            click.echo(f"onnxlrp: wrote the baseline {baseline}", err=True)
    if report_dir is not None:
        report.write_report(report_dir)
        if not quiet:
            click.echo(f"onnxlrp: wrote the report {os.path.join(report_dir, 'index.html')}", err=True)
    click.echo(report.to_json() if as_json else report.table())
    if not report.passed:
        raise click.exceptions.Exit(1)
