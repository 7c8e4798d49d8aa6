"""Dataset: a DataFrame produced by a function, with its target column and train/test split."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from casml.errors import CasmlError
from casml.hashing import hash_value
from casml.persistable import LazyReference, Persistable

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["SPLITS", "Dataset"]

#: The split names a Dataset answers to; ``None`` means every row.
SPLITS = ("train", "test")


def _function_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{name}"


class Dataset(Persistable, name="casml.ml.Dataset"):
    """Load a table with ``source(**params)`` once; split it into train and test reproducibly.

    ``source`` is a function returning a pandas DataFrame. It enters the hash through
    ``casml.hash_value`` (qualified name, source fingerprint and closure), with ``params``,
    ``target``, ``test_size`` and ``random_state``: editing the function or changing a
    parameter is a new dataset. ``target`` names the label column. With ``test_size`` (a
    fraction, or a number of rows) the rows are shuffled and split once with
    ``random_state``; only the row positions of each split are stored, not copies.

    Functions are not stored: a loaded Dataset has ``source`` None and ``source_name``
    naming the function, and holds the built ``dataframe``.
    """

    hash_attributes = ("source_hash", "params", "target", "test_size", "random_state")

    def __init__(
        self,
        source: Callable[..., pd.DataFrame],
        params: Mapping[str, Any] | None = None,
        target: str | None = None,
        test_size: float | int | None = None,
        random_state: int = 0,
    ) -> None:
        if not callable(source):
            raise CasmlError(
                f"Dataset source must be a function returning a DataFrame, got {source!r}"
            )
        if params is not None and not isinstance(params, Mapping):
            raise CasmlError(f"Dataset params must be a mapping of keyword arguments: {params!r}")
        if test_size is not None:
            is_fraction = isinstance(test_size, float) and 0.0 < test_size < 1.0
            is_count = isinstance(test_size, int) and not isinstance(test_size, bool)
            valid = is_fraction or (is_count and test_size > 0)
            if not valid:
                raise CasmlError(
                    f"test_size must be a fraction in (0, 1) or a positive number of rows, "
                    f"got {test_size!r}"
                )
        if not isinstance(random_state, int) or isinstance(random_state, bool):
            raise CasmlError(
                f"random_state must be an int so the split is reproducible, got {random_state!r}"
            )
        self.source: Callable[..., pd.DataFrame] | None = source
        self.source_name = _function_name(source)
        # The function itself cannot be stored; its canonical hash stands for it in the
        # identity, so a loaded Dataset hashes exactly like the one that was built.
        self.source_hash = hash_value(source)
        self.params: dict[str, Any] = dict(params or {})
        self.target = target
        self.test_size = test_size
        self.random_state = random_state

    def build(self) -> None:
        """Call the source, check the table, and draw the split."""
        import numpy as np
        import pandas as pd
        from sklearn.model_selection import train_test_split

        if self.source is None:
            raise CasmlError(
                f"this Dataset was loaded from a store without its source function "
                f"{self.source_name}; create a new Dataset(source, ...) to build it again"
            )
        frame = self.source(**self.params)
        if not isinstance(frame, pd.DataFrame):
            raise CasmlError(
                f"Dataset source {self.source_name} returned a {type(frame).__name__}, "
                "not a pandas DataFrame"
            )
        if self.target is not None and self.target not in frame.columns:
            raise CasmlError(
                f"target column {self.target!r} is not among the columns of "
                f"{self.source_name}(): {list(frame.columns)}"
            )
        self.dataframe = frame
        self.splits_: dict[str, Any] = {}
        if self.test_size is not None:
            if len(frame) < 2:
                raise CasmlError(f"{self.source_name}() has {len(frame)} rows: too few to split")
            try:
                train, test = train_test_split(
                    np.arange(len(frame), dtype=np.int64),
                    test_size=self.test_size,
                    random_state=self.random_state,
                )
            except ValueError as exc:
                raise CasmlError(f"cannot split {self.source_name}(): {exc}") from None
            self.splits_ = {"train": train, "test": test}

    def _rows(self, split: str | None) -> pd.DataFrame:
        if "dataframe" not in self.__dict__:
            raise CasmlError("this Dataset is not built yet: use store.get_or_build(dataset) first")
        frame: pd.DataFrame = self.__dict__["dataframe"]
        if split is None:
            return frame
        if split not in SPLITS:
            raise CasmlError(f"unknown split {split!r}: use None, 'train' or 'test'")
        splits: dict[str, Any] = self.__dict__.get("splits_") or {}
        if not splits:
            if split == "train":
                return frame  # no test set held out: every row is training data
            raise CasmlError(
                "this Dataset has no test split: create it with test_size=... to hold one out"
            )
        rows: pd.DataFrame = frame.iloc[splits[split]]
        return rows

    def X(self, split: str | None = None) -> pd.DataFrame:
        """The feature columns (all but ``target``) of ``split`` ('train', 'test' or all)."""
        frame = self._rows(split)
        if self.target is None:
            return frame
        return frame.drop(columns=[self.target])

    def y(self, split: str | None = None) -> pd.Series:
        """The ``target`` column of ``split`` ('train', 'test' or all rows)."""
        if self.target is None:
            raise CasmlError("this Dataset has no target column: create it with target='...'")
        return self._rows(split)[self.target]

    def __casml_state__(self) -> dict[str, Any]:
        state = super().__casml_state__()
        state.pop("source", None)  # a function: identified by source_hash, never stored
        return state

    @classmethod
    def __casml_restore__(
        cls, state: dict[str, Any], lazy: dict[str, LazyReference]
    ) -> Persistable:
        obj = super().__casml_restore__(state, lazy)
        obj.__dict__.setdefault("source", None)
        return obj

    def __repr__(self) -> str:
        return (
            f"Dataset({self.source_name}, params={self.params!r}, target={self.target!r}, "
            f"test_size={self.test_size!r}, random_state={self.random_state!r})"
        )
