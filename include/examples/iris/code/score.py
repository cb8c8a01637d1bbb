"""An Azure ML batch-deployment scoring script, unchanged from what runs on Azure.

init() loads the model once; run(mini_batch) gets a list of CSV file paths and returns a
DataFrame with one row per input row: the file, the row's id, the predicted species and its
probability.
"""

import glob
import os

import joblib
import pandas as pd

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def init():
    global model
    # Registered models sit one folder below AZUREML_MODEL_DIR.
    model_path = glob.glob(os.path.join(os.environ["AZUREML_MODEL_DIR"], "*", "model.joblib"))[0]
    model = joblib.load(model_path)


def run(mini_batch):
    results = []
    for file_path in mini_batch:
        data = pd.read_csv(file_path)
        proba = model.predict_proba(data[FEATURES])
        results.append(
            pd.DataFrame(
                {
                    "file": os.path.basename(file_path),
                    "id": data["id"],
                    "prediction": model.classes_[proba.argmax(axis=1)],
                    "probability": proba.max(axis=1).round(4),
                }
            )
        )
    return pd.concat(results, ignore_index=True)
