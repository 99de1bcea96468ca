"""Command-line pieces the GPU benchmark scripts share: which model, which dtype, where."""
from __future__ import annotations

import argparse
import os

import torch


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_dir", required=True)
    p.add_argument("--make", choices=("tiny", "full"), help="write a random model there first if missing")
    p.add_argument("--dtype", default="bf16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def ensure_model(args: argparse.Namespace) -> None:
    """--make: write a random model of that size to --model_dir unless one is there."""
    if args.make and not os.path.isfile(os.path.join(args.model_dir, "flow.pt")):
        from light_tts.tools.make_random_model import make_random_model
        make_random_model(args.model_dir, args.make, seed=0)
