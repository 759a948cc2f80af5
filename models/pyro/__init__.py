"""Ready Pyro generators: ``lebm`` (LEBM and its Gaussian-prior baseline) and evaluation (``evaluate``)."""
from models.pyro import evaluate, lebm

__all__ = ["lebm", "evaluate"]
