"""Record per-layer expert loads of a trained checkpoint on held-out data, for `bench/eplb.py --loads`.

Runs the validation split of the run's data through the model (main MoE layers only; the MTP
block's layer is skipped, as deployments drop or separately serve it) and saves the counts as an
ExpertLoadStats file (DESIGN §8: "statistics over a window").

    python bench/record_loads.py --ckpt runs/demo/checkpoints/step_00000500 --out docs/data/small_loads.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dsv3.checkpoint import load_pretrained
from dsv3.data.dataset import DataConfig, prepare_data
from dsv3.data.loader import val_batches
from dsv3.infer.eplb.stats import ExpertLoadStats
from dsv3.model.moe import MoE


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="training checkpoint directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", type=int, default=32)
    args = ap.parse_args()
    ckpt = Path(args.ckpt)
    saved = json.loads((ckpt / "trainer.json").read_text())["config"]
    data = prepare_data(DataConfig(data=saved["data"], tokenizer=str(ckpt), seed=saved["seed"],
                                   val_fraction=saved["val_fraction"], fim_rate=saved["fim_rate"]))  # fmt: skip
    model = load_pretrained(ckpt).eval()
    main_moe = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
    stats = ExpertLoadStats(len(main_moe), model.config.n_routed_experts, window=args.batches)
    for batch in val_batches(data.val, saved["seq_len"], saved["micro_batch"], max_batches=args.batches):
        model(batch[:, :-1])
        stats.push([m.last_counts for m in main_moe])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    stats.save(args.out)
    loads = stats.loads().float()
    maxvio = ((loads.max(1).values - loads.mean(1)) / loads.mean(1)).tolist()
    print(f"{args.out}: {len(main_moe)} layers x {model.config.n_routed_experts} experts, "
          f"{int(loads.sum())} routed token copies; MaxVio per layer {[round(v, 3) for v in maxvio]}")  # fmt: skip


if __name__ == "__main__":
    main()
