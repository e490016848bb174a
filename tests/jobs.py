"""Small job configs shared by the tests."""
from __future__ import annotations


def digits_job(tmp_path, mlflow_uri=None, **over) -> dict:
    """A small, fast digits job config as a dict (teacher trained in-job)."""
    cfg = {
        "name": "t",
        "output_dir": str(tmp_path / "runs"),
        "data": {"name": "digits", "options": {"train_fraction": 0.2}},
        "teacher": {"model": "digits_cnn", "train": {"epochs": 8, "lr": 0.05, "batch_size": 32}},
        "student": {"model": "digits_mlp", "args": {"hidden": 16}},
        "methods": [{"name": "kd", "alpha": 0.9, "temperature": 4.0}],
        "train": {"epochs": 8, "lr": 0.05, "batch_size": 32},
        "seeds": [0],
        "baseline": False,
        "ray": {"num_workers": 0},
        "mlflow": {"tracking_uri": mlflow_uri, "enabled": mlflow_uri is not None},
    }
    for key, value in over.items():
        node = cfg
        *path, last = key.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg
