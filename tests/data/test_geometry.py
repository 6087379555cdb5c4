"""The fitted preprocessing as plain data (data/geometry.py): round trips, old files, the test-time choice."""

import ast
import inspect
import json
from dataclasses import field, fields, make_dataclass

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

import iad_lightning.methods as methods_pkg
from iad_lightning.data.datamodule import AnomalyDataModule
from iad_lightning.data.geometry import (
    NOT_STORED,
    PREPROCESS_KEY,
    describe_preprocess,
    preprocess_from_dict,
    preprocess_to_dict,
    same_geometry,
    serve_fitted_geometry,
)
from iad_lightning.data.transforms import Preprocess, without_crop
from iad_lightning.errors import ConfigError
from iad_lightning.methods.base import AnomalyModule

CASES = [
    Preprocess(),
    Preprocess(resize=(256, 256), crop=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), resize_backend="pil"),
    Preprocess(resize=(320, 128), crop=(224, 96), extra=(v2.RandomGrayscale(0.1),)),
]


@pytest.mark.parametrize("pre", CASES)
def test_round_trips_through_weights_only_torch_load_and_json(pre, tmp_path):
    stored = preprocess_to_dict(pre)
    assert set(stored) == {f.name for f in fields(Preprocess)} - set(NOT_STORED)  # every field, generically
    torch.save({PREPROCESS_KEY: stored}, tmp_path / "x.ckpt")
    loaded = torch.load(tmp_path / "x.ckpt", weights_only=True)[PREPROCESS_KEY]
    for back in (preprocess_from_dict(loaded), preprocess_from_dict(json.loads(json.dumps(stored)))):
        assert back == pre and back.extra == ()  # train augmentations are never stored
        assert back.output_size == pre.output_size and type(back.resize) is type(pre.resize)


def test_a_new_field_round_trips_without_a_change_here():
    """Another issue adds fields to Preprocess: they are stored (issue 25's interpolation fields, and a
    hypothetical colour order)."""
    pre = Preprocess(resize=(64, 64), crop=None, resize_backend="pil", interpolation="bicubic",
                     rgb_after_resize=True, mask_interpolation="bilinear")  # AnomalyCLIP's official geometry
    stored = preprocess_to_dict(pre)
    assert stored["interpolation"] == "bicubic" and stored["rgb_after_resize"] is True
    assert stored["mask_interpolation"] == "bilinear" and preprocess_from_dict(stored) == pre
    extended = make_dataclass("Extended", [("colour_order", str, field(default="rgb"))], bases=(Preprocess,),
                              frozen=True)
    pre = extended(resize=(64, 64), crop=None, colour_order="bgr")
    stored = preprocess_to_dict(pre)
    assert stored["colour_order"] == "bgr" and preprocess_from_dict(stored, cls=extended) == pre


def test_numpy_scalars_become_plain_and_odd_values_are_refused():
    stored = preprocess_to_dict(Preprocess(mean=tuple(np.float32(x) for x in (0.5, 0.25, 0.125))))
    assert stored["mean"] == [0.5, 0.25, 0.125] and all(type(m) is float for m in stored["mean"])
    odd = make_dataclass("Odd", [("hook", object, field(default=None))], bases=(Preprocess,), frozen=True)
    with pytest.raises(ConfigError, match="Preprocess.hook=.*NOT_STORED"):
        preprocess_to_dict(odd(hook=object()))


def test_older_files_get_defaults_and_newer_fields_are_named():
    # an ONNX file exported before resize_backend was stored: the default, tensor
    old = preprocess_from_dict({"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    assert old == Preprocess(resize=256, crop=224) and old.resize_backend == "tensor"
    with pytest.raises(ConfigError, match=r"'model.onnx' stores preprocessing field\(s\) \['warp'\]"):
        preprocess_from_dict({"resize": 256, "warp": 1}, "'model.onnx'")


def test_describe_and_compare():
    crop = Preprocess(resize=256, crop=224, resize_backend="pil")
    assert describe_preprocess(crop) == "resize 256 (shorter side), centre crop 224, pil resize"
    assert describe_preprocess(without_crop(crop)) == "resize 256x256, no crop, pil resize"
    assert same_geometry(Preprocess(mean=[0.5] * 3), Preprocess(mean=(0.5,) * 3))  # lists and tuples alike
    assert not same_geometry(crop, without_crop(crop))


class _Fitted:
    """What serve_fitted_geometry reads of a model: the method's preprocess and the fitted one."""

    def __init__(self, method: Preprocess, fitted: Preprocess) -> None:
        self.preprocess, self.input_preprocess = method, fitted


@pytest.mark.parametrize("center_crop", [True, False])
def test_the_models_geometry_wins_and_a_line_says_when_the_data_config_differs(center_crop):
    method = Preprocess(resize=32, crop=24)
    model = _Fitted(method, without_crop(method))  # fitted with data.center_crop=false
    dm = AnomalyDataModule(format="folder", root="unused", center_crop=center_crop)
    notice = serve_fitted_geometry(dm, model)
    assert dm.input_preprocess == without_crop(method)
    assert (notice is None) == (not center_crop)  # only data.center_crop=true disagrees
    if notice:
        assert notice.count("\n") == 0 and "data.center_crop=true" in notice and "geometry=data" in notice
    # geometry=data: this data config's, said in one line when it is not the model's
    notice = serve_fitted_geometry(dm, model, "data")
    assert dm.input_preprocess == (method if center_crop else without_crop(method))
    assert (notice is None) == (not center_crop) and (notice is None or "NOT the one the model was fitted" in notice)
    # a model fitted WITH the crop, tested on data=folder (center_crop false): still the model's crop
    cropped = _Fitted(method, method)
    notice = serve_fitted_geometry(dm, cropped)
    assert dm.input_preprocess == method and (notice is None) == center_crop
    with pytest.raises(ConfigError, match="geometry=both"):
        serve_fitted_geometry(dm, model, "both")


def _methods() -> list[type]:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(methods_pkg.__path__):
        importlib.import_module(f"iad_lightning.methods.{info.name}")
    seen, todo = [], [AnomalyModule]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("iad_lightning.methods"):
                seen.append(sub)
                todo.append(sub)
    return seen


def test_every_method_keeps_the_base_hooks_that_carry_the_geometry():
    """A method overriding on_fit_start / on_save_checkpoint / on_load_checkpoint calls super():
    otherwise its checkpoints would not record the preprocessing it was fitted with."""
    classes = _methods()
    assert {c.__name__ for c in classes} >= {"PatchCore", "EfficientAD", "UniAD", "AnomalyCLIP", "PaDiM"}
    for cls in classes:
        for hook in ("on_fit_start", "on_save_checkpoint", "on_load_checkpoint"):
            if hook in vars(cls):
                body = ast.unparse(ast.parse(inspect.getsource(vars(cls)[hook]).strip()))
                assert f"super().{hook}(" in body, f"{cls.__name__}.{hook} does not call super().{hook}"
