"""Shared argument lists for the end-to-end tests."""


def tiny_job(tmp_path, *extra: str, steps: int = 6) -> list[str]:
    """A fast llama3 job: the tiny debug flavor on the embedded corpus."""
    return [
        "--config", "llama3_debugmodel",
        "--model.flavor", "debugmodel_tiny",
        "--training.steps", str(steps),
        "--training.seq_len", "64",
        "--training.local_batch_size", "4",
        "--lr_scheduler.warmup_steps", "2",
        "--metrics.progress", "off",
        "--job.dump_folder", str(tmp_path),
        *extra,
    ]
