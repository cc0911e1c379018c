"""The picture of a pipeline: its jobs as boxes in columns by depth (a job right of every job
it reads), an arrow from each job to each job that reads it, every box coloured by the job's
final state and saying it. The driver logs it to the pipeline's run as `pipeline.png`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# state -> box colour: done (green), reused (blue-green), stopped early (amber), ended
# without a result (red), never ran (grey)
COLOURS = {"finished": "#b7e1b0", "cached": "#b3dcd9", "pruned": "#f6d39b",
           "failed": "#f2a5a0", "killed": "#f2a5a0", "skipped": "#dddddd"}
OTHER = "#eeeeee"  # pending, running...: a pipeline drawn before it ended


@dataclass(frozen=True)
class Node:
    name: str
    kind: str  # train, sample, ...
    family: str | None
    state: str
    reads: tuple[str, ...]  # the jobs of the pipeline it reads
    note: str = ""  # a line more (a sweep's trials)


def depths(nodes: list[Node]) -> dict[str, int]:
    """Each job's column: 0 for a job that reads none of the pipeline's, else one more than
    the deepest it reads."""
    by_name = {n.name: n for n in nodes}
    out: dict[str, int] = {}

    def depth(name: str) -> int:
        if name not in out:
            out[name] = 1 + max((depth(r) for r in by_name[name].reads if r in by_name),
                                default=-1)
        return out[name]

    for n in nodes:
        depth(n.name)
    return out


def draw(nodes: list[Node]) -> np.ndarray:
    """The picture, RGB uint8 (H, W, 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    column = depths(nodes)
    columns: dict[int, list[Node]] = {}
    for n in nodes:
        columns.setdefault(column[n.name], []).append(n)
    rank: dict[str, float] = {}
    for d in sorted(columns):  # each job level with the mean of those it reads: fewer crossings
        columns[d].sort(key=lambda n: sum(rank[r] for r in n.reads if r in rank)
                        / max(1, sum(r in rank for r in n.reads)))
        rank.update((n.name, i) for i, n in enumerate(columns[d]))
    tallest = max(len(c) for c in columns.values())
    where = {n.name: (2.6 * d, (tallest - 1) / 2 + (len(c) - 1) / 2 - i)  # columns centred
             for d, c in columns.items() for i, n in enumerate(c)}
    width, height = 2.6 * len(columns), 1.0 * tallest
    fig, ax = plt.subplots(figsize=(max(3.0, width), max(1.6, height + 0.4)), dpi=110)
    box_w, box_h = 1.9, 0.7
    for n in nodes:
        x, y = where[n.name]
        ax.add_patch(FancyBboxPatch((x - box_w / 2, y - box_h / 2), box_w, box_h,
                                    boxstyle="round,pad=0.02", lw=0.8, ec="#555555",
                                    fc=COLOURS.get(n.state, OTHER)))
        what = f"{n.kind} · {n.family}" if n.family else n.kind
        ax.text(x, y + 0.17, n.name, ha="center", va="center", fontsize=7.5, weight="bold")
        ax.text(x, y - 0.1, f"{what}\n{n.state}" + (f" ({n.note})" if n.note else ""),
                ha="center", va="center", fontsize=6.5)
        for r in n.reads:
            if r in where:
                (x0, y0), (x1, y1) = where[r], where[n.name]
                ax.add_patch(FancyArrowPatch((x0 + box_w / 2, y0), (x1 - box_w / 2, y1),
                                             arrowstyle="-|>", mutation_scale=9, lw=0.8,
                                             color="#555555"))
    ax.set_xlim(-box_w / 2 - 0.2, width - 2.6 + box_w / 2 + 0.2)
    ax.set_ylim(-box_h / 2 - 0.2, tallest - 1 + box_h / 2 + 0.2)
    ax.axis("off")
    fig.tight_layout()
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return picture

