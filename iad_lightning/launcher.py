"""``hydra/launcher=parallel``: N sweep jobs at once on one machine, each worker on its own device.

The launcher class is ``hydra_plugins.iad_parallel_launcher.ParallelLauncher`` (Hydra finds
launchers only in its ``hydra_plugins`` namespace); the logic lives here. Built on
hydra-joblib-launcher (``pip install -e ".[parallel]"``): joblib's loky backend runs
the jobs in ``n_jobs`` worker processes. Before a worker's first job it claims a free device
slot (an exclusive ``flock`` on ``<sweep dir>/.devices/slot_<k>.lock``, held for the life of the
process, so a reused worker keeps its device and a crashed one frees it) and sets
``CUDA_VISIBLE_DEVICES`` to that slot's device: inside the job the device is ``cuda:0``, so
``trainer.devices=1``. A worker keeps its device because CUDA, once initialised in a process,
ignores later changes of ``CUDA_VISIBLE_DEVICES``.

devices: ``auto`` (the GPUs visible to the launching process; none on a CPU machine), a count
    ``N`` (GPUs 0..N-1) or a list of device ids; null or no GPU: no pinning.
n_jobs: jobs at once; null: one per device, or 2 without devices.
Other keys are joblib's (``hydra-joblib-launcher``), passed through. Without devices (CPU) the
jobs split the cores: each job sets ``torch.set_num_threads(cpu_count // n_jobs)``.
One process per job: a job cannot itself start DDP (``trainer=ddp``); use ``hydra/launcher=slurm``
for multi-GPU jobs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any

from hydra.types import TaskFunction
from omegaconf import DictConfig

from iad_lightning.errors import ConfigError

log = logging.getLogger(__name__)
_SLOT: tuple[int, int] | None = None  # (slot, lock fd) of this worker process, kept for its life


def resolve_devices(devices: Any) -> list[str]:
    """``auto`` / a count / a list -> device ids as strings ([] means no pinning)."""
    if devices is None:
        return []
    if devices == "auto":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            return [d for d in visible.split(",") if d.strip()]
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    if isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise ConfigError(f"hydra.launcher.devices={devices} must be >= 1, a list of ids, auto or null")
        return [str(i) for i in range(devices)]
    if isinstance(devices, str):
        return [d.strip() for d in devices.split(",") if d.strip()]
    return [str(d) for d in devices]


def claim_slot(lock_dir: Path, n_slots: int) -> int:
    """This process's device slot: the first free one, claimed once and kept."""
    global _SLOT
    if _SLOT is not None:
        return _SLOT[0]
    lock_dir.mkdir(parents=True, exist_ok=True)
    for k in range(n_slots):
        fd = os.open(lock_dir / f"slot_{k}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _SLOT = (k, fd)
        return k
    raise ConfigError(
        f"all {n_slots} device slots under {lock_dir} are taken: hydra.launcher.n_jobs must not "
        "exceed the number of hydra.launcher.devices"
    )


class PinnedTask:
    """The sweep's task function, run in a worker after pinning it to its device (picklable)."""

    def __init__(self, task_function: TaskFunction, devices: list[str], n_jobs: int, lock_dir: str) -> None:
        self.task_function, self.devices, self.n_jobs, self.lock_dir = task_function, devices, n_jobs, lock_dir

    def __call__(self, cfg: DictConfig) -> Any:
        if self.devices:
            slot = claim_slot(Path(self.lock_dir), len(self.devices))
            os.environ["CUDA_VISIBLE_DEVICES"] = self.devices[slot]
            where = f"device slot {slot} (CUDA_VISIBLE_DEVICES={self.devices[slot]})"
        else:
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.n_jobs))
            where = f"no device pinning, {torch.get_num_threads()} CPU threads"
        log.info("parallel launcher: pid %d, %s, start %.3f", os.getpid(), where, time.time())
        try:
            return self.task_function(cfg)
        finally:
            log.info("parallel launcher: pid %d, end %.3f", os.getpid(), time.time())
