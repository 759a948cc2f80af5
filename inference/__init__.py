"""Inference and learning in whole models with energy-tilted priors: guides, handlers, kernels, objectives and
the training loop (``tilted_priors.inference.pyro`` and ``tilted_priors.inference.numpyro``, the same public names), and backend-free chain
diagnostics (``tilted_priors.inference.diagnostics``)."""
__all__: list[str] = []
