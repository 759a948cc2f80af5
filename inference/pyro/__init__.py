"""Inference for Pyro models with energy-tilted priors: guides, effect handlers and (soon) the training loop.

The same public names as the other backend (``inference.pyro`` / ``inference.numpyro``).
"""
from inference.pyro import handlers
from inference.pyro.guides import ShortRunPosterior

__all__ = ["ShortRunPosterior", "handlers"]
