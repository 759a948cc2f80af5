"""LEBM's training update written by hand, shared by the benchmarks that time the library against it
(``lebm.py``, ``update_overhead.py``): posterior ULA from N(0, I) on log p(x, z), prior ULA from N(0, I) on
-E(z) + log N(z), then one optimiser step on -(log p(x | z+) - E(z+) + E(z-)), with a Normal likelihood of
standard deviation ``sd`` around ``G(z)``. ``post`` and ``prior`` are ``(steps, step_size)``."""
from __future__ import annotations

__all__ = ["pyro_update", "numpyro_update"]


def pyro_update(E, G, x, latent_dim: int, sd: float, post: tuple, prior: tuple, optimizer):
    """A zero-argument callable running one update of the torch modules ``E`` and ``G`` on the tensor ``x`` with
    the torch optimiser ``optimizer`` (built over both modules' parameters)."""
    import pyro.distributions as dist
    import torch

    n = x.shape[0]

    def ula(logp, z, steps, h):
        for _ in range(steps):
            z = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(logp(z), z)
            z = z + 0.5 * h * h * g + h * torch.randn_like(z)
        return z.detach()

    def update():
        lik = lambda z: dist.Normal(G(z), sd).log_prob(x).sum()
        z_pos = ula(lambda z: lik(z) - E(z).sum() - 0.5 * (z * z).sum(), torch.randn(n, latent_dim), *post)
        z_neg = ula(lambda z: -E(z).sum() - 0.5 * (z * z).sum(), torch.randn(n, latent_dim), *prior)
        loss = -(lik(z_pos) - E(z_pos).sum() + E(z_neg).sum())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return update


def numpyro_update(E, G, x, latent_dim: int, sd: float, post: tuple, prior: tuple, optimizer,
                   unroll: tuple = (1, 1)):
    """A zero-argument callable running one jitted update of the Flax NNX modules ``E`` and ``G`` on the array
    ``x`` with the optax ``optimizer`` (blocking until done). ``unroll``: the posterior's and the prior's scan
    unrolling. Call it once to compile."""
    import jax
    import optax
    from flax import nnx

    (e_def, e_params), (g_def, g_params) = nnx.split(E), nnx.split(G)
    params = {"e": e_params, "g": g_params}
    state = [params, optimizer.init(params), jax.random.PRNGKey(1)]
    n = x.shape[0]

    def ula(logp, z, key, steps, h, unroll):
        grad = jax.grad(logp)

        def body(z, k):
            return z + 0.5 * h * h * grad(z) + h * jax.random.normal(k, z.shape), None

        return jax.lax.stop_gradient(jax.lax.scan(body, z, jax.random.split(key, steps), unroll=unroll)[0])

    @jax.jit
    def step(params, opt_state, key):
        keys = jax.random.split(key, 5)
        energy = lambda p, z: nnx.merge(e_def, p["e"])(z)
        lik = lambda p, z: jax.scipy.stats.norm.logpdf(x, nnx.merge(g_def, p["g"])(z), sd).sum()
        z_pos = ula(lambda z: lik(params, z) - energy(params, z).sum() - 0.5 * (z * z).sum(),
                    jax.random.normal(keys[0], (n, latent_dim)), keys[1], *post, unroll[0])
        z_neg = ula(lambda z: -energy(params, z).sum() - 0.5 * (z * z).sum(),
                    jax.random.normal(keys[2], (n, latent_dim)), keys[3], *prior, unroll[1])
        loss, grads = jax.value_and_grad(
            lambda p: -(lik(p, z_pos) - energy(p, z_pos).sum() + energy(p, z_neg).sum()))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, keys[4], loss

    def update():
        p, o, k = state
        p, o, k, loss = step(p, o, k)
        state[:] = [p, o, k]
        loss.block_until_ready()

    return update
