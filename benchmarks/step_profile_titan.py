"""torchtitan's side of ``step_profile.py``: one ``vs_torchtitan`` job on torchtitan 0.3.0
(built as ``vs_torchtitan_titan.py`` builds it), its steady steps under the torch profiler
with the same phases (forward, loss, backward, optimizer with clipping) and summary.

    PYTHON_WITH_TORCHTITAN step_profile_titan.py JOB.json ASSETS_DIR RESULT.json

Started by ``step_profile.py``; the environment gives the threads and the step counts.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import vs_torchtitan_titan as titan  # noqa: E402 - sets torchtitan up for a CPU job on import
from step_profile import _Regions, summarize  # noqa: E402


def main() -> None:
    import torch
    from torchtitan.config import ConfigManager
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.tools.logging import init_logger

    job_file, assets, result_file = sys.argv[1:4]
    warmup, steps = int(os.environ["STEP_PROFILE_WARMUP"]), int(os.environ["STEP_PROFILE_STEPS"])
    torch.set_num_threads(int(os.environ["VS_TORCHTITAN_THREADS"]))
    os.environ[titan.JOB_ENV], os.environ[titan.ASSETS_ENV] = job_file, assets
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29531")):
        os.environ.setdefault(name, value)
    sys.modules.setdefault("vs_torchtitan_titan", titan)
    init_logger()
    config = ConfigManager().parse_args(["--module", "vs_torchtitan_titan", "--config", "benchmark_job"])
    trainer = config.build()

    regions = _Regions()
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    step_seconds: list[float] = []
    model = trainer.model_parts[0]
    model.register_forward_pre_hook(lambda module, args: regions.enter("forward"), prepend=True)
    loss_fn = trainer.loss_fn

    def loss_in_region(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        regions.exit("forward")
        regions.enter("loss")
        result = loss_fn(*args, **kwargs)
        regions.exit("loss")
        regions.enter("backward")
        return result

    trainer.loss_fn = loss_in_region
    clip = dist_utils.clip_grad_norm_

    def clip_in_region(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        regions.exit("backward")
        regions.enter("optimizer")
        return clip(*args, **kwargs)

    dist_utils.clip_grad_norm_ = clip_in_region
    lr_step = trainer.lr_schedulers.step

    def lr_step_in_region(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = lr_step(*args, **kwargs)
        regions.exit("optimizer")
        return result

    trainer.lr_schedulers.step = lr_step_in_region
    train_step = trainer.train_step

    def profiled_step(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        step = trainer.step  # torchtitan counts the step before calling train_step
        if step == warmup + 1:
            prof.start()
        start = time.perf_counter()
        result = train_step(*args, **kwargs)
        if step > 1 and not warmup < step <= warmup + steps:
            step_seconds.append(time.perf_counter() - start)
        if step == warmup + steps:
            prof.stop()
        return result

    trainer.train_step = profiled_step
    titan.train_and_close(trainer)
    summary = summarize(prof, steps, int(os.environ.get("STEP_PROFILE_TOP", "12")))
    Path(result_file).write_text(json.dumps({"summary": summary, "step_ms": statistics.median(step_seconds) * 1e3}))


if __name__ == "__main__":
    main()
