"""Data-parallel ``fit`` on NumPyro (``devices=``): the same training on two devices as on one, checkpoints that
move between device counts, MCMC chains across devices, and the errors for bad ``devices``.

JAX fixes its device count when it starts, so each multi-device test runs a script in a fresh Python process with
two virtual CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``) that prints its results as JSON.
Tolerance: float32 results of the two layouts differ only by the order of the sums over the batch (the
cross-device reduction), a few ulps after a few updates; they are compared with ``rtol=1e-5, atol=1e-5``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("numpyro")

RTOL = ATOL = 1e-5

# A small LEBM: z_i ~ EnergyTiltedNormal(EnergyMLP) per datum (the default Contrastive normalizer, a short prior
# chain), x_i ~ N(z_i W, 0.3^2 I); the guide runs short-run Langevin chains on the posterior. ``quadratic_model``
# is the same with a quadratic energy (a param), quicker to compile.
MODEL = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist
from tilted_priors.inference.numpyro import ShortRunPosterior, fit, register_module
from tilted_priors.numpyro import EnergyMLP, EnergyTiltedNormal, ShortRunLangevin

assert len(jax.devices()) == 2, jax.devices()
N, BATCH = 16, 8
ENERGY = EnergyMLP(2, 8, rngs=0)
X = np.random.default_rng(0).normal(size=(N, 3)).astype(np.float32)


def model(x, index=None):
    energy = register_module("energy", ENERGY)
    w = numpyro.param("w", 0.5 * jnp.ones((2, 3)))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", EnergyTiltedNormal(energy, jnp.zeros(2), jnp.ones(2),
                                                   sampler=ShortRunLangevin(2, 0.4)))
        numpyro.sample("x", dist.Normal(z @ w, 0.3).to_event(1), obs=x)


def quadratic_model(x, index=None):
    a = numpyro.param("energy_a", jnp.full(2, 0.1))
    w = numpyro.param("w", 0.5 * jnp.ones((2, 3)))
    with numpyro.plate("data", x.shape[0]):
        z = numpyro.sample("z", EnergyTiltedNormal(lambda z: (a * z ** 2).sum(-1), jnp.zeros(2), jnp.ones(2),
                                                   sampler=ShortRunLangevin(2, 0.4)))
        numpyro.sample("x", dist.Normal(z @ w, 0.3).to_event(1), obs=x)


def train(num_steps, devices, persistent=False, batch_size=BATCH, model=model, **kwargs):
    guide = (ShortRunPosterior(model, steps=2, step_size=0.1, init="persistent", num_data=N) if persistent
             else ShortRunPosterior(model, steps=2, step_size=0.1))
    return fit(model, guide, X, num_steps=num_steps, batch_size=batch_size, lr={"energy": 1e-2, "": 2e-2},
               progress=False, pass_index=persistent, devices=devices, **kwargs)


def report(**results):  # as JSON: a fit result as its parameters, losses and steps, other values as they are
    out = {name: {"params": {k: np.asarray(v).tolist() for k, v in r.params.items()}, "losses": r.losses.tolist(),
                  "steps": r.steps} if hasattr(r, "params") else r for name, r in results.items()}
    print(json.dumps(out))
"""


def run_script(body: str, timeout: float = 120) -> dict:
    """Run ``MODEL + body`` in a fresh Python with two virtual CPU devices; its last line of output, as JSON."""
    # the device count first, whatever else the environment's XLA_FLAGS hold
    flags = ("--xla_force_host_platform_device_count=2 " + os.environ.get("XLA_FLAGS", "")).strip()
    env = {**os.environ, "XLA_FLAGS": flags, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", MODEL + textwrap.dedent(body)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_same_params(got: dict, want: dict, what: str) -> None:
    assert sorted(got["params"]) == sorted(want["params"]), what
    assert got["steps"] == want["steps"], what
    for name in want["params"]:
        np.testing.assert_allclose(np.asarray(got["params"][name]), np.asarray(want["params"][name]),
                                   rtol=RTOL, atol=ATOL, err_msg=f"{what}: {name}")
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=RTOL, err_msg=f"{what}: losses")


@pytest.mark.slow  # a fresh Python with two devices, compiling
def test_two_devices_train_as_one():
    """5 updates of the LEBM on two devices (each takes 4 of the 8 data of a batch) give the parameters of one
    device; the state stays replicated on both, and a batch size the devices do not divide is refused."""
    out = run_script("""
        split = train(5, devices=2)
        leaves = jax.tree_util.tree_leaves(split.state)
        replicated = all(len(leaf.sharding.device_set) == 2 and leaf.sharding.is_fully_replicated
                         for leaf in leaves)
        try:
            train(1, devices=2, batch_size=7)
        except ValueError as err:
            error = str(err)
        report(split=split, single=train(5, devices=None), replicated=replicated, error=error)
        """)
    assert_same_params(out["split"], out["single"], "devices=2 vs devices=None")
    assert out["split"]["steps"] == 5
    assert not np.allclose(out["single"]["params"]["w"], 0.5)  # trained: not a comparison of two initial states
    assert out["replicated"]
    assert "batch_size=7" in out["error"] and "2 devices" in out["error"] and "multiple of 2" in out["error"]


@pytest.mark.slow  # a fresh Python with two devices, compiling
@pytest.mark.parametrize("first, then", [(2, None), (None, 2)], ids=["two-devices-then-one", "one-device-then-two"])
def test_resume_across_device_counts(tmp_path, first, then):
    """3 updates on two devices resumed to 6 on one (and the other way) equal a run of 6 that was never interrupted
    (with persistent chains: the per-datum mutable state travels in the checkpoint too)."""
    out = run_script(f"""
        kwargs = dict(persistent=True, model=quadratic_model)
        straight = train(6, devices=None, **kwargs)
        train(3, devices={first}, out={str(tmp_path)!r}, **kwargs)
        resumed = train(6, devices={then}, out={str(tmp_path)!r}, resume=True, **kwargs)
        report(straight=straight, resumed=resumed, history=len(resumed.history))
        """)
    assert_same_params(out["resumed"], out["straight"], f"{first or 1} device(s), then {then or 1}")
    assert out["history"] == 6


@pytest.mark.slow  # a fresh Python with two devices, compiling
def test_mcmc_chains_in_parallel_across_devices():
    """Two Langevin chains, one per device (``chain_method="parallel"``), draw what they draw one after the other."""
    out = run_script("""
        from numpyro.infer import MCMC
        from tilted_priors.inference.numpyro import Langevin

        def target(x):
            prior = EnergyTiltedNormal(lambda z: 0.5 * (z ** 2).sum(-1), jnp.zeros(2), jnp.ones(2))
            z = numpyro.sample("z", prior)
            numpyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

        draws, devices = {}, {}
        for method in ("parallel", "sequential"):
            mcmc = MCMC(Langevin(target, step_size=0.3), num_warmup=30, num_samples=30, num_chains=2,
                        chain_method=method, progress_bar=False)
            mcmc.run(jax.random.PRNGKey(1), jnp.ones(2))
            z = mcmc.get_samples(group_by_chain=True)["z"]
            draws[method], devices[method] = np.asarray(z).tolist(), len(z.sharding.device_set)
        print(json.dumps({"draws": draws, "devices": devices}))
        """)
    assert out["devices"] == {"parallel": 2, "sequential": 1}
    parallel, sequential = np.asarray(out["draws"]["parallel"]), np.asarray(out["draws"]["sequential"])
    assert parallel.shape == (2, 30, 2)
    np.testing.assert_allclose(parallel, sequential, rtol=0, atol=1e-6)
    assert not np.allclose(parallel[0], parallel[1])  # two chains, not one drawn twice


# --- bad devices: in this process, whatever its device count --------------------------------------------------
def _fit(devices, **kwargs):
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer.autoguide import AutoNormal

    from tilted_priors.inference.numpyro import fit

    def model(x):
        loc = numpyro.sample("loc", dist.Normal(0.0, 10.0))
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("obs", dist.Normal(loc, 1.0), obs=x)

    x = np.random.default_rng(0).normal(size=8).astype(np.float32)
    return fit(model, AutoNormal(model), x, num_steps=2, batch_size=4, progress=False, devices=devices, **kwargs)


def test_bad_devices(tmp_path):
    import jax
    from jax.sharding import Mesh

    available = len(jax.devices())
    with pytest.raises(ValueError, match=r"devices=0: give at least 1 device"):
        _fit(0)
    with pytest.raises(ValueError, match=rf"devices={available + 1}, but {available} device\(s\) available.*"
                                         r"XLA_FLAGS=--xla_force_host_platform_device_count=N"):
        _fit(available + 1, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written
    for bad in ("gpu", 1.5, True, {"a": 1}):
        with pytest.raises(TypeError, match="devices must be None, a number of devices, a list of jax devices or a "
                                            "jax.sharding.Mesh with one axis"):
            _fit(bad)
    with pytest.raises(TypeError, match="must hold jax devices"):
        _fit(["cpu"])
    with pytest.raises(ValueError, match="the list is empty"):
        _fit([])
    with pytest.raises(ValueError, match="more than once"):
        _fit([jax.devices()[0]] * 2)
    with pytest.raises(ValueError, match=r"the Mesh must have one axis.*got axes \('a', 'b'\)"):
        _fit(Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("a", "b")))


def test_one_device_forms_agree():
    """``devices=1`` and a one-axis Mesh of one device train as ``devices=None`` (a list of one device: in the
    docstring of ``fit``)."""
    import jax
    from jax.sharding import Mesh

    want = _fit(None).params
    for devices in (1, Mesh(np.array(jax.devices()[:1]), ("data",))):
        got = _fit(devices).params
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=f"{devices}: {name}")
