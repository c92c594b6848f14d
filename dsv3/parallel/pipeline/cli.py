"""`dsv3 pipeline-plan`: simulate schedules, print their timelines and the bubble/memory table, draw PNGs.

The command sits apart from the simulator (plan.py) and the drawing (timeline.py), so that neither
of those imports the other's consumer: plan <- timeline <- cli.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dsv3.parallel.pipeline.plan import Costs, format_summaries, simulate, summarize
from dsv3.parallel.pipeline.schedule import SCHEDULES, ScheduleError, build_schedule
from dsv3.parallel.pipeline.timeline import draw_timeline, text_timeline


def pipeline_plan_main(argv: list[str] | None = None) -> int:
    """`dsv3 pipeline-plan`: simulate schedules, print timelines and the bubble/memory table, draw PNGs."""
    import argparse

    p = argparse.ArgumentParser(
        prog="dsv3 pipeline-plan",
        description="Simulate pipeline-parallel schedules (DESIGN §5): per-rank timeline, bubble, memory.",
    )
    p.add_argument("--schedule", choices=[*SCHEDULES, "all"], default="dualpipe")
    p.add_argument("--pp", type=int, default=8, help="model stages (dualpipev runs them on pp/2 devices)")
    p.add_argument("--chunks", type=int, default=20, help="micro-batches per step (dualpipe: half per end)")
    p.add_argument("--f", type=float, default=1.0, help="forward time of one stage")
    p.add_argument("--b", type=float, default=2.0, help="full backward time")
    p.add_argument("--w", type=float, default=1.0, help="weight-gradient part of the backward")
    p.add_argument("--fb", type=float, default=None, help="overlapped F&B time (default f + b)")
    p.add_argument("--latency", type=float, default=0.0, help="p2p latency between ranks")
    p.add_argument("--out", default=None, help="PNG path (with --schedule all: one file per schedule)")
    p.add_argument("--no-text", action="store_true", help="skip the text timelines")
    args = p.parse_args(argv)

    names = list(SCHEDULES) if args.schedule == "all" else [args.schedule]
    try:
        costs = Costs(args.f, args.b, args.w, args.fb)
        schedules = [build_schedule(n, args.pp, args.chunks) for n in names]
        sims = [simulate(s, costs, args.latency) for s in schedules]
    except ScheduleError as e:
        print(f"dsv3 pipeline-plan: error: {e}", file=sys.stderr)
        return 2
    for sim in sims:
        if not args.no_text:
            s = sim.schedule
            print(
                f"== {s.name}: {s.num_stages} stages on {s.num_ranks} ranks, {s.num_microbatches} chunks =="
            )
            print(text_timeline(sim), end="\n\n")
        if args.out:
            out = Path(args.out)
            if len(sims) > 1:
                out = out.with_name(f"{out.stem}-{sim.schedule.name}{out.suffix or '.png'}")
            print(f"wrote {draw_timeline(sim, out)}")
    print(f"costs: F={costs.f:g} B={costs.b:g} W={costs.w:g} F&B={costs.pair:g} latency={args.latency:g}")
    print(format_summaries([summarize(sim, args.latency) for sim in sims]))
    return 0
