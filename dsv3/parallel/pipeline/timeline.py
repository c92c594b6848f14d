"""Draw a simulated pipeline schedule: a text timeline for the terminal and a PNG (matplotlib, Agg).

One row per rank, time to the right. Micro-batches are numbered within their direction, like the
DeepSeek-V3 report's Figure 5. A second colour family (lower-case letters in text) marks DualPipe's
reverse direction (micro-batches entering at the last rank) and DualPipeV's second chunk (the up leg
of the V). An overlapped F&B is one box with a black border, forward on top and backward below.
"""

from __future__ import annotations

from pathlib import Path

from dsv3.parallel.pipeline.plan import Simulation
from dsv3.parallel.pipeline.schedule import BACKWARD, FORWARD, INPUT_GRAD, WEIGHT_GRAD, Task

# kind -> (family 0, family 1) colours: forwards light, backwards dark, weight gradients green
_COLORS = {
    FORWARD: ("#8ecae6", "#ffd166"),
    BACKWARD: ("#2a6f97", "#e07a1f"),
    INPUT_GRAD: ("#5b9bd5", "#f0a04b"),  # mid tone, hatched: the input-gradient half of a split backward
    WEIGHT_GRAD: ("#8fd694", "#3d9a50"),
}
_NAMES = {FORWARD: "F forward", BACKWARD: "B full backward", INPUT_GRAD: "I input-gradient backward",
          WEIGHT_GRAD: "W weight gradient"}  # fmt: skip
_SECOND = {"dualpipe": "reverse direction", "dualpipev": "second chunk (up leg)"}


def _family(sim: Simulation, task: Task) -> int:
    """0 or 1: which colour family (DualPipe: direction; DualPipeV: chunk of the V) draws `task`."""
    return sim.schedule.chunk_of(task.stage, task.direction) if sim.schedule.name in _SECOND else 0


def _local_mb(sim: Simulation, task: Task) -> int:
    """Micro-batch index within its direction (DualPipe numbers each direction from 0)."""
    return task.mb - task.direction * (sim.schedule.num_microbatches // 2)


def _label(sim: Simulation, task: Task) -> str:
    text = f"{task.kind}{_local_mb(sim, task)}"
    return text.lower() if _family(sim, task) else text


def _unit(sim: Simulation) -> float:
    return min(iv.end - iv.start for row in sim.timeline for iv in row)


def text_timeline(sim: Simulation, cell: int = 3) -> str:
    """The timeline as text: `cell` characters per unit of the cheapest op, '.' where a rank idles."""
    unit = _unit(sim)
    lines = []
    for rank, row in enumerate(sim.timeline):
        chars: list[str] = []
        for iv in row:
            start, width = round(iv.start / unit * cell), max(1, round((iv.end - iv.start) / unit * cell))
            chars += ["."] * (start - len(chars))
            label = "&".join(_label(sim, t) for t in iv.op.tasks)
            chars += list(("[" + label).ljust(width)[:width])
        lines.append(f"rank {rank:>2} |{''.join(chars)}")
    legend = "F forward, B full backward, I input-gradient backward, W weight gradient; [a&b] overlapped F&B"
    if sim.schedule.name in _SECOND:
        legend += f"; lower case: {_SECOND[sim.schedule.name]}"
    return "\n".join([*lines, legend])


def draw_timeline(sim: Simulation, path: str | Path, title: str | None = None) -> Path:
    """Write the timeline of `sim` as a PNG at `path` and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"hatch.color": "white"}):
        return _draw(sim, Path(path), title)


def _draw(sim: Simulation, path: Path, title: str | None) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    sched, span, unit = sim.schedule, sim.makespan, _unit(sim)
    width_in = min(30.0, max(8.0, 0.22 * span / unit))
    fig, ax = plt.subplots(figsize=(width_in, 0.5 * sched.num_ranks + 1.8), dpi=110)
    font = 7 if width_in * unit / span > 0.15 else 5
    used = set()

    def box(x: float, y: float, w: float, h: float, task: Task) -> None:
        fam = _family(sim, task)
        used.add((task.kind, fam))
        color, hatch = _COLORS[task.kind][fam], "////" if task.kind == INPUT_GRAD else None
        ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="white", lw=0.6, hatch=hatch))
        dark = task.kind == BACKWARD or (task.kind == WEIGHT_GRAD and fam)
        label = ax.text(x + w / 2, y + h / 2, str(_local_mb(sim, task)), ha="center", va="center",
                        fontsize=font, color="white" if dark else "black")  # fmt: skip
        if hatch:  # keep the number readable over the hatching
            label.set_bbox({"facecolor": color, "edgecolor": "none", "pad": 0.5})

    overlapped = False
    for rank, row in enumerate(sim.timeline):
        y = sched.num_ranks - 1 - rank  # rank 0 on top
        for iv in row:
            w = iv.end - iv.start
            if len(iv.op.tasks) == 1:
                box(iv.start, y + 0.05, w, 0.9, iv.op.tasks[0])
                continue
            overlapped = True
            fwd, bwd = iv.op.tasks
            box(iv.start, y + 0.5, w, 0.45, fwd)
            box(iv.start, y + 0.05, w, 0.45, bwd)
            ax.add_patch(Rectangle((iv.start, y + 0.05), w, 0.9, fill=False, edgecolor="black", lw=1.2))

    ax.set_xlim(0, span)
    ax.set_ylim(0, sched.num_ranks)
    ax.set_yticks([sched.num_ranks - 0.5 - r for r in range(sched.num_ranks)])
    ax.set_yticklabels([f"rank {r}" for r in range(sched.num_ranks)])
    ax.set_xlabel("time")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    legend = [
        Patch(
            facecolor=_COLORS[kind][fam],
            hatch="////" if kind == INPUT_GRAD else None,
            label=_NAMES[kind] + (f", {_SECOND[sched.name]}" if fam else ""),
        )  # fmt: skip
        for kind in _COLORS
        for fam in (0, 1)
        if (kind, fam) in used
    ]
    if overlapped:
        legend.append(Patch(facecolor="white", edgecolor="black", label="black border: overlapped F&B"))
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.9 / (sched.num_ranks + 1)),
              ncol=min(len(legend), 5), fontsize=8, frameon=False)  # fmt: skip
    bubble = f"makespan {span:g}, bubble {sim.bubble():g}"
    costs = f"F={sim.costs.f:g} B={sim.costs.b:g} W={sim.costs.w:g} F&B={sim.costs.pair:g}"
    ax.set_title(
        title
        or f"{sched.name}: {sched.num_stages} stages on {sched.num_ranks} ranks, {sched.num_microbatches} "
        f"micro-batches ({costs}; {bubble})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
