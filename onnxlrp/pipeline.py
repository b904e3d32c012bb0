"""Threads around the relevance run: inputs decoded ahead on workers while onnxruntime runs the current batch
(``onnxlrp explain`` on a folder, ``onnxlrp.dataset``), with bounded memory and a clean stop."""
from __future__ import annotations

from collections import deque


def loaded_ahead(batches, load, ahead, stop):
    """``(batch, load(batch))`` for each of ``batches`` in order, up to ``ahead`` batches loading on worker
    threads while the caller works on the current one (0: each loads when it is asked for). ``batches`` is
    read only as loads are queued. When the caller stops early (an interrupt, an error, close()), ``stop``
    is set: the queued loads are cancelled and the running ones end after the input they are on."""
    if ahead == 0:
        for batch in batches:
            yield batch, load(batch)
        return
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(ahead, thread_name_prefix="onnxlrp-load")
    queued = deque()
    try:
        for batch in batches:
            queued.append((batch, pool.submit(load, batch)))
            if len(queued) > ahead:
                batch, task = queued.popleft()
                yield batch, task.result()
        while queued:
            batch, task = queued.popleft()
            yield batch, task.result()
    except BaseException:
        stop.set()
        raise
    finally:
        shut_down(pool)


def shut_down(pool):
    """Cancel ``pool``'s queued tasks and wait for its threads (each ends after the input it is on). A
    Ctrl-C does not cut the wait short, so that no thread decodes or writes after the command returns."""
    while True:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
            return
        except KeyboardInterrupt:
            pass
