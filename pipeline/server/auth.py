"""Personal access tokens for the dashboard and the browser annotation tool.

A token is created by ``dataengine token create NAME`` and shown once; only its SHA-256 digest
is stored, under ``ROOT/curation/tokens/<token id>.json`` (a token is 256 random bits, so a
plain digest is as safe as a slow hash and costs microseconds per request). A token reads
``de_<token id>_<secret>``; the id selects the record, the secret is compared in constant time.
Revoking writes ``<token id>.revoked.json`` next to it (records are never rewritten).

Roles (:data:`ROLES`, each includes the ones before it): an ``annotator`` annotates, a
``curator`` also approves, rejects and exports, an ``admin`` also opens rounds and manages tokens.
A token carries one role (``dataengine token create NAME --role ROLE``; records without one are
annotators).

Identity rules (:func:`identify`): a request with a token acts as the token's NAME and role (a
wrong or revoked token is refused even on loopback); a request without one acts as ``local``
(role ``local_role``) only when tokens are not required, the server is bound to a loopback
address and the client is on loopback; otherwise it is refused.

Unknown token ids cost at most one read of ``<id>.json`` each (never a listing), are remembered
negatively for ``ttl`` seconds in a bounded table, and such reads are rate-limited.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus

LOCAL = "local"
ROLES = ("annotator", "curator", "admin")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
TOKEN_RE = re.compile(r"de_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


class AuthError(Exception):
    """A request cannot be attributed to anyone (missing, malformed, wrong or revoked token)."""


@dataclass(frozen=True)
class Identity:
    """Who makes a request: a person's name and their role."""

    name: str
    role: str

    def allows(self, role: str) -> bool:
        """Whether this identity's role includes ``role``."""
        return role_rank(self.role) >= role_rank(role)


def role_rank(role: str) -> int:
    """0 for annotator, 1 for curator, 2 for admin; ValueError for anything else."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: allowed {', '.join(ROLES)}")
    return ROLES.index(role)


def tokens_dir(corpus: Corpus) -> str:
    """Where token records live: ``ROOT/curation/tokens``."""
    return storage.join(corpus.curation, "tokens")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def validate_name(name: str) -> str:
    """A person's name as used for identities and annotator ids; ValueError otherwise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"token name {name!r} must be 1-64 letters, digits or _ . @ - "
                         "starting with a letter or digit")
    if name == LOCAL:
        raise ValueError(f"token name {LOCAL!r} is reserved for loopback requests without a token")
    return name


def create_token(corpus: Corpus, name: str, role: str = "annotator") -> str:
    """Create a token for ``name`` with ``role``; returns the token text (the only time it is
    visible)."""
    validate_name(name)
    role_rank(role)
    while True:  # the record is created only if its id is free (ids are random; never reused)
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        record = {"token_id": token_id, "name": name, "sha256": _digest(secret),
                  "created": datetime.now(UTC).isoformat(), "role": role}
        if storage.create_json(storage.join(tokens_dir(corpus), f"{token_id}.json"), record):
            return f"de_{token_id}_{secret}"


def revoke_token(corpus: Corpus, token_id: str) -> None:
    """Revoke a token by id (see ``dataengine token list``)."""
    if not re.fullmatch(r"[0-9a-f]{16}", token_id or ""):
        raise ValueError(f"token id {token_id!r} is not 16 hex digits")
    if not storage.exists(storage.join(tokens_dir(corpus), f"{token_id}.json")):
        raise ValueError(f"token id {token_id!r} does not exist")
    url = storage.join(tokens_dir(corpus), f"{token_id}.revoked.json")
    # created once; a second revoke (even a concurrent one) leaves the first record
    storage.create_json(url, {"token_id": token_id, "revoked": datetime.now(UTC).isoformat()})


def list_tokens(corpus: Corpus) -> list[dict[str, Any]]:
    """Token records (id, name, role, created, revoked) without digests, oldest first."""
    d = tokens_dir(corpus)
    revoked = {u.rsplit("/", 1)[-1].split(".")[0]
               for u in storage.listdir(d, r"[0-9a-f]{16}\.revoked\.json")}
    out = []
    for u in storage.listdir(d, r"[0-9a-f]{16}\.json"):
        rec = storage.read_json(u)
        out.append({"token_id": rec["token_id"], "name": rec["name"], "created": rec["created"],
                    "role": rec.get("role", "annotator"), "revoked": rec["token_id"] in revoked})
    return sorted(out, key=lambda r: r["created"])


def any_active_token(corpus: Corpus) -> bool:
    """Whether at least one unrevoked token exists."""
    return any(not t["revoked"] for t in list_tokens(corpus))


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if not host:
        return False
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class TokenStore:
    """Verifies tokens against the records under the corpus, re-listing them at most every
    ``ttl`` seconds (new and revoked tokens take effect within that time). An id not in the
    listing is read directly (at most ``lookups_per_second`` such reads) and, when absent,
    remembered as unknown for ``ttl`` seconds (at most ``max_unknown`` ids)."""

    corpus: Corpus
    ttl: float = 5.0
    max_unknown: int = 4096
    lookups_per_second: float = 20.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = -1e18
        self._records: dict[str, dict[str, Any]] = {}
        self._revoked: set[str] = set()
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._budget = self.lookups_per_second
        self._budget_at = time.monotonic()
        self.lookups = 0  # direct reads of unknown ids (observable by tests)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._loaded < self.ttl:
            return
        with self._lock:
            if now - self._loaded < self.ttl:
                return
            d = tokens_dir(self.corpus)
            records = {}
            for u in storage.listdir(d, r"[0-9a-f]{16}\.json"):
                token_id = u.rsplit("/", 1)[-1][:16]
                records[token_id] = self._records.get(token_id) or storage.read_json(u)
            self._revoked = {u.rsplit("/", 1)[-1][:16]
                             for u in storage.listdir(d, r"[0-9a-f]{16}\.revoked\.json")}
            self._records = records
            self._loaded = time.monotonic()

    def _lookup(self, token_id: str) -> dict[str, Any] | None:
        """One direct read of an id missing from the listing (a token created since)."""
        now = time.monotonic()
        with self._lock:
            seen = self._unknown.get(token_id)
            if seen is not None and now - seen < self.ttl:
                return None
            self._budget = min(self.lookups_per_second,
                               self._budget + (now - self._budget_at) * self.lookups_per_second)
            self._budget_at = now
            if self._budget < 1:
                return None
            self._budget -= 1
            self.lookups += 1
        url = storage.join(tokens_dir(self.corpus), f"{token_id}.json")
        try:
            rec = storage.read_json(url)
        except FileNotFoundError:
            rec = None
        with self._lock:
            if rec is None:
                self._unknown[token_id] = now
                self._unknown.move_to_end(token_id)
                while len(self._unknown) > self.max_unknown:
                    self._unknown.popitem(last=False)
                return None
            self._records[token_id] = rec
            if storage.exists(storage.join(tokens_dir(self.corpus), f"{token_id}.revoked.json")):
                self._revoked.add(token_id)
            return rec

    def identity(self, token: str) -> Identity:
        """The identity a token belongs to; AuthError when it is malformed, unknown or revoked."""
        m = TOKEN_RE.fullmatch(token or "")
        if not m:
            raise AuthError("malformed token")
        token_id, secret = m.groups()
        self._refresh()
        rec = self._records.get(token_id) or self._lookup(token_id)
        if rec is None or not hmac.compare_digest(rec["sha256"], _digest(secret)):
            raise AuthError("unknown token")
        if token_id in self._revoked:
            raise AuthError("revoked token")
        role = rec.get("role", "annotator")
        return Identity(rec["name"], role if role in ROLES else "annotator")

    def verify(self, token: str) -> str:
        """The name a token belongs to; AuthError when it is malformed, unknown or revoked."""
        return self.identity(token).name


def identify(store: TokenStore, token: str | None, *, bound_loopback: bool,
             client_host: str | None, require_token: bool = False,
             local_role: str = "admin") -> Identity:
    """Who makes a request: the token's identity, or ``local`` on loopback without a token
    when tokens are not required."""
    if token:
        return store.identity(token)
    if require_token:
        raise AuthError("a token is required (sign in at /login, or send "
                        "'Authorization: Bearer <token>')")
    if bound_loopback and is_loopback(client_host):
        return Identity(LOCAL, local_role)
    raise AuthError("a token is required when the server is not bound to loopback")
