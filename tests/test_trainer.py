"""The shared Ray Train launcher: DDP sync across two nodes, control divergence, kill -9 resume."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from dataengine.pipeline.core import trainer


def _loop(config):
    import ray.train

    ctx = trainer.context(config)
    torch.manual_seed(0)  # same init on every worker
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = trainer.restore(models={"model": model}, optimizers={"opt": opt})
    start = state["step"] + 1 if state else 0
    model = trainer.prepare(model, sync_gradients=config["sync"])
    g = torch.Generator().manual_seed(1000 + ctx.rank)  # each worker sees different data
    node = ray.get_runtime_context().get_node_id()
    for step in range(start, config["steps"]):
        x = torch.randn(16, 8, generator=g)
        loss = ((model(x.to(ctx.device)) - x.sum(1, keepdim=True)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ctx.rank == 0 and config.get("pidfile"):
            with open(config["pidfile"], "a") as f:
                f.write(f"{os.getpid()} {step}\n")
        w = trainer.unwrap(model).weight.detach().flatten().tolist()
        trainer.report({"step": step, "start": start, "rank_w": w, "node": node},
                       models={"model": model} if step % 5 == 4 else None,
                       optimizers={"opt": opt}, extra={"step": step})
        time.sleep(config.get("sleep", 0))


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_two_workers_on_two_nodes_sync_and_control_diverges(ray_cluster, tmp_path):
    import ray

    scale = trainer.ScaleConfig(num_workers=2, cpus_per_worker=0.5,
                                placement_strategy="STRICT_SPREAD")
    seen: dict[bool, list] = {}
    for sync in (True, False):
        @ray.remote(num_cpus=0)
        class Sink:  # collects each worker's final weights
            def __init__(self):
                self.w = {}

            def put(self, rank, w, node):
                self.w[rank] = (w, node)

            def get(self):
                return self.w

        sink = Sink.options(name=f"sink-{sync}").remote()

        def loop2(config):
            import ray.train
            ctx = trainer.context(config)
            torch.manual_seed(0)
            model = torch.nn.Linear(8, 1)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            model = trainer.prepare(model, sync_gradients=config["sync"])
            g = torch.Generator().manual_seed(1000 + ctx.rank)
            for _ in range(config["steps"]):
                x = torch.randn(16, 8, generator=g)
                loss = ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            w = trainer.unwrap(model).weight.detach().flatten().tolist()
            s = ray.get_actor(config["sink"])
            ray.get(s.put.remote(ctx.rank, w, ray.get_runtime_context().get_node_id()))
            ray.train.report({"done": 1})

        trainer.launch(loop2, {"sync": sync, "steps": 10, "sink": f"sink-{sync}"},
                       runs_url=str(tmp_path / "runs"), name=f"sync-{sync}", scale=scale)
        seen[sync] = ray.get(sink.get.remote())
        ray.kill(sink)
    (w0, n0), (w1, n1) = seen[True][0], seen[True][1]
    assert n0 != n1, "workers must be placed on different nodes"
    assert w0 == pytest.approx(w1, abs=1e-6)
    (c0, _), (c1, _) = seen[False][0], seen[False][1]
    assert max(abs(a - b) for a, b in zip(c0, c1)) > 1e-3


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_worker_killed_resumes_from_last_checkpoint(ray_cluster, tmp_path):
    import threading

    pidfile = tmp_path / "pids.txt"
    scale = trainer.ScaleConfig(num_workers=1, cpus_per_worker=0.5, max_failures=2)

    def killer():
        while True:
            time.sleep(0.2)
            if pidfile.exists():
                lines = pidfile.read_text().split()
                if len(lines) >= 2 and int(lines[-1]) >= 7:
                    os.kill(int(lines[-2]), signal.SIGKILL)
                    return

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = trainer.launch(_loop, {"sync": True, "steps": 14, "pidfile": str(pidfile),
                                    "sleep": 0.3},
                            runs_url=str(tmp_path / "runs"), name="killed", scale=scale)
    t.join(timeout=5)
    rows = [line.split() for line in pidfile.read_text().splitlines()]
    pids = {r[0] for r in rows}
    assert len(pids) == 2, "the killed worker was replaced by a new process"
    steps_after = [int(r[1]) for r in rows if r[0] != rows[0][0]]
    assert steps_after[0] == 5, "resumed right after the last checkpoint (step 4)"
    assert int(rows[-1][1]) == 13, "the resumed run trained to the end"
    assert result.metrics["step"] == 9  # the metrics of the newest checkpoint
