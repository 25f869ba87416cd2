"""The errors plait reports to users. Each carries one message that says what is wrong
and how to fix it; the CLI prints it and exits with status 2 (config) or 1 (runtime)."""


class PlaitError(Exception):
    """Base class: the message is meant for the user, no traceback needed."""

    exit_code = 1


class ConfigError(PlaitError):
    """Bad configuration or plugin selection: raised before any work starts."""

    exit_code = 2


class PluginError(ConfigError):
    """A plugin cannot be enabled (not installed, fails to import, version mismatch...)."""


class CheckpointError(PlaitError):
    """A checkpoint is corrupt, partial or incompatible; earlier checkpoints stay usable."""


class TrainingDivergedError(PlaitError):
    """Loss became NaN or inf; the last good checkpoint is left intact."""


class DataError(PlaitError):
    """A row of the training data cannot be used (found while training; the run saves a
    checkpoint of the last finished step before it stops)."""


class Interrupted(PlaitError):
    """SIGINT or SIGTERM outside the training loop (which saves and stops on its own):
    start-up, plan, convert. Exits with 128 + the signal's number, as shells report it."""

    def __init__(self, signum: int) -> None:
        import signal

        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} before the run could finish; checkpoints saved before are intact: "
                         "run the same command again to start or resume")
        self.exit_code = 128 + signum


def describe_os_error(error: OSError) -> str:
    """What the file system said, in words: disk full, read-only, no permission."""
    import errno

    where = f" ({error.filename})" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full{where}: free space or choose another folder, then run the same command again"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"no permission to write{where} ({error.strerror}): choose a folder you can write"
    return f"{error.strerror or error}{where}"
