"""Pipeline: scikit-learn preprocessing steps fitted on a Dataset's training rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sklearn.base import BaseEstimator, clone

from casml.errors import CasmlError
from casml.ml._sklearn import restore_sklearn_state, sklearn_state
from casml.ml.dataset import Dataset
from casml.persistable import LazyReference, Persistable

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Pipeline"]


def _check_steps(steps: Sequence[Any]) -> list[tuple[str, Any]]:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise CasmlError(f"Pipeline steps must be a list of (name, transformer) pairs: {steps!r}")
    checked: list[tuple[str, Any]] = []
    for position, step in enumerate(steps):
        if not (isinstance(step, (tuple, list)) and len(step) == 2 and isinstance(step[0], str)):
            raise CasmlError(
                f"Pipeline steps[{position}] must be a (name, transformer) pair, got {step!r}"
            )
        name, transformer = step
        if not (isinstance(transformer, BaseEstimator) or transformer in (None, "passthrough")):
            raise CasmlError(
                f"Pipeline step {name!r} must be a scikit-learn transformer (or "
                f"'passthrough'), got {type(transformer).__name__}"
            )
        checked.append((name, transformer))
    names = [name for name, _ in checked]
    if len(set(names)) != len(names):
        raise CasmlError(f"Pipeline step names must be unique: {names}")
    return checked


class Pipeline(Persistable, name="casml.ml.Pipeline"):
    """Fit preprocessing ``steps`` on ``dataset``'s train split (all rows without a split).

    ``steps`` is a list of ``(name, transformer)`` as for ``sklearn.pipeline.Pipeline``.
    Transformers enter the hash by class and parameters, never by fitted state, so the hash
    is known before fitting. After build, ``pipeline_`` is the fitted scikit-learn pipeline
    and ``transform(X)`` applies it. Fitted and unfitted steps are stored through skops.
    """

    hash_attributes = ("dataset", "steps")
    # Attributes holding scikit-learn objects: stored as skops bytes, never pickled.
    _sklearn_attributes = ("steps", "pipeline_")

    def __init__(self, dataset: Dataset, steps: Sequence[tuple[str, Any]]) -> None:
        if not isinstance(dataset, (Dataset, LazyReference)):
            raise CasmlError(f"Pipeline needs a casml.ml.Dataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.steps = _check_steps(steps)

    def build(self) -> None:
        """Fit clones of the steps on the dataset's training rows."""
        from sklearn.pipeline import Pipeline as SklearnPipeline

        dataset: Dataset = self.dataset
        if not self.steps:
            self.pipeline_: Any = None
            return
        fresh = [(name, clone(step) if isinstance(step, BaseEstimator) else step)
                 for name, step in self.steps]  # fmt: skip
        X = dataset.X("train")
        y = dataset.y("train") if dataset.target is not None else None
        self.pipeline_ = SklearnPipeline(fresh).fit(X, y)

    def transform(self, X: pd.DataFrame | Any) -> Any:
        """Apply the fitted steps to ``X`` (returned unchanged when there are no steps)."""
        if "pipeline_" not in self.__dict__:
            raise CasmlError("this Pipeline is not built yet: use store.get_or_build(pipeline)")
        fitted = self.__dict__["pipeline_"]
        return X if fitted is None else fitted.transform(X)

    def __casml_state__(self) -> dict[str, Any]:
        return sklearn_state(super().__casml_state__(), self._sklearn_attributes, "Pipeline")

    @classmethod
    def __casml_restore__(
        cls, state: dict[str, Any], lazy: dict[str, LazyReference]
    ) -> Persistable:
        restored = restore_sklearn_state(state, cls._sklearn_attributes, "Pipeline")
        return super().__casml_restore__(restored, lazy)

    def __repr__(self) -> str:
        return f"Pipeline(steps={self.steps!r})"
