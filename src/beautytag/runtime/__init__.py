"""Running a model: backends, the :class:`Engine`, typed results (:class:`Prediction`),
explanations. ``from beautytag.runtime import Engine`` is the Python API."""

from beautytag.runtime.engine import Engine
from beautytag.runtime.results import Prediction

__all__ = ["Engine", "Prediction"]
