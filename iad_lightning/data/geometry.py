"""The preprocessing a model was fitted with, as plain data: one truth for test, predict and export.

A method proposes a ``Preprocess`` (resize, crop, resize backend, mean/std, ...); the datamodule
may change it at fit time (``data.center_crop=false`` drops the crop). What the fit was served
becomes part of the model (``AnomalyModule.fitted_preprocess``): stored in the checkpoint under
``PREPROCESS_KEY`` and in the export metadata (``iad_preprocess``) as a dict of plain types
(``preprocess_to_dict``), so ``torch.load(weights_only=True)`` and JSON both read it. Every field
of ``Preprocess`` is stored except the method-specific train augmentations (``NOT_STORED``): a
field added to the dataclass round-trips without a change here. A stored dict that lacks a field
(written before the field existed) gets the dataclass default.

Which geometry a test uses (``serve_fitted_geometry``): the model's, by default; ``geometry=data``
(test.py) serves the data config's instead, on purpose, and a one-line notice says so either way
when the two differ.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from iad_lightning.data.transforms import Preprocess
from iad_lightning.errors import ConfigError

PREPROCESS_KEY = "iad_preprocess"  # checkpoint entry (a plain dict); also the export metadata key
NOT_STORED = ("extra",)  # method-specific train augmentations (v2 transforms): never part of inference
GEOMETRY_SOURCES = ("model", "data")


def _plain(value: Any, name: str) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v, name) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / torch scalars
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"Preprocess.{name}={value!r} is not a plain value (int, float, str, bool, None or "
                      f"a list of them), so a checkpoint cannot store it; add '{name}' to NOT_STORED "
                      "in iad_lightning/data/geometry.py if it only matters while training")


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def preprocess_to_dict(preprocess: Preprocess) -> dict[str, Any]:
    """Every stored field of ``preprocess`` as plain types (tuples become lists)."""
    return {f.name: _plain(getattr(preprocess, f.name), f.name) for f in fields(preprocess)
            if f.name not in NOT_STORED}


def preprocess_from_dict(stored: dict[str, Any], source: str = "checkpoint", cls: type = Preprocess) -> Preprocess:
    """The ``Preprocess`` (``cls``) of ``preprocess_to_dict`` (lists become tuples). Missing fields
    take the dataclass default (older files); an unknown field is an error naming it and ``source``."""
    known = {f.name for f in fields(cls)} - set(NOT_STORED)
    unknown = sorted(set(stored) - known)
    if unknown:
        raise ConfigError(f"{source} stores preprocessing field(s) {unknown} that this version of "
                          "iad_lightning does not know; update iad_lightning to use it")
    return cls(**{k: _tuples(v) for k, v in stored.items()})


def same_geometry(a: Preprocess, b: Preprocess) -> bool:
    """Equal as stored (train augmentations aside; tuples and lists alike)."""
    return preprocess_to_dict(a) == preprocess_to_dict(b)


def describe_preprocess(pre: Preprocess) -> str:
    """One short phrase, e.g. ``resize 256x256, no crop, pil resize``."""
    def hw(v: Any) -> str:
        return str(v) if isinstance(v, int) else "x".join(str(s) for s in v)

    resize = f"{pre.resize} (shorter side)" if isinstance(pre.resize, int) else hw(pre.resize)
    crop = "no crop" if pre.crop is None else f"centre crop {hw(pre.crop)}"
    return f"resize {resize}, {crop}, {pre.resize_backend} resize"


def serve_fitted_geometry(datamodule: Any, model: Any, source: str = "model") -> str | None:
    """Make ``datamodule`` serve a fitted ``model``. ``source``: ``model`` (default) serves exactly
    the preprocessing the model was fitted with (``model.input_preprocess``) on every split,
    whatever this data config's ``center_crop`` says; ``data`` serves the method's preprocessing
    with this data config's ``center_crop`` (a deliberate experiment; predict.py and exported
    files still use the model's). Returns a one-line notice when the two geometries differ."""
    if source not in GEOMETRY_SOURCES:
        raise ConfigError(f"geometry={source}: expected one of {', '.join(GEOMETRY_SOURCES)} "
                          "(model: the preprocessing stored with the model; data: this data config's)")
    datamodule.preprocess = model.preprocess
    datamodule.fitted_preprocess = None
    fitted, data = model.input_preprocess, datamodule.input_preprocess
    if source == "model":
        datamodule.fitted_preprocess = fitted
    if same_geometry(fitted, data):
        return None
    crop = f"data.center_crop={str(datamodule.center_crop).lower()}"
    if source == "model":
        return (f"geometry: testing with the preprocessing the model was fitted with ({describe_preprocess(fitted)}), "
                f"not this data config's ({describe_preprocess(data)}, {crop}); geometry=data tests with the latter")
    return (f"geometry=data: testing with this data config's preprocessing ({describe_preprocess(data)}, {crop}), "
            f"NOT the one the model was fitted with ({describe_preprocess(fitted)}), which predict.py and exports use")
