"""pipeline.core.storage on memory:// and local disk: atomic publish, retries, braces, listdir."""

import os
import uuid

import fsspec
import pyarrow as pa
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from dataengine.pipeline.core import storage


@pytest.fixture(params=["memory", "local"])
def base(request, tmp_path):
    if request.param == "memory":
        return f"memory://t-{uuid.uuid4().hex[:8]}"
    return str(tmp_path / "root")


class FlakyFS(MemoryFileSystem):
    """A real in-memory filesystem whose reads and writes fail transiently ``fail`` times."""

    protocol = "flaky"
    fail = 0
    calls = 0
    error: type[Exception] = ConnectionError

    def _maybe_fail(self):
        type(self).calls += 1
        if type(self).fail > 0:
            type(self).fail -= 1
            raise type(self).error("503 ServiceUnavailable (simulated)")

    def cat_file(self, path, *a, **kw):
        self._maybe_fail()
        return super().cat_file(path, *a, **kw)

    def pipe_file(self, path, value, *a, **kw):
        self._maybe_fail()
        return super().pipe_file(path, value, *a, **kw)


fsspec.register_implementation("flaky", FlakyFS, clobber=True)


def test_write_read_roundtrip_and_overwrite_rules(base):
    url = storage.join(base, "a", "b.json")
    storage.write_json(url, {"x": 1})
    assert storage.read_json(url) == {"x": 1} and storage.exists(url)
    storage.write_json(url, {"x": 2})
    assert storage.read_json(url) == {"x": 2}
    with pytest.raises(FileExistsError, match="append-only"):
        storage.write_bytes(url, b"no", overwrite=False)
    table = pa.table({"k": ["a", "b"], "v": [1, 2]})
    storage.write_table(storage.join(base, "t.parquet"), table)
    assert storage.read_table(storage.join(base, "t.parquet")).equals(table)
    both = storage.read_tables([storage.join(base, "t.parquet")] * 2)
    assert both.num_rows == 4 and storage.read_tables([]).num_rows == 0


def test_open_atomic_publishes_whole_or_nothing(base):
    url = storage.join(base, "shard.tar")
    with pytest.raises(RuntimeError):
        with storage.open_atomic(url) as f:
            f.write(b"half a shard")
            assert not storage.exists(url)  # nothing visible while writing
            raise RuntimeError("crash mid-write")
    assert not storage.exists(url)
    with storage.open_atomic(url) as f:
        f.write(b"x" * 1000)
    assert storage.read_bytes(url) == b"x" * 1000
    # no temporary names are left beside the published file
    assert [u.rsplit("/", 1)[-1] for u in storage.listdir(base)] == ["shard.tar"]


def test_local_write_never_exposes_partial_file(tmp_path):
    url = str(tmp_path / "f.bin")
    storage.write_bytes(url, b"old")
    storage.write_bytes(url, b"new" * 100000)
    assert open(url, "rb").read() == b"new" * 100000
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_listdir_pattern_sorted_and_missing(base):
    for name in ("shard-000002.tar", "shard-000001.tar", "shard-000001.done.json", "x.txt"):
        storage.write_bytes(storage.join(base, "images", name), b"1")
    urls = storage.listdir(storage.join(base, "images"), r"shard-\d+\.tar")
    assert [u.rsplit("/", 1)[-1] for u in urls] == ["shard-000001.tar", "shard-000002.tar"]
    assert storage.listdir(storage.join(base, "nothing-here")) == []


def test_brace_expansion():
    urls = storage.expand("s3://b/images/shard-{000000..000003}.tar")
    assert urls == [f"s3://b/images/shard-00000{i}.tar" for i in range(4)]
    assert storage.expand("a-{x,y}.json") == ["a-x.json", "a-y.json"]


def test_transient_errors_are_retried_with_backoff():
    FlakyFS.fail, FlakyFS.calls = 2, 0
    url = f"flaky://r-{uuid.uuid4().hex[:8]}/obj.bin"
    storage.write_bytes(url, b"payload")  # a remote store: single PUT, retried
    assert FlakyFS.calls == 3
    FlakyFS.fail, FlakyFS.calls = 3, 0
    assert storage.read_bytes(url) == b"payload"
    assert FlakyFS.calls == 4


def test_retries_give_up_and_user_errors_are_not_retried():
    url = f"flaky://r-{uuid.uuid4().hex[:8]}/obj.bin"
    FlakyFS.fail, FlakyFS.calls = 0, 0
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(url)
    assert FlakyFS.calls == 1
    storage.write_bytes(url, b"p")
    FlakyFS.fail, FlakyFS.calls = 10, 0
    with pytest.raises(ConnectionError):
        storage.retry(lambda: storage.get_fs(url)[0].cat_file(url), attempts=3, base=0.001)
    assert FlakyFS.calls == 3
    FlakyFS.fail = 0


def test_is_transient_classification():
    assert storage.is_transient(ConnectionError("reset"))
    assert storage.is_transient(RuntimeError("An error occurred (SlowDown)"))
    assert not storage.is_transient(FileNotFoundError("x"))
    assert not storage.is_transient(ValueError("bad"))


def test_check_writable(tmp_path):
    storage.check_writable(str(tmp_path / "ok"))
    with pytest.raises(PermissionError, match="not writable"):
        storage.check_writable("/proc/dataengine-cannot-write-here")


def test_bytes_tar_writer_is_read_back_by_webdataset_and_tarfile(tmp_path):
    """The image shards' tar writer: same members as webdataset's TarWriter (sorted
    extensions, mode 0444), a valid ustar archive, every sample read back by webdataset."""
    import tarfile

    import webdataset as wds

    from dataengine.pipeline.core.shards import BytesTarWriter, iter_tar

    samples = [{"__key__": f"{i:016x}", "jpg": bytes([i]) * (100 + 700 * i),
                "json": f'{{"i": {i}}}'.encode()} for i in range(5)]
    path = tmp_path / "shard-000000.tar"
    with open(path, "wb") as f, BytesTarWriter(f, mtime=0) as sink:
        for s in samples:
            sink.write(s)
    with tarfile.open(path) as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == [f"{s['__key__']}.{e}" for s in samples
                                             for e in ("jpg", "json")]
        assert all(m.mode == 0o444 and m.isfile() for m in members)
        assert tf.extractfile(members[2]).read() == samples[1]["jpg"]
    back = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [(b["__key__"], b["jpg"], b["json"]) for b in back] == \
        [(s["__key__"], s["jpg"], s["json"]) for s in samples]
    assert len(list(iter_tar(str(path)))) == 5
    with pytest.raises(ValueError, match="takes bytes"):
        BytesTarWriter(open(tmp_path / "x.tar", "wb")).write({"__key__": "k", "cls": 3})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_create_if_absent_has_one_winner(where, tmp_path, request):
    """Of writers racing for one name exactly one creates it (local disk: link; S3: a
    conditional PUT); the file is never replaced."""
    from concurrent.futures import ThreadPoolExecutor

    base = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    url = storage.join(base, "claims", "shard-000001.json")
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: storage.create_bytes(url, str(i).encode()), range(8)))
    assert sum(won) == 1
    assert storage.read_bytes(url) == str(won.index(True)).encode()
    assert storage.create_json(url, {"late": True}) is False
    with pytest.raises(FileExistsError, match="append-only"):
        storage.write_bytes(url, b"again", overwrite=False)
    assert storage.read_bytes(url) == str(won.index(True)).encode()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_staged_file_is_published_whole_once_or_not_at_all(where, tmp_path, request):
    """A staged file is invisible until published; ``create`` publishes only if the name is
    free (a large file's create-if-absent); a stage never published leaves nothing behind."""
    from concurrent.futures import ThreadPoolExecutor

    base = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    url = storage.join(base, "images", "shard-000000.tar")

    def stage_and_create(i: int) -> bool:
        with storage.Staged(url) as staged:
            staged.file.write(bytes([i]) * (1 << 20))
            assert not storage.exists(url) or storage.read_bytes(url)[:1] != bytes([i])
            return staged.create()

    with ThreadPoolExecutor(6) as pool:
        won = list(pool.map(stage_and_create, range(6)))
    assert sum(won) == 1
    assert storage.read_bytes(url) == bytes([won.index(True)]) * (1 << 20)
    with storage.Staged(storage.join(base, "images", "never.tar")) as staged:
        staged.file.write(b"abandoned")
    assert not storage.exists(storage.join(base, "images", "never.tar"))
    if where == "local":
        assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["shard-000000.tar"]
