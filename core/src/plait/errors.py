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
