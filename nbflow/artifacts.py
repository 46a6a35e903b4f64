"""Results of any size (spec 11): values too large for Redis are stored as *artifacts*.

A step result, a run's output or an event payload whose encoding is larger than
``Engine(artifact_threshold=...)`` (1 MiB) is written to the artifact location
(``Engine(artifacts=...)``: a directory or an fsspec URL, default
``$NBFLOW_HOME/artifacts``) and Redis keeps only a reference, the codec envelope
``{"$nbflow": "artifact", "url", "format", "bytes", "sha256", "type", "rows",
"columns", "mem", "host"}`` (``codec.ArtifactRef``, well under 1 KB).

Formats:

* ``parquet`` -- DataFrames and Series (pyarrow).  Parquet does not keep everything
  pandas has, so the file holds the data columns under positional names (``c0``,
  ``c1`` ...), the index as extra columns (a MultiIndex as its codes), and in its
  schema metadata (key ``nbflow``) the frame's codec envelope *without rows*: the
  exact column labels (any type, duplicates, MultiIndex), every dtype (categories,
  time zones of any kind, units, nullable and string storage), the index's dtype,
  names, levels and frequency.  Reading casts back whatever Parquet changed.  Before
  writing, the same round trip runs on the first rows in memory and must compare
  equal exactly; data of ``object`` dtype (any Python objects) never goes to Parquet.
  Whatever fails either test is stored as ``json`` instead.
* ``json`` -- the value's codec JSON text (what Redis would have held), in a file.

Names: ``{location}/{prefix, %-quoted}/{instance id}/{uuid4 hex}.{parquet|json}``, one
per write (so a write never replaces a file someone refers to).  Local files are
written to a hidden temporary name in the same directory, fsynced and renamed;
object stores (S3 ...) upload without committing (``autocommit=False``) and commit
at the end, so a crash or a full disk never leaves a partial file under a name a
reference could point to.  The reference reaches Redis only after the file is
complete.

Which artifacts are still referred to is kept in Redis (``nbflow.store``): the hash
``{p}:artifacts`` (URL -> number of references) and per instance
``{p}:{id}:artifacts``, updated by the same scripts that write or drop the
references.  Restart, terminate (its buffered events) and retention delete the files
whose count drops to zero, after the script has run; ``nbflow gc`` deletes files
under the location that the index does not know (older than a grace period, so a
file being written is not taken for an orphan).  Nothing else deletes user data.

Reading verifies the sha256; a missing or corrupt file is an ``ArtifactError``
naming the step and the URL, never a None.  Each process keeps what it read or
wrote lately in memory (an LRU bounded by bytes), so replays do not read again.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit

from nbflow import codec
from nbflow.errors import ArtifactError
from nbflow.server import nbflow_home

log = logging.getLogger("nbflow")

#: Encodings larger than this go to an artifact (``Engine(artifact_threshold=...)``).
DEFAULT_THRESHOLD: Final = 1024 * 1024
#: What a process keeps of recently read or written artifacts, in bytes of memory.
DEFAULT_CACHE_BYTES: Final = 1024 * 1024 * 1024
#: ``nbflow gc`` leaves files younger than this alone: one may be written right now,
#: its reference not in Redis yet.
DEFAULT_GC_MIN_AGE: Final = 3600.0
#: Rows of a frame that the Parquet round trip is tried on before writing.
_PROBE_ROWS: Final = 5
_HOST: Final = socket.gethostname()
_REACH: Final = (
    "every engine and worker must be given an artifact location they all reach "
    "(Engine(artifacts=URL), nbflow worker --artifacts URL)"
)


class ArtifactTooLarge(ValueError):
    """An artifact over ``max_artifact_bytes``: the step fails at once (no retries), as a
    result over ``max_step_bytes`` does."""


def _is_pandas(value: object) -> bool:
    """Whether ``value`` is a DataFrame or Series (without importing pandas)."""
    if "pandas" not in sys.modules or not type(value).__module__.startswith("pandas"):
        return False
    import pandas as pd

    return isinstance(value, pd.DataFrame | pd.Series)


def _memory(value: Any, deep: bool) -> int:
    """Bytes a DataFrame or Series takes in memory (``deep``: counting Python objects)."""
    usage = value.memory_usage(index=True, deep=deep)
    return int(usage.sum() if hasattr(usage, "sum") else usage)


def _local_path(url: str) -> str | None:
    """The local path of a ``file://`` URL, else None."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    return unquote(parts.path)


def location_url(location: str | os.PathLike[str] | None) -> str:
    """The URL of an artifact location: a path becomes an absolute ``file://`` URL."""
    if location is None:
        path = str(nbflow_home() / "artifacts")
    elif isinstance(location, os.PathLike) or "://" not in str(location):
        path = os.path.abspath(os.path.expanduser(os.fspath(location)))
    else:
        url = str(location).rstrip("/")
        if url.startswith("file://"):
            return "file://" + quote(os.path.abspath(unquote(url[len("file://") :])))
        return url
    return "file://" + quote(path)


class ArtifactStore:
    """Writes, reads, caches and deletes the artifacts of one engine (see the module
    docstring).  ``threshold=None`` stores nothing as an artifact (every result goes to
    Redis and ``max_step_bytes`` caps it, as before spec 11)."""

    def __init__(
        self,
        location: str | os.PathLike[str] | None,
        *,
        prefix: str,
        threshold: int | None = DEFAULT_THRESHOLD,
        max_bytes: int | None = None,
        options: Mapping[str, Any] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        for name, limit in (("artifact_threshold", threshold), ("max_artifact_bytes", max_bytes)):
            if limit is not None and (
                isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
            ):
                raise ValueError(f"{name} must be a non-negative int or None, not {limit!r}")
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"artifact_options must be a dict of fsspec options, not {options!r}")
        if location is not None and not isinstance(location, str | os.PathLike):
            raise TypeError(
                f"artifacts must be a directory or an fsspec URL (file://, s3://, ...), "
                f"not {location!r}"
            )
        self.url = location_url(location)
        if any(c in self.url for c in '"\\') or any(ord(c) < 32 for c in self.url):
            raise ValueError(
                f"artifact location {self.url!r} may not contain quotes, backslashes or "
                "control characters"
            )
        self.threshold = threshold
        self.max_bytes = max_bytes
        self.options: dict[str, Any] = dict(options or {})
        self.root = f"{self.url}/{quote(prefix, safe='')}"
        self._local = _local_path(self.url)
        self._default = location is None
        if self._local is not None and not self._default:
            self._check_local_dir(self._local)
        self._fs: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._cached = 0
        self.cache_bytes = cache_bytes

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r}, threshold={self.threshold})"

    def _check_local_dir(self, path: str) -> None:
        url = "file://" + quote(path)
        if not os.path.isdir(path):
            what = "is not a directory" if os.path.exists(path) else "does not exist"
            raise ValueError(
                f"artifact location {url} {what}: create it first, or pass an existing "
                "directory or an fsspec URL (s3://bucket/path ...)"
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"artifact location {url} is not writable by this process")

    # -- deciding -------------------------------------------------------------------

    def large_frame(self, value: object) -> bool:
        """Whether ``value`` is a DataFrame/Series already larger in memory than the
        threshold: it goes to an artifact without being encoded as JSON first (its JSON
        would be larger still, and slow to make)."""
        if self.threshold is None or not _is_pandas(value):
            return False
        return _memory(value, deep=False) > self.threshold

    def over_threshold(self, size: int) -> bool:
        """Whether an encoding of ``size`` bytes goes to an artifact."""
        return self.threshold is not None and size > self.threshold

    # -- writing --------------------------------------------------------------------

    def write(
        self, value: Any, iid: str, what: str, text: str | None = None
    ) -> tuple[str, str, str | None]:
        """Stores ``value`` as an artifact of instance ``iid``; returns (the reference's
        JSON, its URL, the value's JSON when that is what was stored).  ``text`` is the
        value's codec JSON when already made.

        Raises ``TypeError`` for a value the codec cannot store, ``ArtifactTooLarge``
        over ``max_artifact_bytes``, ``ArtifactError`` when the location cannot be
        written (the step attempt fails and its retries apply); nothing half-written
        is left under the artifact's name.
        """
        meta: dict[str, Any] = {"type": type(value).__name__}
        data: Any = None
        if _is_pandas(value):
            meta["type"] = "DataFrame" if value.ndim == 2 else "Series"
            meta["rows"] = int(value.shape[0])
            if value.ndim == 2:
                meta["columns"] = int(value.shape[1])
            meta["mem"] = _memory(value, deep=True)
            data = _parquet_parts(value)
        if data is None and text is None:
            text = codec.encode(value)
        fmt = "json" if data is None else "parquet"
        name = f"{self.root}/{iid}/{uuid.uuid4().hex}.{fmt}"
        if data is None:
            assert text is not None
            payload = text.encode()
            if self.max_bytes is not None and len(payload) > self.max_bytes:
                raise ArtifactTooLarge(
                    f"{what} is {len(payload)} bytes as JSON, more than "
                    f"max_artifact_bytes={self.max_bytes}"
                )
            size, digest = self._put(name, what, lambda f: f.write(payload))
        else:
            size, digest = self._put(name, what, lambda f: _write_parquet(data, f))
        meta["host"] = _HOST
        ref = codec.ArtifactRef(name, fmt, size, digest, **meta)
        if data is not None:
            self._remember(name, value.copy(deep=False), meta["mem"])
        elif text is not None and len(text) <= self.cache_bytes // 4:
            self._remember(name, text, len(text))
        return codec.encode(ref), name, (text if data is None else None)

    def _put(self, url: str, what: str, write: Any) -> tuple[int, str]:
        """Writes one file through ``write(file)`` (hashing as it goes); (bytes, sha256)."""
        try:
            local = _local_path(url)
            if local is not None:
                return self._put_local(local, write)
            return self._put_remote(url, write)
        except ArtifactTooLarge as exc:
            raise ArtifactTooLarge(f"{what} is {exc}") from None
        except Exception as exc:
            raise ArtifactError(
                f"cannot write the artifact of {what} to {url}: {_why(exc)}; {_REACH}"
            ) from exc

    def _put_local(self, path: str, write: Any) -> tuple[int, str]:
        directory = os.path.dirname(path)
        if self._default or not os.path.isdir(directory):
            os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
        try:
            with open(tmp, "wb") as raw:
                out = _HashingWriter(raw, self.max_bytes)
                write(out)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return out.size, out.hexdigest()

    def _put_remote(self, url: str, write: Any) -> tuple[int, str]:
        fs, path = self._filesystem(url)
        try:
            raw = fs.open(path, "wb", autocommit=False)
            transactional = True
        except (TypeError, NotImplementedError):
            raw = fs.open(path, "wb")
            transactional = False
        try:
            out = _HashingWriter(raw, self.max_bytes)
            write(out)
            raw.close()
            if transactional:
                raw.commit()
        except BaseException:
            if transactional:
                try:
                    raw.discard()
                except Exception:
                    pass
            else:  # a store without transactions: remove what may have landed
                try:
                    fs.rm(path)
                except Exception:
                    pass
            raise
        return out.size, out.hexdigest()

    def _filesystem(self, url: str) -> tuple[Any, str]:
        """The fsspec filesystem for ``url`` (this store's options for its own protocol)."""
        import fsspec  # type: ignore[import-untyped, unused-ignore]

        options = self.options if url.startswith(self.url) else {}
        if url.startswith(self.url) and self._fs is not None:
            return self._fs, self._fs._strip_protocol(url)
        fs, path = fsspec.core.url_to_fs(url, **options)
        if url.startswith(self.url):
            self._fs = fs
        return fs, path

    # -- reading --------------------------------------------------------------------

    def load(self, ref: codec.ArtifactRef, what: str) -> Any:
        """The value an artifact holds: from memory if read or written lately, else read
        and checked against its sha256.  ``ArtifactError`` (naming ``what`` and the
        URL) when it is missing, unreadable or corrupt."""
        with self._lock:
            hit = self._cache.get(ref.url)
            if hit is not None:
                self._cache.move_to_end(ref.url)
        if hit is not None:
            return _fresh(hit[0])
        data = self._read(ref, what)
        digest = hashlib.sha256(data).hexdigest()
        if digest != ref.sha256 or len(data) != ref.size:
            raise ArtifactError(
                f"the artifact of {what} at {ref.url} is corrupt: {len(data)} bytes with "
                f"sha256 {digest}, expected {ref.size} bytes with sha256 {ref.sha256}; "
                "restart the instance from that step to compute it again"
            )
        try:
            if ref.format == "parquet":
                value = _read_parquet(data)
                del data
                self._remember(ref.url, value, _memory(value, deep=True))
                return _fresh(value)
            text = bytes(data).decode("utf-8")
        except Exception as exc:
            raise ArtifactError(
                f"the artifact of {what} at {ref.url} cannot be read as {ref.format}: {_why(exc)}"
            ) from exc
        self._remember(ref.url, text, len(text))
        return codec.decode(text)

    def _read(self, ref: codec.ArtifactRef, what: str) -> Any:
        """The file's bytes (a memory map for local files: no copy)."""
        try:
            local = _local_path(ref.url)
            if local is not None:
                import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]

                with pa.memory_map(local, "r") as mapped:
                    return mapped.read_buffer()
            fs, path = self._filesystem(ref.url)
            return fs.cat_file(path)
        except Exception as exc:
            host = ref.meta.get("host")
            where = f" (written on host {host!r}, this is {_HOST!r})" if host != _HOST else ""
            raise ArtifactError(
                f"the artifact of {what} at {ref.url} cannot be read{where}: {_why(exc)}; "
                f"{_REACH}; or restart the instance from that step to compute it again"
            ) from exc

    def _remember(self, url: str, value: Any, size: int) -> None:
        """Keeps ``value`` (a frame, or codec JSON text) for replays, least recently used
        out first, within ``cache_bytes``."""
        if size > self.cache_bytes:
            return
        with self._lock:
            old = self._cache.pop(url, None)
            if old is not None:
                self._cached -= old[1]
            self._cache[url] = (value, size)
            self._cached += size
            while self._cached > self.cache_bytes and self._cache:
                _, (_, dropped) = self._cache.popitem(last=False)
                self._cached -= dropped

    def forget(self, urls: Iterable[str]) -> None:
        with self._lock:
            for url in urls:
                old = self._cache.pop(url, None)
                if old is not None:
                    self._cached -= old[1]

    # -- resolving references ---------------------------------------------------------

    def resolve(self, value: Any, what: str) -> Any:
        """``value`` with an artifact reference (the value itself, or an event's payload)
        replaced by what it holds."""
        if isinstance(value, codec.ArtifactRef):
            return self.load(value, what)
        if isinstance(value, dict) and isinstance(value.get("payload"), codec.ArtifactRef):
            return {**value, "payload": self.load(value["payload"], what)}
        return value

    # -- deleting -------------------------------------------------------------------

    def delete(self, urls: Iterable[Any]) -> int:
        """Deletes the files at ``urls`` (those no reference points to any more); logs
        what cannot be deleted (``nbflow gc`` finds those later).  Returns how many."""
        done = 0
        todo = [u.decode() if isinstance(u, bytes) else str(u) for u in urls]
        self.forget(todo)
        for url in todo:
            try:
                local = _local_path(url)
                if local is not None:
                    os.unlink(local)
                else:
                    fs, path = self._filesystem(url)
                    fs.rm_file(path)
                done += 1
            except FileNotFoundError:
                pass
            except Exception as exc:
                log.warning("nbflow: cannot delete artifact %s: %s", url, _why(exc))
        return done

    def files(self) -> list[tuple[str, float]]:
        """Every file under this store's prefix: (URL, modification epoch)."""
        if self._local is not None:
            root = _local_path(self.root)
            assert root is not None
            found = []
            for directory, _, names in os.walk(root):
                for name in names:
                    path = os.path.join(directory, name)
                    try:
                        found.append(("file://" + quote(path), os.stat(path).st_mtime))
                    except FileNotFoundError:
                        pass
            return found
        fs, path = self._filesystem(self.root)
        try:
            listing = fs.find(path, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for name, info in listing.items():
            stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
            epoch = stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp or 0)
            out.append((fs.unstrip_protocol(name), epoch))
        return out


def _fresh(value: Any) -> Any:
    """A cached value as a caller may keep and change: frames as a lazy copy (pandas
    copy-on-write: a change copies then), JSON text decoded anew."""
    if isinstance(value, str):
        return codec.decode(value)
    return value.copy(deep=False)


def _why(exc: BaseException) -> str:
    """An I/O failure in a few words, saying what to do when it is a known case."""
    name = type(exc).__name__
    text = f"{name}: {exc}"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return text + " (the disk is full)"
    if isinstance(exc, PermissionError) or (
        isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EROFS)
    ):
        return text + " (the location is not writable by this process)"
    if "Credentials" in name or "credentials" in str(exc).lower():
        return text + (
            " (no credentials for the object store: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY or a profile, or pass Engine(artifact_options={...}))"
        )
    return text


class _HashingWriter:
    """A write-only file that hashes what passes through it and stops at ``limit``.

    The hashing runs on a thread of its own (hashlib lets go of the GIL), so it overlaps
    with pyarrow encoding the next row group instead of adding to the write's time.
    """

    def __init__(self, raw: Any, limit: int | None) -> None:
        self.raw = raw
        self.limit = limit
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False
        self._todo: queue.Queue[bytes | None] = queue.Queue(maxsize=64)
        self._thread: threading.Thread | None = None

    def _hash_all(self) -> None:
        while True:
            chunk = self._todo.get()
            if chunk is None:
                return
            self._hash.update(chunk)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        if self.limit is not None and self.size + n > self.limit:
            raise ArtifactTooLarge(f"more than max_artifact_bytes={self.limit} bytes when stored")
        self.raw.write(view)
        if n < 65536 and self._thread is None:
            self._hash.update(view)
        else:
            if self._thread is None:
                self._thread = threading.Thread(target=self._hash_all, daemon=True)
                self._thread.start()
            self._todo.put(bytes(view))  # the writer may reuse its buffer once we return
        self.size += n
        return n

    def hexdigest(self) -> str:
        """The sha256 of everything written (waits for the hashing thread)."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None
        return self._hash.hexdigest()

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True

    def __del__(self) -> None:
        if self._thread is not None:  # a write that failed: let the thread end
            self._todo.put(None)


# -- Parquet ---------------------------------------------------------------------------


def _parquet_parts(value: Any) -> tuple[Any, bytes] | None:
    """(the flat frame to write, its schema metadata) when Parquet keeps ``value``
    exactly, else None (it is stored as JSON then)."""
    import numpy as np
    import pandas as pd

    def python_objects(dtype: Any) -> bool:
        return isinstance(dtype, np.dtype) and dtype.kind == "O"

    frame = value if value.ndim == 2 else value.to_frame()
    if any(python_objects(dtype) for dtype in frame.dtypes):
        return None
    index = value.index
    if not isinstance(index, pd.MultiIndex) and python_objects(index.dtype):
        return None
    try:
        parts = _flatten(value)
        probe = value.iloc[:_PROBE_ROWS]
        buffer = io.BytesIO()
        _write_parquet(_flatten(probe), buffer)
        back = _read_parquet(buffer.getvalue())
    except Exception as exc:  # pyarrow cannot hold it (a mixed column, an odd dtype)
        log.debug("nbflow: not stored as Parquet (%r); stored as JSON", exc)
        return None
    return parts if _identical(back, probe) else None


def _flatten(value: Any) -> tuple[Any, bytes]:
    """The frame Parquet gets: data columns ``c0``..., index columns ``i0``... (codes for
    a MultiIndex, nothing for a RangeIndex), and the metadata that restores the rest."""
    import pandas as pd

    series = value.ndim == 1
    frame = value.to_frame(name="c0") if series else value
    flat = frame.copy(deep=False)
    flat.columns = [f"c{i}" for i in range(frame.shape[1])]
    flat.index = pd.RangeIndex(len(flat))
    index = value.index
    meta: dict[str, Any] = {"kind": "series" if series else "frame", "ncols": frame.shape[1]}
    meta["template"] = codec.encode(value.iloc[:0])
    if isinstance(index, pd.RangeIndex):
        meta["range"] = [index.start, index.stop, index.step]
    elif isinstance(index, pd.MultiIndex):
        meta["multi"] = index.nlevels
        for k, codes in enumerate(index.codes):
            flat[f"i{k}"] = codes
    else:
        flat["i0"] = index.array
        freq = getattr(index, "freqstr", None)
        if freq is not None:
            meta["freq"] = freq
    return flat, json.dumps(meta).encode()


#: Rows converted to Arrow and written at a time: one Parquet row group (pyarrow's own
#: default size), so a write holds one group in Arrow form, not a copy of the frame.
_ROW_GROUP: Final = 1024 * 1024


def _write_parquet(parts: tuple[Any, bytes], sink: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

    flat, meta = parts
    first = pa.Table.from_pandas(flat.iloc[:_ROW_GROUP], preserve_index=False)
    schema = first.schema.with_metadata({**(first.schema.metadata or {}), b"nbflow": meta})
    with pq.ParquetWriter(sink, schema) as writer:
        writer.write_table(first.replace_schema_metadata(schema.metadata))
        del first
        for start in range(_ROW_GROUP, len(flat), _ROW_GROUP):
            chunk = flat.iloc[start : start + _ROW_GROUP]
            writer.write_table(pa.Table.from_pandas(chunk, schema=schema, preserve_index=False))


def _read_parquet(data: Any) -> Any:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(data) if not isinstance(data, pa.Buffer) else data)
    meta = json.loads(table.schema.metadata[b"nbflow"])
    template: Any = codec.decode(meta["template"])
    flat = table.to_pandas(split_blocks=True, self_destruct=True)
    del table
    n = int(meta["ncols"])
    if "range" in meta:
        start, stop, step = meta["range"]
        index: Any = pd.RangeIndex(start, stop, step, name=template.index.name)
    elif "multi" in meta:
        like = template.index
        index = pd.MultiIndex(
            levels=like.levels,
            codes=[flat[f"i{k}"].to_numpy() for k in range(int(meta["multi"]))],
            names=like.names,
            verify_integrity=False,
        )
    else:
        like = template.index
        values = flat["i0"]
        if values.dtype != like.dtype:
            values = values.astype(like.dtype)
        # (from the array, not the column: a Series would lend the index its name)
        index = pd.Index(values.array, dtype=like.dtype, name=like.name, copy=False)
        if "freq" in meta:
            kind = pd.TimedeltaIndex if like.dtype.kind == "m" else pd.DatetimeIndex
            index = kind(index, freq=meta["freq"])
    out = flat.iloc[:, :n]
    del flat
    dtypes = [template.dtype] if meta["kind"] == "series" else list(template.dtypes)
    for i, dtype in enumerate(dtypes):
        if out.dtypes.iloc[i] != dtype:
            out.isetitem(i, out.iloc[:, i].astype(dtype))
    out.index = index
    if meta["kind"] == "series":
        result = out.iloc[:, 0]
        result.name = template.name
        return result
    out.columns = template.columns
    return out


def _identical(got: Any, want: Any) -> bool:
    """Whether two frames (or series) are equal exactly: values, dtypes, index, columns."""
    from pandas.testing import assert_frame_equal, assert_index_equal, assert_series_equal

    try:
        if want.ndim == 1:
            assert_series_equal(got, want, check_exact=True, check_freq=True)
            if got.name != want.name and not (got.name is None and want.name is None):
                return False
        else:
            assert_frame_equal(got, want, check_exact=True, check_freq=True)
            assert list(got.dtypes) == list(want.dtypes)
            assert_index_equal(got.columns, want.columns, exact=True)
        assert_index_equal(got.index, want.index, exact=True)
        if hasattr(want.index, "levels"):
            for a, b in zip(got.index.levels, want.index.levels, strict=True):
                assert_index_equal(a, b, exact=True)
        return getattr(got.index, "freq", None) == getattr(want.index, "freq", None)
    except (AssertionError, TypeError, ValueError):
        return False


# -- nbflow gc ---------------------------------------------------------------------------


def collect_garbage(
    store: ArtifactStore,
    client: Any,
    index_key: str,
    *,
    min_age: float = DEFAULT_GC_MIN_AGE,
    dry_run: bool = False,
) -> list[str]:
    """Deletes the files under ``store``'s prefix that no reference in Redis names
    (``index_key``: the ``{p}:artifacts`` hash) and that are older than ``min_age``
    seconds; returns their URLs (only lists them with ``dry_run``)."""
    cutoff = time.time() - min_age
    found = [(url, mtime) for url, mtime in store.files() if mtime <= cutoff]
    orphans: list[str] = []
    for start in range(0, len(found), 1000):
        chunk = [url for url, _ in found[start : start + 1000]]
        counts = client.hmget(index_key, chunk)
        orphans.extend(url for url, count in zip(chunk, counts, strict=True) if count is None)
    if not dry_run:
        store.delete(orphans)
    return orphans


__all__ = [
    "ArtifactStore",
    "ArtifactTooLarge",
    "DEFAULT_THRESHOLD",
    "collect_garbage",
    "location_url",
]
