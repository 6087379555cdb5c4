"""Safe loading of third-party ``torch.save`` files: ``torch.load(weights_only=True)`` plus an
explicit allow-list, never ``weights_only=False``.

``safe_torch_load(path, extra_globals=..., what=...)`` is the one entry point for published files
(official checkpoints, teachers, prompts, projectors). ``extra_globals`` extends torch's safe
unpickler for this call only (``torch.serialization.safe_globals``); an entry is a class or a
``(stand_in, "module.Name")`` pair, so a file that pickles a class of a package we do not install
loads onto a local stand-in under that exact name. Anything else in the file is still refused and
the ``WeightsError`` names the file and the refused global.

Allow-lists shipped here:

- ``EASYDICT``: ``easydict.EasyDict`` (UniAD's ``ckpt.pth.tar`` stores ``"arch": config.net``, a
  list of EasyDicts). torch's unpickler only fills exact ``dict`` / ``OrderedDict`` objects, so the
  stand-in's constructor returns an ``OrderedDict``: the loaded ``arch`` is nested OrderedDicts
  with the same items (EasyDict's attribute mirror lands in the OrderedDict's ``__dict__``).
- ``NUMPY_SCALARS``: numpy scalars such as a metric stored next to the weights (ADPretrain's
  ``{'projectors': state_dict, 'img_auc', 'pix_auc', 'pix_pro'}`` when those are numpy floats):
  ``numpy.core.multiarray.scalar`` (numpy 1 name) / ``numpy._core.multiarray.scalar`` (numpy 2),
  ``numpy.dtype`` and the numeric dtype classes (not the object dtype).
- ``PDN_MODULES``: the torch.nn classes of a whole pickled PDN (``torch.save(teacher)`` in
  nelson1425/EfficientAD: ``teacher_final.pth``, ``teacher_*_final.pth``): Sequential, Conv2d,
  ReLU, AvgPool2d. Their ``__setstate__`` only restores attributes; no code of the file runs.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

try:  # numpy >= 2
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import scalar as _np_scalar

from iad_lightning.errors import WeightsError

SafeGlobal = Callable | tuple[Callable, str]


class EasyDictStandIn:
    """Stand-in for ``easydict.EasyDict`` during a safe load: constructing it yields an
    ``OrderedDict`` (the only dict type torch's safe unpickler fills item by item)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict(*args, **kwargs)


EASYDICT: tuple[SafeGlobal, ...] = ((EasyDictStandIn, "easydict.EasyDict"),)
NUMPY_SCALARS: tuple[SafeGlobal, ...] = (
    (_np_scalar, "numpy.core.multiarray.scalar"),
    (_np_scalar, "numpy._core.multiarray.scalar"),
    np.dtype,
    *(type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFD"),  # bool, ints, floats, complex; no object
)
PDN_MODULES: tuple[SafeGlobal, ...] = (nn.Sequential, nn.Conv2d, nn.ReLU, nn.AvgPool2d)


def safe_torch_load(path: str | Path, extra_globals: Sequence[SafeGlobal] = (), what: str = "file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with ``extra_globals`` allowed
    for this call. ``what`` names the file in errors (e.g. ``"teacher weights file"``).
    Raises ``WeightsError`` for a missing file or one holding anything not allowed."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"{what} '{p}' does not exist")
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # refused globals, corrupt or truncated files, ...
        raise WeightsError(
            f"{what} '{p}' could not be loaded safely with torch.load(weights_only=True) "
            f"({type(err).__name__}: {_reason(err)}). Only tensors, plain "
            f"containers{' and ' + ', '.join(_names(extra_globals)) if extra_globals else ''} are accepted; "
            f"convert a pickled module you trust to a plain state dict, e.g. "
            f"python -c \"import torch; torch.save(torch.load('{p}', weights_only=False).state_dict(), "
            f"'{p.with_suffix('')}_state.pth')\""
        ) from err


def _names(extra: Sequence[SafeGlobal]) -> list[str]:
    return [g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in extra]


def _reason(err: Exception) -> str:
    """The informative line of torch's long weights_only message (the refused GLOBAL)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln:
            return ln.split(" was not an allowed global")[0].removeprefix("WeightsUnpickler error: ")
    return lines[0] if lines else "no message"
