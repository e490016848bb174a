"""Browser check of the MLflow UI on a kdray store: what a user sees, rendered by headless Chromium.

    python bench/ui.py                      # runs a tiny digits job into a fresh store, then checks it
    python bench/ui.py --store sqlite:////abs/mlflow.db --out ui-check

Starts ``kdray ui`` on the store, renders four pages after their JavaScript ran (``chromium --headless
--dump-dom --screenshot``): the experiment's runs in the "Model training" view, the job run (its
description is the results table), a student's stage run (datasets, system metrics, registered model) and
the experiment's logged models; prints what each page must show and what it lacks, saves a screenshot per
page and logs the experiment page's as ``ui/experiment.png`` on the job run. Exit status 1 when something
is missing. ``tests/test_mlflow_ui.py`` runs the same check.

MLflow 3.17.2's UI picks an experiment's view from the workflow switch ("GenAI" / "Model training", the
``workflowType`` URL parameter, else the browser's saved choice, GenAI by default) rather than from the
``mlflow.experimentKind`` tag kdray sets: a fresh browser opening ``#/experiments/<id>`` lands on the GenAI
overview. ``kdray ui`` therefore prints each kdray experiment's link with ``workflowType=machine_learning``.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

TRAINING_VIEW = "workflowType=machine_learning"
# runs sorted by name: not nested under the job run, so every stage run is a row of the table
FLAT_RUNS = "orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"


def chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(store: str, port: int, log_path: str, timeout_s: float = 90.0) -> subprocess.Popen:
    """``kdray ui --store STORE --port PORT`` in its own process group, once ``/health`` answers. Its output
    goes to ``log_path`` (a pipe nobody reads fills up and stalls the server's request logging)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kdray.orchestrator.cli", "ui", "--store", store, "--port",
                                 str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kdray ui exited with {proc.returncode}: {read_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    stop_ui(proc)
    raise TimeoutError(f"kdray ui did not answer on port {port} within {timeout_s:.0f}s")


def read_tail(path: str, chars: int = 3000) -> str:
    with open(path, errors="replace") as fh:
        return fh.read()[-chars:]


def stop_ui(proc: subprocess.Popen) -> None:
    """Stop the UI and the workers ``mlflow ui`` started (its process group, which only it is in)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def render(url: str, screenshot: str | None = None, window: str = "1900,950", budget_ms: int = 15000) -> str:
    """The page's text after its JavaScript ran (``--virtual-time-budget``), optionally a PNG of it. A fresh
    profile each time: no view choice saved by an earlier page leaks into the next."""
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
               f"--user-data-dir={profile}", f"--window-size={window}", f"--virtual-time-budget={budget_ms}",
               "--dump-dom"]
        if screenshot:
            cmd.append(f"--screenshot={screenshot}")
        dom = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=120).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def pages(store: str, base: str) -> tuple[list[dict], object]:
    """The pages to render and the strings each must show, read from the store's latest kdray job (and
    that job's run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    jobs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`kdray.role` = 'job'", order_by=["attributes.start_time DESC"], max_results=1)
    if not jobs:
        raise LookupError(f"no kdray job run in {store}")
    job = jobs[0]
    exp = job.info.experiment_id
    stages = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{job.info.run_id}'")
    students = [s for s in stages if s.data.tags.get("kdray.role") == "distill"] or stages
    student = sorted(students, key=lambda r: r.info.run_name)[0]
    table = job.data.tags.get("mlflow.note.content", "")  # the results table: every cell must be on the page
    cells = [c.strip() for line in table.splitlines()[2:] for c in line.strip().strip("|").split("|")]
    registered = student.data.tags.get("kdray.registered_model")
    root = f"{base}/#/experiments/{exp}"
    return [
        {"name": "experiment", "url": f"{root}/runs?{TRAINING_VIEW}&{FLAT_RUNS}",
         "expect": ["Model training", "Runs", job.info.run_name, *[s.info.run_name for s in stages],
                    "Dataset", "training", "Models"]},
        {"name": "job_run", "url": f"{root}/runs/{job.info.run_id}?{TRAINING_VIEW}",
         "expect": ["Description", *cells]},
        {"name": "stage_run", "url": f"{root}/runs/{student.info.run_id}?{TRAINING_VIEW}",
         "expect": [student.info.run_name, "system/cpu_utilization_percentage", "Datasets", "digits",
                    "Registered models", *([registered] if registered else [])]},
        {"name": "models", "url": f"{root}/models?{TRAINING_VIEW}",
         "expect": ["Models", *[s.info.run_name for s in stages], "Ready", *([registered] if registered else [])]},
    ], job


def check(store: str, out_dir: str) -> dict:
    """Render every page (again with more virtual time while something is missing: a loaded machine answers
    the page's requests late); screenshot and text of each in ``out_dir``; the experiment page's screenshot
    logged on the job run as ``ui/experiment.png``."""
    from mlflow.tracking import MlflowClient

    os.makedirs(out_dir, exist_ok=True)
    port = free_port()
    log_path = os.path.join(out_dir, "kdray-ui.log")
    proc = start_ui(store, port, log_path)
    results = {}
    try:
        wanted, job = pages(store, f"http://127.0.0.1:{port}")
        for page in wanted:
            png = os.path.join(out_dir, f"{page['name']}.png")
            for budget in (15000, 30000, 60000):
                text = render(page["url"], png, budget_ms=budget)
                missing = [s for s in page["expect"] if s not in text]
                if not missing:
                    break
            with open(os.path.join(out_dir, f"{page['name']}.txt"), "w") as fh:
                fh.write(text)
            results[page["name"]] = {"url": page["url"], "missing": missing, "text": text, "png": png}
    finally:
        stop_ui(proc)
    MlflowClient(store).log_artifact(job.info.run_id, results["experiment"]["png"], "ui")
    with open(log_path, errors="replace") as fh:
        ui_output = fh.read()
    return {"pages": results, "job_run_id": job.info.run_id, "ui_output": ui_output,
            "artifact": f"runs:/{job.info.run_id}/ui/experiment.png"}


def tiny_job(root: str) -> str:
    """A small digits job (teacher, one student) into ``<root>/mlflow.db``; returns the store URI."""
    import kdray

    store = f"sqlite:///{os.path.abspath(root)}/mlflow.db"
    kdray.distill("digits", overrides=[f"output_dir={root}/runs", f"mlflow.tracking_uri={store}",
                                       "train.epochs=2", "teacher.train.epochs=2", "seeds=[0]", "baseline=false",
                                       "ray.num_workers=0"], log=lambda *_: None)
    return store


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="tracking URI of a store holding a kdray job (default: run a tiny one)")
    parser.add_argument("--out", default="ui-check", help="folder for the screenshots")
    args = parser.parse_args()
    if chromium() is None:
        print("chromium is not installed (apt-get install -y chromium)", file=sys.stderr)
        return 2
    store = args.store or tiny_job(tempfile.mkdtemp(prefix="kdray-ui-"))
    start = time.perf_counter()
    result = check(store, args.out)
    print(f"# MLflow UI check ({time.perf_counter() - start:.1f}s) on {store}")
    for name, page in result["pages"].items():
        print(f"{name}: {'ok' if not page['missing'] else 'MISSING ' + json.dumps(page['missing'])}  {page['url']}"
              f"  -> {page['png']}")
    print(f"screenshot logged as {result['artifact']}")
    return 1 if any(p["missing"] for p in result["pages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
