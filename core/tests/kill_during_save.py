"""Runs toy-model jobs that die by SIGKILL at chosen points of a checkpoint save (for
``test_fault_injection``): ``python kill_during_save.py CASES_JSON``, each case
``{"folder", "steps", "point", "save", "delay"}``; prints each child's wait status.

This process imports torch but runs no tensor operation: each case runs in a child forked
from it, so the children start at once and fork no thread pool."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

import torch

from plait.checkpoint import checksums, layout
from toy_model import ToyModelPlugin, toy_config, train_toy


def job_config(folder: str, steps: int) -> Any:
    config = toy_config(folder, steps=steps)
    config.checkpoint.interval = 1
    config.checkpoint.keep_latest_k = 2
    return config


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, save: int, delay: float) -> None:
    """Make this process kill itself at ``point`` of its ``save``-th checkpoint save (for
    "mid_file": its ``save``-th tensor write), or ``delay`` seconds after starting ("timer")."""
    if point == "timer":
        threading.Timer(delay, die).start()
        return
    calls = {"count": 0}

    def when_due(original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls["count"] += 1
            if calls["count"] == save:
                die()
            return original(*args, **kwargs)
        return wrapper

    if point == "mid_file":  # half of the ``save``-th tensor written (of all saves) reaches its file
        original_save = torch.save

        def half_written(obj: Any, stream: Any, *args: Any, **kwargs: Any) -> None:
            calls["count"] += 1
            if calls["count"] == save and hasattr(stream, "write"):
                import io

                buffer = io.BytesIO()
                original_save(obj, buffer, *args, **kwargs)
                stream.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                stream.flush()
                die()
            original_save(obj, stream, *args, **kwargs)

        torch.save = half_written
    elif point == "before_data":
        checksums.ChecksummingWriter.write_data = when_due(checksums.ChecksummingWriter.write_data)
    elif point == "before_metadata":
        checksums.ChecksummingWriter.finish = when_due(checksums.ChecksummingWriter.finish)
    elif point == "before_manifest":
        checksums.os.replace = when_due(checksums.os.replace)
    elif point == "before_publish":
        layout.os.rename = when_due(layout.os.rename)
    elif point == "before_purge":
        layout.purge = when_due(layout.purge)
    elif point == "mid_delete":
        layout.shutil.rmtree = when_due(layout.shutil.rmtree)
    else:
        raise ValueError(point)


def run_case(case: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    arm(case["point"], case["save"], case["delay"])
    train_toy(job_config(case["folder"], case["steps"]), ToyModelPlugin())


def main() -> None:
    from plait.data import build_tokenizer
    from plait.data.embedded import embedded_corpus

    embedded_corpus(), build_tokenizer("")  # read once here, not in every child
    statuses = []
    for case in json.loads(sys.argv[1]):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run_case(case)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        statuses.append(status)
    print(json.dumps(statuses))


if __name__ == "__main__":
    main()
