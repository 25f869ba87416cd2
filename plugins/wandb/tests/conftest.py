import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # wandb_files


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb writes only under tmp_path, quietly, and sees no credentials of this machine."""
    folder = tmp_path / "wandb_dir"
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_RUN_ID",
                 "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    return folder

