"""Expert-parallel load balancer (EPLB, DESIGN §8): load statistics, placement planners, replica routing.

- `stats`: sliding-window per-layer, per-expert token counts; file format.
- `planner`: `rebalance` / `plan`, hierarchical and global policies (improved greedy).
- `incremental`: re-plan moving at most M experts per layer.
- `dynamic`: H hosted / A active experts per GPU, active set and token split per step.
- `routing`: `ReplicatedMoE`, a MoE run on physical replicas (equal to the unreplicated layer).
- `report`: the `dsv3 plan eplb` command (text summary and heatmap).
"""

from dsv3.infer.eplb.placement import Placement, balancedness, moved_experts
from dsv3.infer.eplb.planner import plan, rebalance
from dsv3.infer.eplb.stats import ExpertLoadStats

__all__ = ["ExpertLoadStats", "Placement", "balancedness", "moved_experts", "plan", "rebalance"]
