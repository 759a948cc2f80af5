"""Ready NumPyro generators: ``lebm`` (LEBM and its Gaussian-prior baseline) and evaluation (``evaluate``)."""
from models.numpyro import evaluate, lebm

__all__ = ["lebm", "evaluate"]
