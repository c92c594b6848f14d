"""Expert parallelism: the routed experts sharded over ranks, tokens moved by all-to-all (DESIGN §5).

moe.py       the expert-parallel MoE layer (dispatch/combine overrides of the MoE's halves),
             `parallelize_experts`, gathering the full state for checkpoints
dispatch.py  the one-hop and two-hop (inter-node, then intra-node) token exchanges
"""
