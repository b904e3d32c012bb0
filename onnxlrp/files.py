"""Reading input files and writing result files safely: never unpickling, never through a link someone
planted, never half a file.

``read_npy`` loads an array without ever unpickling (an object array or an ``.npz`` renamed ``.npy`` is
refused by name); ``natural_key`` orders file names as people count (img2 before img10).

Each output goes to a fresh temporary file in the target's own folder, created exclusively
(``tempfile.mkstemp``: O_CREAT | O_EXCL with a random name, so a symlink planted at a predictable name
is never followed), written through that descriptor (not reopened by name), and renamed over the target
with ``os.replace``, which replaces a link at the target itself rather than writing where it points.
"""
from __future__ import annotations

import os
import re
import tempfile
import threading
from contextlib import contextmanager

from .errors import InputError

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



def natural_key(name):
    """img2 before img10, a.png before a2.png."""
    stem, ext = os.path.splitext(name)
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", stem) if t], ext


def read_npy(path, mmap=True):
    """The array in the ``.npy`` file ``path`` (memory-mapped by default); InputError naming the file when it
    is not one, holds pickled objects (never loaded) or is an ``.npz`` archive."""
    import numpy as np
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "pickled" in text or "Python objects" in text or "Object arrays" in text:
            raise InputError(f"{path}: holds pickled Python objects, which are never loaded (allow_pickle=False); "
                             "save a numeric array with numpy.save") from None
        raise InputError(f"{path}: not a readable .npy array ({text})") from None
    if isinstance(arr, np.lib.npyio.NpzFile):  # np.load goes by the content: a zip is an .npz archive
        names = arr.files
        arr.close()
        listed = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise InputError(f"{path}: is an .npz archive (of {listed or 'no arrays'}), not a .npy array; save the "
                         "input with numpy.save")
    return arr
