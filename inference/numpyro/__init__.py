"""Inference for NumPyro models with energy-tilted priors: guides, effect handlers, MCMC kernels and training.

The same public names as the other backend (``tilted_priors.inference.pyro`` / ``tilted_priors.inference.numpyro``).
"""
from tilted_priors._extras import require

require("numpyro", "tilted_priors.inference.numpyro")

from tilted_priors.inference.numpyro import handlers
from tilted_priors.inference.numpyro.coupling import CouplingBound, coupling_bound
from tilted_priors.inference.numpyro.guides import AmortizedGuide, RefinedGuide, ShortRunPosterior
from tilted_priors.inference.numpyro.kernels import Langevin
from tilted_priors.inference.numpyro.likelihood import LogLikelihoodEstimate, log_likelihood
from tilted_priors.inference.numpyro.mixture import RecursiveMixtureELBO, RecursiveMixtureGuide, fit_recursive
from tilted_priors.inference.numpyro.modules import register_module
from tilted_priors.inference.numpyro.nce import NoiseContrastive
from tilted_priors.inference.numpyro.posthoc import PosthocResult, posthoc_tilt
from tilted_priors.inference.numpyro.reparam import FlowBackbone
from tilted_priors.inference.numpyro.stein import stein_discrepancy, stein_scores
from tilted_priors.inference.numpyro.train import FitResult, TrainingDiverged, TrainingHealth, fit
from tilted_priors.inference.checkpoints import CheckpointError
from tilted_priors.inference.files import RunFolderLocked

__all__ = ["ShortRunPosterior", "AmortizedGuide", "RefinedGuide", "RecursiveMixtureGuide", "RecursiveMixtureELBO",
           "fit_recursive", "NoiseContrastive", "FlowBackbone", "Langevin", "fit", "FitResult", "TrainingDiverged",
           "TrainingHealth", "CheckpointError", "RunFolderLocked",
           "handlers", "register_module", "log_likelihood", "LogLikelihoodEstimate",
           "posthoc_tilt", "PosthocResult", "stein_scores", "stein_discrepancy",
           "coupling_bound", "CouplingBound"]
