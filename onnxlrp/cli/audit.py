"""``onnxlrp audit``: the CI step for exported models (see onnxlrp.audit for what each check does)."""
from __future__ import annotations

import os

import click

from ..files import atomic_write
from .app import (CLIError, CONTEXT_SETTINGS, RULE_HELP, ShapeType, build_rules, cli, debug_option, model_argument,
                  output_name_option, pop_rule_kwargs, rule_options, skip_checks_option)

AUDIT_EPILOG = RULE_HELP + """\b
Checks (each PASS, FAIL or SKIP with figures; --fail-on chooses which gate the exit code):
  coverage      every node has an emitter and a rule (none passed through by --skip-checks)
  forward       the relevance graph's output against plain onnxruntime on the original file
  conservation  with biases and epsilons zeroed, every layer passes on what reaches it
  identity      piecewise-linear graphs: LRP-0 against the emitted gradient graph's gradient x input
  health        finite relevance, sum |R| below --explosion x the seed
  precision     float32 against float64 relevance
  faithfulness  removing the most relevant patches first lowers the logit faster than random orders
Exit codes: 0 every gating check passed, 1 one failed (or the model cannot be read), 2 usage error.
"""


def _csv_checks(ctx, param, value):
    from ..auditing import CHECKS
    if value is None:
        return CHECKS
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise click.BadParameter(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    return names


def _load_inputs(path):
    import numpy as np
    if not os.path.isfile(path):
        raise CLIError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: is not a file")
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise CLIError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(data, np.ndarray):
        raise CLIError(f"{path}: is an .npz archive, not a .npy array; save the inputs with numpy.save")
    return data


@cli.command(context_settings=CONTEXT_SETTINGS, epilog=AUDIT_EPILOG)
@model_argument
@rule_options
@click.option("--inputs", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="FILE.npy",
              help="A batch of inputs (the batch axis first). Default: --samples seeded synthetic inputs of the "
                   "declared shape (standard normal; token ids uniform over the vocabulary).")
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True,
              help="How many synthetic inputs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic inputs.")
@click.option("--input-shape", type=ShapeType(), default=None,
              help="The dims after the batch axis of synthetic inputs, where the model's are dynamic.")
@click.option("--output-selection", "-k", type=click.IntRange(min=0), default=None, metavar="K",
              help="The output index to explain (default: each input's top output).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout instead of a table.")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=str), default=None, metavar="FILE",
              help="Also write the report as JUnit XML (one testcase per check) for CI systems to display.")
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
@output_name_option
@skip_checks_option
@debug_option
def audit(model, inputs, samples, seed, input_shape, output_selection, as_json, junit, fail_on, no_precision,
          forward_rtol, conservation_tol, identity_rtol, explosion, precision_rtol, faithfulness_margin, output_name,
          skip_checks, **kwargs):
    """Audit MODEL's explanations for CI: coverage, forward equivalence, conservation, the LRP-0 =
    gradient x input identity, numerical health, float32 vs float64 and faithfulness, each a named check."""
    from ..auditing import audit as run_audit
    spec, desc = build_rules(**pop_rule_kwargs(kwargs))
    if not os.path.isfile(model):
        raise CLIError(f"{model}: no such file" if not os.path.exists(model) else f"{model}: is not a file")
    if junit is not None and os.path.isdir(junit):
        raise CLIError(f"{junit}: is a folder; give a file name with --junit")
    thresholds = {k: v for k, v in dict(forward_rtol=forward_rtol, conservation_tol=conservation_tol,
                                        identity_rtol=identity_rtol, explosion=explosion,
                                        precision_rtol=precision_rtol,
                                        faithfulness_margin=faithfulness_margin).items() if v is not None}
    report = run_audit(model, spec, inputs=_load_inputs(inputs) if inputs else None, samples=samples, seed=seed,
                       input_shape=input_shape, output_selection=output_selection, output_name=output_name,
                       thresholds=thresholds, precision_check=not no_precision, fail_on=fail_on,
                       skip_checks=skip_checks)
    report.rules = desc
    if junit is not None:
        with atomic_write(junit) as f:
            f.write(report.to_junit().encode())
    click.echo(report.to_json() if as_json else report.table())
    if not report.passed:
        raise click.exceptions.Exit(1)
