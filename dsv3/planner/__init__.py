"""Capacity and cost planning at the paper's scale (issue 18): hardware profiles, the per-layer
cost model, and the `dsv3 plan serve|train|calibrate` commands. See docs/planning.md."""
