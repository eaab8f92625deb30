"""The reference for a distributed daemon: plain mlx-lm on the same sharded model.

Run as every rank of a ring group (MLX_RANK, MLX_HOSTFILE set):
`python dist_ref.py JOB.json OUT.json`. JOB holds `model` (a directory), `contexts` (lists
of token ids) and `max_tokens`. Each context is generated greedily from scratch with
`mlx_lm.stream_generate` on `mlx_lm.utils.sharded_load`'s model; rank 0 writes the
generated token ids (EOS excluded, as the daemon reports them) to OUT.
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.utils import sharded_load


def main(job_path: str, out_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    model, tokenizer = sharded_load(job["model"])
    outputs = []
    for context in job["contexts"]:
        responses = stream_generate(
            model, tokenizer, mx.array(context), max_tokens=job["max_tokens"]
        )
        # The last response carries the finish reason, with the last token ("length")
        # or the EOS ("stop"), which the daemon does not count as generated.
        outputs.append([r.token for r in responses if r.finish_reason in (None, "length")])
    if mx.distributed.init().rank() == 0:
        with open(out_path, "w") as f:
            json.dump(outputs, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
