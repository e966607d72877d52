#!/usr/bin/env python
"""Write a random-weights checkpoint of configs/tiny/v1-tiny.yaml (the no-download demo's base model).

Usage: python tools/make_tiny_checkpoint.py OUT.ckpt [--seed 0]

Every UNet weight is perturbed by 0.05 N(0,1) so that the zero-initialised output layers are not
zero and the text prompt actually changes the prediction.
"""
import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.checkpoint import save_state_dict  # noqa: E402
from ldm.util import instantiate_from_config, load_model_config  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=str(REPO / "configs/tiny/v1-tiny.yaml"))
    args = p.parse_args()
    torch.manual_seed(args.seed)
    model = instantiate_from_config(load_model_config(args.config))
    with torch.no_grad():
        for t in model.model.parameters():
            t.add_(0.05 * torch.randn_like(t))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
