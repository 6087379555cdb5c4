"""DDP that also serves methods with nothing to train (memory banks, zero-shot models).

torch's DistributedDataParallel refuses a module without trainable parameters. PatchCore still
needs the process group (sharded embedding, gathered bank, gathered test predictions), so this
strategy skips the DDP wrapper when no parameter requires a gradient and wraps as usual otherwise.
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy


class AnomalyDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that leaves gradient-free modules unwrapped."""

    def configure_ddp(self) -> None:
        assert self.model is not None
        if any(p.requires_grad for p in self.model.parameters()):
            super().configure_ddp()
        # else: nothing to synchronise; collectives are issued explicitly by the method
