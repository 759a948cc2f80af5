"""Ready generators, data sets, metrics and the command line (``python -m models``)."""
__all__: list[str] = []
