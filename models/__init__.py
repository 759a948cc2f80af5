"""Ready generators, data sets, metrics and the command line (``python -m tilted_priors``)."""
from tilted_priors._extras import require

require("models", "tilted_priors.models")

__all__: list[str] = []
