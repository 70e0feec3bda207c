"""Storage over any fsspec URL: local paths, ``file://``, ``s3://``, ``memory://``.

Every path is resolved once through :func:`fsspec.core.url_to_fs`; there is no per-cloud code.
Writes are atomic (a reader never sees half a file): local files are written to a temporary
name and renamed, remote objects are uploaded in a single PUT. Remote I/O is retried with
exponential backoff and jitter on transient errors.

S3 settings come from the standard AWS environment and config files (credentials, region,
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``); ``DATAENGINE_S3_ENDPOINT`` overrides the
endpoint for S3-compatible stores.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

import fsspec
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

T = TypeVar("T")

_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                  FileExistsError, ValueError, TypeError, KeyError)


class UnreadableFile(ValueError):
    """A published file that cannot be parsed (truncated, not JSON / parquet); names the file."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: unreadable ({reason})")
        self.url = url
        self.reason = reason


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url``: an S3 endpoint override from ``DATAENGINE_S3_ENDPOINT``, and
    no listings cache (other processes write the same prefixes: a cached listing would hide
    their claims and done records)."""
    if url.startswith(("s3://", "s3a://")):
        opts: dict[str, Any] = {"use_listings_cache": False}
        endpoint = os.environ.get("DATAENGINE_S3_ENDPOINT")
        if endpoint:
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve ``url`` to ``(filesystem, path)``; local paths become absolute."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    return fs, path


def is_local(url: str) -> bool:
    """True when ``url`` names the local filesystem."""
    return isinstance(get_fs(url)[0], LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join URL parts with ``/`` (also for local paths)."""
    out = base.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def expand(pattern: str) -> list[str]:
    """Expand brace patterns (``shard-{000000..000099}.tar``) into a list of URLs."""
    return list(braceexpand(pattern))


def is_transient(exc: BaseException) -> bool:
    """Whether an error is worth retrying (network, throttling, 5xx), not a user error."""
    if isinstance(exc, _NOT_TRANSIENT):
        return False
    name = type(exc).__name__
    if isinstance(exc, (ConnectionError, TimeoutError)) or name in {
        "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
        "ServerDisconnectedError", "ClientOSError", "ResponseStreamingError",
    }:
        return True
    text = str(exc)
    return bool(re.search(r"\b(SlowDown|Throttl|RequestTimeout|InternalError|ServiceUnavailable|"
                          r"50[0-4])\b", text)) or isinstance(exc, OSError)


def retry(fn: Callable[[], T], *, what: str = "", attempts: int = 5, base: float = 0.2,
          cap: float = 8.0) -> T:
    """Call ``fn`` and retry transient failures with exponential backoff and full jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt == attempts or not is_transient(exc):
                raise
            delay = random.uniform(0, min(cap, base * 2 ** (attempt - 1)))
            logger.warning("transient error on %s (attempt %d/%d): %s; retrying in %.2fs",
                           what or "storage", attempt, attempts, type(exc).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def exists(url: str) -> bool:
    """Whether a file or directory exists at ``url``."""
    fs, path = get_fs(url)
    return retry(lambda: fs.exists(path), what=url)


def plain_local(url: str) -> str | None:
    """The path of a plain local file URL (no protocol, or ``file://``), else None."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url or "::" in url:
        return None
    return url


def read_bytes(url: str) -> bytes:
    """Read a whole file."""
    local = plain_local(url)
    if local is not None:  # the sharding hot path: fsspec's resolution costs ~3x the read

        def read() -> bytes:
            with open(local, "rb") as f:
                return f.read()

        return retry(read, what=url)
    fs, path = get_fs(url)
    return retry(lambda: fs.cat_file(path), what=url)


def read_json(url: str) -> Any:
    """Read a JSON file; :class:`UnreadableFile` (naming it) when it is not valid JSON."""
    data = read_bytes(url)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnreadableFile(url, f"not valid JSON: {exc}") from exc


def listdir(url: str, pattern: str | None = None) -> list[str]:
    """Sorted URLs of the entries directly under ``url`` (empty when it does not exist).

    ``pattern`` is a regular expression matched against each entry's basename.
    """
    fs, path = get_fs(url)
    try:
        entries = retry(lambda: fs.ls(path, detail=False), what=url)
    except FileNotFoundError:
        return []
    names = sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries})
    if pattern is not None:
        names = [n for n in names if re.fullmatch(pattern, n)]
    return [join(url, n) for n in names]


def makedirs(url: str) -> None:
    """Create a directory (a no-op on object stores)."""
    fs, path = get_fs(url)
    fs.makedirs(path, exist_ok=True)


def _local_atomic_path(path: str) -> str:
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.tmp-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def _staged_beside(path: str, publish: Callable[[str, str], None]) -> Iterator[BinaryIO]:
    """A temporary file beside local ``path``, fsynced and handed to ``publish(tmp, path)``
    (``os.replace``, or ``os.link`` to create only) when the block exits cleanly; never left
    behind."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _local_atomic_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def create_bytes(url: str, data: bytes) -> bool:
    """Publish ``data`` at ``url`` only if nothing is there yet, atomically: of several writers
    racing for one name exactly one wins. Returns True when this call created the file.

    Local disk: the content is written to a temporary file, then hard-linked to the name
    (``link`` fails when the name exists). S3 and S3-compatible stores: one conditional PUT with
    ``If-None-Match: *``. Other filesystems (``memory://``): check, then write.
    """
    fs, path = get_fs(url)
    if isinstance(fs, LocalFileSystem):
        try:
            with _staged_beside(path, os.link) as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
    if _is_s3(fs):
        try:
            retry(lambda: fs.pipe_file(path, data, mode="create"), what=url)
            return True
        except (FileExistsError, OSError) as exc:
            if _precondition_failed(exc):
                return False
            raise
    if retry(lambda: fs.exists(path), what=url):
        return False
    retry(lambda: fs.pipe_file(path, data), what=url)
    return True


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"s3", "s3a"} & set(protocols))


def create_file(local_path: str, url: str) -> bool:
    """Publish a finished local file at ``url`` only if nothing is there yet (the large-file
    form of :func:`create_bytes`; the local file is left in place). True when this call
    created it."""
    fs, path = get_fs(url)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = _local_atomic_path(path)
        try:
            try:
                os.link(local_path, tmp)  # same filesystem: no copy
            except OSError:
                shutil.copyfile(local_path, tmp)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    if _is_s3(fs):
        try:
            retry(lambda: fs.put_file(local_path, path, mode="create"), what=url)
            return True
        except (FileExistsError, OSError) as exc:
            if _precondition_failed(exc):
                return False
            raise
    if retry(lambda: fs.exists(path), what=url):
        return False
    retry(lambda: fs.put_file(local_path, path), what=url)
    return True


class Staged:
    """A file written to a local staging name first and published later, whole: either
    only if absent (:meth:`create`) or replacing (:meth:`replace`). Nothing is published when
    neither is called; the staging file is removed on :meth:`close` (or leaving a ``with``).

    On local disk the staging file sits beside the target (``.<name>.tmp-*``, so publishing is
    a link or rename, no copy); elsewhere it is in the temp dir.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        fs, path = get_fs(url)
        if isinstance(fs, LocalFileSystem):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.path = _local_atomic_path(path)
        else:
            fd, self.path = tempfile.mkstemp(prefix="dataengine-", suffix=".part")
            os.close(fd)
        self.file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in finish/close

    def _finish_writing(self) -> None:
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()

    def create(self) -> bool:
        """Publish only if nothing is at the URL yet; True when this call published it."""
        self._finish_writing()
        return create_file(self.path, self.url)

    def replace(self) -> None:
        """Publish, replacing whatever is at the URL."""
        self._finish_writing()
        fs, path = get_fs(self.url)
        if isinstance(fs, LocalFileSystem):
            os.replace(self.path, path)
        else:
            retry(lambda: fs.put_file(self.path, path), what=self.url)

    def close(self) -> None:
        """Drop the staging file (a no-op for what was published)."""
        if not self.file.closed:
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an S3 error is the 412 of a conditional PUT whose name already exists."""
    while exc is not None:
        if isinstance(exc, FileExistsError):
            return True
        text = f"{type(exc).__name__} {exc}"
        if "PreconditionFailed" in text or "412" in text:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def create_json(url: str, obj: Any) -> bool:
    """:func:`create_bytes` of ``obj`` as indented JSON."""
    return create_bytes(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def write_bytes(url: str, data: bytes, *, overwrite: bool = True) -> None:
    """Publish ``data`` at ``url`` atomically.

    With ``overwrite=False`` an existing file is an error (append-only areas use this); the
    check and the write are one atomic step (:func:`create_bytes`).
    """
    if not overwrite:
        if not create_bytes(url, data):
            raise FileExistsError(f"{url} already exists and this area is append-only")
        return
    fs, path = get_fs(url)
    if isinstance(fs, LocalFileSystem):
        with open_atomic(url) as f:
            f.write(data)
        return
    # Object stores: one PUT is atomic to readers.
    retry(lambda: fs.pipe_file(path, data), what=url)


def write_json(url: str, obj: Any, *, overwrite: bool = True) -> None:
    """Publish ``obj`` as indented JSON atomically."""
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(),
                overwrite=overwrite)


def put_file(local_path: str, url: str) -> None:
    """Publish a finished local file at ``url`` atomically (rename locally, one upload remotely)."""
    fs, path = get_fs(url)
    if isinstance(fs, LocalFileSystem):
        with open(local_path, "rb") as src, open_atomic(url) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        return
    retry(lambda: fs.put_file(local_path, path), what=url)


@contextlib.contextmanager
def open_atomic(url: str) -> Iterator[BinaryIO]:
    """Open ``url`` for writing; the file is published whole when the block exits cleanly.

    The content is staged in a local temporary file, so large shards never sit in memory: beside
    the target on local disk (fsync, then rename: no copy), else in the temp dir, then one PUT.
    """
    fs, path = get_fs(url)
    if isinstance(fs, LocalFileSystem):
        with _staged_beside(path, os.replace) as f:
            yield f
        return
    fd, tmp = tempfile.mkstemp(prefix="dataengine-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f  # type: ignore[misc]
        put_file(tmp, url)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def open_read(url: str) -> BinaryIO:
    """Open ``url`` for streaming reads."""
    fs, path = get_fs(url)
    return retry(lambda: fs.open(path, "rb"), what=url)


def remove(url: str, recursive: bool = False) -> None:
    """Delete a file or tree if it exists (used for temporary areas only)."""
    fs, path = get_fs(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=recursive)


def check_writable(url: str) -> None:
    """Fail at once with a clear message when ``url`` cannot be written."""
    probe = join(url, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        makedirs(url)
        write_bytes(probe, b"ok")
        remove(probe)
    except Exception as exc:
        raise PermissionError(f"corpus root {url!r} is not writable: {exc}") from exc


def read_table(url: str):  # -> pyarrow.Table
    """Read a parquet file as a pyarrow Table; :class:`UnreadableFile` (naming it) when it is
    not valid parquet (truncated, empty, another format)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = read_bytes(url)
    try:
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise UnreadableFile(url, f"not valid parquet: {exc}") from exc


def write_table(url: str, table, *, overwrite: bool = True) -> None:
    """Publish a pyarrow Table as parquet atomically."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(url, buf.getvalue(), overwrite=overwrite)


def read_tables(urls: list[str], *, skip_unreadable: bool = False):  # -> pyarrow.Table
    """Concatenate parquet files (schemas unified); an empty table when there are none.

    An unreadable file raises :class:`UnreadableFile` naming it; with ``skip_unreadable`` it is
    left out and the number left out is logged.
    """
    import pyarrow as pa

    tables, skipped = [], []
    for u in urls:
        try:
            tables.append(read_table(u))
        except UnreadableFile as exc:
            if not skip_unreadable:
                raise
            skipped.append(exc)
    if skipped:
        logger.error("skipped %d unreadable parquet file(s): %s", len(skipped),
                     "; ".join(str(e) for e in skipped[:5]))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")
