"""Inference for Pyro models with energy-tilted priors: guides, effect handlers, MCMC kernels and the training loop.

The same public names as the other backend (``tilted_priors.inference.pyro`` / ``tilted_priors.inference.numpyro``).
"""
from tilted_priors._extras import require

require("pyro", "tilted_priors.inference.pyro")

from tilted_priors.inference.pyro import handlers
from tilted_priors.inference.pyro.coupling import CouplingBound, coupling_bound
from tilted_priors.inference.pyro.guides import AmortizedGuide, RefinedGuide, ShortRunPosterior
from tilted_priors.inference.pyro.kernels import Langevin
from tilted_priors.inference.pyro.likelihood import LogLikelihoodEstimate, log_likelihood
from tilted_priors.inference.pyro.mixture import RecursiveMixtureELBO, RecursiveMixtureGuide, fit_recursive
from tilted_priors.inference.pyro.modules import register_module
from tilted_priors.inference.pyro.nce import NoiseContrastive
from tilted_priors.inference.pyro.posthoc import PosthocResult, posthoc_tilt
from tilted_priors.inference.pyro.reparam import FlowBackbone
from tilted_priors.inference.pyro.stein import stein_discrepancy, stein_scores
from tilted_priors.inference.pyro.train import FitResult, TrainingDiverged, TrainingHealth, fit
from tilted_priors.inference.checkpoints import CheckpointError
from tilted_priors.inference.files import RunFolderLocked

__all__ = ["ShortRunPosterior", "AmortizedGuide", "RefinedGuide", "RecursiveMixtureGuide", "RecursiveMixtureELBO",
           "fit_recursive", "NoiseContrastive", "FlowBackbone", "Langevin", "fit", "FitResult", "TrainingDiverged",
           "TrainingHealth", "CheckpointError", "RunFolderLocked",
           "handlers", "register_module", "log_likelihood", "LogLikelihoodEstimate",
           "posthoc_tilt", "PosthocResult", "stein_scores", "stein_discrepancy",
           "coupling_bound", "CouplingBound"]
