"""Inference for NumPyro models with energy-tilted priors: guides, effect handlers and (soon) the training loop.

The same public names as the other backend (``inference.pyro`` / ``inference.numpyro``).
"""
from inference.numpyro import handlers
from inference.numpyro.guides import ShortRunPosterior

__all__ = ["ShortRunPosterior", "handlers"]
