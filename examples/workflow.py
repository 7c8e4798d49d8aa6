"""Train only what is new: Dataset -> Pipeline -> Model -> Metric on two scikit-learn datasets.

Run it twice; the second run loads everything and trains nothing::

    python examples/workflow.py            # store in <tmp>/casml-workflow-example
    python examples/workflow.py            # "trained: nothing"
    python examples/workflow.py --c 0.1 1 10   # trains the two C=10 models and metrics only
    python examples/workflow.py --graph    # also print the lineage as a Mermaid graph
    python examples/workflow.py --root ./my-store --fresh

Needs the ``ml`` extra: ``pip install "casml[ml]"``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import casml
from casml.ml import Dataset, Metric, Model, Pipeline

DEFAULT_ROOT = Path(tempfile.gettempdir()) / "casml-workflow-example"


def iris() -> pd.DataFrame:
    """The iris flowers: 150 rows, 4 features, 3 classes."""
    frame: pd.DataFrame = load_iris(as_frame=True).frame
    return frame


def breast_cancer() -> pd.DataFrame:
    """The Wisconsin breast cancer table: 569 rows, 30 features, 2 classes."""
    frame: pd.DataFrame = load_breast_cancer(as_frame=True).frame
    return frame


def experiments(strengths: list[float]) -> list[Metric]:
    """Every configuration we want scored; equal configurations share their artifacts."""
    metrics: list[Metric] = []
    for source in (iris, breast_cancer):
        data = Dataset(source, target="target", test_size=0.25, random_state=7)
        scaled = Pipeline(data, [("scale", StandardScaler())])
        reduced = Pipeline(data, [("scale", StandardScaler()), ("pca", PCA(n_components=2))])
        candidates = [Model(scaled, LogisticRegression(C=c, max_iter=1000)) for c in strengths]
        candidates += [
            Model(reduced, LogisticRegression(C=1.0, max_iter=1000)),
            Model(scaled, RandomForestClassifier(n_estimators=50, random_state=0)),
        ]
        metrics.extend(Metric(m, data, scorers=("accuracy", "f1_macro")) for m in candidates)
    return metrics


def short_name(data: Dataset) -> str:
    """The source function's name: 'iris', 'breast_cancer'."""
    return data.source_name.rsplit(".", 1)[-1]


def describe(obj: casml.Persistable) -> str:
    """A one-line label for an artifact of the workflow."""
    if isinstance(obj, Dataset):
        return f"Dataset   {short_name(obj)}"
    if isinstance(obj, Pipeline):
        return f"Pipeline  {'+'.join(name for name, _ in obj.steps)} on {short_name(obj.dataset)}"
    if isinstance(obj, Model):
        data = obj.pipeline.dataset
        return f"Model     {obj.estimator!r} on {short_name(data)}"
    if isinstance(obj, Metric):
        return f"Metric    {', '.join(obj.scorers)} on {short_name(obj.dataset)} ({obj.split})"
    return type(obj).__name__


def chain(metric: Metric) -> list[casml.Persistable]:
    """The artifacts one metric needs, upstream first."""
    model: Model = metric.model
    pipeline: Pipeline = model.pipeline
    return [pipeline.dataset, pipeline, model, metric]


def main() -> None:
    """Parse the options, run every experiment through the store, print what happened."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="store folder")
    parser.add_argument("--fresh", action="store_true", help="empty the store folder first")
    parser.add_argument(
        "--c",
        type=float,
        nargs="+",
        default=[0.1, 1.0],
        help="inverse regularization strengths of the logistic regressions (default 0.1 1.0); "
        "add one to see only its models and metrics trained",
    )
    parser.add_argument("--graph", action="store_true", help="print a Mermaid lineage graph")
    args = parser.parse_args()
    if args.fresh and args.root.exists():
        shutil.rmtree(args.root)

    started = time.perf_counter()
    with casml.Store(args.root) as store:
        metrics = experiments(args.c)
        # Hashes are known before training, so the store says what is new without training.
        todo: dict[str, str] = {}
        for metric in metrics:
            for obj in chain(metric):
                if obj.hash_ not in todo and obj.hash_ not in store:
                    todo[obj.hash_] = describe(obj)
        results = [store.get_or_build(metric, name="workflow-metric") for metric in metrics]
        elapsed = time.perf_counter() - started

        print(f"store: {store.root}")
        if todo:
            print(f"built {len(todo)} new artifacts:")
            for label in todo.values():
                print(f"  {label}")
        else:
            print("trained: nothing (every configuration was already in the store)")
        print()
        rows = []
        for metric in results:
            model: Model = metric.model
            steps = "+".join(name for name, _ in model.pipeline.steps)
            rows.append((short_name(metric.dataset), f"{steps} -> {model.estimator!r}", metric))
        width = max(len(label) for _, label, _ in rows)
        print(f"{'dataset':<14} {'pipeline -> model':<{width}} {'accuracy':>8} {'f1_macro':>8}")
        for data_name, label, metric in rows:
            accuracy, f1 = metric.values["accuracy"], metric.values["f1_macro"]
            print(f"{data_name:<14} {label:<{width}} {accuracy:>8.3f} {f1:>8.3f}")
        print()
        stored = store.find(class_name="casml.ml.Metric")
        print(f"{len(stored)} metrics in the store; run took {elapsed:.2f} s")
        if args.graph:
            first_dataset = results[0].dataset
            print()
            print(store.graph(first_dataset.hash_, format="mermaid"), end="")


if __name__ == "__main__":
    main()
