"""Plugin module: light at import, the model is imported when the spec is registered."""
from plait import hookimpl

PLAIT_API_VERSION = 1
PROVIDES = ("model:tinylm",)
REQUIRES = ()
DESCRIPTION = "tinylm: a tiny causal MLP-mixer language model (third-party example)"


@hookimpl
def plait_register_models(register):
    from plait_tinylm.model import SPEC

    register(SPEC)
