"""Running a model: backends, the :class:`Engine`, typed results (:class:`Prediction`),
explanations. ``from beautytag.runtime import Engine`` is the Python API.

The names are imported on first use, so that ``beautytag.runtime.results`` (plain data, no
torch) can be imported without loading torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from beautytag.runtime.engine import Engine
    from beautytag.runtime.results import Prediction

__all__ = ["Engine", "Prediction"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from beautytag.runtime.engine import Engine

        return Engine
    if name == "Prediction":
        from beautytag.runtime.results import Prediction

        return Prediction
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
