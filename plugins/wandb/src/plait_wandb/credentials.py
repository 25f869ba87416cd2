"""Whether W&B credentials are configured, read the way wandb reads them (environment,
then the netrc file that `wandb login` writes), without importing wandb or going online."""
from __future__ import annotations

import configparser
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_BASE_URL = "https://api.wandb.ai"


def _netrc_path() -> Path:
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix = Path("~/.netrc").expanduser()
    windows = Path("~/_netrc").expanduser()
    return windows if not unix.exists() and windows.exists() else unix


def base_url() -> str:
    """The W&B server: $WANDB_BASE_URL, else the one `wandb login --host` saved, else W&B's."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    folder = Path(os.environ.get("WANDB_CONFIG_DIR") or Path("~/.config/wandb").expanduser())
    settings = configparser.ConfigParser()
    try:
        settings.read(folder / "settings")
        return settings.get("default", "base_url", fallback=DEFAULT_BASE_URL) or DEFAULT_BASE_URL
    except (configparser.Error, OSError):
        return DEFAULT_BASE_URL


def api_key_configured() -> bool:
    """True when WANDB_API_KEY (or an identity-token file) is set or the netrc file holds a
    key for the W&B server."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(base_url()).netloc
    try:
        entry = netrc.netrc(str(_netrc_path())).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])
