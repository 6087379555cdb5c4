"""Hydra plugin: ``hydra/launcher=parallel`` (see ``iad_lightning.launcher``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from iad_lightning.errors import ConfigError
from iad_lightning.launcher import PinnedTask, resolve_devices

try:
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
except ImportError:  # the plugin scan imports this module on every Hydra run: never fail here
    JoblibLauncher = None


if JoblibLauncher is not None:

    class ParallelLauncher(JoblibLauncher):
        """hydra-joblib-launcher with one device per worker process (``iad_lightning.launcher``)."""

        def __init__(self, devices: Any = "auto", n_jobs: int | None = None, **joblib: Any) -> None:
            self.devices = resolve_devices(devices)
            if n_jobs is None or (self.devices and n_jobs < 1):  # joblib's -1 (all CPUs): all devices here
                n_jobs = len(self.devices) or 2
            if self.devices and n_jobs > len(self.devices):
                raise ConfigError(
                    f"hydra.launcher.n_jobs={n_jobs} exceeds the {len(self.devices)} devices {self.devices}: "
                    "lower n_jobs or list more hydra.launcher.devices"
                )
            super().__init__(n_jobs=n_jobs, **joblib)

        def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
            lock_dir = str(Path(str(config.hydra.sweep.dir)).resolve() / ".devices")
            pinned = PinnedTask(task_function, self.devices, int(self.joblib["n_jobs"]), lock_dir)
            super().setup(hydra_context=hydra_context, task_function=pinned, config=config)

else:
    from hydra.plugins.launcher import Launcher

    class ParallelLauncher(Launcher):  # type: ignore[no-redef]
        """Stand-in that says what to install."""

        def __init__(self, **_: Any) -> None:
            raise ConfigError('hydra/launcher=parallel needs hydra-joblib-launcher: pip install -e ".[parallel]"')

        def setup(self, **_: Any) -> None:  # pragma: no cover
            raise NotImplementedError

        def launch(self, *_: Any, **__: Any) -> Any:  # pragma: no cover
            raise NotImplementedError
