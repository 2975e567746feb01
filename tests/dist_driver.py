"""Entry point for the torchrun tests: `torchrun --nproc_per_node N tests/dist_driver.py <json args>`."""

import json
import sys

args = json.loads(sys.argv[1])
kind = args.pop("kind")
if kind == "precompute":
    from fpo.precompute import precompute

    precompute(progress=False, **args)
elif kind == "train":
    from fpo.train import train

    train(args, log=lambda *a, **k: None)
