"""train.py ckpt_path=.../last.ckpt resumes an interrupted run: a real SIGKILL part-way, then the
resumed run ends where an uninterrupted one ends (weights, optimiser, scheduler, counters, metrics).

Tiny UniAD (width 32, one encoder and one decoder layer, 64 px, one synthetic category: 16 train
images, batch 4, so 4 steps per epoch), 3 epochs = 12 steps, StepLR every 2 epochs, a periodic
checkpoint every 6 steps: the kill lands after step 6, in the middle of epoch 1, so the resumed
run must restore the data position inside the epoch's order, the RNG streams of the feature
jitter and dropout, Adam's moments and the scheduler, and rebuild the feature cache. The
uninterrupted run also checks the plots every run writes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iad_lightning.calibration import THRESHOLD_BUFFERS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_entrypoints import REPO, run  # noqa: E402

STEPS_PER_CKPT = 6
TINY_UNIAD = [
    "method=uniad", "data=synthetic", "data.category=[fabric]", "method.image_size=64", "method.hidden_dim=32",
    "method.nhead=4", "method.num_encoder_layers=1", "method.num_decoder_layers=1", "method.dim_feedforward=64",
    "method.neighbor_size=[3,3]", "method.score_kernel=4", "method.lr=1e-3", "method.lr_step_epochs=2",
    "data.batch_size=4", "trainer.max_epochs=3", "trainer.accelerator=cpu", "callbacks.visualizer.n_images=0",
    f"callbacks.model_checkpoint.every_n_train_steps={STEPS_PER_CKPT}", "logger=none",
]


def _killed_run(out: Path, overrides: list[str] = TINY_UNIAD) -> Path:
    """Start a run, SIGKILL it as soon as its first periodic checkpoint exists; return that file."""
    ckpt = out / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={out}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it was killed:\n{proc.stderr.read()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)  # a real signal, no cleanup in the process
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not (out / "results.json").exists()
    return ckpt


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    # the uninterrupted reference runs alongside the one that gets killed
    full = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY_UNIAD, f"hydra.run.dir={root / 'full'}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = _killed_run(root / "killed")
    interrupted = torch.load(ckpt, map_location="cpu", weights_only=True)
    resumed = run("train.py", *TINY_UNIAD, f"ckpt_path={ckpt}", f"hydra.run.dir={root / 'resumed'}")
    log, _ = full.communicate(timeout=600)
    assert full.returncode == 0, log[-4000:]
    return root, interrupted, resumed.stdout + resumed.stderr


def test_killed_run_resumes_to_the_uninterrupted_result(runs):
    root, interrupted, log = runs
    assert interrupted["global_step"] == STEPS_PER_CKPT and interrupted["epoch"] == 1  # mid-epoch 1 of 0..2
    assert "Restoring states from the checkpoint" in log
    full = torch.load(root / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    resumed = torch.load(root / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == full["global_step"] == 12 and resumed["epoch"] == full["epoch"]
    assert resumed["lr_schedulers"] == full["lr_schedulers"]  # StepLR stepped at epoch 2 in both
    # float tolerance: the resumed run rebuilds the feature cache from other batch compositions
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    moments_full = full["optimizer_states"][0]["state"]
    moments_resumed = resumed["optimizer_states"][0]["state"]
    for i, state in moments_full.items():
        torch.testing.assert_close(moments_resumed[i]["exp_avg"], state["exp_avg"], rtol=1e-3, atol=1e-6)
    # (the calibrated thresholds are set after training: NaN in the periodic checkpoint)
    weights_moved = max(float((interrupted["state_dict"][k] - v).abs().max()) for k, v in full["state_dict"].items()
                        if v.is_floating_point() and k not in THRESHOLD_BUFFERS)
    assert weights_moved > 1e-3  # the last 6 steps changed the weights: resuming did real work
    a = json.loads((root / "full" / "results.json").read_text())["categories"]["fabric"]
    b = json.loads((root / "resumed" / "results.json").read_text())["categories"]["fabric"]
    for key, value in a.items():
        assert b[key] == pytest.approx(value, abs=1e-4), key


def test_every_run_writes_curve_plots(runs):
    from PIL import Image

    plots = runs[0] / "full" / "plots"
    assert sorted(p.name for p in plots.glob("*.png")) == ["fabric_calibration.png", "fabric_pro.png", "fabric_roc.png", "metrics.png"]
    for path in plots.glob("*.png"):
        with Image.open(path) as img:
            assert img.width >= 400 and img.height >= 400 and len(set(img.convert("L").getdata())) > 20  # drawn


def test_a_missing_resume_checkpoint_is_named(tmp_path):
    from iad_lightning.errors import ConfigError
    from iad_lightning.run import resume_path

    assert resume_path(None) is None
    with pytest.raises(ConfigError, match="gone.ckpt' does not exist; to resume"):
        resume_path(str(tmp_path / "gone.ckpt"))


@pytest.mark.parametrize("saved", ["epoch_end_hook", "after_training"])
def test_close_finished_epoch_on_checkpoints_lightning_writes(saved, tmp_path):
    """Both layouts of a checkpoint that ``max_steps`` stopped on an epoch's last batch, written by
    Lightning itself (``ModelCheckpoint`` in the epoch-end hook; ``trainer.save_checkpoint`` after
    training, as ``ThresholdCalibration`` rewrites last.ckpt): resumed with a larger ``max_steps``
    through ``close_finished_epoch``, the run trains the batches, epochs and weights of the
    uninterrupted longer run; without it Lightning re-enters the finished epoch."""
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from iad_lightning.checkpoint import close_finished_epoch

    class Tiny(L.LightningModule):
        def __init__(self, repair: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.layer, self.repair, self.seen = torch.nn.Linear(2, 1), repair, []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, batch_idx))
            return self.layer(batch[0]).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), 0.1)

        def train_dataloader(self):
            data = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)

        def on_load_checkpoint(self, checkpoint):
            if self.repair:
                assert close_finished_epoch(checkpoint, self.trainer.max_steps)

    def fit(max_steps: int, folder: str, ckpt: Path | None = None, repair: bool = True) -> Tiny:
        model = Tiny(repair)
        trainer = L.Trainer(max_steps=max_steps, max_epochs=-1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, ckpt_path=ckpt)
        trainer.save_checkpoint(tmp_path / folder / "after.ckpt")
        return model

    fit(4, "stopped")  # 2 batches per epoch: step 4 is the last batch of epoch 2
    ckpt = tmp_path / "stopped" / ("last.ckpt" if saved == "epoch_end_hook" else "after.ckpt")
    straight = fit(6, "straight")
    resumed = fit(6, "resumed", ckpt)
    assert resumed.seen == straight.seen[4:] == [(2, 0), (2, 1)]
    assert torch.equal(resumed.layer.weight, straight.layer.weight)
    assert fit(6, "lightning_alone", ckpt, repair=False).seen != straight.seen[4:]
