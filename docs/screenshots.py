"""The MLflow UI as a genforge user sees it, photographed in headless Chromium.

jobspecs/evaluate.yaml, shortened (16 px Fashion-MNIST, a few hundred steps, the DDPM measuring
FD as it trains), runs on a private local stack with system metrics every 2 s; then Chromium
photographs the training run's charts, its system metrics and its grid, the pipeline's
picture, and the registered model with its versions and aliases. Writes docs/screenshots/*.png.

    apt-get install chromium      # or any Chrome on PATH as chromium / google-chrome
    python docs/screenshots.py
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

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


class Chromium:
    """Headless Chromium driven over the DevTools protocol: pages are photographed once they
    have drawn what they should (the command line's --screenshot waits on virtual time, under
    which MLflow's charts sometimes stay spinners), and a page can be clicked first."""

    def __init__(self, binary: str) -> None:
        self.binary, self.calls = binary, 0

    async def __aenter__(self) -> Chromium:
        import aiohttp  # MLflow's and Ray's dependency

        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self.proc = subprocess.Popen(
            [self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile.name}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = Path(self.profile.name) / "DevToolsActivePort"
        for _ in range(300):
            if port.exists() and port.read_text().strip():
                break
            await asyncio.sleep(0.1)
        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{port.read_text().split()[0]}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.http.close()
        self.proc.terminate()
        self.proc.wait()
        self.profile.cleanup()

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.calls += 1
        await self.ws.send_json({"id": self.calls, "method": method, "params": params})
        while True:  # events are skipped
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.calls:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def js(self, expression: str) -> Any:
        out = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return out["result"].get("value")

    async def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                            clickCount=1)
        # away again: a pointer resting on a chart opens its tooltip over the picture
        await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=0, y=0)

    async def until(self, expression: str, what: str) -> None:
        for _ in range(120):
            if await self.js(expression):
                return
            await asyncio.sleep(0.5)
        failed = Path(tempfile.gettempdir()) / "genforge-screenshot-failed.png"
        failed.write_bytes(base64.b64decode((await self.send("Page.captureScreenshot"))["data"]))
        raise SystemExit(f"the page did not show {what} in 60 s (as it was: {failed})")

    async def open(self, url: str, height: int, charts: int = 0) -> None:
        """Loads `url` in a 1440-wide window and waits until `charts` plots have drawn (and 3 s
        more, for what draws after them)."""
        await self.send("Emulation.setDeviceMetricsOverride", width=1440, height=height,
                        deviceScaleFactor=1, mobile=False)
        await self.send("Page.navigate", url="about:blank")  # a new document, not a hash change
        await self.send("Page.navigate", url=url)
        await self.until(f"{CHARTS} >= {charts}", f"{charts} charts ({url})")
        await asyncio.sleep(3)

    async def shoot(self, name: str) -> None:
        out = OUT / f"{name}.png"
        out.write_bytes(base64.b64decode((await self.send("Page.captureScreenshot"))["data"]))
        print(out)


CHARTS = "document.querySelectorAll('.js-plotly-plot').length"
# MLflow 3.17 opens its assistant panel on a local server's first page; a user closes it once
QUIET = ("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
         "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")
# The "samples" image chart starts at its first step; the right end of its slider (the last
# one on the page: the full-screen dialog's, once open) is the last grid.
LAST_GRID = """(() => {
  const sliders = document.querySelectorAll('[role=slider]');
  const track = sliders[sliders.length - 1].parentElement.parentElement.getBoundingClientRect();
  return [track.right - 1, track.top + track.height / 2];
})()"""
FULL_SCREEN = """(() => {
  const card = document.querySelector('[role=slider]')
    .closest('[data-testid=experiment-view-compare-runs-card]');
  const button = card.querySelector('[data-component-id=fullscreen_button_chartcard]')
    .getBoundingClientRect();
  return [button.left + button.width / 2, button.top + button.height / 2];
})()"""


def grids_drawn(step: int, n: int) -> str:
    """Whether `n` pictures of the step's grid have loaded."""
    return ("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0 && "
            f"/samples%2Bstep%2B{step}%2B/.test(i.src)).length >= {n}")


async def photograph(chrome: str, ui: str, client: Any, exp: str) -> None:
    def page(path: str) -> str:  # in the model-training view, as genforge links it
        return f"{ui}/#/{path}?{TRAINING_VIEW}"

    runs = client.search_runs([exp])
    job = {r.data.tags.get("genforge.job"): r for r in runs}
    ddpm = job["ddpm"]
    parent = ddpm.data.tags["mlflow.parentRunId"]
    metrics = list(ddpm.data.metrics)
    system = sum(key.startswith("system/") for key in metrics)
    last = int(ddpm.data.params["train.steps"])
    run = f"experiments/{exp}/runs"
    async with Chromium(chrome) as browser:
        await browser.send("Page.navigate", url=page(run))
        await asyncio.sleep(3)
        await browser.js(QUIET)
        await browser.open(page(run), 900)
        await browser.shoot("experiment-runs")
        # the loss, FD and KID curves, and the grids (the "samples" chart, at its last step)
        await browser.open(page(f"{run}/{ddpm.info.run_id}/model-metrics"), 1850,
                           charts=len(metrics) - system)
        await browser.click(*await browser.js(LAST_GRID))
        await browser.until(grids_drawn(last, 1), "the last grid")
        await browser.shoot("training-run-charts")
        # the same chart full screen: the grid as large as the UI draws it
        await browser.click(*await browser.js(FULL_SCREEN))
        await asyncio.sleep(1)
        await browser.click(*await browser.js(LAST_GRID))
        await browser.until(grids_drawn(last, 2), "the last grid full screen")
        await browser.shoot("training-run-grid")
        await browser.open(page(f"{run}/{ddpm.info.run_id}/system-metrics"), 1400,
                           charts=system)
        await browser.shoot("training-run-system-metrics")
        model = client.get_model_version_by_alias(MODEL, "champion")
        await browser.open(page(f"experiments/{exp}/models/"
                                f"{model.source.removeprefix('models:/')}/artifacts"), 900)
        await browser.shoot("model-artifacts")
        await browser.open(page(f"{run}/{parent}/artifacts/pipeline.png"), 900)
        await browser.shoot("pipeline-picture")
        await browser.open(page(f"models/{MODEL}"), 900)
        await browser.shoot("registered-model")
        await browser.open(page(f"models/{MODEL}/versions/{model.version}"), 900)
        await browser.shoot("model-version")


def main() -> None:
    from mlflow.tracking import MlflowClient

    chrome = browser()
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ["GENFORGE_SYSTEM_METRICS_INTERVAL"] = "2"
    with private_stack(2) as (home, state, _):
        _, proc = launch(home, spec())
        finish(proc)
        client = MlflowClient(state.tracking_uri)
        exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
        asyncio.run(photograph(chrome, state.tracking_uri, client, exp))


if __name__ == "__main__":
    main()
