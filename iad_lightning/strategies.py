"""DDP that also serves methods with nothing to train (memory banks, zero-shot models).

torch's DistributedDataParallel refuses a module without trainable parameters. PatchCore still
needs the process group (sharded embedding, gathered bank, gathered test predictions), so this
strategy skips the DDP wrapper when no parameter requires a gradient and wraps as usual otherwise.

``resolve_strategy`` maps Lightning's DDP strategy names (``trainer.strategy=ddp``, ``ddp_spawn``,
``ddp_find_unused_parameters_true``, ...) to this strategy, so the plain Lightning spelling works
for every method; other names and configured objects pass through unchanged.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy

# Lightning's registered DDP names -> the start method of the process launcher
_DDP_START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}
_UNUSED_SUFFIXES = {"_find_unused_parameters_true": True, "_find_unused_parameters_false": False}


class AnomalyDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that leaves gradient-free modules unwrapped."""

    def configure_ddp(self) -> None:
        assert self.model is not None
        if any(p.requires_grad for p in self.model.parameters()):
            super().configure_ddp()
        # else: nothing to synchronise; collectives are issued explicitly by the method


def resolve_strategy(strategy: Any) -> Any:
    """``"ddp"``-family names -> ``AnomalyDDPStrategy`` with the same launcher and options."""
    if not isinstance(strategy, str):
        return strategy
    name, find_unused = strategy, None
    for suffix, value in _UNUSED_SUFFIXES.items():
        if name.endswith(suffix):
            name, find_unused = name[: -len(suffix)], value
    if name not in _DDP_START_METHODS:
        return strategy
    kwargs: dict[str, Any] = {"start_method": _DDP_START_METHODS[name]}
    if find_unused is not None:
        kwargs["find_unused_parameters"] = find_unused
    return AnomalyDDPStrategy(**kwargs)
