"""``onnxlrp explain-dataset``: a whole dataset in, sharded relevance and a manifest out (onnxlrp.dataset)."""
from __future__ import annotations

import os

import click

from .app import (CLIError, CONTEXT_SETTINGS, ShapeType, build_rules, cache_option, cli, debug_option, device_option,
                  load_analyzer, model_argument, output_name_option, pop_rule_kwargs, precision_option,
                  rule_options, skip_checks_option)
from .explain import image_options

EPILOG = """\b
Examples:
  onnxlrp explain-dataset model.onnx photos/ --out lrp_dataset -c EpsilonGammaBox --low -3 --high 3
  onnxlrp explain-dataset model.onnx 'val/**/*.JPEG' --out val_lrp --format parquet --heatmaps
  onnxlrp explain-dataset model.onnx shards/*.parquet --column image --out out --ray auto --gpus-per-worker 1
Rerunning the same command skips the shards already written (an interrupted run resumes)."""


@cli.command("explain-dataset", context_settings=CONTEXT_SETTINGS, epilog=EPILOG)
@model_argument
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...", type=click.Path(path_type=str))
@rule_options
@click.option("--out", "-o", required=True, type=click.Path(path_type=str), metavar="DIR",
              help="Folder for the shards, heatmaps and manifest.json (created if needed).")
@click.option("--format", "fmt", type=click.Choice(["npy", "parquet"]), default="npy", show_default=True,
              help="npy: shard-K.npy relevance + shard-K.rows.json; parquet: one shard-K.parquet (needs pyarrow).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Rows per shard: the unit that is written at once and skipped on a rerun.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=32, show_default=True,
              help="Inputs explained per onnxruntime run.")
@click.option("--output-selection", "-k", type=click.IntRange(min=0), default=None, metavar="K",
              help="Explain output K for every input. Default: each input's top class.")
@click.option("--heatmaps", is_flag=True, help="Also write a heatmap PNG (with a colour bar) per input.")
@click.option("--column", default=None, help="Parquet column holding the input (default: image, input, ... or "
                                             "the first image/array column).")
@click.option("--id-column", default=None, help="Parquet column naming each row (default: path, id, ...).")
@image_options
@click.option("--input-shape", type=ShapeType(), default=None,
              help="The input dims after the batch axis (e.g. 3,224,224) for models with dynamic sizes.")
@click.option("--force", "-f", is_flag=True, help="Replace a run of another configuration in --out.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run on a Ray cluster (pip install 'onnxlrp[ray]'): 'auto' (the running cluster), an address, "
                   "or 'local' (a new one on this machine). --out must be on storage every node sees.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="With --ray: actors (each one onnxruntime session). Default: what the cluster's CPUs/GPUs allow.")
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="With --ray: GPUs per actor (0: CPU actors).")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="With --ray: CPUs per actor.")
@device_option
@click.option("--progress/--no-progress", default=None, help="Rows, rate and ETA on stderr (default: on a terminal).")
@output_name_option
@precision_option
@skip_checks_option
@cache_option
@debug_option
def explain_dataset(model, sources, out, fmt, shard_size, batch_size, output_selection, heatmaps, column, id_column,
                    mean, std, no_normalize, layout, input_shape, force, ray_address, workers, gpus_per_worker,
                    cpus_per_worker, device, progress, output_name, precision, skip_checks, **kwargs):
    """Explain every input of SOURCE... with LRP and write the relevance in shards to --out.

    SOURCE is a folder (searched recursively for images, .npy and Parquet files), a glob, or a file: an
    image, a .npy array (one sample or a batch) or a Parquet file (one input per row). Images are
    preprocessed as 'onnxlrp explain' does. Each shard holds --shard-size rows: their relevance, and per row
    the input, explained class, score, predicted class, relevance sum and status ('error' with the reason for
    an input that does not decode, its relevance NaN). manifest.json records the run; rerunning the same
    command skips the finished shards.
    """
    if no_normalize and (mean is not None or std is not None):
        raise click.UsageError("--no-normalize and --mean/--std exclude each other")
    if ray_address is None and (workers is not None or gpus_per_worker):
        raise click.UsageError("--workers and --gpus-per-worker go with --ray")
    spec, _ = build_rules(**pop_rule_kwargs(kwargs))
    if not os.path.isfile(model):
        raise CLIError(f"{model}: no such file" if not os.path.exists(model) else f"{model}: is not a file")
    from ..dataset import explain_dataset as run
    analyzer = load_analyzer(model, spec, device=device, verbose=False, skip_checks=skip_checks,
                             precision=precision, output_name=output_name)
    try:
        result = run(analyzer, source=list(sources), out=out, batch_size=batch_size, shard_size=shard_size,
                     format=fmt, output_selection=output_selection, heatmaps=heatmaps, input_shape=input_shape,
                     layout=layout, mean=mean, std=std, normalize=not no_normalize, column=column,
                     id_column=id_column, force=force, progress=progress, ray=ray_address, workers=workers,
                     gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)
    except KeyboardInterrupt:
        click.echo(f"interrupted: the shards finished so far are in {out}; rerun the same command to go on",
                   err=True)
        raise click.exceptions.Exit(130) from None
    skipped = f", {result.skipped} shards already done" if result.skipped else ""
    errors = f", {result.errors} errors (status 'error' in the rows)" if result.errors else ""
    click.echo(f"{result.out}: {result.items} inputs in {result.shards} shards; explained {result.rows} in "
               f"{result.seconds:.1f} s ({result.rate:.1f}/s){skipped}{errors}")
