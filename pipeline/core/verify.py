"""``dataengine verify``: check every area's invariants, report, and (asked to) repair.

Checks, per area:

- **images**: each done record matches its tar (the same keys in the same order, each sample's
  sha256, the tar's size and sha256 when recorded); no key is in two shards; the index is the
  union of the done records; no stale claim (an unfinished shard whose writer is gone) and no
  tar without a claim or done record.
- **rounds**: ``round.json`` and every manifest part readable; each manifest part matches its
  round shard's masks; a complete round's ``manifest.parquet`` is the union of its parts; no
  round shard without its manifest part.
- **models**: every published version (``version.json``) readable and holding its weights;
  every promotion record in the promotion log.
- **latents**: each done record matches its tar's sample count; ``dataset.json`` lists the
  done shards.
- **curation, splits, quarantine, engine**: every record readable; every indexed key has a split.
- **temporary files**: no staging file (``.<name>.tmp-*``, ``.write-probe-*``) older than the
  grace period (local roots; object stores have none).

``repair=True`` re-derives what is derived (index, round manifests, ``dataset.json``, promotion
log entries, missing split parts, round shards from their tars), finishes stale image claims
through ``finish_claims`` (the CLI passes the sharding stage's), removes staging files older
than the grace period, and moves what cannot be re-derived (unreadable records, tars nobody
claimed) to ``ROOT/quarantine/files/`` with a line in the report. Nothing is deleted silently.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from dataengine.pipeline.core import index as index_mod
from dataengine.pipeline.core import publish, rounds, splits, storage
from dataengine.pipeline.core.layout import MODEL_KINDS, Corpus, round_name
from dataengine.pipeline.core.shards import iter_tar

logger = logging.getLogger(__name__)

TEMP_RE = re.compile(r"\.(.+)\.tmp-[0-9a-f]{12}|\.write-probe-[0-9a-f]{8}")


@dataclass
class Report:
    """What verify found: problems (area, url, what) and, after a repair, what it did."""

    root: str
    problems: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    def problem(self, area: str, url: str, what: str) -> None:
        self.problems.append({"area": area, "url": url, "problem": what})

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """The report as printable lines."""
        out = [f"verify {self.root}: {len(self.problems)} problem(s)"]
        out += [f"  [{p['area']}] {p['url']}: {p['problem']}" for p in self.problems]
        out += [f"  note: {n}" for n in self.notes]
        out += [f"  repaired: {r}" for r in self.repaired]
        return out


def _rel(corpus: Corpus, url: str) -> str:
    return url[len(corpus.root) + 1:] if url.startswith(corpus.root + "/") else url


def _read_json(report: Report, area: str, url: str) -> Any:
    try:
        return storage.read_json(url)
    except (storage.UnreadableFile, FileNotFoundError) as exc:
        report.problem(area, url, f"unreadable record: {exc}")
        return None


def quarantine_file(corpus: Corpus, url: str, report: Report, why: str) -> None:
    """Move a file that cannot be re-derived to ``ROOT/quarantine/files/<its path>``."""
    dest = storage.join(corpus.quarantine, "files", _rel(corpus, url))
    storage.write_bytes(dest, storage.read_bytes(url))
    storage.remove(url)
    report.repaired.append(f"moved {_rel(corpus, url)} to {_rel(corpus, dest)} ({why})")


# ---- images ---------------------------------------------------------------------------------

def _tar_facts(url: str) -> tuple[list[tuple[str, str]], int, str]:
    """([(key, sha256 from its json)], size, sha256) of an image tar."""
    import hashlib

    sha, size = hashlib.sha256(), 0
    with storage.open_read(url) as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            size += len(chunk)
    keys = [(s["__key__"], json.loads(s["json"]).get("sha256", "") if "json" in s else "")
            for s in iter_tar(url)]
    return keys, size, sha.hexdigest()


def _check_image_shard(corpus: Corpus, name: str, done: dict[str, Any], report: Report) -> None:
    tar = corpus.image_shard(name)
    if not storage.exists(tar):
        report.problem("images", tar, "done record without its tar")
        return
    try:
        keys, size, sha = _tar_facts(tar)
    except Exception as exc:  # noqa: BLE001 - any unreadable tar is the finding
        report.problem("images", tar, f"unreadable tar: {type(exc).__name__}: {exc}")
        return
    expect = [(r["key"], r["sha256"]) for r in done.get("rows", [])]
    if [k for k, _ in keys] != [k for k, _ in expect]:
        report.problem("images", tar, f"tar holds keys {[k for k, _ in keys][:5]}... but its "
                                      f"done record lists {[k for k, _ in expect][:5]}...")
    elif keys != expect:
        report.problem("images", tar, "a sample's sha256 differs from its done record")
    rec = done.get("tar") or {}
    if rec and (rec.get("bytes") != size or rec.get("sha256") != sha):
        report.problem("images", tar, "tar size/sha256 differ from its done record")


def check_images(corpus: Corpus, report: Report, repair: bool,
                 finish_claims: Callable[[Corpus], list[str]] | None) -> None:
    """Done records against tars, keys unique, index = union of done records, claims."""
    names: dict[str, set[str]] = {}
    for url in storage.listdir(corpus.images, r"shard-\d+\.(tar|done\.json|claim\.json)"):
        base = url.rsplit("/", 1)[-1]
        names.setdefault(base.split(".", 1)[0], set()).add(base.split(".", 1)[1])
    done: dict[str, dict[str, Any]] = {}
    for name in sorted(n for n, k in names.items() if "done.json" in k):
        rec = _read_json(report, "images", corpus.image_done(name))
        if rec is not None:
            done[name] = rec
            _check_image_shard(corpus, name, rec, report)
    owner: dict[str, str] = {}
    for name, rec in sorted(done.items()):
        for r in rec.get("rows", []):
            if r["key"] in owner:
                report.problem("images", corpus.image_shard(name),
                               f"key {r['key']} is also in {owner[r['key']]}")
            owner.setdefault(r["key"], name)
    _check_claims(corpus, names, report, repair, finish_claims)
    _check_index(corpus, done, report, repair)


def _check_claims(corpus: Corpus, names: dict[str, set[str]], report: Report, repair: bool,
                  finish_claims: Callable[[Corpus], list[str]] | None) -> None:
    stale, orphans = [], []
    for name, kinds in sorted(names.items()):
        if "done.json" in kinds:
            continue
        if "claim.json" not in kinds:
            orphans.append(name)
            continue
        claim = _read_json(report, "images", corpus.image_claim(name))
        if claim is None:
            continue
        if publish.is_stale(claim):
            stale.append(name)
        else:
            report.notes.append(f"images/{name}: being written by {claim.get('owner')}")
    for name in stale:
        report.problem("images", corpus.image_claim(name),
                       "stale claim: its writer is gone before the done record (re-run "
                       "`dataengine shard` or `verify --repair` to finish it)")
    for name in orphans:
        report.problem("images", corpus.image_shard(name),
                       "tar without claim or done record (written by no known writer)")
    if repair and stale and finish_claims is not None:
        for name in finish_claims(corpus):
            report.repaired.append(f"finished images/{name} from its claim")
    if repair:
        for name in orphans:
            quarantine_file(corpus, corpus.image_shard(name), report, "tar nobody claimed")


def _check_index(corpus: Corpus, done: dict[str, dict[str, Any]], report: Report,
                 repair: bool) -> None:
    want = sorted((r["key"], name) for name, rec in done.items() for r in rec.get("rows", []))
    if not done:
        return
    problem = ""
    try:
        table = index_mod.load_index(corpus)
        have = sorted(zip(table.column("key").to_pylist(), table.column("shard").to_pylist(),
                          strict=True))
        if have != want:
            problem = (f"index has {len(have)} rows, the done records {len(want)}; "
                       f"{len(set(have) ^ set(want))} differ")
    except storage.UnreadableFile as exc:
        problem = str(exc)
    if not problem:
        return
    report.problem("images", corpus.index, problem)
    if repair:
        split_map = splits.load_map(corpus)
        rows = ({**r, "split": split_map.get(r["key"], r.get("split", "train"))}
                for name in sorted(done) for r in done[name]["rows"])
        index_mod.write_index(corpus, rows, list(done))
        report.repaired.append("re-derived images/index.parquet from the done records")


def check_splits(corpus: Corpus, report: Report, repair: bool) -> None:
    """Split parts readable; every indexed key has a split."""
    try:
        split_map = splits.load_map(corpus)
        table = index_mod.load_index(corpus)
    except storage.UnreadableFile as exc:
        report.problem("splits", exc.url, str(exc))
        if repair and "/splits/" in exc.url:
            quarantine_file(corpus, exc.url, report, "unreadable split part")
        return
    missing = [r for r in table.select(["key", "split", "source"]).to_pylist()
               if r["key"] not in split_map]
    if not missing:
        return
    report.problem("splits", corpus.splits, f"{len(missing)} indexed key(s) have no split")
    if repair:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rows = [{"key": r["key"], "split": r["split"] or "train", "source": r["source"] or "",
                 "rule": "repair", "time": now} for r in missing]
        name = f"part-repair-{publish.Owner.current().run}.parquet"
        storage.write_table(storage.join(corpus.splits, name),
                            pa.Table.from_pylist(rows, schema=splits.SCHEMA), overwrite=False)
        report.repaired.append(f"recorded the index's split of {len(rows)} key(s) in {name}")


# ---- rounds ---------------------------------------------------------------------------------

def _check_round_shard(corpus: Corpus, number: int, shard: str, part: pa.Table,
                       report: Report) -> None:
    url = corpus.round_shard(number, shard)
    if not storage.exists(url):
        report.problem("rounds", url, "manifest part without its round shard")
        return
    try:
        ids = sorted(f"{round_name(int(a['round']))}/{r['image']['image_id']}/{int(a['id'])}"
                     for r in rounds.iter_round_shard(corpus, number, shard)
                     for a in r["annotations"])
    except Exception as exc:  # noqa: BLE001 - an unreadable round shard is the finding
        report.problem("rounds", url, f"unreadable round shard: {type(exc).__name__}: {exc}")
        return
    if ids != sorted(part.column("mask_id").to_pylist()):
        report.problem("rounds", url, "its masks differ from its manifest part")


def check_round(corpus: Corpus, number: int, report: Report, repair: bool) -> None:
    """One round: claim, parts against shards, aggregate, unfinished shards."""
    rdir = corpus.round_dir(number)
    if storage.exists(storage.join(rdir, "round.json")):
        _read_json(report, "rounds", storage.join(rdir, "round.json"))
    writer = rounds.RoundWriter(corpus, number, "imported" if number == 0 else "manual")
    parts: dict[str, pa.Table] = {}
    for url in storage.listdir(storage.join(rdir, "manifest"), r"shard-\d+\.parquet"):
        try:
            parts[url.rsplit("/", 1)[-1][:-8]] = storage.read_table(url)
        except storage.UnreadableFile as exc:
            report.problem("rounds", url, str(exc))
            if repair and storage.exists(corpus.round_shard(number, url.rsplit("/", 1)[-1][:-8])):
                quarantine_file(corpus, url, report, "unreadable manifest part; re-derived")
                writer.complete_shard(url.rsplit("/", 1)[-1][:-8])
    for shard, part in sorted(parts.items()):
        _check_round_shard(corpus, number, shard, part, report)
    for shard in writer.unfinished_shards():
        report.problem("rounds", corpus.round_shard(number, shard),
                       "round shard without its manifest part (a writer stopped between)")
        if repair:
            writer.complete_shard(shard)
            report.repaired.append(f"{_rel(corpus, corpus.round_shard(number, shard))}: "
                                   "manifest part derived from the tar")
    _check_round_aggregate(corpus, number, report, repair)


def _check_round_aggregate(corpus: Corpus, number: int, report: Report, repair: bool) -> None:
    url = storage.join(corpus.round_dir(number), "manifest.parquet")
    if not rounds.is_complete(corpus, number):
        return
    try:
        want = sorted(rounds.read_round_manifest(corpus, number).column("mask_id").to_pylist())
    except storage.UnreadableFile:
        return  # reported with the parts
    problem = ""
    if not storage.exists(url):
        problem = "complete round without manifest.parquet"
    else:
        try:
            have = sorted(storage.read_table(url).column("mask_id").to_pylist())
            if have != want:
                problem = f"manifest.parquet has {len(have)} masks, its parts {len(want)}"
        except storage.UnreadableFile as exc:
            problem = str(exc)
    if len(set(want)) != len(want):
        report.problem("rounds", url, "a mask id appears twice in the round")
    if problem:
        report.problem("rounds", url, problem)
        if repair:
            storage.write_table(url, rounds.read_round_manifest(corpus, number))
            report.repaired.append(f"re-derived {_rel(corpus, url)} from its parts")


# ---- models, latents, records ---------------------------------------------------------------

def check_models(corpus: Corpus, report: Report, repair: bool) -> None:
    """Published versions readable and holding weights; promotions logged."""
    from dataengine.pipeline.core import promotion

    for kind in MODEL_KINDS:
        for vdir in storage.listdir(corpus.path("models", kind), r"v\d{4,}"):
            vjson = storage.join(vdir, "version.json")
            if not storage.exists(vjson):
                report.notes.append(f"{_rel(corpus, vdir)}: unfinished (not published)")
                continue
            if _read_json(report, "models", vjson) is None:
                continue
            fs, path = storage.get_fs(vdir)
            if not any(f.endswith(".safetensors") for f in storage.retry(lambda: fs.find(path))):
                report.problem("models", vdir, "published version without weights")
    try:
        logged = {d["candidate"] for d in promotion.decisions(corpus)}
    except storage.UnreadableFile as exc:
        report.problem("models", exc.url, str(exc))
        return
    for vdir in storage.listdir(corpus.path("models", "sam"), r"v\d{4,}"):
        rec_url = storage.join(vdir, "promotion.json")
        if storage.exists(rec_url) and vdir.rsplit("/", 1)[-1] not in logged:
            report.problem("models", rec_url, "gate decision missing from the promotion log")
            rec = _read_json(report, "models", rec_url)
            if repair and rec is not None:
                promotion.log_decision(corpus, rec)
                report.repaired.append(f"logged the gate decision of {_rel(corpus, vdir)}")


def check_latents(corpus: Corpus, report: Report, repair: bool) -> None:
    """Latent done records against tars; ``dataset.json`` lists the done shards."""
    for out in storage.listdir(corpus.path("latents")):
        done = {}
        for url in storage.listdir(storage.join(out, "done"), r"shard-\d+\.json"):
            rec = _read_json(report, "latents", url)
            if rec is None:
                continue
            done[rec["shard"]] = rec
            tar = storage.join(out, f"{rec['shard']}.tar")
            if not storage.exists(tar):
                report.problem("latents", tar, "done record without its tar")
            elif sum(1 for _ in iter_tar(tar)) != rec.get("samples"):
                report.problem("latents", tar, "sample count differs from its done record")
        ds_url = storage.join(out, "dataset.json")
        ds = _read_json(report, "latents", ds_url) if storage.exists(ds_url) else None
        if done and (ds is None or sorted(ds.get("shards", [])) != sorted(done)):
            report.problem("latents", ds_url, "dataset.json does not list the done shards")
            if repair and ds is not None:
                from dataengine.pipeline.core.publish import publish_derived

                def write(recs: tuple[str, ...], ds=ds, out=out, done=done) -> None:
                    storage.write_json(storage.join(out, "dataset.json"), {
                        **{k: ds[k] for k in ("vae_version", "round", "resolution") if k in ds},
                        "shards": sorted(done), "samples": sum(d["samples"]
                                                               for d in done.values()),
                        "complete": ds.get("complete", False)})

                publish_derived(lambda: tuple(sorted(done)), write)
                report.repaired.append(f"re-derived {_rel(corpus, ds_url)}")


def check_records(corpus: Corpus, report: Report, repair: bool) -> None:
    """Curation decisions, tokens, quarantine parts and engine steps are readable."""
    areas = [(corpus.curation, r"decisions-.*\.parquet", "curation"),
             (storage.join(corpus.curation, "tokens"), r".*\.json", "tokens"),
             (corpus.quarantine, r".*\.parquet", "quarantine")]
    areas += [(storage.join(e, "steps"), r"\d{4,}-.*\.json", "engine")
              for e in storage.listdir(corpus.engine)]
    for folder, pattern, area in areas:
        for url in storage.listdir(folder, pattern):
            try:
                if url.endswith(".parquet"):
                    storage.read_table(url)
                else:
                    storage.read_json(url)
            except storage.UnreadableFile as exc:
                report.problem(area, url, str(exc))
                if repair:
                    quarantine_file(corpus, url, report, f"unreadable {area} record")


def check_temp_files(corpus: Corpus, report: Report, repair: bool, grace_seconds: float) -> None:
    """Staging files older than the grace period (a writer died before publishing)."""
    if not storage.is_local(corpus.root) or not os.path.isdir(corpus.root):
        return
    now = time.time()
    for dirpath, _, files in os.walk(corpus.root):
        for f in files:
            if not TEMP_RE.fullmatch(f):
                continue
            path = os.path.join(dirpath, f)
            age = now - os.stat(path).st_mtime
            if age < grace_seconds:
                report.notes.append(f"{path}: staging file {age:.0f}s old (a writer is at work)")
                continue
            report.problem("temp", path, f"orphan staging file, {age:.0f}s old")
            if repair:
                os.unlink(path)
                report.repaired.append(f"removed orphan staging file {_rel(corpus, path)} "
                                       "(never published: not data)")


def verify(root: str | Corpus, *, repair: bool = False, grace_seconds: float = 3600.0,
           finish_claims: Callable[[Corpus], list[str]] | None = None) -> Report:
    """Check (and with ``repair``, repair) the corpus at ``root``; see the module docstring.

    After a repair the corpus is checked again: the returned report lists what was repaired
    and what is still wrong.
    """
    corpus = root if isinstance(root, Corpus) else Corpus(root)
    if not storage.exists(corpus.root):
        raise FileNotFoundError(f"corpus root {corpus.root!r} does not exist")
    report = _check_all(corpus, repair, grace_seconds, finish_claims)
    if repair and report.repaired:
        again = _check_all(corpus, False, grace_seconds, None)
        again.repaired = report.repaired
        report = again
    return report


def _check_all(corpus: Corpus, repair: bool, grace_seconds: float,
               finish_claims: Callable[[Corpus], list[str]] | None) -> Report:
    report = Report(corpus.root)
    check_images(corpus, report, repair, finish_claims)
    check_splits(corpus, report, repair)
    for number in corpus.rounds():
        check_round(corpus, number, report, repair)
    check_models(corpus, report, repair)
    check_latents(corpus, report, repair)
    check_records(corpus, report, repair)
    check_temp_files(corpus, report, repair, grace_seconds)
    return report
