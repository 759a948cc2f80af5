"""Inference and learning in whole models with energy-tilted priors: guides, handlers, kernels, objectives and
the training loop (``inference.pyro`` and ``inference.numpyro``, the same public names), and backend-free chain
diagnostics (``inference.diagnostics``)."""
__all__: list[str] = []
