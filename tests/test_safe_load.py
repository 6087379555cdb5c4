"""safe_load: per-call allow-lists on top of torch.load(weights_only=True)."""

import collections

import numpy as np
import pytest
import torch

from iad_lightning.errors import WeightsError
from iad_lightning.safe_load import NUMPY_SCALARS, safe_torch_load


def test_numpy_metrics_next_to_weights_load_only_with_their_allow_list(tmp_path):
    # ADPretrain's checkpoint layout, the metrics as numpy scalars (sklearn returns np.float64)
    path = tmp_path / "checkpoints_pro_angle.pth"
    torch.save({"projectors": {"0.weight": torch.ones(2, 2)}, "img_auc": np.float64(0.91),
                "pix_auc": np.float32(0.95), "pix_pro": np.float64(0.88)}, path)
    with pytest.raises(WeightsError, match="checkpoints_pro_angle.pth.*GLOBAL numpy"):
        safe_torch_load(path, what="projector file")
    ckpt = safe_torch_load(path, extra_globals=NUMPY_SCALARS, what="projector file")
    assert ckpt["img_auc"] == np.float64(0.91) and ckpt["pix_auc"].dtype == np.float32
    assert torch.equal(ckpt["projectors"]["0.weight"], torch.ones(2, 2))
    with pytest.raises(WeightsError):  # the allow-list held for that call only
        safe_torch_load(path)


def test_anything_else_stays_refused_and_missing_files_are_named(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"w": torch.zeros(1), "counter": collections.UserDict(a=1)}, path)
    with pytest.raises(WeightsError, match="odd.pth.*collections.UserDict.*state dict"):
        safe_torch_load(path, extra_globals=NUMPY_SCALARS)
    with pytest.raises(WeightsError, match="file '.*missing.pth' does not exist"):
        safe_torch_load(tmp_path / "missing.pth")
