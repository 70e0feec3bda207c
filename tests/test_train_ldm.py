"""pipeline.ldm.train_ldm on the two-node Ray cluster: DDP across nodes on disjoint latent shards
ends with identical weights, a control run without gradient sync diverges, a SIGKILLed worker
resumes at its last checkpoint's step; the published version loads into a diffusers pipeline."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.trainer import ScaleConfig
from dataengine.pipeline.ldm.train_ldm import TrainLdmConfig, pick_latents, train_ldm
from tests.ldm_corpus import corpus_with_latents


@pytest.fixture(scope="module")
def ldm_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ldm") / "corpus")
    corpus_with_latents(root, shards=3, per_shard=6)
    return root


def _cfg(**kw) -> TrainLdmConfig:
    base = dict(unet="test", text="test", steps=8, batch_size=4, checkpoint_every=4,
                sample_steps=4, grid_n=2, heldout_samples=8, shuffle_buffer=16,
                scale=ScaleConfig(num_workers=2, cpus_per_worker=0.5,
                                  placement_strategy="STRICT_SPREAD", max_failures=2))
    base.update(kw)
    return TrainLdmConfig(**base)


def _workers(root: str, run: str) -> list[dict]:
    d = storage.join(Corpus(root).runs, run, "workers")
    return [storage.read_json(u) for u in storage.listdir(d, r"rank-\d+\.json")]


def test_config_validation():
    with pytest.raises(ValueError, match="conditions"):
        TrainLdmConfig(conditions=["depth"])
    with pytest.raises(ValueError, match="grad_accum=0"):
        TrainLdmConfig(grad_accum=0)


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_two_nodes_identical_weights_control_diverges_and_export(ray_cluster, ldm_root):
    from dataengine.models.ldm import LayoutDiffusionPipeline

    info = train_ldm(ldm_root, _cfg(run_name="sync", grad_accum=2))
    w = sorted(_workers(ldm_root, "sync"), key=lambda r: r["rank"])
    assert len(w) == 2 and w[0]["node"] != w[1]["node"], "workers on different nodes"
    assert not set(w[0]["shards"]) & set(w[1]["shards"]), "disjoint latent shards"
    assert len(set(w[0]["shards"]) | set(w[1]["shards"])) == 3
    assert w[0]["digest"] == w[1]["digest"], "DDP keeps the weights identical"
    # quality curve, sample grid next to every checkpoint, published version
    assert [s for s, _ in info["curve"]] == [3, 7] and info["heldout_split"] == "holdout"
    assert np.isfinite(info["heldout_loss"])
    ckpts = storage.listdir(storage.join(Corpus(ldm_root).runs, "sync"), r"checkpoint_\d.*")
    assert ckpts and all(storage.exists(storage.join(c, "samples.png")) for c in ckpts)
    version_dir = Corpus(ldm_root).model_dir("ldm", info["version"])
    assert storage.read_bytes(storage.join(version_dir, "samples.png"))[:4] == b"\x89PNG"
    pipe = LayoutDiffusionPipeline.from_pretrained(storage.join(version_dir, "pipeline"))
    out = pipe("<c1>", layout=np.zeros((8, 8), np.uint8), num_inference_steps=2,
               output_type="np")
    assert out.shape == (1, 32, 32, 3)
    # samples conditioned on held-out images, shown beside them: 3 rows of 2 (32 px, 2 px pad)
    from PIL import Image

    from dataengine.pipeline.ldm.sample import SampleConfig, sample

    grid = sample(ldm_root, SampleConfig(heldout=True, n=2, steps=2))
    assert grid["model"] == info["version"] and grid["prompt"].startswith("holdout images of")
    with Image.open(io.BytesIO(storage.read_bytes(grid["grid"]))) as im:
        assert im.size == (2 * 34 + 2, 3 * 34 + 2)

    train_ldm(ldm_root, _cfg(run_name="nosync", sync_gradients=False, publish=False))
    c = sorted(_workers(ldm_root, "nosync"), key=lambda r: r["rank"])
    assert c[0]["digest"] != c[1]["digest"], "without gradient sync the workers diverge"


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_sigkilled_worker_resumes_at_last_checkpoint(ray_cluster, ldm_root, tmp_path):
    beat = tmp_path / "heartbeat.txt"
    snapshot = os.path.join(Corpus(ldm_root).runs, "killed", "checkpoint_manager_snapshot.json")
    killed: list[tuple[int, int]] = []  # (pid, step of the newest registered checkpoint)

    def registered_step() -> int:
        try:
            with open(snapshot) as f:
                return int(json.load(f)["latest_checkpoint_result"]["metrics"]["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    def killer():
        deadline = time.time() + 280
        while time.time() < deadline and not killed:
            time.sleep(0.05)
            ckpt = registered_step()
            if ckpt < 3 or not beat.exists():
                continue
            for line in beat.read_text().splitlines():
                pid, rank, step = map(int, line.split())
                if rank == 1 and step > ckpt + 1:
                    os.kill(pid, signal.SIGKILL)
                    killed.append((pid, ckpt))
                    return

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    info = train_ldm(ldm_root, _cfg(run_name="killed", steps=12, heartbeat_file=str(beat),
                                    publish=False))
    t.join(timeout=5)
    assert killed, "a worker was killed"
    pid, ckpt = killed[0]
    rows = [tuple(map(int, line.split())) for line in beat.read_text().splitlines()]
    # (a loaded machine may restart the group before the kill too: look at the killed group)
    last = max(i for i, r in enumerate(rows) if r[0] == pid)
    before = {r[0] for r in rows[:last + 1]}
    after = [r for r in rows[last + 1:] if r[0] not in before]
    assert after, "a new worker group took over"
    assert max(r[2] for r in rows if r[0] == pid) > ckpt, "killed mid-run, after a checkpoint"
    assert min(r[2] for r in after) == ckpt + 1, "resumed right after the last checkpoint"
    assert max(r[2] for r in after) == 11 and info["steps"] == 12
    assert [s for s, _ in info["curve"]][-1] == 11
    assert all(r["start"] == ckpt + 1 for r in _workers(ldm_root, "killed"))


def test_pick_latents_names_what_exists(ldm_root):
    corpus = Corpus(ldm_root)
    assert pick_latents(corpus) == "v0001-32-r0"
    with pytest.raises(FileNotFoundError, match="v0009-32-r0"):
        pick_latents(corpus, "v0009-32-r0")
