"""How the dashboard serves a corpus: bind address, identity, request limits, annotation."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import dataclass, field

from dataengine.pipeline.server import auth
from dataengine.pipeline.server.private_cache import default_root

THUMB_SIZES = (64, 96, 128, 160, 192, 256, 320, 384, 512)
SECURE_COOKIES = ("auto", "always", "never")


@dataclass
class ServerConfig:
    """How the dashboard serves a corpus.

    Identity: ``require_token`` (None = on when bound off loopback or behind a trusted proxy,
    else off) makes every request carry a token, loopback included; without it a loopback client
    without a token acts as ``local`` with ``local_role``. ``trusted_proxies`` are the addresses
    (or networks) whose ``X-Forwarded-Proto`` / ``X-Forwarded-For`` are believed; naming any turns
    ``require_token`` on, because a proxy on loopback would otherwise hand everyone ``local``.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    cache_dir: str = ""          # default: a per-corpus folder under the per-user cache root
    refresh_seconds: float = 2.0  # how often manifests / decisions are re-listed
    thumb_size: int = 192
    lease_seconds: float = 600.0  # annotation: an abandoned image returns to the queue after this
    annotate_device: str = ""     # annotation: torch device for the SAM decoder ('' = auto)
    precompute: str = "ray"       # annotation: embeddings of an opened round: ray | local | off
    decoder: str = "auto"         # annotation: SAM decoder per click: auto (ONNX Runtime on CPU
                                  # when installed, else torch) | onnx | torch
    torch_threads: int = 0        # annotation: torch / ONNX intra-op threads in this process
                                  # (0 = default; 1 avoids OpenMP stalls on a busy, shared CPU)
    browser_decoder: bool = True  # annotation: let browsers run the decoder (onnxruntime-web
                                  # assets installed under static/vendor/ort) on the embedding
    require_token: bool | None = None
    local_role: str = "admin"
    trusted_proxies: list[str] = field(default_factory=list)
    secure_cookies: str = "auto"  # auto: Secure when the request is https (proxy header
                                  # believed only from trusted_proxies) | always | never
    max_body_bytes: int = 1 << 20
    max_json_depth: int = 32
    body_timeout_seconds: float = 30.0  # a request body must arrive within this time
    max_objects_per_lease: int = 200
    prompt_cache_mb: int = 64     # prompt histories of live leases (freed when leases end)
    predicts_per_second: float = 5.0  # per identity (bursts of twice that; one at a time)
    max_pending_jobs: int = 4     # round openings queued or running at once

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r}: allowed 0..65535")
        if self.refresh_seconds < 0:
            raise ValueError(f"refresh_seconds={self.refresh_seconds}: must be >= 0")
        if self.thumb_size not in THUMB_SIZES:
            raise ValueError(f"thumb_size={self.thumb_size}: allowed {THUMB_SIZES}")
        if self.decoder not in ("auto", "onnx", "torch"):
            raise ValueError(f"decoder={self.decoder!r}: allowed auto, onnx, torch")
        if self.precompute not in ("ray", "local", "off"):
            raise ValueError(f"precompute={self.precompute!r}: allowed ray, local, off")
        if not isinstance(self.torch_threads, int) or self.torch_threads < 0:
            raise ValueError(f"torch_threads={self.torch_threads!r}: must be an integer >= 0")
        if self.lease_seconds <= 0:
            raise ValueError(f"lease_seconds={self.lease_seconds}: must be > 0")
        if self.local_role not in auth.ROLES:
            raise ValueError(f"local_role={self.local_role!r}: allowed {auth.ROLES}")
        if self.secure_cookies not in SECURE_COOKIES:
            raise ValueError(f"secure_cookies={self.secure_cookies!r}: allowed {SECURE_COOKIES}")
        for p in self.trusted_proxies:
            try:
                ipaddress.ip_network(p, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {p!r} is not an IP address or network") \
                    from None
        if self.require_token is False and not auth.is_loopback(self.host):
            raise ValueError(f"require_token=false with host={self.host!r}: off loopback every "
                             "request needs a token")
        if self.require_token is False and self.trusted_proxies:
            raise ValueError("require_token=false with trusted_proxies: requests through a "
                             "proxy must carry a token")
        for name, lo, hi in (("max_body_bytes", 1024, 1 << 30), ("max_json_depth", 2, 1000),
                             ("max_objects_per_lease", 1, 100_000),
                             ("prompt_cache_mb", 1, 1 << 16), ("max_pending_jobs", 1, 1000)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name}={v!r}: allowed an integer within {lo}..{hi}")
        if not self.body_timeout_seconds > 0:
            raise ValueError(f"body_timeout_seconds={self.body_timeout_seconds}: must be > 0")
        if not self.predicts_per_second > 0:
            raise ValueError(f"predicts_per_second={self.predicts_per_second}: must be > 0")

    @property
    def tokens_required(self) -> bool:
        """Whether every request must carry a token."""
        if self.require_token is not None:
            return self.require_token
        return not auth.is_loopback(self.host) or bool(self.trusted_proxies)

    def proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """``trusted_proxies`` as networks."""
        return [ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies]


def default_cache_dir(root: str) -> str:
    """A per-corpus render cache under the per-user cache root (private to this user)."""
    h = hashlib.sha256(root.encode()).hexdigest()[:16]
    return os.path.join(default_root(), "dashboard", h)
