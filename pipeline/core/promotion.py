"""The promotion gate: a new SAM version serves the next round only if it does not regress.

A decision compares a candidate's held-out metrics (:mod:`dataengine.pipeline.sam.evaluate`) with
those of the current promoted version, metric by metric (``GateConfig.metrics``: name -> ``max``
when higher is better, ``min`` when lower is better) with a per-metric tolerance; the candidate is
promoted when no metric regresses beyond its tolerance (the first version, with nothing to compare
to, is promoted when ``promote_first``). Decisions are data, recorded append-only:

- ``ROOT/models/sam/promotions/NNNNNN-vXXXX.json`` (one file per decision, never rewritten),
- ``ROOT/models/sam/vXXXX/promotion.json`` (the version's own decision, written once).

:func:`current_version` is the version of the newest positive decision: what every stage uses as
"the current model".
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus

logger = logging.getLogger(__name__)

DIRECTIONS = ("max", "min")
_FILE_RE = r"\d{6}-v\d{4,}\.json"


@dataclass
class GateConfig:
    """What "does not regress" means."""

    metrics: dict[str, str] = field(default_factory=lambda: {"miou1": "max", "noc50": "min"})
    tolerance: dict[str, float] = field(default_factory=lambda: {"miou1": 0.0, "noc50": 0.0})
    promote_first: bool = True        # a first version (no current one) is promoted

    def __post_init__(self) -> None:
        if not self.metrics:
            raise ValueError("metrics: the gate needs at least one metric")
        for name, d in self.metrics.items():
            if d not in DIRECTIONS:
                raise ValueError(f"metrics.{name}={d!r}: one of {DIRECTIONS}")
        for name, t in self.tolerance.items():
            if float(t) < 0:
                raise ValueError(f"tolerance.{name}={t}: must be >= 0")


def decide(candidate: dict[str, float], current: dict[str, float] | None,
           cfg: GateConfig | None = None) -> dict[str, Any]:
    """The gate's verdict (pure): ``{"promoted", "reason", "checks": [...]}``."""
    cfg = cfg or GateConfig()
    if current is None:
        ok = cfg.promote_first
        return {"promoted": ok, "reason": "first version" if ok else "no current version",
                "checks": []}
    checks, regressed = [], []
    for name, direction in cfg.metrics.items():
        if name not in candidate or name not in current:
            raise ValueError(f"gate metric {name!r} missing (candidate has "
                             f"{sorted(candidate)}, current has {sorted(current)})")
        new, old = float(candidate[name]), float(current[name])
        tol = float(cfg.tolerance.get(name, 0.0))
        ok = new >= old - tol if direction == "max" else new <= old + tol
        checks.append({"metric": name, "direction": direction, "candidate": new,
                       "current": old, "tolerance": tol, "ok": ok})
        if not ok:
            regressed.append(f"{name} {new:.4g} vs {old:.4g} ({direction}, tol {tol:g})")
    promoted = not regressed
    reason = "no held-out metric regressed" if promoted else "regressed: " + "; ".join(regressed)
    return {"promoted": promoted, "reason": reason, "checks": checks}


def decisions(corpus: Corpus) -> list[dict[str, Any]]:
    """Every recorded decision, oldest first."""
    urls = storage.listdir(corpus.path("models", "sam", "promotions"), _FILE_RE)
    return [storage.read_json(u) for u in sorted(urls)]


def current_version(corpus: Corpus | str) -> str | None:
    """The promoted SAM version in force (newest positive decision), or None."""
    corpus = corpus if isinstance(corpus, Corpus) else Corpus(str(corpus))
    for d in reversed(decisions(corpus)):
        if d.get("promoted"):
            return d["candidate"]
    return None


def decision_for(corpus: Corpus, version: str) -> dict[str, Any] | None:
    """The recorded decision on ``version`` (None when it was never gated)."""
    url = storage.join(corpus.model_dir("sam", version), "promotion.json")
    return storage.read_json(url) if storage.exists(url) else None


def record(corpus: Corpus, candidate: str, verdict: dict[str, Any], *,
           current: str | None, candidate_metrics: dict[str, Any],
           current_metrics: dict[str, Any] | None, protocol: str = "",
           who: str = "engine") -> dict[str, Any]:
    """Append one decision (see the module docstring); returns it. A version is gated once."""
    prior = decision_for(corpus, candidate)
    if prior is not None:
        log_decision(corpus, prior)
        raise FileExistsError(f"SAM {candidate} was already gated: {prior}")
    rec = {"candidate": candidate, "current": current,
           "promoted": bool(verdict["promoted"]), "reason": verdict["reason"],
           "checks": verdict.get("checks", []), "protocol": protocol,
           "candidate_metrics": candidate_metrics, "current_metrics": current_metrics,
           "who": who, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # the version's own record is the claim (gated once, even by two gates at once); the log
    # entry follows, at the first free sequence number
    if not storage.create_json(storage.join(corpus.model_dir("sam", candidate),
                                            "promotion.json"), rec):
        raise FileExistsError(f"SAM {candidate} was already gated: "
                              f"{decision_for(corpus, candidate)}")
    rec = log_decision(corpus, rec)
    logger.info("promotion gate: %s %s (current %s): %s", candidate,
                "PROMOTED" if rec["promoted"] else "rejected", current, rec["reason"])
    return rec


def log_decision(corpus: Corpus, rec: dict[str, Any]) -> dict[str, Any]:
    """Append a version's decision to the promotion log (once: a re-run after a crash between
    the version's record and its log entry adds the entry); returns it with its ``seq``."""
    logged = [d for d in decisions(corpus) if d.get("candidate") == rec["candidate"]]
    if logged:
        return logged[0]
    seq = len(storage.listdir(corpus.path("models", "sam", "promotions"), _FILE_RE)) + 1
    while not storage.create_json(corpus.path("models", "sam", "promotions",
                                              f"{seq:06d}-{rec['candidate']}.json"),
                                  {**rec, "seq": seq}):
        seq += 1
    return {**rec, "seq": seq}


def gate(corpus: Corpus, candidate: str, candidate_metrics: dict[str, Any],
         current_metrics: dict[str, Any] | None, cfg: GateConfig | None = None, *,
         protocol: str = "", who: str = "engine") -> dict[str, Any]:
    """Decide on ``candidate`` against the current version and record the decision."""
    current = current_version(corpus)
    if current == candidate:
        raise ValueError(f"{candidate} is already the current version")
    verdict = decide(candidate_metrics, current_metrics if current else None, cfg)
    return record(corpus, candidate, verdict, current=current,
                  candidate_metrics=candidate_metrics,
                  current_metrics=current_metrics if current else None, protocol=protocol,
                  who=who)

