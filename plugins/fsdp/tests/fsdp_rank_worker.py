"""One rank of a multi-process test run: ``python fsdp_rank_worker.py OUT.json ARGS...``.

The launcher sets the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT); rank 0
writes the losses and gradient norms of the run to OUT.json.
"""
import json
import os
import sys

import torch


def main() -> None:
    torch.set_num_threads(1)
    from plait.cli import train

    out, argv = sys.argv[1], sys.argv[2:]
    result = train(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump({"losses": result.losses, "grad_norms": result.grad_norms, "last_step": result.last_step}, f)


if __name__ == "__main__":
    main()
