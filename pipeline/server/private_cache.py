"""A cache directory on local disk that only this user can write, whose files are checked
before use.

The dashboard caches rendered thumbnails, tar member offsets and ONNX decoder graphs. A cache
other users could write would let them plant a thumbnail that is served, or a decoder graph that
decides the masks people accept. So the cache:

- lives under a per-user folder (default ``$XDG_CACHE_HOME/dataengine`` or
  ``~/.cache/dataengine``), created with mode 0700; every folder from the cache folder down must
  be owned by this user, not a symlink, and not accessible to group or others, else it is
  refused (files are created 0600);
- stores each entry as ``<name>`` plus the SHA-256 of its content, checked on every read; an
  entry that does not match is discarded (and recomputed by the caller).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
import threading
import uuid

logger = logging.getLogger(__name__)

DIGEST = 32  # bytes of the SHA-256 prefix of every entry


class UnsafeCacheDir(PermissionError):
    """A cache folder another user could write (owner, mode or symlink)."""


def default_root() -> str:
    """The per-user cache root: ``$XDG_CACHE_HOME/dataengine`` or ``~/.cache/dataengine``
    (``<tmp>/dataengine-<uid>`` when there is no usable home)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        return os.path.join(tempfile.gettempdir(), f"dataengine-{os.getuid()}")
    return os.path.join(base, "dataengine")


def ensure_private_dir(path: str) -> str:
    """Create ``path`` (mode 0700) if needed and check it is private to this user; returns its
    absolute path. UnsafeCacheDir when it is a symlink, owned by someone else, or writable by
    group or others."""
    path = os.path.abspath(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    _check_ancestors(path)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafeCacheDir(f"cache folder {path} is a symlink or not a folder")
    if st.st_uid != os.getuid():
        raise UnsafeCacheDir(f"cache folder {path} is owned by uid {st.st_uid}, not by this "
                             f"user ({os.getuid()}); choose another --cache-dir")
    if st.st_mode & 0o077:  # others may have read it, or planted entries in it already
        raise UnsafeCacheDir(f"cache folder {path} is accessible to other users (mode "
                             f"{stat.S_IMODE(st.st_mode):o}); remove it or `chmod 700` it after "
                             "checking its content")
    return path


def _check_ancestors(path: str) -> None:
    """Every folder above ``path`` belongs to this user or root, and no other user can replace
    its entries (not writable by others, or sticky like /tmp)."""
    cur = os.path.dirname(path)
    while True:
        st = os.stat(cur)
        if st.st_uid not in (0, os.getuid()):
            raise UnsafeCacheDir(f"cache folder {path}: its parent {cur} belongs to uid "
                                 f"{st.st_uid}; choose another --cache-dir")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX and st.st_uid != os.getuid():
            raise UnsafeCacheDir(f"cache folder {path}: its parent {cur} is writable by others")
        parent = os.path.dirname(cur)
        if parent == cur:
            return
        cur = parent


class PrivateCache:
    """Named byte entries under a private folder, each verified by its SHA-256 on read."""

    def __init__(self, root: str) -> None:
        self.root = ensure_private_dir(root)
        self._checked: set[str] = {self.root}
        self._lock = threading.Lock()
        self.rejected = 0  # entries discarded because their content did not match

    def _dir(self, name: str) -> str:
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"cache entry name {name!r} is not a relative name")
        d = os.path.dirname(os.path.join(self.root, name))
        if d not in self._checked:
            # every folder between the root and the entry is ours and private
            rel = os.path.relpath(d, self.root)
            cur = self.root
            for part in rel.split(os.sep):
                if part in ("", "."):
                    continue
                cur = os.path.join(cur, part)
                ensure_private_dir(cur)
            with self._lock:
                self._checked.add(d)
        return d

    def path(self, name: str) -> str:
        """The file path of entry ``name`` (its folder checked and created)."""
        self._dir(name)
        return os.path.join(self.root, name)

    def get(self, name: str) -> bytes | None:
        """The content of ``name``, or None when absent or when its hash does not match."""
        path = self.path(name)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_uid != os.getuid():
                    raise UnsafeCacheDir(f"cache entry {path} is owned by uid {st.st_uid}")
                data = f.read()
        except FileNotFoundError:
            return None
        digest, body = data[:DIGEST], data[DIGEST:]
        if len(digest) != DIGEST or hashlib.sha256(body).digest() != digest:
            self.rejected += 1
            logger.warning("cache entry %s does not match its hash: discarded", path)
            self.discard(name)
            return None
        return body

    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` atomically (a temporary file renamed into place)."""
        path = self.path(name)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(hashlib.sha256(data).digest())
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def discard(self, name: str) -> None:
        """Remove an entry (no error when absent)."""
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            pass
