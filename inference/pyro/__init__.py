"""Inference for Pyro models with energy-tilted priors: guides, effect handlers, MCMC kernels and the training loop.

The same public names as the other backend (``inference.pyro`` / ``inference.numpyro``).
"""
from inference.pyro import handlers
from inference.pyro.guides import AmortizedGuide, RefinedGuide, ShortRunPosterior
from inference.pyro.kernels import Langevin
from inference.pyro.mixture import RecursiveMixtureELBO, RecursiveMixtureGuide, fit_recursive
from inference.pyro.reparam import FlowBackbone
from inference.pyro.train import FitResult, TrainingDiverged, fit

__all__ = ["ShortRunPosterior", "AmortizedGuide", "RefinedGuide", "RecursiveMixtureGuide", "RecursiveMixtureELBO",
           "fit_recursive", "FlowBackbone", "Langevin", "fit", "FitResult", "TrainingDiverged", "handlers"]
