"""The on-disk cache of relevance graphs: a second ``LRP(model, composite)`` of the same file is ready in
the time onnxruntime needs to map the weights (ResNet50 in a fresh process, imports included: 3.6 s ->
0.6 s; see the README's Speed section). A hit imports neither onnx nor onnx-graphsurgeon.

What is kept: onnxruntime's own optimized form of the relevance graph (``optimized_model_filepath``: the
constant folding and the NCHWc weight layouts of ``ORT_ENABLE_ALL`` done once), its weights in one file that
onnxruntime maps instead of reading, the large dense weights the graph takes as inputs in another
(``inputs.weights``, written by onnxlrp on a thread and mapped by numpy: onnxruntime took 0.9 s to copy and
write VGG16's), and what the analyzer needs to run it (input and output names and shapes). A hit builds no
canonized graph: layers, rules and the canonization report are made from the model when something asks for
them (``show_layer_indices``, another input shape, a diagnosis).

Where: ``$ONNXLRP_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnxlrp``, else ``~/.cache/onnxlrp``; ``LRP(...,
cache=DIR)`` names another folder. Off: ``LRP(..., cache=False)``, ``$ONNXLRP_CACHE=0`` or the command line's
``--no-cache``. Bounded: least recently used entries go when the folder holds more than
``$ONNXLRP_CACHE_MAX_BYTES`` (default 20 GiB; K/M/G suffixes). ``onnxlrp cache info|clear`` shows and empties it.

The key: the model's content (SHA-256 of the file and of every external-data file it names; remembered per
path with its size, inode, mtime and ctime, so unchanged files are not read again), a description of the
rules or composite (every parameter; arrays by their bytes) and the source of any rule or analyzer class
that is not onnxlrp's, onnxlrp's version and a hash of its own source files, the onnx, onnxruntime and numpy
versions, the CPU (the optimized layouts are the CPU's), the analyzer's options and the input shape. A rule
that cannot be described (a lambda, a class defined in an interactive session) is not cached.

Safe against concurrent writers and crashes: an entry is written into a fresh temporary folder and renamed
into place whole (the first writer wins; a reader never sees half an entry). Each file's size and CRC-32 are
checked on every hit (while onnxruntime loads, on the other core); a corrupt, truncated or unreadable entry
is removed and rebuilt. The folder must be the user's own and not writable by others, else the cache is off
(with a note). Only CPU sessions of float32 graphs are cached: a CUDA session's optimized form is not
portable, and float64 is for verification.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import zlib
from functools import lru_cache

import numpy as np

#: the layout of an entry; bump it when what an entry holds changes
FORMAT = 1
DEFAULT_MAX_BYTES = 20 << 30
GRAPH_FILE, WEIGHTS_FILE, ENTRY_FILE = "relevance.onnx", "relevance.weights", "entry.json"
#: the weights the graph takes as inputs (onnxlrp.runtime.lift_dense_weights), written by onnxlrp
INPUTS_FILE = "inputs.weights"
#: where each of them starts in INPUTS_FILE is a multiple of this
_ALIGN = 64
#: a temporary folder older than this is a crashed writer's
STALE_SECONDS = 3600
#: StringStringEntryProto(key="location"), as serialized: a file without these bytes names no external data
_LOCATION_KEY = b"\n\x08location"
_CHUNK = 8 << 20

_notes = set()


class Uncacheable(Exception):
    """The rules or the analyzer cannot be described for a key (the message says what)."""


def _note(message, verbose=True):
    if verbose and message not in _notes:
        _notes.add(message)
        print(f"onnxlrp: {message}", file=sys.stderr)


def _parse_bytes(text):
    text = str(text).strip().upper()
    scale = 1
    for suffix, power in (("K", 10), ("M", 20), ("G", 30), ("T", 40)):
        if text.endswith(suffix):
            text, scale = text[:-1], 1 << power
            break
    return int(float(text) * scale)


def default_dir() -> str:
    if os.environ.get("ONNXLRP_CACHE_DIR"):
        return os.environ["ONNXLRP_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "onnxlrp")


def resolve(cache) -> str | None:
    """The cache folder for ``LRP(..., cache=...)``: True = the default (unless $ONNXLRP_CACHE is 0/off/false),
    False/None = off, a path = that folder."""
    if cache is None or cache is False:
        return None
    if cache is True:
        if os.environ.get("ONNXLRP_CACHE", "1").strip().lower() in ("0", "off", "false", "no"):
            return None
        return default_dir()
    return os.fspath(cache)


def max_bytes() -> int:
    value = os.environ.get("ONNXLRP_CACHE_MAX_BYTES")
    if not value:
        return DEFAULT_MAX_BYTES
    try:
        return _parse_bytes(value)
    except ValueError:
        raise ValueError(f"$ONNXLRP_CACHE_MAX_BYTES={value!r}: expected a number of bytes (K/M/G/T suffixes)") \
            from None


def usable_root(root, verbose=True) -> str | None:
    """``root`` made (mode 0700) and checked: a folder of this user's that others cannot write to (a planted
    entry would be run); None, with a note, when it is not."""
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        info = os.stat(root)
    except OSError as exc:
        _note(f"the cache is off: cannot create {root} ({exc.strerror})", verbose)
        return None
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        _note(f"the cache is off: {root} belongs to another user or others may write to it "
              "(chmod go-w, or set $ONNXLRP_CACHE_DIR)", verbose)
        return None
    return root


# -- the key ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _package_hash() -> str:
    """onnxlrp's own source: a development checkout changes its code without changing its version."""
    digest = hashlib.sha256()
    package = os.path.dirname(os.path.abspath(__file__))
    for folder, dirs, files in os.walk(package):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, package).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def cpu_identity() -> str:
    """What onnxruntime's CPU kernels and layouts depend on: the machine and its instruction set."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    parts.append(line.strip())
                if line.strip() == "":  # the first processor is enough
                    break
    except OSError:
        pass
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _module_source(cls, sources):
    module = sys.modules.get(cls.__module__)
    if cls.__module__ == "builtins" or cls.__module__.split(".")[0] in ("onnxlrp", "numpy"):
        return
    path = getattr(module, "__file__", None)
    if not path or not os.path.isfile(path):
        raise Uncacheable(f"{cls.__qualname__} is defined in {cls.__module__}, which has no source file")
    if path not in sources:
        with open(path, "rb") as f:
            sources[path] = hashlib.sha256(f.read()).hexdigest()


def _class_name(cls, sources):
    for base in cls.__mro__:
        _module_source(base, sources)
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(obj, sources=None, depth=0):
    """A JSON-able description of ``obj`` (rules, composites and their parameters) that changes whenever
    what they compute may; ``sources`` collects {file: hash} of the modules that define classes outside
    onnxlrp. Raises Uncacheable for what cannot be described (functions, objects of unknown kinds)."""
    from .composite import Composite, Primitive
    from .rules.base import Rule
    sources = {} if sources is None else sources
    if depth > 20:
        raise Uncacheable("the rules nest too deep to describe")
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return ["float", repr(obj)]
    if isinstance(obj, np.generic):
        return [obj.dtype.str, repr(obj.item())]
    if isinstance(obj, np.ndarray):
        data = np.ascontiguousarray(obj)
        return ["ndarray", data.dtype.str, list(data.shape), hashlib.sha256(data.tobytes()).hexdigest()]
    if isinstance(obj, (list, tuple)):
        return [type(obj).__name__, [describe(v, sources, depth + 1) for v in obj]]
    if isinstance(obj, dict):
        return ["dict", [[describe(k, sources, depth + 1), describe(v, sources, depth + 1)] for k, v in obj.items()]]
    if isinstance(obj, range):
        return ["range", obj.start, obj.stop, obj.step]
    if isinstance(obj, type):
        return ["class", _class_name(obj, sources)]
    if isinstance(obj, (Rule, Primitive, Composite)):
        fields = {k: v for k, v in vars(obj).items()}
        return [_class_name(type(obj), sources), describe(fields, sources, depth + 1)]
    raise Uncacheable(f"cannot describe a {type(obj).__name__} ({obj!r:.60})")


def _version(module):
    """A package's version from its installed metadata: a cache hit must not import onnx to learn it (the
    import takes over a second, most of a hit's time)."""
    import importlib.metadata
    for dist in (module, module.replace("_", "-"), "onnxruntime-gpu" if module == "onnxruntime" else None):
        if dist is None:
            continue
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return importlib.import_module(module).__version__


def environment() -> dict:
    from . import __version__
    return {"format": FORMAT, "onnxlrp": __version__, "onnxlrp_source": _package_hash(),
            "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"),
            "onnx_graphsurgeon": _version("onnx_graphsurgeon"), "numpy": np.__version__,
            "python": platform.python_version(), "cpu": cpu_identity()}


def entry_key(content: str, description: dict) -> str:
    text = json.dumps({"model": content, "environment": environment(), **description}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# -- the model's content --------------------------------------------------------------------------------
def _stat_record(path):
    info = os.stat(path)
    return [os.path.abspath(path), info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]


def _memo_path(root, path):
    return os.path.join(root, "paths", hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:32] + ".json")


def remembered_content(root, path) -> str | None:
    """The content hash remembered for ``path`` if neither it nor its external-data files changed since."""
    try:
        with open(_memo_path(root, path)) as f:
            memo = json.load(f)
        if memo.get("format") != FORMAT or not isinstance(memo.get("files"), list):
            return None
        for record in memo["files"]:
            if _stat_record(record[0]) != record:
                return None
        content = memo["content"]
        return content if isinstance(content, str) else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _hash_file(path, digest, look_for=None):
    """Feed the file to ``digest``; whether ``look_for`` occurs in it (across chunk boundaries too)."""
    found, tail = False, b""
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])  # hashlib lets go of the GIL here: this runs beside the loading
            if look_for is not None and not found:
                found = look_for in (tail + bytes(view[:min(n, len(look_for))])) or \
                    buffer.find(look_for, 0, n) >= 0
                tail = bytes(view[max(0, n - len(look_for) + 1):n])
    return found


def content_hash(path):
    """(SHA-256 of the model file and of each external-data file it names, [the files read]); None if a file
    changed while it was read."""
    before = _stat_record(path)
    digest = hashlib.sha256()
    files = [path]
    if _hash_file(path, digest, _LOCATION_KEY):
        import onnx
        folder = os.path.dirname(os.path.abspath(path))
        proto = onnx.load(path, load_external_data=False)
        locations = set()
        for tensor in _all_tensors(proto):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                locations.update(e.value for e in tensor.external_data if e.key == "location")
        for location in sorted(locations):
            external = os.path.join(folder, location)
            digest.update(b"\0" + location.encode() + b"\0")
            _hash_file(external, digest)
            files.append(external)
    if _stat_record(path) != before:
        return None
    return digest.hexdigest(), files


def _all_tensors(proto):
    from onnx.external_data_helper import _get_all_tensors
    return _get_all_tensors(proto)


class ContentHasher:
    """The model file's content hash, worked out on a thread beside the loading (hashlib and file reads let go
    of the GIL), for the cache entry written after a miss."""

    def __init__(self, path):
        self.result = self.error = None
        self._thread = threading.Thread(target=self._run, args=(path,), name="onnxlrp-hash", daemon=True)
        self._thread.start()

    def _run(self, path):
        try:
            self.result = content_hash(path)
        except Exception as exc:  # the loader reports a bad file better; the entry is then not written
            self.error = exc

    def get(self):
        self._thread.join()
        return self.result


def remember_content(root, path, content, files):
    try:
        os.makedirs(os.path.join(root, "paths"), mode=0o700, exist_ok=True)
        _write_json(_memo_path(root, path), {"format": FORMAT, "content": content,
                                             "files": [_stat_record(f) for f in files]})
    except OSError:
        pass


def _write_json(target, data):
    from .files import atomic_write
    with atomic_write(target, "w", encoding="utf-8") as f:
        json.dump(data, f)


class ModelCache:
    """The cache as one analyzer of one model file uses it: ``description`` is everything but the model's
    content and the input shape that the relevance graph depends on (rules, options, classes)."""

    def __init__(self, root, path, description, verbose=True):
        self.root, self.path, self.description, self.verbose = root, path, description, verbose
        self.content = remembered_content(root, path)
        self._hasher = None if self.content else ContentHasher(path)
        self._lock = threading.Lock()  # a pending entry's thread asks for the key too
        self.used = set()  # the keys this analyzer read or wrote

    def key(self, shape, wait=True):
        """The entry key for an input shape; None while the content is being hashed (``wait=False``) or when
        it could not be."""
        if self.content is None:
            hasher = self._hasher
            if hasher is None or (not wait and hasher._thread.is_alive()):
                return None
            result = hasher.get()  # waited for without the lock: a lookup with wait=False never blocks
            with self._lock:  # a pending entry's thread may get here too
                if self.content is None and self._hasher is hasher:
                    self._hasher = None
                    if result is not None:
                        self.content, files = result
                        remember_content(self.root, self.path, self.content, files)
            if self.content is None:
                return None
        return entry_key(self.content, {**self.description, "shape": None if shape is None else list(shape)})

    def load(self, shape, device, verbose, spinning=True):
        """(entry, session) on a hit, else None; a damaged entry is removed, and said so. ``spinning``: the
        session's (runtime.make_session)."""
        from .runtime import optimized_session
        key = self.key(shape, wait=False)
        entry = lookup(self.root, key) if key else None
        if entry is None:
            return None
        checker = entry.verifier()  # on the other core, while onnxruntime maps the weights
        try:
            prepack = bool(entry.meta.get("analyzer", {}).get("prepack_weights", True))
            session = optimized_session(entry.graph_path, device, verbose, prepack=prepack,
                                        weight_inputs=entry.weight_inputs(), spinning=spinning)
        except Exception:
            session = None
        checker.join()
        if session is None or not checker.ok:
            remove(self.root, key)
            _note(f"a damaged cache entry ({os.path.join(self.root, key)}) was removed; building the relevance "
                  "graph again", verbose)
            return None
        entry.touch()
        self.used.add(key)
        return entry, session

    def start_entry(self, shape):
        """A PendingEntry for the graph about to be built, or None (the folder is not writable). Its key is
        asked for only when it is finished, on its thread: the model's hash is not waited for here."""
        def key():
            found = self.key(shape)
            if found is not None:
                self.used.add(found)
            return found
        try:
            return PendingEntry(self.root, key, self.verbose)
        except OSError:
            return None

    def forget(self):
        """Remove the entries this analyzer used (they disagreed with the model)."""
        for key in self.used:
            remove(self.root, key)
        self.used.clear()


# -- entries -------------------------------------------------------------------------------------------
def _crc_file(path):
    crc = 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while True:
            n = f.readinto(buffer)
            if not n:
                return crc
            crc = zlib.crc32(view[:n], crc)  # zlib lets go of the GIL on large buffers


def _file_records(folder):
    return {name: [os.path.getsize(os.path.join(folder, name)), _crc_file(os.path.join(folder, name))]
            for name in (GRAPH_FILE, WEIGHTS_FILE, INPUTS_FILE) if os.path.exists(os.path.join(folder, name))}


def _write_arrays(path, arrays):
    """Write the arrays one after another (each at a multiple of _ALIGN) into the new file ``path``; their
    [name, dtype, shape, offset] records."""
    records, offset = [], 0
    with open(path, "xb") as f:  # in the entry's own fresh folder: nothing else is there
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            f.write(b"\0" * (-offset % _ALIGN))
            offset += -offset % _ALIGN
            records.append([name, array.dtype.str, list(array.shape), offset])
            f.write(memoryview(array.reshape(-1)).cast("B"))  # numpy's buffer, not a copy of it
            offset += array.nbytes
    return records


class PendingEntry:
    """A new entry being written: onnxruntime writes its optimized graph into ``folder`` (a fresh temporary
    folder) while it makes the session; ``finish`` then writes the weights the graph takes as inputs, asks
    for the key (``key``: a callable; the model's hash may still be running), checksums the files and
    renames the folder into place, all on a thread, so the first construction waits for neither the hash
    nor the disk. Python waits for that thread at exit."""

    def __init__(self, root, key, verbose=True):
        self.root, self._key, self.key, self.verbose = root, key, None, verbose
        self.folder = tempfile.mkdtemp(prefix=".tmp-", dir=root)
        self.graph_path = os.path.join(self.folder, GRAPH_FILE)
        self.thread = None

    def finish(self, meta, weight_inputs=None):
        self.thread = threading.Thread(target=self._finish, args=(meta, weight_inputs or {}),
                                       name="onnxlrp-cache-write")
        self.thread.start()

    def _finish(self, meta, weight_inputs):
        try:
            if not os.path.exists(self.graph_path):
                raise OSError("onnxruntime wrote no optimized graph")
            meta = {**meta, "weight_inputs": _write_arrays(os.path.join(self.folder, INPUTS_FILE), weight_inputs)
                    if weight_inputs else []}
            self.key = self._key()
            if self.key is None:  # the model could not be hashed (it changed while it was read)
                shutil.rmtree(self.folder, ignore_errors=True)
                return
            entry = {"format": FORMAT, "key": self.key, "files": _file_records(self.folder), "meta": meta,
                     "written": time.time()}
            with open(os.path.join(self.folder, ENTRY_FILE), "w", encoding="utf-8") as f:
                json.dump(entry, f)
            try:
                os.rename(self.folder, os.path.join(self.root, self.key))
            except OSError:  # another process wrote the same entry first: keep theirs
                shutil.rmtree(self.folder, ignore_errors=True)
                return
            evict(self.root, max_bytes(), keep=self.key)
        except (OSError, ValueError) as exc:
            shutil.rmtree(self.folder, ignore_errors=True)
            _note(f"could not write to the cache in {self.root} ({exc}); it is used for reading only", self.verbose)

    def abandon(self):
        shutil.rmtree(self.folder, ignore_errors=True)

    def wait(self):
        if self.thread is not None:
            self.thread.join()


class Entry:
    """A complete entry: its folder and what ``entry.json`` says."""

    def __init__(self, root, key):
        self.folder = os.path.join(root, key)
        with open(os.path.join(self.folder, ENTRY_FILE), encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != FORMAT or data.get("key") != key or not isinstance(data.get("meta"), dict):
            raise ValueError("not an entry of this format")
        self.files, self.meta = data["files"], data["meta"]
        if GRAPH_FILE not in self.files:
            raise ValueError("the entry has no graph")
        for name, (size, _) in self.files.items():
            if os.path.getsize(os.path.join(self.folder, name)) != size:
                raise ValueError(f"{name} has another size than when it was written")
        self.graph_path = os.path.join(self.folder, GRAPH_FILE)
        records = self.meta.get("weight_inputs", [])
        if records and INPUTS_FILE not in self.files:
            raise ValueError(f"the entry has no {INPUTS_FILE}")
        size = self.files.get(INPUTS_FILE, [0])[0]
        for record in records:
            name, dtype, shape, offset = record
            if dtype != "<f4" or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"{INPUTS_FILE}: {name!r} is not a float32 array")
            nbytes = int(np.prod(shape, dtype=np.int64)) * 4
            if not (isinstance(name, str) and isinstance(offset, int) and 0 <= offset <= size - nbytes):
                raise ValueError(f"{INPUTS_FILE}: {name!r} lies outside the file")
        self._records = records

    def weight_inputs(self) -> dict:
        """{name: read-only array mapped from INPUTS_FILE} for the weights the graph takes as inputs."""
        path = os.path.join(self.folder, INPUTS_FILE)
        return {name: np.memmap(path, np.dtype(dtype), "r", offset, tuple(shape))
                for name, dtype, shape, offset in self._records}

    def verifier(self):
        """A thread that checks every file's CRC-32 (started now; ``join`` it, then read its ``ok``)."""
        checker = threading.Thread(name="onnxlrp-cache-check", daemon=True)
        checker.ok = False
        checker.run = lambda: setattr(checker, "ok", self._intact())
        checker.start()
        return checker

    def _intact(self):
        try:
            return all(_crc_file(os.path.join(self.folder, name)) == crc for name, (_, crc) in self.files.items())
        except OSError:
            return False

    def touch(self):
        try:
            os.utime(os.path.join(self.folder, ENTRY_FILE))  # least recently used goes first
        except OSError:
            pass


def lookup(root, key):
    """The complete entry for ``key``, or None. A damaged one is removed (and rebuilt by the caller)."""
    folder = os.path.join(root, key)
    if not os.path.isdir(folder):
        return None
    try:
        return Entry(root, key)
    except (OSError, ValueError, KeyError, TypeError):
        remove(root, key)
        return None


def remove(root, key):
    """Take an entry out of use at once (rename, then delete), so no other process starts reading it."""
    folder = os.path.join(root, key)
    try:
        doomed = tempfile.mkdtemp(prefix=".tmp-removed-", dir=root)
        os.rename(folder, os.path.join(doomed, key))
        shutil.rmtree(doomed, ignore_errors=True)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)


def entries(root):
    """[(key, bytes, last used)] of the complete entries under ``root``."""
    found = []
    try:
        names = os.listdir(root)
    except OSError:
        return found
    for name in names:
        folder = os.path.join(root, name)
        if name.startswith(".") or name == "paths" or not os.path.isdir(folder):
            continue
        try:
            used = os.path.getmtime(os.path.join(folder, ENTRY_FILE))
            size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        except OSError:
            continue
        found.append((name, size, used))
    return found


def evict(root, limit, keep=None):
    """Remove least recently used entries until the folder holds at most ``limit`` bytes (``keep`` stays),
    and temporary folders that crashed writers left."""
    now = time.time()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(".tmp-") and os.path.isdir(path):
            try:
                if now - os.path.getmtime(path) > STALE_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass
    found = sorted(entries(root), key=lambda e: e[2])
    total = sum(size for _, size, _ in found)
    for key, size, _ in found:
        if total <= limit:
            break
        if key != keep:
            remove(root, key)
            total -= size


def clear(root):
    """Remove every entry and remembered content hash; returns the bytes freed."""
    freed = 0
    for key, size, _ in entries(root):
        remove(root, key)
        freed += size
    shutil.rmtree(os.path.join(root, "paths"), ignore_errors=True)
    evict(root, float("inf"))
    return freed


__all__ = ["Entry", "PendingEntry", "Uncacheable", "clear", "default_dir", "describe", "entries", "entry_key",
           "evict", "lookup", "max_bytes", "resolve", "usable_root"]
