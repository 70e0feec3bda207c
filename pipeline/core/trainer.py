"""Ray Train launcher and worker-side helpers shared by every trainer (SAM, detector, VAE, LDM).

Driver side: :func:`launch` runs a per-worker loop under ``ray.train.torch.TorchTrainer`` with
DDP (NCCL on GPU, gloo on CPU), checkpoints under ``ROOT/runs/<name>/`` on the corpus storage
(local or S3) and a ``FailureConfig`` so a lost worker or node resumes from the last checkpoint.
Launching again with the same run name resumes the run from its latest checkpoint.

Worker side: :func:`context` (rank, world size, device), :func:`my_shards` (disjoint shards per
worker), :func:`prepare` (DDP wrap, or no gradient sync for control runs), :func:`autocast`
(bf16 on CUDA only), :func:`report` and :func:`restore` (safetensors model + weights-only
optimizer state; nothing is unpickled from storage).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dataengine.pipeline.core import storage

logger = logging.getLogger(__name__)


@dataclass
class ScaleConfig:
    """How a training run is spread over the cluster."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"   # SPREAD / STRICT_SPREAD put workers on different nodes
    max_failures: int = 3              # worker/node losses survived by resuming a checkpoint
    torch_threads: int = 0             # 0 = leave torch's default
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers={self.num_workers}: must be >= 1")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker}: must be > 0")
        allowed = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
        if self.placement_strategy not in allowed:
            raise ValueError(f"placement_strategy={self.placement_strategy!r}: one of {allowed}")


def _storage_for_ray(url: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for RunConfig from any fsspec URL."""
    fs, path = storage.get_fs(url)
    if storage.is_local(url):
        os.makedirs(path, exist_ok=True)
        return path, None
    import pyarrow.fs as pafs

    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def launch(train_loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], *,
           runs_url: str, name: str, scale: ScaleConfig,
           env: dict[str, str] | None = None) -> Any:
    """Run ``train_loop(loop_config)`` on ``scale.num_workers`` Ray Train workers.

    Checkpoints go to ``runs_url/name``; a second launch with the same ``name`` resumes from the
    latest checkpoint. Returns the ``ray.train.Result``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dataengine.pipeline.core.distribute import ensure_ray

    ensure_ray()
    resources: dict[str, float] = {"CPU": scale.cpus_per_worker}
    if scale.use_gpu:
        resources["GPU"] = scale.gpus_per_worker
    storage_path, storage_fs = _storage_for_ray(runs_url)
    worker_env = {k: v for k, v in os.environ.items()
                  if k.startswith(("AWS_", "DATAENGINE_", "PYTHONPATH"))}
    worker_env.update(env or {})
    if scale.torch_threads:
        worker_env["OMP_NUM_THREADS"] = str(scale.torch_threads)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={**loop_config, "_scale": asdict(scale)},
        torch_config=TorchConfig(backend="nccl" if scale.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=scale.num_workers, use_gpu=scale.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=scale.placement_strategy),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=scale.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=scale.keep_checkpoints),
            worker_runtime_env={"env_vars": worker_env},
        ),
    )
    return trainer.fit()


# --------------------------------------------------------------------------- worker side


@dataclass
class WorkerContext:
    """Who this worker is."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context(config: dict[str, Any] | None = None) -> WorkerContext:
    """Rank, world size and device of the calling Ray Train worker; sets torch threads."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    threads = int(((config or {}).get("_scale") or {}).get("torch_threads") or 0)
    if threads:
        torch.set_num_threads(threads)
    return WorkerContext(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                         local_rank=ctx.get_local_rank(), device=ray.train.torch.get_device())


def my_shards(shards: Sequence[str], rank: int, world_size: int) -> list[str]:
    """This worker's disjoint share of ``shards`` (round-robin by position)."""
    if world_size > len(shards) and shards:
        logger.warning("%d workers for %d shards: some workers get none", world_size,
                       len(shards))
    return list(shards)[rank::world_size]


def prepare(model: torch.nn.Module, *, sync_gradients: bool = True) -> torch.nn.Module:
    """Move ``model`` to the worker's device and wrap it in DDP (unless ``sync_gradients`` is
    False, used by control runs that must diverge)."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model, parallel_strategy="ddp" if sync_gradients else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module behind a DDP wrapper."""
    return model.module if hasattr(model, "module") else model


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def report(metrics: dict[str, Any], *, models: dict[str, torch.nn.Module] | None = None,
           optimizers: dict[str, torch.optim.Optimizer] | None = None,
           extra: dict[str, Any] | None = None,
           files: dict[str, bytes] | None = None) -> None:
    """Report metrics from every worker; with ``models`` also a checkpoint written by rank 0.

    The checkpoint holds ``<name>.safetensors`` per model, ``<name>.optim.pt`` per optimizer
    (loaded back with ``weights_only=True``), ``state.json`` (``extra`` + metrics) and ``files``.
    """
    import ray.train
    from safetensors.torch import save_file

    ctx = ray.train.get_context()
    if not models or ctx.get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            state = {k: v.detach().contiguous().cpu()
                     for k, v in unwrap(model).state_dict().items()}
            save_file(state, os.path.join(tmp, f"{name}.safetensors"))
        for name, opt in (optimizers or {}).items():
            torch.save(opt.state_dict(), os.path.join(tmp, f"{name}.optim.pt"))
        for fname, data in (files or {}).items():
            with open(os.path.join(tmp, fname), "wb") as f:
                f.write(data)
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({**(extra or {}), "metrics": metrics}, f, default=float)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def restore(*, models: dict[str, torch.nn.Module] | None = None,
            optimizers: dict[str, torch.optim.Optimizer] | None = None) -> dict[str, Any] | None:
    """Load the latest checkpoint of this run into ``models``/``optimizers`` (if any).

    Returns the checkpoint's ``state.json`` (e.g. ``{"step": 120, ...}``) or None on a fresh run.
    """
    import ray.train
    from safetensors.torch import load_file

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        for name, model in (models or {}).items():
            unwrap(model).load_state_dict(load_file(os.path.join(d, f"{name}.safetensors")))
        for name, opt in (optimizers or {}).items():
            path = os.path.join(d, f"{name}.optim.pt")
            if os.path.exists(path):
                opt.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        with open(os.path.join(d, "state.json")) as f:
            return json.load(f)


def checkpoint_files(result: Any) -> str | None:
    """Local directory holding the final checkpoint of a finished run (copied if remote)."""
    ckpt = getattr(result, "checkpoint", None)
    if ckpt is None:
        return None
    return ckpt.to_directory(tempfile.mkdtemp(prefix="dataengine-ckpt-"))


def final_checkpoint(result: Any, what: str) -> tuple[str, dict[str, Any]]:
    """``(local checkpoint dir, its state.json)`` of a finished run; an error names ``what``."""
    ckpt_dir = checkpoint_files(result)
    if ckpt_dir is None:
        raise RuntimeError(f"{what}: the run ended without a checkpoint")
    with open(os.path.join(ckpt_dir, "state.json")) as f:
        return ckpt_dir, json.load(f)
