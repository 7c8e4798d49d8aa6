"""Metric: scores of a Model on one split of a Dataset, computed once and stored."""

from __future__ import annotations

from collections.abc import Iterable

from sklearn.metrics import get_scorer

from casml.errors import CasmlError
from casml.ml.dataset import SPLITS, Dataset
from casml.ml.model import Model
from casml.persistable import LazyReference, Persistable

__all__ = ["Metric"]


class Metric(Persistable, name="casml.ml.Metric"):
    """Score ``model`` on ``dataset``'s ``split`` with scikit-learn scorers by name.

    ``scorers`` are names accepted by ``sklearn.metrics.get_scorer`` (``"accuracy"``,
    ``"f1_macro"``, ``"roc_auc"``, ...). After build, ``values`` maps each name to a float.
    Metrics are ordinary artifacts: ``store.find(class_name="casml.ml.Metric")`` lists them.
    """

    hash_attributes = ("model", "dataset", "scorers", "split")

    def __init__(
        self,
        model: Model,
        dataset: Dataset,
        scorers: Iterable[str] = ("accuracy",),
        split: str | None = "test",
    ) -> None:
        if not isinstance(model, (Model, LazyReference)):
            raise CasmlError(f"Metric needs a casml.ml.Model, got {type(model).__name__}")
        if not isinstance(dataset, (Dataset, LazyReference)):
            raise CasmlError(f"Metric needs a casml.ml.Dataset, got {type(dataset).__name__}")
        if isinstance(scorers, str):
            scorers = (scorers,)
        names = tuple(scorers)
        if not names or not all(isinstance(name, str) for name in names):
            raise CasmlError(f"Metric scorers must be scorer names such as 'accuracy': {names!r}")
        for name in names:
            try:
                get_scorer(name)
            except ValueError:
                raise CasmlError(
                    f"unknown scorer {name!r}: see sklearn.metrics.get_scorer_names()"
                ) from None
        if split is not None and split not in SPLITS:
            raise CasmlError(f"unknown split {split!r}: use None, 'train' or 'test'")
        self.model = model
        self.dataset = dataset
        self.scorers = names
        self.split = split

    def build(self) -> None:
        """Score the model's predictions on the split, one float per scorer."""
        model: Model = self.model
        dataset: Dataset = self.dataset
        features = model.pipeline.transform(dataset.X(self.split))
        labels = dataset.y(self.split)
        self.values: dict[str, float] = {
            name: float(get_scorer(name)(model.fitted, features, labels)) for name in self.scorers
        }

    def __repr__(self) -> str:
        shown = self.__dict__.get("values", "not built")
        return f"Metric(scorers={self.scorers!r}, split={self.split!r}, values={shown!r})"
