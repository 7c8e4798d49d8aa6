"""casml.ml: Dataset -> Pipeline -> Model -> Metric, trained only when new, stored via skops."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.decomposition import PCA
from sklearn.feature_selection import SelectKBest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline as SklearnPipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

import casml
from casml.ml import Dataset, Metric, Model, Pipeline, _sklearn, trust_modules
from casml.store import Store

ROOT = Path(__file__).resolve().parents[1]


def iris_frame() -> pd.DataFrame:
    frame: pd.DataFrame = load_iris(as_frame=True).frame
    return frame


def cancer_frame() -> pd.DataFrame:
    frame: pd.DataFrame = load_breast_cancer(as_frame=True).frame
    return frame


def iris_subset(columns: int = 4) -> pd.DataFrame:
    frame: pd.DataFrame = load_iris(as_frame=True).frame
    return frame[[*frame.columns[:columns], "target"]]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """An embedded store (local folder + SQLite): the ML layer is the same on every backend."""
    with Store(tmp_path / "store") as s:
        yield s


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count build() calls per casml.ml type."""
    counts: Counter[str] = Counter()
    for cls in (Dataset, Pipeline, Model, Metric):

        def counting(self: Any, _original: Callable[[Any], None] = cls.build) -> None:
            counts[type(self).__name__] += 1
            _original(self)

        monkeypatch.setattr(cls, "build", counting)
    return counts


def iris_metric(c: float = 1.0, random_state: int = 0) -> Metric:
    data = Dataset(iris_frame, target="target", test_size=0.3, random_state=random_state)
    pipeline = Pipeline(data, [("scale", StandardScaler())])
    model = Model(pipeline, LogisticRegression(C=c, max_iter=500))
    return Metric(model, data, scorers=("accuracy", "f1_macro"))


# -- train only if new ----------------------------------------------------------------------


def test_second_get_or_build_of_an_equal_config_builds_nothing(
    store: Store, builds: Counter[str]
) -> None:
    first = store.get_or_build(iris_metric())
    assert builds == {"Dataset": 1, "Pipeline": 1, "Model": 1, "Metric": 1}
    again = store.get_or_build(iris_metric())  # equal config, all new instances
    assert builds == {"Dataset": 1, "Pipeline": 1, "Model": 1, "Metric": 1}
    assert again is not first and again.hash_ == first.hash_
    assert again.values == first.values
    assert 0.8 < first.values["accuracy"] <= 1.0


def test_changing_a_model_parameter_rebuilds_the_model_and_metric_only(
    store: Store, builds: Counter[str]
) -> None:
    store.get_or_build(iris_metric(c=1.0))
    builds.clear()
    metric = store.get_or_build(iris_metric(c=0.01))
    assert builds == {"Model": 1, "Metric": 1}
    assert metric.model.estimator.C == 0.01


def test_changing_the_dataset_rebuilds_everything_downstream(
    store: Store, builds: Counter[str]
) -> None:
    store.get_or_build(iris_metric(random_state=0))
    builds.clear()
    store.get_or_build(iris_metric(random_state=1))
    assert builds == {"Dataset": 1, "Pipeline": 1, "Model": 1, "Metric": 1}


def test_computing_hashes_builds_nothing(builds: Counter[str]) -> None:
    metric = iris_metric()
    assert len({metric.hash_, metric.model.hash_, metric.model.pipeline.hash_}) == 3
    assert builds == {}


# -- identity ---------------------------------------------------------------------------------


def test_estimators_hash_by_class_and_params_never_by_fitted_state() -> None:
    X, y = load_iris(return_X_y=True)
    unfitted = LogisticRegression(C=0.5, max_iter=300)
    before = casml.hash_value(unfitted)
    unfitted.fit(X, y)
    assert casml.hash_value(unfitted) == before
    assert casml.hash_value(LogisticRegression(C=0.5, max_iter=300)) == before
    assert casml.hash_value(LogisticRegression(C=0.6, max_iter=300)) != before
    # Nested estimators enter by their own params.
    nested = SklearnPipeline([("pca", PCA(n_components=2))])
    assert casml.hash_value(nested) != casml.hash_value(
        SklearnPipeline([("pca", PCA(n_components=3))])
    )
    # A ufunc parameter has a stable stand-in.
    assert casml.hash_value(FunctionTransformer(np.log1p)) != casml.hash_value(
        FunctionTransformer(np.expm1)
    )
    with pytest.raises(casml.UnhashableError, match="RandomState"):
        casml.hash_value(LogisticRegression(random_state=np.random.RandomState(0)))


def test_dataset_identity_covers_source_params_and_split() -> None:
    base = Dataset(iris_subset, params={"columns": 2}, target="target")
    assert base.hash_ == Dataset(iris_subset, params={"columns": 2}, target="target").hash_
    assert base.hash_ != Dataset(iris_subset, params={"columns": 3}, target="target").hash_
    assert base.hash_ != Dataset(iris_frame, target="target").hash_
    assert base.hash_ != Dataset(iris_subset, {"columns": 2}, "target", test_size=0.2).hash_
    assert Dataset(iris_frame).hash_ == Dataset(iris_frame, params={}).hash_

    def scaled(factor: float) -> Callable[[], pd.DataFrame]:
        def source() -> pd.DataFrame:
            return iris_frame() * factor

        return source

    # Closure variables are part of the source function's identity.
    assert Dataset(scaled(1.0)).hash_ != Dataset(scaled(2.0)).hash_


def test_dataset_splits_are_reproducible_disjoint_row_positions(store: Store) -> None:
    data = store.get_or_build(Dataset(iris_frame, target="target", test_size=0.2))
    train, test = data.splits_["train"], data.splits_["test"]
    assert len(test) == 30 and len(train) == 120
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(150))
    assert list(data.X("train").columns) == list(iris_frame().columns[:4])
    assert data.y("test").name == "target"
    pd.testing.assert_frame_equal(data.X("test"), data.dataframe.iloc[test].drop(columns="target"))
    loaded = Store(store.root).get(data.hash_)
    assert loaded.hash_ == data.hash_ and loaded.source is None
    assert loaded.source_name.endswith("iris_frame")
    np.testing.assert_array_equal(loaded.splits_["test"], test)
    pd.testing.assert_series_equal(loaded.y("train"), data.y("train"))

    no_split = store.get_or_build(Dataset(iris_frame, target="target"))
    assert len(no_split.X("train")) == 150  # no held-out rows: train is everything
    with pytest.raises(casml.CasmlError, match="no test split"):
        no_split.X("test")
    with pytest.raises(casml.CasmlError, match="unknown split"):
        no_split.y("validation")


def test_invalid_configurations_fail_before_training(store: Store) -> None:
    with pytest.raises(casml.CasmlError, match="function"):
        Dataset("iris.csv")  # type: ignore[arg-type, unused-ignore]
    with pytest.raises(casml.CasmlError, match="test_size"):
        Dataset(iris_frame, test_size=1.5)
    data = Dataset(iris_frame, target="target")
    with pytest.raises(casml.CasmlError, match="pair"):
        Pipeline(data, [StandardScaler()])
    with pytest.raises(casml.CasmlError, match="unique"):
        Pipeline(data, [("a", StandardScaler()), ("a", PCA())])
    with pytest.raises(casml.CasmlError, match="estimator"):
        Model(Pipeline(data, []), "svm")
    model = Model(Pipeline(data, []), LogisticRegression())
    with pytest.raises(casml.CasmlError, match="unknown scorer"):
        Metric(model, data, scorers=("accurracy",))
    with pytest.raises(casml.CasmlError, match="not a pandas DataFrame"):
        store.get_or_build(Dataset(lambda: [1, 2, 3]))  # type: ignore[arg-type, return-value]
    with pytest.raises(casml.CasmlError, match="'label'"):
        store.get_or_build(Dataset(iris_frame, target="label"))


# -- end to end -------------------------------------------------------------------------------


def run_workflow(store: Store, source: Callable[[], pd.DataFrame], scorers: tuple[str, ...]) -> Any:
    """The showcase workflow: one dataset, one pipeline, two models, one metric each."""
    data = Dataset(source, target="target", test_size=0.25, random_state=42)
    pipeline = Pipeline(data, [("scale", StandardScaler()), ("select", SelectKBest(k=3))])
    metrics = []
    for c in (0.1, 1.0):
        model = Model(pipeline, LogisticRegression(C=c, max_iter=1000))
        metrics.append(store.get_or_build(Metric(model, data, scorers=scorers), name="metric"))
    return data, metrics


@pytest.mark.parametrize(
    ("source", "scorers"),
    [(iris_frame, ("accuracy", "f1_macro")), (cancer_frame, ("accuracy", "roc_auc"))],
    ids=["iris", "breast_cancer"],
)
def test_end_to_end_second_run_trains_nothing(
    tmp_path: Path,
    builds: Counter[str],
    source: Callable[[], pd.DataFrame],
    scorers: tuple[str, ...],
) -> None:
    with Store(tmp_path / "store") as store:
        _, metrics = run_workflow(store, source, scorers)
    assert builds == {"Dataset": 1, "Pipeline": 1, "Model": 2, "Metric": 2}
    builds.clear()
    with Store(tmp_path / "store") as store:  # a new Store on the same folder
        data_again, metrics_again = run_workflow(store, source, scorers)
        assert builds == {}
        assert [m.values for m in metrics_again] == [m.values for m in metrics]
        for metric in metrics:
            assert set(metric.values) == set(scorers)
            assert all(0.7 < value <= 1.0 for value in metric.values.values())

        found = store.find(class_name="casml.ml.Metric")
        assert {info.hash for info in found} == {m.hash_ for m in metrics}
        assert {store.get(info.hash).values["accuracy"] for info in found} == {
            m.values["accuracy"] for m in metrics
        }
        assert [info.version for info in store.find(name="metric")] == [2, 1]

        kinds = Counter(info.class_name for info in store.dependents(data_again.hash_))
        assert kinds == {"casml.ml.Pipeline": 1, "casml.ml.Model": 2, "casml.ml.Metric": 2}
        lineage = {info.class_name for info in store.lineage(metrics[0].hash_)}
        assert lineage == {"casml.ml.Model", "casml.ml.Pipeline", "casml.ml.Dataset"}
        graph = store.graph(data_again.hash_)
        # data->pipeline, pipeline->2 models, 2 x (model->metric, data->metric)
        assert graph.count("-->") == 7


def test_model_loads_in_a_fresh_process_without_pickle(tmp_path: Path) -> None:
    with Store(tmp_path / "store") as store:
        data, metrics = run_workflow(store, cancer_frame, ("accuracy",))
        model = metrics[1].model
        expected = model.predict(data.X("test")).tolist()
        state = model.__casml_state__()
        assert bytes(state["estimator_"][:2]) == b"PK"  # a skops zip, not a pickle stream
    script = textwrap.dedent(
        """
        import json, pickle, sys
        import casml

        def refuse(*args, **kwargs):
            raise AssertionError("pickle was used to load a model")

        pickle.loads = pickle.load = refuse
        store = casml.Store(sys.argv[1])
        model, data = store.get(sys.argv[2]), store.get(sys.argv[3])
        print(json.dumps([type(model).__module__, model.predict(data.X("test")).tolist()]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "store"), model.hash_, data.hash_],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the repo: nothing but installed modules is importable
    )
    assert result.returncode == 0, result.stderr
    module, predictions = json.loads(result.stdout)
    assert module == "casml.ml.model"
    assert predictions == expected


class ShadyClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """A classifier whose class lives outside scikit-learn: skops would have to trust it."""

    def fit(self, X: Any, y: Any) -> ShadyClassifier:
        self.classes_ = np.unique(y)
        return self

    def predict(self, X: Any) -> Any:
        return np.full(len(X), self.classes_[0])


def test_a_skops_payload_with_a_foreign_type_is_refused(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = Dataset(iris_frame, target="target")
    model = Model(Pipeline(data, []), ShadyClassifier())
    shady = f"{__name__}.ShadyClassifier"
    with pytest.raises(casml.PickleNotAllowedError, match=shady):
        store.get_or_build(model)  # refused before anything unloadable is stored
    assert model.hash_ not in store

    # A store written by a process that trusted this module...
    monkeypatch.setattr(_sklearn, "_user_prefixes", set())
    trust_modules(f"{__name__}.")
    store.get_or_build(Model(Pipeline(data, []), ShadyClassifier()))
    assert model.hash_ in store
    # ...is refused by one that does not.
    monkeypatch.setattr(_sklearn, "_user_prefixes", set())
    with pytest.raises(casml.PickleNotAllowedError, match=shady) as refused:
        Store(store.root).get(model.hash_)
    assert "trust_modules" in str(refused.value)


def test_unfitted_steps_and_estimators_survive_storage(store: Store) -> None:
    data = Dataset(iris_frame, target="target", test_size=0.3)
    steps = [("log", FunctionTransformer(np.log1p)), ("pca", PCA(n_components=2))]
    model = store.get_or_build(Model(Pipeline(data, steps), LogisticRegression(C=0.3)))
    loaded = Store(store.root).get(model.hash_)
    assert loaded.hash_ == model.hash_
    assert loaded.pipeline.hash_ == model.pipeline.hash_
    assert loaded.estimator.get_params() == LogisticRegression(C=0.3).get_params()
    assert not hasattr(loaded.estimator, "coef_")  # the unfitted spec stays unfitted
    assert [name for name, _ in loaded.pipeline.steps] == ["log", "pca"]
    X = data.X("test")
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    np.testing.assert_allclose(
        loaded.to_sklearn().predict_proba(X), model.to_sklearn().predict_proba(X)
    )


@pytest.fixture(autouse=True)
def _isolate_trust() -> Iterator[None]:
    saved = set(_sklearn._user_prefixes)
    yield
    _sklearn._user_prefixes.clear()
    _sklearn._user_prefixes.update(saved)
