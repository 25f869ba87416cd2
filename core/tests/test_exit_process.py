"""A rank of a distributed run leaves without interpreter finalization, output flushed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import atexit, logging, sys
from plait.cli import exit_process
atexit.register(lambda: print("finalized"))
logging.basicConfig(stream=sys.stderr)
logging.getLogger("x").warning("logged")
print("unterminated line", end="")
exit_process(3)
"""


@pytest.mark.parametrize(("world_size", "finalized"), [("2", False), ("1", True)])
def test_exit_process_keeps_output_and_code(world_size, finalized):
    env = {**os.environ, "WORLD_SIZE": world_size}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout.startswith("unterminated line")
    assert "logged" in proc.stderr
    assert ("finalized" in proc.stdout) is finalized
