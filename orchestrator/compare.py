"""`genforge compare EXPERIMENT`: every evaluated model of an experiment in one table.

Rows come from the experiment's finished evaluate runs in MLflow (the latest run of each
evaluate job) and their `metrics.json` in storage: first each evaluation's real-vs-real
baseline, then its sources. The table is printed (text, markdown, csv or json), logged as an
artifact of the evaluation's pipeline run, and optionally plotted: quality against sampling
time per image; `grids` lays every model's first images (the evaluation's `outputs/shown.npz`)
side by side under its name and scores, each evaluation's held-out images first.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator.storage import NotFound, Storage
from workers.registry import FAMILIES, family

COLUMNS = [  # (key, header, format)
    ("evaluation", "evaluation", "{}"), ("model", "model", "{}"), ("family", "family", "{}"),
    ("kind", "kind", "{}"), ("step", "step", "{}"), ("params", "params", "{:,}"),
    ("sampler", "sampler", "{}"), ("fd", "FD", "{:.2f}"), ("kid", "KID", "{:.3f}"),
    ("classifier_score", "CS", "{:.2f}"), ("class_kl", "class KL", "{:.3f}"),
    ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}"),
    ("label_accuracy", "label acc.", "{:.3f}"),  # class-conditional sources only
    ("s_per_image", "s/image", "{:.2e}"),
    ("inception_fid", "Inception FID", "{:.2f}"),  # only with evaluate.inception
]


class CompareError(Exception):
    """Nothing to compare; the message says why."""


def _sampler(info: dict[str, Any]) -> str:
    s = info.get("sampler")
    if not s:
        return "(sample job)" if info.get("source_kind") == "sample" else "-"
    return family(info["family"]).describe(s) if info.get("family") in FAMILIES else "-"


def collect(client: MlflowClient, root: Storage, experiment: str) -> tuple[list[dict], str | None]:
    """The table's rows, and the pipeline run of the newest evaluation (where it is logged)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise CompareError(f"no experiment named '{experiment}' in MLflow")
    runs = client.search_runs([exp.experiment_id],
                              "tags.`genforge.kind` = 'evaluate' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    latest: dict[str, Any] = {}
    for run in runs:
        latest.setdefault(run.data.tags["genforge.job"], run)
    if not latest:
        raise CompareError(f"experiment '{experiment}' has no finished evaluate job")
    rows: list[dict] = []
    for name, run in sorted(latest.items()):
        key = f"{experiment}/{name}/{run.data.tags['genforge.hash']}/outputs/metrics.json"
        try:
            results = json.loads(root.get_bytes(key))
        except NotFound:
            raise CompareError(f"{root.uri(key)} is missing (run {run.info.run_id})") from None
        shown = f"{experiment}/{name}/{run.data.tags['genforge.hash']}/outputs/shown.npz"
        rows.append({"evaluation": name, "model": "real vs real (held-out)", "family": "-",
                     "kind": "baseline", "step": "-", "params": None, "sampler": "-",
                     "s_per_image": None, **_metric_cells(results["baseline"]),
                     "_shown": (shown, "real")})
        for src in results["sources"]:
            swept = ", ".join(f"{k} {v}" for k, v in (src.get("swept") or {}).items())
            rows.append({"evaluation": name, "model": src["ref"] + (f" ({swept})" if swept else ""),
                         "family": src.get("family"),
                         "kind": src.get("source_kind"), "step": src.get("step"),
                         "params": src.get("params"), "sampler": _sampler(src),
                         "s_per_image": src.get("s_per_image"), **_metric_cells(src["metrics"]),
                         "_shown": (shown, src.get("label"))})
    parent = next(iter(latest.values())).data.tags.get("mlflow.parentRunId")
    return rows, parent


def _metric_cells(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics.get(k) for k, _, _ in COLUMNS
            if k in ("fd", "kid", "classifier_score", "class_kl", "precision", "recall",
                     "label_accuracy", "inception_fid")}


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def render(rows: list[dict], fmt: str) -> str:
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    columns = [c for c in COLUMNS if c[0] != "inception_fid"
               or any(r.get("inception_fid") is not None for r in rows)]
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=[k for k, _, _ in columns])
        writer.writeheader()
        writer.writerows({k: r.get(k) for k, _, _ in columns} for r in rows)
        return buf.getvalue()
    cells = [[_cell(r.get(k), f) for k, _, f in columns] for r in rows]
    headers = [h for _, h, _ in columns]
    if fmt == "markdown":
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    numeric = {i for i, (k, _, f) in enumerate(columns) if f != "{}" or k == "step"}

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(c) for c in cells])


def plot(rows: list[dict], path: str) -> None:
    """FD against sampling time per image, one labelled point per model; each evaluation's
    real-vs-real FD as a dashed line (what "good" is)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for row in rows:
        if row["kind"] == "baseline":
            ax.axhline(row["fd"], ls="--", lw=1, color="grey")
            ax.annotate(f"real vs real ({row['evaluation']})", (0.01, row["fd"]),
                        xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                        va="bottom")
        elif row.get("s_per_image") and row.get("fd") is not None:
            ax.scatter(row["s_per_image"], row["fd"], s=30)
            ax.annotate(f"{row['model']} ({row['sampler']})" if row["sampler"] != "-" else row["model"],
                        (row["s_per_image"], row["fd"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampling time per image (s)")
    ax.set_ylabel("Fréchet distance (classifier features, lower is better)")
    ax.grid(True, which="both", lw=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def grids(rows: list[dict], root: Storage, path: str) -> None:
    """Every model's first images side by side, under its name, sampler and scores: one row of
    panels per evaluation, its held-out images first (the real-vs-real scores under them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from workers import images as imageio

    kept: dict[str, Any] = {}
    by_evaluation: dict[str, list[tuple[dict, Any]]] = {}
    for row in rows:
        key, label = row["_shown"]
        if key not in kept:
            try:
                kept[key] = np.load(io.BytesIO(root.get_bytes(key)))
            except NotFound:
                raise CompareError(f"{root.uri(key)} is missing: evaluation "
                                   f"'{row['evaluation']}' kept no images (rerun it)") from None
        if label not in kept[key].files:
            raise CompareError(f"{root.uri(key)} holds no images of '{row['model']}'")
        by_evaluation.setdefault(row["evaluation"], []).append(
            (row, imageio.grid(kept[key][label], pad=1)))
    cols = max(len(panels) for panels in by_evaluation.values())
    fig, axes = plt.subplots(len(by_evaluation), cols, squeeze=False, dpi=120,
                             figsize=(2.3 * cols, 2.9 * len(by_evaluation)))
    for ax in axes.flat:
        ax.axis("off")
    for r, (name, panels) in enumerate(by_evaluation.items()):
        for c, (row, picture) in enumerate(panels):
            ax = axes[r][c]
            gray = picture.shape[-1] == 1
            ax.imshow(picture[..., 0] if gray else picture, cmap="gray" if gray else None,
                      interpolation="nearest", vmin=0, vmax=255)
            title = "held-out images" if row["kind"] == "baseline" else row["model"]
            scores = " · ".join(f"{h} {_cell(row.get(k), f)}" for k, h, f in COLUMNS
                                if k in ("fd", "kid") and row.get(k) is not None)
            sampler = "" if row["sampler"] in ("-", None) else f"\n{row['sampler']}"
            ax.set_title(f"{title}{sampler}\n{scores}", fontsize=7)
        axes[r][0].text(-0.08, 0.5, name, transform=axes[r][0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=8, weight="bold")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
