"""The MLflow UI as a genforge user sees it, photographed in headless Chromium.

jobspecs/evaluate.yaml, shortened (16 px Fashion-MNIST, a few hundred steps, the DDPM measuring
FD as it trains), runs on a private local stack with system metrics every 2 s; then Chromium
photographs the training run's charts, its system metrics and its grid, the pipeline's
picture, and the registered model with its versions and aliases. Writes docs/screenshots/*.png.

    apt-get install chromium      # or any Chrome on PATH as chromium / google-chrome
    python docs/screenshots.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import finish, launch, private_stack  # noqa: E402  (sets up the stack's Ray auth)

from orchestrator.tracking import TRAINING_VIEW  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
EXPERIMENT = "screenshots"
MODEL = "fashion-generator"


def spec() -> dict:
    path = ROOT / "jobspecs" / "evaluate.yaml"
    out = yaml.safe_load(path.read_text())
    out["experiment"] = EXPERIMENT
    data = out["defaults"]["data"]
    data.update(path=str((path.parent / data["path"]).resolve()), image_size=16, limit=6000)
    data["split"]["heldout"] = str((path.parent / data["split"]["heldout"]).resolve())
    small = {"steps": 300, "batch_size": 64, "width": 16}  # the feature network
    for job in out["jobs"]:
        if job["kind"] == "train":
            job["train"].update(steps=400, checkpoint_every=200, log_every=10,
                                sample_every=100, warmup_steps=0)
        else:
            job["evaluate"].update(num_samples=200, classifier=small)
    ddpm = next(j for j in out["jobs"] if j["name"] == "ddpm")
    ddpm["train"]["eval"] = {"every": 100, "num_samples": 128, "classifier": small}
    out["jobs"][2]["evaluate"]["per_source"]["ddpm"]["steps"] = 20
    return out


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    raise SystemExit("no Chromium on PATH (apt-get install chromium)")


def shoot(chrome: str, url: str, name: str, size: str = "1440,900", wait_s: int = 20) -> None:
    """A picture of `url` once its page has rendered (`wait_s` of virtual time lets the app's
    requests and charts finish first)."""
    out = OUT / f"{name}.png"
    subprocess.run([chrome, "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--window-size={size}",
                    f"--virtual-time-budget={wait_s * 1000}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=120)
    print(out)


def main() -> None:
    from mlflow.tracking import MlflowClient

    chrome = browser()
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ["GENFORGE_SYSTEM_METRICS_INTERVAL"] = "2"
    with private_stack(2) as (home, state, _):
        _, proc = launch(home, spec())
        finish(proc)
        ui = state.tracking_uri
        client = MlflowClient(ui)
        exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
        runs = client.search_runs([exp])
        job = {r.data.tags.get("genforge.job"): r.info.run_id for r in runs}
        ddpm = job["ddpm"]
        parent = client.get_run(ddpm).data.tags["mlflow.parentRunId"]
        def page(path: str) -> str:  # in the model-training view, as genforge links it
            return f"{ui}/#/{path}?{TRAINING_VIEW}"

        run = f"experiments/{exp}/runs"
        shoot(chrome, page(run), "experiment-runs")
        # the loss, FD and KID curves, and the grids (the "samples" chart, by step)
        shoot(chrome, page(f"{run}/{ddpm}/model-metrics"), "training-run-charts", "1440,2000",
              wait_s=60)
        shoot(chrome, page(f"{run}/{ddpm}/system-metrics"), "training-run-system-metrics",
              "1440,1400", wait_s=60)
        # its last grid, as the run's artifact: the "samples" chart above renders its images
        # only once scrolled into view, which a headless page never is
        grids = [a.path for a in client.list_artifacts(ddpm, "images") if a.path.endswith(".png")]
        last = max(grids, key=lambda path: int(re.search(r"step[+%](\d+)", path).group(1)))
        shoot(chrome, page(f"{run}/{ddpm}/artifacts/{last}"), "training-run-grid")
        model = client.get_model_version_by_alias(MODEL, "champion").source.removeprefix(
            "models:/")
        shoot(chrome, page(f"experiments/{exp}/models/{model}/artifacts"), "model-artifacts")
        shoot(chrome, page(f"{run}/{parent}/artifacts/pipeline.png"), "pipeline-picture")
        shoot(chrome, page(f"models/{MODEL}"), "registered-model")
        champion = client.get_model_version_by_alias(MODEL, "champion").version
        shoot(chrome, page(f"models/{MODEL}/versions/{champion}"), "model-version")


if __name__ == "__main__":
    main()
