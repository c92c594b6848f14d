"""Simulated pipeline bubbles vs DESIGN §5's formulas for PP = 4, 8, 16, and the timeline PNGs.

    .venv/bin/python bench/pipeline_plan.py --img-dir docs/img

Prints Markdown tables (the ones in docs/pipeline.md) for three cost settings: the default
F=1, B=2, W=1, F&B=F+B (Figure 5's equal cells), the same with a real compute overlap (F&B=2.5), and
one that breaks the DualPipe formula's condition F = B - W, to show by how much. Writes one timeline
PNG per schedule at PP=8 with 20 micro-batches (Figure 5's setting) and DualPipe at the paper's PP=16.
No model runs here: this is the schedule simulator (dsv3.parallel.pipeline.plan); bench/pipeline.py will time
the real runtime.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dsv3.parallel.pipeline.plan import Costs, simulate, summarize
from dsv3.parallel.pipeline.schedule import SCHEDULES, build_schedule
from dsv3.parallel.pipeline.timeline import draw_timeline

GRID = {4: (8, 16), 8: (16, 20, 32), 16: (32, 64)}  # PP -> micro-batch counts valid for every schedule
COST_SETTINGS = [
    ("F=1, B=2, W=1, F&B=F+B=3 (the formulas' conditions hold)", Costs()),
    ("F=1, B=2, W=1, F&B=2.5 (compute overlap inside F&B; conditions hold)", Costs(fb=2.5)),
    ("F=1, B=2.5, W=0.5, F&B=3.5 (F != B-W: the DualPipe formula is not exact)", Costs(1, 2.5, 0.5)),
]


def table(costs: Costs) -> str:
    rows = [
        "| PP | chunks | schedule | devices | makespan | bubble (sim) | bubble (formula) | bubble / makespan "
        "| bubble vs 1F1B | params/device | peak activations (sim / table) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for pp, chunk_counts in GRID.items():
        for chunks in chunk_counts:
            base = None
            for name in SCHEDULES:
                s = summarize(simulate(build_schedule(name, pp, chunks), costs))
                base = base or s.bubble
                rows.append(
                    f"| {pp} | {chunks} | {name} | {s.ranks} | {s.makespan:g} | {s.bubble:g} | {s.formula:g} "
                    f"| {s.bubble_ratio:.1%} | {s.bubble / base:.2f}x | {s.params_per_device}x "
                    f"| {s.peak_activations} / {s.table_activations} |"
                )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img-dir", default=None, help="write the timeline PNGs here (e.g. docs/img)")
    args = p.parse_args()
    for title, costs in COST_SETTINGS:
        print(f"### {title}\n\n{table(costs)}\n")
    if args.img_dir:
        img = Path(args.img_dir)
        for name in SCHEDULES:
            print("wrote", draw_timeline(simulate(build_schedule(name, 8, 20)), img / f"pipeline-{name}.png"))
        print(
            "wrote",
            draw_timeline(simulate(build_schedule("dualpipe", 16, 32)), img / "pipeline-dualpipe-pp16.png"),
        )


if __name__ == "__main__":
    main()
