"""Explaining shards: decode -> batch -> relevance -> write, as a stream with bounded memory.

The same code runs on one machine (``explain_dataset`` without ``ray``: the analyzer's session) and inside
each Ray actor (a session on the exported relevance graph): a shard is cut into batches from its first row,
worker threads decode the next batches while onnxruntime runs the current one, and one writer thread appends
each explained batch to its shard's files, so that at most ``PREFETCH_BATCHES`` decoded batches, the batch
being explained and the one being written are in memory at once, whatever the dataset size.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np

from ..errors import InputError
from ..pipeline import loaded_ahead, shut_down
from .shards import ShardWriter, result_rows
from .sources import Decoder

#: decoded batches waiting ahead of the one onnxruntime runs (each on its own worker thread), where the
#: cores are not split (a GPU session, one core)
PREFETCH_BATCHES = 2


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class GraphRelevance:
    """``relevance(x, selection)`` on a session of the exported relevance graph (a Ray actor's, or the local
    pipeline's own when it splits the cores)."""

    def __init__(self, session, data_input, normalize_output_relevance):
        self.session, self.data_input = session, data_input
        self.normalize = np.asarray(bool(normalize_output_relevance))

    def __call__(self, x, selection):
        from ..interface import NORMALIZE, OUTPUT, RELEVANCE, SELECTION, SELECTION_USED  # no onnx in an actor
        if selection is None:
            selection = np.full(len(x), -1, np.int64)
        return self.session.run([OUTPUT, RELEVANCE, SELECTION_USED],
                                {self.data_input: x, SELECTION: selection, NORMALIZE: self.normalize})


#: decoded bytes at most waiting ahead of onnxruntime when there are many cores to decode on
AHEAD_BYTES = 256 << 20
#: batches timed per configuration when the cores are split (after one that warms the session up)
TIMED_BATCHES = 3
#: decoding below this part of the CPU time per input is not worth a trial of a split
SPLIT_MIN_SHARE = 0.1


class CoreSplit:
    """The local pipeline's relevance: the analyzer's session on every core, or, where decoding is a large part
    of the work, a session of the relevance graph on fewer cores, whichever runs the pipeline faster.

    Decoding and onnxruntime share the cores. A session that takes every core leaves the decoding threads
    none (they run between its spinning threads: on small models the pipeline was slower than a plain loop).
    After a warm-up batch the pipeline's rate is timed over TIMED_BATCHES batches with the analyzer's session;
    if decoding's share of the CPU time per input says a split could help (large models: it cannot), a
    session on n - d cores (d in proportion to that share, its idle threads sleeping instead of spinning) is
    timed the same way, and the faster of the two explains the rest. Both give the same relevance bit for
    bit (tests/test_dataset.py)."""

    def __init__(self, analyzer, prep, batch_size):
        from ..runtime import will_use_cuda
        self.analyzer, self.prep, self.n = analyzer, prep, cores()
        self.splittable = self.n >= 2 and analyzer.precision == "float32" and not will_use_cuda(analyzer.device)
        sample_bytes = int(np.prod(prep.sample_shape)) * np.dtype(prep.dtype).itemsize * max(1, batch_size)
        # enough decoding threads for any split, as many batches ahead as fit in AHEAD_BYTES
        self.decoders = max(1, min(self.n - 1, AHEAD_BYTES // sample_bytes)) if self.splittable else PREFETCH_BATCHES
        self.chosen = f"the analyzer's session ({'CUDA' if will_use_cuda(analyzer.device) else f'{self.n} threads'})"
        self._current = self._analyze
        self._phase, self._batches, self._inputs, self._since = "warm", 0, 0, None
        self._decode = self._relevance = 0.0
        self._rate_all_cores = None
        self._split = None

    def __call__(self, x, selection):
        return self._current(x, selection)

    def _analyze(self, x, selection):
        expl = self.analyzer.analyze(x, selection)
        return expl.output, expl.val, expl.output_selection

    def observe(self, n, decode, relevance):
        """After each relevance run: ``n`` inputs, decoding's CPU seconds per input, the run's seconds."""
        if not self.splittable or self._phase == "done":
            return
        now = time.perf_counter()
        self._batches += 1
        if self._phase in ("warm", "warm-split"):
            self._phase = "time" if self._phase == "warm" else "time-split"
            self._batches, self._inputs, self._since = 0, 0, now
            return
        self._inputs += n
        self._decode += decode * n
        self._relevance += relevance
        if self._batches < TIMED_BATCHES:
            return
        rate = self._inputs / max(now - self._since, 1e-9)
        if self._phase == "time":
            self._rate_all_cores = rate
            decode, relevance = self._decode / self._inputs, self._relevance / self._inputs
            share = decode / (decode + relevance * self.n)  # decoding's part of the CPU time per input
            if share < SPLIT_MIN_SHARE:
                self._finish(None, f", kept: decoding {100 * share:.0f} % of the CPU time")
                return
            d = max(1, min(self.n - 1, round(self.n * share)))
            self._split = (self._split_session(self.n - d), d)
            self._current, self._phase, self._batches = self._split[0], "warm-split", 0
            return
        d = self._split[1]
        rates = f"{self._rate_all_cores:.0f} vs {rate:.0f} inputs/s"
        if rate > self._rate_all_cores:
            self._finish(self._split[0], f"onnxruntime on {self.n - d} of {self.n} cores, decoding on {d} ({rates})")
        else:
            self._finish(None, f", kept ({rates} with onnxruntime on {self.n - d} cores)")

    def _finish(self, relevance, text):
        self._phase = "done"
        if relevance is None:
            self._current, self._split = self._analyze, None
            self.chosen += text
        else:
            self._current, self.chosen = relevance, text

    def _split_session(self, threads):
        from ..runtime import make_session
        a = self.analyzer
        graph = a._export(a._build(self.prep.sample_shape)).SerializeToString()
        session = make_session(graph, "cpu", verbose=False, threads=threads, prepack=a.prepack_weights)
        return GraphRelevance(session, a.data_input, a.normalize_output_relevance)


class ShardExplainer:
    """Explains whole shards with ``relevance(x, selection) -> (outputs (n, K), relevance, explained)``."""

    def __init__(self, relevance, prep, folder, batch_size, output_selection=None, heatmap_options=None,
                 decoders=PREFETCH_BATCHES, observe=None):
        self.relevance, self.prep, self.folder = relevance, prep, folder
        self.decoders = decoders
        #: observe(inputs, decoding CPU s per input, relevance run s) after each run (CoreSplit.observe)
        self.observe = observe
        self.batch_size = int(batch_size)
        self.output_selection = output_selection
        self.heatmap_options = heatmap_options
        self._thread_decoder = threading.local()  # a Decoder per worker thread: it keeps its file open

    def _batches(self, shards):
        for k, items in shards:
            for start in range(0, len(items), self.batch_size):
                yield k, len(items), items[start:start + self.batch_size], start + self.batch_size >= len(items)

    def _load(self, batch, stop):
        """(stacked samples or None, {row: reason}, decoding's CPU seconds per input) of one batch, on a worker
        thread; None once ``stop`` is set."""
        decoder = getattr(self._thread_decoder, "decoder", None)
        if decoder is None:
            decoder = self._thread_decoder.decoder = Decoder(self.prep)
        samples, errors = [], {}
        started = time.thread_time()
        for i, item in enumerate(batch[2]):
            if stop.is_set():
                return None
            try:
                samples.append(decoder.sample(item))
            except InputError as exc:  # its own error row; the others are explained
                text = str(exc)
                errors[i] = text[len(item[3]) + 2:] if text.startswith(f"{item[3]}: ") else text
        x = np.stack(samples) if samples else None
        return x, errors, (time.thread_time() - started) / max(len(batch[2]), 1)

    def _explain(self, loaded):
        """The relevance run on a loaded batch (the only step on the calling thread)."""
        x, errors, decode = loaded
        if x is None:
            return None
        sel = None if self.output_selection is None else np.full(len(x), self.output_selection, np.int64)
        started = time.perf_counter()
        explained = self.relevance(x, sel)
        if self.observe is not None:
            self.observe(len(x), decode, time.perf_counter() - started)
        return explained

    def _rows(self, items, errors, explained):
        """The batch's rows and relevance, NaN in the rows that did not decode (on the writer thread)."""
        n = len(items)
        if explained is None:
            outputs, relevance = np.full((n, 1), np.nan, np.float32), None
            selection = np.full(n, -1, np.int64)
        else:
            out, relevance, selection = explained
            outputs = np.asarray(out).reshape(len(relevance), -1)
        if errors:
            ok = [i for i in range(n) if i not in errors]
            full = np.full((n, *self.prep.sample_shape), np.nan, np.float32)
            if relevance is not None:
                full[ok] = relevance
                grown = np.full((n, outputs.shape[1]), np.nan, outputs.dtype)
                grown[ok] = outputs
                chosen = np.full(n, -1, np.int64)
                chosen[ok] = selection
                outputs, selection = grown, chosen
            relevance = full
        return result_rows([it[3] for it in items], outputs, relevance, selection, errors)

    def run(self, shards, on_shard=None, on_rows=None):
        """Explain ``shards`` ((k, items) pairs, in order); ``on_rows(n)`` after each batch is written,
        ``on_shard(summary)`` after each shard is committed.
        Returns the summaries. An exception or Ctrl-C aborts the shard in flight (its files never appear)
        and leaves the committed ones."""
        from concurrent.futures import ThreadPoolExecutor
        stop = threading.Event()
        writer_pool = ThreadPoolExecutor(1, thread_name_prefix="onnxlrp-write")
        writers, summaries, pending = {}, [], None

        def write(batch, errors, explained):
            k, n, items, last = batch
            rows, relevance = self._rows(items, errors, explained)
            w = writers.get(k)
            if w is None:
                w = writers[k] = ShardWriter(self.folder, k, n, self.prep.sample_shape, self.heatmap_options)
            w.add(rows, relevance)
            if on_rows is not None:
                on_rows(len(rows))
            if last:
                del writers[k]
                summary = w.commit()
                summaries.append(summary)
                if on_shard is not None:
                    on_shard(summary)

        try:
            for batch, loaded in loaded_ahead(self._batches(shards), lambda b: self._load(b, stop),
                                              self.decoders, stop):
                explained = self._explain(loaded)
                if pending is not None:
                    pending.result()  # one batch written while the next runs: memory stays bounded
                pending = writer_pool.submit(write, batch, loaded[1], explained)
            if pending is not None:
                pending.result()
        except BaseException:
            stop.set()
            raise
        finally:
            shut_down(writer_pool)
            for w in writers.values():
                w.abort()
        return summaries


class Progress:
    """Rows done, rate and ETA on stderr: one updating line on a terminal, else a line every ``every`` s."""

    def __init__(self, total, label="explain-dataset", enabled=None, every=10.0, file=None):
        self.file = file or sys.stderr
        self.total, self.done, self.label = total, 0, label
        self.tty = self.file.isatty()
        self.enabled = self.tty if enabled is None else bool(enabled)
        self.every = every
        self.started = self._last = time.perf_counter()

    def update(self, n):
        self.done += n
        now = time.perf_counter()
        if not self.enabled or (not self.tty and now - self._last < self.every and self.done < self.total):
            return
        self._last = now
        rate = self.done / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "?" if left == float("inf") else f"{int(left) // 3600}:{int(left) % 3600 // 60:02d}:{int(left) % 60:02d}"
        line = (f"{self.label} {self.done}/{self.total} rows ({100 * self.done // max(self.total, 1)}%) "
                f"{rate:.1f} rows/s ETA {eta}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=self.file, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(file=self.file)
