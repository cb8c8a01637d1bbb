"""Prepare the iris example: train a scikit-learn model and write sample input files.

Runs inside the scoring image (`make example`), so the model is pickled by the same
scikit-learn that will load it. Writes, next to this file:

* ``model/iris-classifier/model.joblib``: the model, one level down as Azure ML's registered
  models are (the scoring script finds it with a glob under ``AZUREML_MODEL_DIR``);
* ``model/iris-classifier/model.pkl``: the same model, pickled, taking whole input rows (it
  picks its feature columns itself), as Azure's custom-outputs example expects;
* ``data/iris-000.csv`` ... ``iris-014.csv``: the 150 iris rows, shuffled, 10 per file;

and for the SageMaker batch-transform example (``serving/``):

* ``model/iris-classifier.tar.gz``: a SageMaker model archive, ``model.joblib`` at its top level
  (unpacked into ``/opt/ml/model`` of the serving container);
* ``data-serve/iris-000.csv`` ...: the same files and rows as ``data/`` without the header line
  (columns ``id, sepal_length, sepal_width, petal_length, petal_width``; a deployment drops the
  id with the input filter ``$[1:]``);
* ``data-serve-jsonl/iris-000.jsonl`` ...: the same rows as JSON Lines,
  ``{"id": 17, "features": [5.1, 3.5, 1.4, 0.2]}``.
"""

import json
import pickle
import tarfile
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
ROWS_PER_FILE = 10
HERE = Path(__file__).resolve().parent


def main() -> None:
    iris = load_iris()
    X = pd.DataFrame(iris.data, columns=FEATURES)
    y = iris.target_names[iris.target]

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(X, y)
    model_dir = HERE / "model" / "iris-classifier"
    model_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, model_dir / "model.joblib")

    rows = X.assign(id=np.arange(len(X)))[["id", *FEATURES]]
    whole_rows = make_pipeline(
        ColumnTransformer([("features", StandardScaler(), FEATURES)], remainder="drop"),
        LogisticRegression(max_iter=1000),
    )
    whole_rows.fit(rows, y)
    with open(model_dir / "model.pkl", "wb") as fh:
        pickle.dump(whole_rows, fh)

    rows = rows.sample(frac=1.0, random_state=7).reset_index(drop=True)
    data_dir = HERE / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for old in data_dir.glob("*.csv"):
        old.unlink()
    for n, start in enumerate(range(0, len(rows), ROWS_PER_FILE)):
        rows.iloc[start : start + ROWS_PER_FILE].to_csv(data_dir / f"iris-{n:03d}.csv", index=False)
    print(f"trained {model_dir / 'model.joblib'} (accuracy {model.score(X, y):.3f}); wrote {n + 1} files to {data_dir}")
    write_serving_files(model_dir / "model.joblib", rows)


def _clean(folder: Path, pattern: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(pattern):
        old.unlink()
    return folder


def write_serving_files(model_file: Path, rows: pd.DataFrame) -> None:
    """The SageMaker model archive and header-less CSV and JSON Lines inputs of the same rows."""
    archive = HERE / "model" / "iris-classifier.tar.gz"

    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(archive, "w:gz") as tar:
        tar.add(model_file, arcname="model.joblib", filter=as_root)

    csv_dir = _clean(HERE / "data-serve", "*.csv")
    jsonl_dir = _clean(HERE / "data-serve-jsonl", "*.jsonl")
    for n, start in enumerate(range(0, len(rows), ROWS_PER_FILE)):
        chunk = rows.iloc[start : start + ROWS_PER_FILE]
        chunk.to_csv(csv_dir / f"iris-{n:03d}.csv", index=False, header=False)
        with open(jsonl_dir / f"iris-{n:03d}.jsonl", "w", encoding="utf-8") as fh:
            for row in chunk.itertuples(index=False):
                features = [float(getattr(row, name)) for name in FEATURES]
                fh.write(json.dumps({"id": int(row.id), "features": features}) + "\n")
    print(f"wrote {archive} and {n + 1} files each to {csv_dir} and {jsonl_dir}")


if __name__ == "__main__":
    main()
