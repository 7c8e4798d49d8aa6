"""Model: a scikit-learn estimator fitted on a Pipeline's transformed training rows."""

from __future__ import annotations

from typing import Any

from sklearn.base import BaseEstimator, clone

from casml.errors import CasmlError
from casml.ml._sklearn import restore_sklearn_state, sklearn_state
from casml.ml.pipeline import Pipeline
from casml.persistable import LazyReference, Persistable

__all__ = ["Model"]


class Model(Persistable, name="casml.ml.Model"):
    """Fit ``estimator`` on the output of ``pipeline`` over its dataset's train split.

    The hash covers the pipeline (and through it the dataset) and the estimator's class and
    parameters, so changing a hyperparameter retrains this model alone. After build,
    ``estimator_`` is the fitted estimator; ``predict(X)`` transforms ``X`` through the
    pipeline first. Both estimators are stored through skops, never pickle.
    """

    hash_attributes = ("pipeline", "estimator")
    _sklearn_attributes = ("estimator", "estimator_")

    def __init__(self, pipeline: Pipeline, estimator: Any) -> None:
        if not isinstance(pipeline, (Pipeline, LazyReference)):
            raise CasmlError(f"Model needs a casml.ml.Pipeline, got {type(pipeline).__name__}")
        if not isinstance(estimator, BaseEstimator):
            raise CasmlError(
                f"Model needs a scikit-learn estimator, got {type(estimator).__name__}"
            )
        self.pipeline = pipeline
        self.estimator = estimator

    def build(self) -> None:
        """Fit a clone of the estimator on the pipeline-transformed training rows."""
        pipeline: Pipeline = self.pipeline
        dataset = pipeline.dataset
        if dataset.target is None:
            raise CasmlError("a Model needs labels: give the Dataset a target column")
        features = pipeline.transform(dataset.X("train"))
        self.estimator_: Any = clone(self.estimator).fit(features, dataset.y("train"))

    @property
    def fitted(self) -> Any:
        """The fitted scikit-learn estimator (``estimator_``), or an error if not built."""
        if "estimator_" not in self.__dict__:
            raise CasmlError("this Model is not built yet: use store.get_or_build(model)")
        return self.__dict__["estimator_"]

    def predict(self, X: Any) -> Any:
        """Predict for the raw features ``X``: the pipeline's transform, then the estimator."""
        fitted = self.fitted
        pipeline: Pipeline = self.pipeline
        return fitted.predict(pipeline.transform(X))

    def to_sklearn(self) -> Any:
        """One fitted ``sklearn.pipeline.Pipeline`` (steps + estimator), e.g. for predict_proba."""
        from sklearn.pipeline import Pipeline as SklearnPipeline

        fitted = self.fitted
        pipeline: Pipeline = self.pipeline
        transformer = pipeline.__dict__.get("pipeline_")
        steps = [] if transformer is None else list(transformer.steps)
        last = "estimator"
        while last in {name for name, _ in steps}:
            last += "_"
        return SklearnPipeline([*steps, (last, fitted)])

    def __casml_state__(self) -> dict[str, Any]:
        return sklearn_state(super().__casml_state__(), self._sklearn_attributes, "Model")

    @classmethod
    def __casml_restore__(
        cls, state: dict[str, Any], lazy: dict[str, LazyReference]
    ) -> Persistable:
        restored = restore_sklearn_state(state, cls._sklearn_attributes, "Model")
        return super().__casml_restore__(restored, lazy)

    def __repr__(self) -> str:
        return f"Model(estimator={self.estimator!r})"
