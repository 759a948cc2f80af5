"""The reference case itself is checked against numerical integration, so the other tests rest on it."""
import numpy as np
from scipy import integrate

from helpers import make_case


def test_closed_form_log_z_matches_quadrature():
    case = make_case(dim=2, seed=3)

    def tilted(y, x):
        z = np.array([x, y])
        base = np.exp(-0.5 * np.sum(((z - case.loc) / case.scale) ** 2)) / (2 * np.pi * np.prod(case.scale))
        return np.exp(-case.energy_np(z)) * base

    z_num, _ = integrate.dblquad(tilted, -12, 12, -12, 12, epsabs=1e-11)
    assert abs(np.log(z_num) - case.log_z) < 1e-6
    m1, _ = integrate.dblquad(lambda y, x: x * tilted(y, x), -12, 12, -12, 12, epsabs=1e-11)
    assert abs(m1 / z_num - case.mean[0]) < 1e-6


def test_ula_covariance_tends_to_target_as_step_shrinks():
    case = make_case()
    errors = [np.abs(case.ula_cov(h) - case.cov).max() for h in (0.8, 0.4, 0.2, 0.1)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 0.02
