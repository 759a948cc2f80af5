"""Inference for NumPyro models with energy-tilted priors: guides, effect handlers, MCMC kernels and training.

The same public names as the other backend (``inference.pyro`` / ``inference.numpyro``).
"""
from inference.numpyro import handlers
from inference.numpyro.guides import AmortizedGuide, RefinedGuide, ShortRunPosterior
from inference.numpyro.kernels import Langevin
from inference.numpyro.mixture import RecursiveMixtureELBO, RecursiveMixtureGuide, fit_recursive
from inference.numpyro.reparam import FlowBackbone
from inference.numpyro.train import FitResult, TrainingDiverged, fit

__all__ = ["ShortRunPosterior", "AmortizedGuide", "RefinedGuide", "RecursiveMixtureGuide", "RecursiveMixtureELBO",
           "fit_recursive", "FlowBackbone", "Langevin", "fit", "FitResult", "TrainingDiverged", "handlers"]
