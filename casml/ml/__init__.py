"""casml.ml: Dataset, Pipeline, Model and Metric, the persistable steps of an ML workflow.

Needs the ``ml`` extra (pandas, scikit-learn, skops). Chain them and let
``store.get_or_build`` decide what to train::

    data = Dataset(load_frame, target="label", test_size=0.25)
    model = Model(Pipeline(data, [("scale", StandardScaler())]), LogisticRegression(C=1.0))
    metric = store.get_or_build(Metric(model, data, scorers=("accuracy",)))

Only configurations never stored before are built. Importing this package teaches
``casml.hash_value`` to hash scikit-learn estimators by class and parameters.
"""

from casml.ml._sklearn import TRUSTED_MODULE_PREFIXES, trust_modules
from casml.ml.dataset import Dataset
from casml.ml.metric import Metric
from casml.ml.model import Model
from casml.ml.pipeline import Pipeline

__all__ = ["TRUSTED_MODULE_PREFIXES", "Dataset", "Metric", "Model", "Pipeline", "trust_modules"]
