"""Writing result files safely: never through a link someone planted, never half a file.

Each output goes to a fresh temporary file in the target's own folder, created exclusively
(``tempfile.mkstemp``: O_CREAT | O_EXCL with a random name, so a symlink planted at a predictable name
is never followed), written through that descriptor (not reopened by name), and renamed over the target
with ``os.replace``, which replaces a link at the target itself rather than writing where it points.
"""
from __future__ import annotations

import os
import tempfile
import threading
from contextlib import contextmanager

_UMASK_LOCK = threading.Lock()


def _umask():
    # reading the umask means setting it: two threads at once would each see the other's 0 (`onnxlrp
    # explain` writes on several)
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


@contextmanager
def atomic_write(target, mode="wb", encoding=None):
    """A file object on a new exclusive temporary file next to ``target``; on success it replaces
    ``target`` (with the permissions a new file would get), on failure it is removed."""
    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.", suffix=".partial")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600
        with os.fdopen(fd, mode, encoding=encoding) as f:
            fd = None
            yield f
        os.replace(tmp, target)
    except BaseException:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise

