"""A small GPT-2 (built from a config: no download) trained for a few steps, with every op of
chosen steps logged to Weights & Biases (offline) by lens_callbacks.

    python examples/transformer_wandb.py [--out out/transformer] [--steps 20] [--quick]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import wandb
from transformers import GPT2Config, GPT2LMHeadModel

from lens_callbacks import Lens, WandbWriter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/transformer"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a few steps, for the smoke test")
    args = parser.parse_args()
    steps = 3 if args.quick else args.steps
    os.environ.setdefault("WANDB_MODE", "offline")  # a local run folder: `wandb sync` uploads it
    os.environ.setdefault("WANDB_SILENT", "true")
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = wandb.init(project="lens-examples", dir=str(args.out), config={"steps": steps})
    # Only the attention and MLP projections (their modules are named c_attn, c_proj, c_fc).
    lens = Lens(model, layers=lambda layer: (layer.module or "").endswith(("c_attn", "c_fc")),
                every_n_steps=max(1, steps // 2), writers=[WandbWriter(run, graph=False)])
    for step in range(steps):
        tokens = torch.randint(0, 256, (4, 32))
        with lens.step(step):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
        run.log({"loss": loss.item()}, step=step)
        optimizer.step()
        optimizer.zero_grad()
    lens.close()
    run.finish()
    print(f"W&B offline run in {args.out / 'wandb'}:")
    print("  lens/activations/..., lens/gradients/..., lens/statistics, lens-capture artifacts")


if __name__ == "__main__":
    main()
