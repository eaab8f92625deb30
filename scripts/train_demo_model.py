"""Train the embedded default model (a ~1 M-parameter llama) on the synthetic corpus, with MLX.

The result is what ships in `daemon/default_model/`: `config.json`, `model.safetensors`
(float32, ~4 MB), the tokenizer files and `training.json` (settings, parameter count, final
loss, seconds). Deterministic given the seed. With the defaults it took 45 minutes
on one CPU core (MLX's CPU backend); `--steps 50` is a quick smoke run.

Usage: python scripts/train_demo_model.py [--out DIR] [--steps N] [--seed N] [--samples]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from agentkv.daemon.engine.demo_model import SHIPPED_MODEL_DIR, TrainSettings, train_demo_model

SAMPLE_PROMPTS = ("Yesterday I", "Every day she", "Tomorrow the children", "Right now Tom")


def main() -> int:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL_DIR, help="model directory")
    parser.add_argument("--seed", type=int, default=0)
    for field in dataclasses.fields(TrainSettings):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, field.name)), default=None)
    parser.add_argument("--samples", action="store_true", help="print a few continuations")
    args = parser.parse_args()
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainSettings)
        if getattr(args, f.name) is not None
    }
    settings = dataclasses.replace(defaults, **overrides)
    print(f"training the demo model into {args.out}: {settings}")
    record = train_demo_model(args.out, seed=args.seed, settings=settings, dtype="float32")
    print(json.dumps(record, indent=2))
    if args.samples:
        _print_samples(args.out)
    return 0


def _print_samples(model_dir: Path) -> None:
    """A few seeded continuations, to eyeball what the model learned."""
    import mlx.core as mx
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(model_dir))
    for prompt in SAMPLE_PROMPTS:
        mx.random.seed(0)
        text = generate(model, tokenizer, prompt, max_tokens=40, sampler=make_sampler(0.7))
        print(f"{prompt!r} -> {text!r}")


if __name__ == "__main__":
    sys.exit(main())
