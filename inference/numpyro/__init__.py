"""Inference for NumPyro models with energy-tilted priors: guides, effect handlers and the training loop.

The same public names as the other backend (``inference.pyro`` / ``inference.numpyro``).
"""
from inference.numpyro import handlers
from inference.numpyro.guides import ShortRunPosterior
from inference.numpyro.train import FitResult, TrainingDiverged, fit

__all__ = ["ShortRunPosterior", "fit", "FitResult", "TrainingDiverged", "handlers"]
