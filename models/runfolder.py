"""What a run folder holds, and its checks: ``config.json`` validated field by field, and weights files whose
manifest must match the configuration that loads them. Backend-free.

Examples
--------
>>> config = {"method": "lebm", "backend": "numpyro", "data": "mnist", "image_shape": [28, 28, 1],
...           "latent_dim": 16, "ngf": 16, "seed": 0, "batch_size": 100, "lr_energy": 1e-4, "lr_generator": 1e-3,
...           "posterior_steps": 20, "posterior_step_size": 0.1}
>>> check_config(config, "run/config.json") == config
True
>>> check_config({**config, "ngf": "wide"}, "run/config.json")
Traceback (most recent call last):
...
tilted_priors.inference.checkpoints.CheckpointError: run/config.json: 'ngf' is 'wide', not a positive integer. \
Fix it by hand (as the run was trained), or train the run again.
"""
from __future__ import annotations

import json
from numbers import Integral, Real
from pathlib import Path

from tilted_priors.inference.checkpoints import CheckpointError

__all__ = ["MANIFEST", "WEIGHTS_FIX", "NETWORK_KEYS", "check_config", "read_config", "manifest_of",
           "check_weights_config", "network_config"]

#: The key of the manifest inside a weights file.
MANIFEST = "__manifest__"
WEIGHTS_FIX = ("Give the weights file of this run (as `train` wrote it), or train the run again; check that "
               "config.json is the run's own")
#: The settings that fix the networks' shapes and values: a weights file is loaded only with the same ones.
NETWORK_KEYS = ("method", "backend", "image_shape", "latent_dim", "ngf")
_CONFIG_FIX = "Fix it by hand (as the run was trained), or train the run again."


def _positive_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool) and v > 0


def _positive_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and v == v and 0 < v < float("inf")


_FIELDS = {
    "method": (lambda v: v in ("lebm", "abp"), "one of 'lebm', 'abp'"),
    "backend": (lambda v: v in ("pyro", "numpyro"), "one of 'pyro', 'numpyro'"),
    "data": (lambda v: isinstance(v, str) and bool(v), "'mnist' or the path of a data file"),
    "image_shape": (lambda v: isinstance(v, list) and len(v) == 3 and all(_positive_int(d) for d in v),
                    "a list [height, width, channels] of positive integers"),
    "latent_dim": (_positive_int, "a positive integer"),
    "ngf": (_positive_int, "a positive integer"),
    "seed": (lambda v: isinstance(v, Integral) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "batch_size": (_positive_int, "a positive integer"),
    "lr_energy": (_positive_number, "a positive number"),
    "lr_generator": (_positive_number, "a positive number"),
    "posterior_steps": (_positive_int, "a positive integer"),
    "posterior_step_size": (_positive_number, "a positive number"),
}
_OPTIONAL = {"epochs": (lambda v: v is None or _positive_int(v), "a positive integer or null"),
             "num_steps": (lambda v: v is None or _positive_int(v), "a positive integer or null"),
             "steps": (lambda v: v is None or isinstance(v, Integral) and v >= 0, "an integer >= 0"),
             "train_seconds": (lambda v: isinstance(v, Real), "a number")}


def check_config(config, path) -> dict:
    """``config`` (a run's ``config.json`` as parsed) if every field is present and valid, else
    :class:`~tilted_priors.inference.checkpoints.CheckpointError` naming the field, its value and what it should be."""
    if not isinstance(config, dict):
        raise CheckpointError(path, f"it holds a {type(config).__name__}, not a JSON object of settings", _CONFIG_FIX)
    missing = [k for k in _FIELDS if k not in config]
    if missing:
        raise CheckpointError(path, f"it lacks the setting(s) {', '.join(map(repr, missing))}", _CONFIG_FIX)
    for table in (_FIELDS, _OPTIONAL):
        for key, (ok, what) in table.items():
            if key in config and not ok(config[key]):
                raise CheckpointError(path, f"{key!r} is {config[key]!r}, not {what}", _CONFIG_FIX)
    return config


def read_config(path) -> dict:
    """Read and check a run's ``config.json`` (see :func:`check_config`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointError(path.parent, "it is not a run folder: it has no config.json",
                              "Give the folder that `tilted-priors train --out` wrote") from None
    try:
        config = json.loads(text)
    except ValueError as err:
        raise CheckpointError(path, f"it is not valid JSON ({err})", _CONFIG_FIX) from None
    return check_config(config, path)


def network_config(config: dict) -> dict:
    """The settings of ``config`` that fix the networks (:data:`NETWORK_KEYS`)."""
    return {k: config[k] for k in NETWORK_KEYS if k in config}


def manifest_of(path, raw) -> dict:
    """The manifest stored in a weights file (a JSON string, or a 0-d array of one), or ``CheckpointError``."""
    if raw is None:
        raise CheckpointError(path, "it has no manifest: it was not written by this package's save_params (or by a "
                                    "version before manifests)", WEIGHTS_FIX)
    try:
        return json.loads(str(raw))
    except ValueError:
        raise CheckpointError(path, "its manifest is damaged", WEIGHTS_FIX) from None


def check_weights_config(path, manifest: dict, config: dict | None) -> None:
    """With ``config`` given, refuse a weights file written for other network settings."""
    if config is None:
        return
    saved = manifest.get("config") or {}
    wanted = network_config(config)
    diff = [f"{k}={saved.get(k)!r} (config.json: {wanted[k]!r})" for k in wanted if saved.get(k) != wanted[k]]
    if diff:
        raise CheckpointError(path, "it was written for other settings than config.json's: " + ", ".join(diff),
                              "Put config.json back as the run was trained, or train the run again")
