"""Backend-free bookkeeping of persistent chains (the ``Persistent`` sampler of each backend builds on it)."""
from __future__ import annotations

__all__ = ["PersistentBase"]


class PersistentBase:
    """Holds a sampler and the last positions of its chains; each backend adds ``run``.

    ``_start(init)`` gives the positions a call should start from: the stored ones when they exist and have
    ``init``'s shape, else ``init``.
    """

    def __init__(self, sampler):
        if not hasattr(sampler, "run") or isinstance(sampler, PersistentBase):
            raise TypeError(f"Persistent wraps a ShortRunLangevin or MALA sampler, got {sampler!r}")
        self.sampler = sampler
        self.state = None

    @property
    def steps(self) -> int:
        return self.sampler.steps

    @property
    def step_size(self) -> float:
        return self.sampler.step_size

    def reset(self) -> None:
        """Forget the stored chains; the next call starts from its ``init``."""
        self.state = None

    def _start(self, init):
        return self.state if self.state is not None and tuple(self.state.shape) == tuple(init.shape) else init

    def __repr__(self) -> str:
        return f"Persistent({self.sampler!r})"
