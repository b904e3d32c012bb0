"""Explaining a dataset on a Ray cluster (``explain_dataset(..., ray="auto" | ADDRESS)``, ``onnxlrp[ray]``).

The driver exports the relevance graph once and puts it in Ray's object store; Ray Data maps the unfinished
shards onto an actor pool (``map_batches`` with a callable class and an ``ActorPoolStrategy``, ``num_gpus``
each on clusters with GPUs). Each actor makes one onnxruntime session from that graph when it starts (no onnxlrp
rewriting on the workers) and explains whole shards with the same pipeline as one machine
(onnxlrp.dataset.pipeline): the same batches, the same decoding, the same files, written by the actor into the
output folder, which must therefore be on storage every node sees (a shared file system). The driver receives
one small summary per shard, for the progress line and the manifest.

Shards rather than Ray's ``write_parquet``: Ray names its files by block and writes them in place, so a rerun
cannot tell which inputs are done and a crash can leave half a file; a shard written under a temporary name
and renamed is either there or not, which is what resuming needs.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..errors import LRPError


class ShardActor:
    """One Ray actor: one relevance-graph session, whole shards explained per call."""

    def __init__(self, graph, data_input, normalize_output_relevance, prep, folder, batch_size, output_selection,
                 heatmap_options, device, cpus, prepack=True):
        import ray

        from ..runtime import make_session
        from .pipeline import GraphRelevance, ShardExplainer
        if isinstance(graph, ray.ObjectRef):
            graph = ray.get(graph)
        # the actor's CPUs: one decoding thread, onnxruntime on the others (at least one), not spinning, so
        # that actors sharing a node do not take each other's cores
        threads = max(1, int(cpus) - 1) if device == "cpu" else None
        session = make_session(graph, device, verbose=False, threads=threads, prepack=prepack)
        self.explainer = ShardExplainer(GraphRelevance(session, data_input, normalize_output_relevance), prep,
                                        folder, batch_size, output_selection, heatmap_options, decoders=1)

    def __call__(self, batch):
        shards = [(int(k), json.loads(items)) for k, items in zip(batch["shard"], batch["items"])]
        summaries = self.explainer.run(shards)
        return {key: np.asarray([s[key] for s in summaries], np.int64) for key in ("shard", "rows", "errors")}


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise LRPError("ray=...: explaining on Ray needs Ray Data (pip install 'onnxlrp[ray]')") from None
    return ray


def run_on_ray(analyzer, graph, shards, folder, prep, batch_size, output_selection, heatmap_options, *,
               address="auto", workers=None, gpus_per_worker=0.0, cpus_per_worker=1.0, on_shard=None):
    """Explain ``shards`` ((k, items) pairs) on the Ray cluster at ``address`` ("auto": the one this process
    is connected to or finds, "local": a new one on this machine); returns the shard summaries."""
    ray = _ray()
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        except ConnectionError as exc:
            raise LRPError(f"ray={address!r}: no Ray cluster to connect to ({exc}); start one with `ray start "
                           "--head`, give its address, or ray='local'") from None
        started = True
    try:
        resources = ray.cluster_resources()
        if gpus_per_worker and resources.get("GPU", 0) < gpus_per_worker:
            raise LRPError(f"gpus_per_worker={gpus_per_worker}: the Ray cluster has {resources.get('GPU', 0):g} "
                           "GPUs")
        per = gpus_per_worker if gpus_per_worker else cpus_per_worker
        have = resources.get("GPU" if gpus_per_worker else "CPU", 1)
        workers = int(workers or max(1, have // per))
        workers = max(1, min(workers, len(shards)))
        device = "cuda" if gpus_per_worker else "cpu"
        ref = ray.put(graph)
        rows = [{"shard": k, "items": json.dumps(items)} for k, items in shards]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(
            ShardActor, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker or None,
            fn_constructor_kwargs=dict(graph=ref, data_input=analyzer.data_input,
                                       normalize_output_relevance=analyzer.normalize_output_relevance, prep=prep,
                                       folder=folder, batch_size=batch_size, output_selection=output_selection,
                                       heatmap_options=heatmap_options, device=device,
                                       cpus=cpus_per_worker, prepack=analyzer.prepack_weights))
        summaries = []
        for row in ds.iter_rows():
            summary = {key: int(row[key]) for key in ("shard", "rows", "errors")}
            summaries.append(summary)
            if on_shard is not None:
                on_shard(summary)
        return summaries
    finally:
        if started:
            ray.shutdown()


def cluster_address(value):
    """``ray=`` as given: None (no Ray), "auto", "local" or an address."""
    if value in (None, False):
        return None
    if value is True:
        return "auto"
    return os.fspath(value)
