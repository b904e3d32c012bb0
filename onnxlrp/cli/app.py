"""The click application: the command group, the shared options and the small commands.

``explain`` lives in :mod:`onnxlrp.cli.explain`. Errors: onnxlrp's own (``LRPError``) and any other
exception become a one-line ``Error: ...`` on stderr with exit code 1 (``--debug`` adds the
traceback); click's usage errors exit with 2.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import traceback

import click

from .. import __version__

DEBUG_KEY = "onnxlrp.debug"
DEFAULT_COMPOSITE = "EpsilonPlus"

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- errors -----------------------------------------------------------------------------------------------
class CLIError(click.ClickException):
    """A model or input problem: one line on stderr, exit code 1."""
    exit_code = 1


def one_line(exc: BaseException) -> str:
    from ..errors import LRPError, UnsupportedModelError
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, UnsupportedModelError):
        nodes = ", ".join(f"'{n}' ({op})" for n, op, _ in exc.nodes[:3])
        more = f" and {len(exc.nodes) - 3} more" if len(exc.nodes) > 3 else ""
        return (f"{first.rstrip(':')}: {nodes}{more}; 'onnxlrp check MODEL' lists them, --skip-checks passes "
                "relevance through them unchanged")
    if isinstance(exc, LRPError):
        return first
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or first}"
    return f"{type(exc).__name__}: {first} (run with --debug for the traceback)"


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """onnxlrp's warnings (an explosion, a non-finite result and the layer it started at) as one line on
    stderr, without the source file and line Python's default display adds."""
    from ..errors import LRPWarning
    if issubclass(category, LRPWarning):
        click.echo(f"Warning: {message}", err=True)
    else:
        import warnings
        click.echo(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), err=True)


class LRPGroup(click.Group):
    """A click group that turns exceptions into one-line errors (exit 1) unless --debug is given."""

    def invoke(self, ctx):
        import warnings
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:  # `onnxlrp ... | head`: stop quietly (as the Python docs recommend)
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):
                pass
            raise click.exceptions.Exit(1) from None
        except Exception as exc:  # noqa: BLE001 - every other error is reported in one line
            if ctx.meta.get(DEBUG_KEY):
                traceback.print_exc()
            raise CLIError(one_line(exc)) from None

    def list_commands(self, ctx):
        order = ["explain", "explain-dataset", "check", "audit", "layers", "rules", "export"]
        return [c for c in order if c in self.commands] + sorted(c for c in self.commands if c not in order)


def _set_debug(ctx, param, value):
    if value:
        ctx.meta[DEBUG_KEY] = True
    return value


def debug_option(f):
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="Show the full traceback when something fails.")(f)


# -- parameter types ----------------------------------------------------------------------------------------
class FloatList(click.ParamType):
    """Comma-separated floats: "0.5" or "0.485,0.456,0.406"."""
    name = "FLOATS"

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)):
            return tuple(float(v) for v in value)
        try:
            vals = tuple(float(v) for v in str(value).replace(" ", "").split(",") if v != "")
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)
        if not vals:
            self.fail("expected at least one number", param, ctx)
        return vals


class ShapeType(click.ParamType):
    """The input dims after the batch axis: "3,224,224" or "3x224x224"."""
    name = "DIMS"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).lower().replace("x", ",").replace(" ", "").split(",")
        try:
            dims = tuple(int(p) for p in parts if p != "")
        except ValueError:
            self.fail(f"{value!r} is not a list of integers like 3,224,224", param, ctx)
        if not dims or any(d <= 0 for d in dims):
            self.fail(f"{value!r}: dims must be positive integers like 3,224,224", param, ctx)
        return dims


class NameChoice(click.Choice):
    """Case-insensitive choice that also accepts a name without ``suffix`` (``epsilon`` for EpsilonRule)."""

    def __init__(self, choices, suffix=""):
        super().__init__(list(choices), case_sensitive=False)
        self.suffix = suffix

    def convert(self, value, param, ctx):
        if isinstance(value, str) and self.suffix:
            for choice in self.choices:
                if choice.lower() in (value.lower(), value.lower() + self.suffix.lower()):
                    return choice
        return super().convert(value, param, ctx)


# -- rule options -------------------------------------------------------------------------------------------
def _preset_names():
    from ..composite import PRESETS
    return list(PRESETS)


def _rule_names():
    from ..rules import ALL_RULES
    return list(ALL_RULES)


RULE_HELP = """\b
Rules (default: EpsilonPlus):
  -c EpsilonGammaBox --low L --high H
        ZBox(L, H) on the first convolution, Gamma on the other
        convolutions, Epsilon on dense layers. L and H bound the input
        values the model sees: ImageNet-normalized images lie in about
        [-2.2, 2.7], so --low -3 --high 3 fits them.
  -c EpsilonPlus              ZPlus on convolutions, Epsilon on dense layers.
  -c EpsilonAlpha2Beta1       AlphaBeta(2,1) on convolutions, Epsilon on dense
  -c EpsilonPlusFlat          EpsilonPlus, Flat on the first convolution.
  -c EpsilonAlpha2Beta1Flat   EpsilonAlpha2Beta1, Flat on the first conv.
  -c AttnLRP [--epsilon E]    Transformers (LXT's AttnLRP): LRP-0 (or
                              Epsilon E) on linear layers, softmax rule,
                              uniform rule on attention products,
                              LayerNorm rule, identity on activations.
  -c CPLRP [--epsilon E]      AttnLRP with attention probabilities held
                              constant (relevance only through values).
  -r NAME                     One rule on every layer it fits; the others
                              keep the default (LRP-0 on linear layers,
                              pass-through on activations and reshapes).
"""


def rule_options(f):
    opts = [
        click.option("--composite", "-c", type=NameChoice(_preset_names()), default=None, metavar="NAME",
                     help="Rule preset: " + ", ".join(_preset_names()) + " (see below). Default: EpsilonPlus."),
        click.option("--rule", "-r", type=NameChoice(_rule_names(), suffix="Rule"), default=None, metavar="NAME",
                     help="One rule on every layer it fits, instead of a preset: "
                          + ", ".join(_rule_names()) + " (case-insensitive; 'epsilon' = EpsilonRule)."),
        click.option("--low", type=float, default=None,
                     help="Lower input bound of ZBox (EpsilonGammaBox, ZBoxRule), e.g. -3."),
        click.option("--high", type=float, default=None,
                     help="Upper input bound of ZBox (EpsilonGammaBox, ZBoxRule), e.g. 3."),
        click.option("--epsilon", type=float, default=None,
                     help="Epsilon of the Epsilon rule (presets, EpsilonRule). Default: 1e-6."),
        click.option("--gamma", type=float, default=None,
                     help="Gamma of the Gamma rule (EpsilonGammaBox, GammaRule, GeneralizedGammaRule). "
                          "Default: 0.25."),
        click.option("--alpha", type=float, default=None, help="Alpha of AlphaBetaRule (default 2)."),
        click.option("--beta", type=float, default=None, help="Beta of AlphaBetaRule (default 1)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


RULE_KEYS = ("composite", "rule", "low", "high", "epsilon", "gamma", "alpha", "beta")


def pop_rule_kwargs(kwargs):
    return {k: kwargs.pop(k) for k in RULE_KEYS}


def _fmt(v):
    return f"{v:g}" if isinstance(v, float) else repr(v)


def build_rules(composite=None, rule=None, low=None, high=None, epsilon=None, gamma=None, alpha=None, beta=None):
    """The LRP rule spec (a Composite or a Rule) and a short description, from the command-line options."""
    from ..composite import PRESETS
    from ..rules import ALL_RULES
    given = {k: v for k, v in dict(low=low, high=high, epsilon=epsilon, gamma=gamma, alpha=alpha,
                                   beta=beta).items() if v is not None}
    if composite and rule:
        raise click.UsageError("--composite and --rule exclude each other: pick one")
    if rule:
        cls = ALL_RULES[rule]
        fields = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
        extra = [k for k in given if k not in fields]
        if extra:
            takes = ", ".join(f"--{k}" for k in fields) or "no parameters"
            raise click.UsageError(f"--{extra[0]} does not apply to {rule} (it takes {takes})")
        if rule == "ZBoxRule" and not {"low", "high"} <= set(given):
            raise click.UsageError("ZBoxRule needs --low and --high: the bounds of the model's input values")
        try:
            obj = cls(**given)
        except (TypeError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--rule") from None
        return obj, f"{obj!r} on every layer it fits"
    name = composite or DEFAULT_COMPOSITE
    factory = PRESETS[name]
    params = inspect.signature(factory).parameters
    extra = [k for k in given if k not in params]
    if extra:
        takes = ", ".join(f"--{k}" for k in params)
        raise click.UsageError(f"--{extra[0]} does not apply to {name} (it takes {takes})")
    required = [p.name for p in params.values() if p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    missing = [k for k in required if k not in given]
    if missing:
        raise click.UsageError(
            f"{name} needs " + " and ".join(f"--{k}" for k in missing) + ": the bounds of the input values the "
            "model sees, e.g. --low -3 --high 3 for ImageNet-normalized images (they lie in about [-2.2, 2.7])")
    try:
        obj = factory(**given)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--composite") from None
    args = ", ".join(f"{k}={_fmt(v)}" for k, v in given.items())
    return obj, f"{name}({args})"


def device_option(f):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"], case_sensitive=False),
                        default="auto", show_default=True,
                        help="Where onnxruntime runs: cuda when it works (auto), or as told; 'cuda' fails when "
                             "onnxruntime's CUDA provider does not load.")(f)


def skip_checks_option(f):
    return click.option("--skip-checks", is_flag=True,
                        help="Let relevance pass unchanged through nodes onnxlrp does not support instead of "
                             "refusing the model (only right for shape-preserving elementwise ops).")(f)


def precision_option(f):
    return click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32",
                        show_default=True,
                        help="float64 runs canonization, modified weights and the relevance graph in double, "
                             "to tell float32 rounding apart from rule effects (slower; ops without a double "
                             "kernel in onnxruntime run on onnx's reference evaluator).")(f)


def output_name_option(f):
    return click.option("--output-name", default=None, metavar="NAME",
                        help="The graph output to explain when MODEL has several (default: the first; "
                             "the command says which it explains).")(f)


def _no_cache(ctx, param, value):
    if value:
        ctx.meta["onnxlrp.cache"] = False


def cache_option(f):
    return click.option("--no-cache", is_flag=True, expose_value=False, callback=_no_cache,
                        help="Neither read nor write the cache of relevance graphs ('onnxlrp cache info' says "
                             "where it is).")(f)


def cache_setting():
    """False under --no-cache, else True (the cache's own default: $ONNXLRP_CACHE, $ONNXLRP_CACHE_DIR)."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get("onnxlrp.cache", True) if ctx is not None else True


def model_argument(f):
    return click.argument("model", metavar="MODEL", type=click.Path(dir_okay=True, path_type=str))(f)


def load_analyzer(model, spec, *, device="cpu", verbose=False, skip_checks=False, precision="float32",
                  output_name=None, quiet=False, spinning=True):
    from ..analyzer import LRP
    analyzer = LRP(model, spec, device=device.lower(), verbose=verbose, skip_checks=skip_checks, precision=precision,
                   output_name=output_name, cache=cache_setting(), spinning=spinning)
    if len(analyzer.model_outputs) > 1 and not quiet:
        # never explain one of several outputs without saying which
        click.echo(f"{model}: explaining output '{analyzer.output_name}' of {len(analyzer.model_outputs)} "
                   f"({', '.join(analyzer.model_outputs)}); choose with --output-name", err=True)
    return analyzer


def fmt_shape(shape):
    if shape is None:
        return "(unknown)"
    return "(" + ", ".join("N" if i == 0 and not isinstance(d, int) else str(d) for i, d in enumerate(shape)) + ")"


# -- the group ------------------------------------------------------------------------------------------------
@click.group(cls=LRPGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="onnxlrp")
@debug_option
def cli():
    """Layer-wise Relevance Propagation (LRP) for ONNX models.

    Explains a model's predictions: which input pixels (or features) speak for the predicted class
    (red in the heatmaps) and which against it (blue). The explanation is one ONNX graph that runs on
    onnxruntime, on the CPU or the GPU.

    \b
    Examples:
      onnxlrp explain model.onnx cat.png      # top-class heatmaps in ./lrp_out
      onnxlrp explain model.onnx -c EpsilonGammaBox --low -3 --high 3 photos/
      onnxlrp explain-dataset model.onnx dataset/ --out lrp_dataset   # sharded, resumable
      onnxlrp check model.onnx                # is every node supported?
      onnxlrp layers model.onnx               # layer indices after canonization
      onnxlrp rules model.onnx -c EpsilonGammaBox --low -3 --high 3
      onnxlrp export model.onnx -c EpsilonPlus -o model_lrp.onnx

    Run 'onnxlrp COMMAND --help' for a command's options. Exit codes: 0 success, 1 a problem with the
    model or the inputs, 2 a usage error. Add --debug to see the traceback of a failure.
    """


# -- check ----------------------------------------------------------------------------------------------------
@cli.command(context_settings=CONTEXT_SETTINGS)
@model_argument
@click.option("--input-shape", type=ShapeType(), default=None,
              help="For inputs with dynamic dims: the dims after the batch axis (e.g. 3,224,224) to test the "
                   "relevance graph with.")
@cache_option
@debug_option
def check(model, input_shape):
    """Check whether onnxlrp supports every node of MODEL.

    Loads and canonizes the model (BatchNorm fused, output softmax stripped, ...), lists every node
    that has no relevance emitter, and, when all are supported and the input shape is known, emits the
    relevance graph and runs it once on a zero input. Exit code 1 when a node is unsupported or the
    model cannot be loaded.
    """
    import numpy as np

    from ..analyzer import LRP
    from ..api import lrp_rules
    from ..errors import InputError, UnsupportedModelError
    try:
        lrp_rules(model)
    except UnsupportedModelError as exc:
        n = len(exc.nodes)
        click.echo(f"{model}: {n} node{'s' if n != 1 else ''} not supported by onnxlrp:")
        for name, op, reason in exc.nodes:
            click.echo(f"  - node '{name}' (op type {op}): {reason}")
        click.echo("Register an emitter for these op types (onnxlrp.LRP_CONFIG.register_emitter), or run with "
                   "--skip-checks to pass relevance through them unchanged (only right for shape-preserving "
                   "elementwise ops).")
        raise click.exceptions.Exit(1)
    analyzer = LRP(model, None, device="cpu", verbose=False, cache=cache_setting())
    shape = analyzer.input_shape
    click.echo(f"{model}: OK, every node is supported")
    click.echo(f"  input '{analyzer.data_input}' {fmt_shape(shape)} {analyzer.input_dtype} -> output "
               f"{fmt_shape(analyzer.output_shape)}; {len(analyzer.layers)} layers after canonization")
    dims = input_shape
    if dims is None and shape is not None and all(isinstance(d, int) for d in shape[1:]):
        dims = tuple(shape[1:])
    if dims is None and analyzer.token_input:  # any sequence length tests the graph
        from ..loading import PROBE_SEQUENCE_LENGTH
        dims = tuple(d if isinstance(d, int) else PROBE_SEQUENCE_LENGTH for d in shape[1:])
    if dims is None:
        click.echo("  the input has dynamic dims: pass --input-shape to also test the relevance graph")
        return
    x = np.zeros((1, *dims), dtype=analyzer.input_dtype)
    try:
        expl = analyzer.analyze(x)
    except InputError as exc:  # another input without a default value
        click.echo(f"  relevance graph not run: {exc}")
        return
    if not np.all(np.isfinite(expl.val)):
        raise CLIError(f"{model}: the relevance graph ran but gave non-finite relevance on a zero input")
    click.echo(f"  relevance graph emitted and run on a zero input of shape {x.shape} ({analyzer.execution_device})")


# -- layers / rules --------------------------------------------------------------------------------------------
@cli.command(context_settings=CONTEXT_SETTINGS, epilog=RULE_HELP)
@model_argument
@rule_options
@debug_option
def layers(model, **kwargs):
    """List the layers of MODEL after canonization, with their indices.

    The indices are the ones layer-wise rule lists and LayerMap/RangeMap use in the Python API
    (onnxlrp.show_layer_indices). The rule column shows the rules of the chosen preset (default
    EpsilonPlus, the default of 'onnxlrp explain').
    """
    from ..api import show_layer_indices
    from ..composite import Composite
    spec, _ = build_rules(**pop_rule_kwargs(kwargs))
    composite = spec if isinstance(spec, Composite) else Composite(spec)
    show_layer_indices(model, composite, file=sys.stdout)


@cli.command(context_settings=CONTEXT_SETTINGS, epilog=RULE_HELP)
@model_argument
@rule_options
@output_name_option
@skip_checks_option
@debug_option
def rules(model, skip_checks, output_name, **kwargs):
    """Show which LRP rule lands on which layer of MODEL.

    Prints the analyzer the way the Python API's repr(onnxlrp.LRP(model, composite)) does: one line per
    layer, index, op type, node name => rule.
    """
    spec, desc = build_rules(**pop_rule_kwargs(kwargs))
    analyzer = load_analyzer(model, spec, skip_checks=skip_checks, output_name=output_name)
    click.echo(f"# {model}: {desc}")
    click.echo(repr(analyzer))


# -- export -----------------------------------------------------------------------------------------------------
USAGE_SNIPPET = """\
Run it with onnxruntime alone (no onnxlrp needed):
  import numpy as np, onnxruntime as ort
  sess = ort.InferenceSession("{path}", providers=["CPUExecutionProvider"])
  x = ...  # {xshape} {dtype}, preprocessed like the model's input
  output, relevance, explained = sess.run(None, {{
      "{x}": x,{others}
      "output_selection": np.full(len(x), -1, dtype=np.int64),  # -1 = each sample's top class
      "normalize_output_relevance": np.array(True)}})"""


@cli.command(context_settings=CONTEXT_SETTINGS, epilog=RULE_HELP)
@model_argument
@rule_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Where to write the relevance graph. Default: MODEL's name + '_lrp.onnx' in the current "
                   "folder.")
@click.option("--input-shape", type=ShapeType(), default=None,
              help="The dims after the batch axis (e.g. 3,224,224); needed when MODEL's input has dynamic "
                   "dims other than the batch.")
@click.option("--force", "-f", is_flag=True, help="Overwrite the output file if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the written path.")
@output_name_option
@precision_option
@skip_checks_option
@cache_option
@debug_option
def export(model, output, input_shape, force, quiet, output_name, precision, skip_checks, **kwargs):
    """Write the relevance graph of MODEL as a standalone ONNX model.

    The graph computes the model output and the LRP relevance in one pass and runs in plain
    onnxruntime (CPU or GPU), without onnxlrp installed.

    \b
    Inputs:
      <the model's data input>     as the model takes it
      output_selection int64[N]    output index to explain per sample, -1 = top
      normalize_output_relevance   bool scalar; true: relevance sums to 1 per
                                   sample, false: to the explained output value
    Outputs:
      output                       the model output (softmax stripped)
      relevance                    the input relevance, the input's shape
      output_selection_used        int64[N], the explained output per sample

    The same text, with the rules of every layer, is stored in the model's doc_string. The batch
    axis stays dynamic.
    """
    spec, desc = build_rules(**pop_rule_kwargs(kwargs))
    if output is None:
        stem = os.path.splitext(os.path.basename(model.rstrip("/\\")))[0] or "model"
        output = f"{stem}_lrp.onnx"
    if os.path.isdir(output):
        raise CLIError(f"{output}: is a folder; give a file name with -o")
    if os.path.lexists(output) and not force:  # a dangling symlink counts: writing would follow it
        raise CLIError(f"{output}: exists already" + ("" if os.path.exists(output) else " (a symlink to nothing)")
                       + "; pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise CLIError(f"{output}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):  # before building the whole graph
        raise CLIError(f"{output}: cannot write in the folder {parent}")
    analyzer = load_analyzer(model, spec, skip_checks=skip_checks, precision=precision, output_name=output_name,
                             quiet=quiet)
    shape = analyzer.input_shape
    static = shape is not None and all(isinstance(d, int) for d in shape[1:])
    if input_shape is not None:
        if shape is not None and len(input_shape) != len(shape) - 1:
            raise click.BadParameter(f"{len(input_shape)} dims given, the input {fmt_shape(shape)} has "
                                     f"{len(shape) - 1} after the batch axis", param_hint="--input-shape")
        if shape is not None and any(isinstance(d, int) and d != g for d, g in zip(shape[1:], input_shape)):
            raise click.BadParameter(f"{','.join(map(str, input_shape))} does not fit the model's input "
                                     f"{fmt_shape(shape)}", param_hint="--input-shape")
        dims = tuple(input_shape)
    elif static:
        dims = tuple(shape[1:])
    else:
        example = "128 (the sequence length)" if analyzer.token_input else "3,224,224"
        raise CLIError(f"{model}: the input {fmt_shape(shape)} has dynamic dims besides the batch; pass "
                       f"--input-shape with the dims after the batch axis, e.g. --input-shape {example}")
    analyzer.save(output, input_shape=dims)
    if quiet:
        click.echo(output)
        return
    import onnx
    saved = onnx.load(output, load_external_data=False)
    size = os.path.getsize(output)
    click.echo(f"wrote {output} ({size / 1e6:.2f} MB): {desc}, input dims {fmt_shape(('N',) + dims)}")
    click.echo("")
    click.echo(saved.doc_string)
    click.echo("")
    others = "".join(f'\n      "{name}": ...,  # {analyzer._other_info[name][0]}, the model\'s input'
                     for name in analyzer.other_inputs)
    if analyzer.sequence_output:
        others += '\n      "output_position": np.full(len(x), -1, dtype=np.int64),  # -1 = the last position'
    click.echo(USAGE_SNIPPET.format(path=output, x=analyzer.data_input, xshape=fmt_shape(("N",) + dims),
                                    dtype=analyzer.input_dtype, others=others))


# -- cache ----------------------------------------------------------------------------------------------------
@cli.group(context_settings=CONTEXT_SETTINGS)
def cache():
    """The on-disk cache of relevance graphs.

    A second construction of the same model file with the same rules takes onnxruntime's optimized
    relevance graph from here instead of building it (VGG16: seconds instead of tens). The folder is
    $ONNXLRP_CACHE_DIR, else $XDG_CACHE_HOME/onnxlrp, else ~/.cache/onnxlrp; $ONNXLRP_CACHE=0 or a
    command's --no-cache turns it off; $ONNXLRP_CACHE_MAX_BYTES bounds it (default 20G: the least
    recently used entries go first).
    """


@cache.command("info", context_settings=CONTEXT_SETTINGS)
def cache_info():
    """Where the cache is, whether it is on, and what it holds."""
    from .. import cache as cache_module
    root = cache_module.default_dir()
    state = "on" if cache_module.resolve(True) else "off ($ONNXLRP_CACHE)"
    found = cache_module.entries(root) if os.path.isdir(root) else []
    total = sum(size for _, size, _ in found)
    click.echo(f"folder:  {root}")
    click.echo(f"state:   {state}")
    click.echo(f"entries: {len(found)}, {total / 2**20:.1f} MiB of at most {cache_module.max_bytes() / 2**30:.1f} GiB")


@cache.command("clear", context_settings=CONTEXT_SETTINGS)
def cache_clear():
    """Remove every entry."""
    from .. import cache as cache_module
    root = cache_module.default_dir()
    freed = cache_module.clear(root) if os.path.isdir(root) else 0
    click.echo(f"removed the cached relevance graphs in {root} ({freed / 2**20:.1f} MiB)")


from . import explain as _explain  # noqa: E402,F401  (registers the explain command)
from . import audit as _audit  # noqa: E402,F401  (registers the audit command)
from . import dataset as _dataset  # noqa: E402,F401  (registers the explain-dataset command)
