"""``python -m tilted_priors``: the command line, the same as the ``tilted-priors`` console script.

The command line is part of the ready models (:mod:`tilted_priors.models.cli`, the ``models`` extra); this entry
point only forwards to it, so the prior itself still imports nothing from :mod:`tilted_priors.models`.
"""
import sys

__all__: list[str] = []

if __name__ == "__main__":
    from tilted_priors.models.cli import main

    sys.exit(main())
