"""The twin contract: the Pyro and NumPyro halves of every package have the same public names and signatures.

For each module that exists on both backends (``tilted_priors.{pyro,numpyro}.X``,
``tilted_priors.inference.{pyro,numpyro}.X``, ``tilted_priors.models.{pyro,numpyro}.X`` and the three packages
themselves) the test compares

- the public names (``__all__``), and which submodules exist;
- for every public function: its parameters (names, order, kind, defaults; not annotations, which name each
  backend's array type);
- for every public class: its constructor's parameters and those of every public method the project's classes
  define (a method that overrides the backend framework's own API — ``torch.nn.Module.forward``, NumPyro's
  ``Distribution.sample(key, ...)``, the MCMC kernel protocols, ... — follows that framework and is not compared),
  and whether a name is a method on one side and a property on the other.

Each difference must be listed in :data:`ALLOWED` with a one-line reason, and each entry of :data:`ALLOWED` must
still match a difference (so the list shrinks when a difference is removed). A second test checks that NumPyro
spells its PRNG key argument ``rng_key`` everywhere.
"""
from __future__ import annotations

import fnmatch
import importlib
import inspect
import pkgutil
from typing import Iterator

import pytest

PACKAGES = [("tilted_priors.pyro", "tilted_priors.numpyro"),
            ("tilted_priors.inference.pyro", "tilted_priors.inference.numpyro"),
            ("tilted_priors.models.pyro", "tilted_priors.models.numpyro")]

#: Intended differences: ``(module, member, difference) -> reason``. ``module`` is the twin's name with the
#: backend as ``*`` (e.g. ``tilted_priors.*.samplers``), ``member`` the public name (``Class.method``,
#: ``Class.__init__``, ``__all__`` for the names list, ``<submodules>`` for the package's modules); both may be
#: :mod:`fnmatch` patterns. ``difference`` is the exact text the test reports.
ALLOWED: dict[tuple[str, str, str], str] = {
    # --- randomness ---------------------------------------------------------------------------------------------
    ("*", "*", "param rng_key only on numpyro"):
        "NumPyro takes explicit PRNG keys; Pyro draws from torch's global generator (pyro.set_rng_seed)",
    ("*", "*.__init__", "param rngs only on numpyro"):
        "Flax NNX modules take their initialisation seed (rngs); torch modules draw from the global generator",
    # --- networks: torch modules vs Flax NNX modules ----------------------------------------------------------------
    ("*", "*.torch_state_dict", "only on numpyro"):
        "NumPyro's weight exchange with the torch twin (a Pyro network is a torch module: state_dict)",
    ("*", "*.load_torch_state_dict", "only on numpyro"):
        "NumPyro's weight exchange with the torch twin (a Pyro network is a torch module: load_state_dict)",
    ("tilted_priors.models.*.vae_ebm", "VAEModel.load_torch_state_dicts", "only on numpyro"):
        "loads the torch twin's encoder/decoder/energy weights into the NNX modules (Pyro: load_state_dict)",
    ("tilted_priors.*.energies", "EnergyMLP.__init__", "param activation default: pyro GELU, numpyro _exact_gelu"):
        "the same exact GELU: a torch module class on Pyro, a JAX function on NumPyro",
    ("tilted_priors.models.*.generators", "Generator.__init__", "param param_dtype only on numpyro"):
        "NNX fixes a module's parameter dtype when it is built; a torch module changes it later with .to(dtype)",
    ("tilted_priors.models.*", "*.with_params", "only on numpyro"):
        "NumPyro trains param sites in the SVI state, so trained weights go back into a copy of the model; "
        "Pyro trains the torch modules in place",
    # --- samplers and normalizers -------------------------------------------------------------------------------
    ("tilted_priors.*.samplers", "*.__init__", "param unroll only on numpyro"):
        "unrolling of the compiled jax.lax.scan chain; Pyro runs a Python loop",
    # --- inference ----------------------------------------------------------------------------------------------
    ("tilted_priors.inference.*.train", "fit", "param device only on pyro"):
        "Pyro places the data's minibatches on a torch device (one per process under torchrun); NumPyro places "
        "arrays by sharding (devices=)",
    ("tilted_priors.inference.*.train", "fit", "param devices only on numpyro"):
        "NumPyro shards each minibatch over several devices in one process; Pyro runs one process per device "
        "under torchrun, with the same fit call",
    ("tilted_priors.inference.*.guides", "ShortRunPosterior.__init__", "param name only on numpyro"):
        "NumPyro keeps persistent chains in a numpyro.mutable site of the SVI state, named by name",
    ("tilted_priors.inference.*.guides", "ShortRunPosterior.__init__", "param compile_log_joint only on pyro"):
        "Pyro's chain replays a traced graph of the model's log joint (off for debugging the model); NumPyro's "
        "is always compiled by jax.jit",
    ("tilted_priors.inference.*.guides", "RefinedGuide.__init__", "param compile_log_joint only on pyro"):
        "as ShortRunPosterior's: NumPyro's chain is always compiled by jax.jit",
    ("tilted_priors.inference.*.kernels", "Langevin.__init__", "param compile_potential only on pyro"):
        "Pyro's kernel replays a traced graph of the potential (off to run the model at every step); NumPyro's "
        "potential is always compiled by jax.jit",
    ("tilted_priors.inference.*.guides", "ShortRunPosterior.state_dict", "only on pyro"):
        "Pyro's guide holds its persistent chains and saves them itself; NumPyro's live in the SVI state",
    ("tilted_priors.inference.*.guides", "ShortRunPosterior.load_state_dict", "only on pyro"):
        "Pyro's guide holds its persistent chains and restores them itself; NumPyro's live in the SVI state",
    ("tilted_priors.inference.*.mixture", "RecursiveMixtureELBO.__init__", "param vectorize_particles only on numpyro"):
        "NumPyro's ELBO option (vmap over particles); the Pyro loss draws its particles in a loop",
    ("tilted_priors.inference.*.mixture", "RecursiveMixtureELBO.loss_and_grads", "only on pyro"):
        "Pyro's SVI calls ELBO.loss_and_grads; NumPyro's SVI differentiates ELBO.loss itself",
    ("tilted_priors.inference.*.nce", "NoiseContrastive.loss_and_grads", "only on pyro"):
        "Pyro's SVI calls ELBO.loss_and_grads; NumPyro's SVI differentiates ELBO.loss itself",
    ("tilted_priors.inference.*.kernels", "__all__", "name LangevinKernelState only on numpyro"):
        "NumPyro's MCMC kernels return their state as a pytree; Pyro's kernel keeps its state on the object",
    ("tilted_priors.inference.*.kernels", "__all__", "name LangevinAdaptState only on numpyro"):
        "NumPyro's MCMC kernels return their state as a pytree; Pyro's kernel keeps its state on the object",
    **{("tilted_priors.inference.*.kernels", "Langevin.__init__", f"param {name} only on pyro"):
       "an option of Pyro's own HMC/NUTS kernels (pyro.infer.HMC), which NumPyro's kernels do not have"
       for name in ("transforms", "max_plate_nesting", "jit_compile", "jit_options", "ignore_jit_warnings",
                    "min_stepsize", "max_stepsize")},
    ("tilted_priors.inference.*.train", "fit", "param init_params only on numpyro"):
        "NumPyro's parameters live in the SVI state, started from init_params; Pyro's live in the param store",
    # --- models -------------------------------------------------------------------------------------------------
    **{("tilted_priors.models.*.ntebm", "NTEBM.__init__", f"param {name} only on {side}"):
       "the flow is torch modules on Pyro, a parameter pytree with stax apply functions on NumPyro (NTEBM is "
       "made by build(), whose signature is shared)"
       for name, side in (("transforms", "pyro"), ("flow", "pyro"), ("flow_params", "numpyro"),
                          ("arn_applies", "numpyro"), ("permutation", "numpyro"))},
    ("tilted_priors.models.*.ntebm", "NTEBM.transform", "param params only on numpyro"):
        "NumPyro builds the flow at any parameter value (jitted fitting); Pyro's flow is its torch modules",
    ("tilted_priors.models.*.ntebm", "NTEBM.flow_dist", "param params only on numpyro"):
        "NumPyro builds the flow at any parameter value (jitted fitting); Pyro's flow is its torch modules",
    ("tilted_priors.models.*.ntebm", "build", "param flow default: pyro 'spline', numpyro 'iaf'"):
        "the flow libraries differ: Pyro has coupling flows, NumPyro's only invertible flow is the IAF",
    ("tilted_priors.models.*.rme", "RMEModel.__init__", "param global_logits only on numpyro"):
        "NumPyro's model is an immutable snapshot of the SVI params; Pyro's global logits stay in the param store",
    ("tilted_priors.models.*.rme", "RMEModel.proposal", "kind: pyro method, numpyro property"):
        "NumPyro's is a jax Partial (a pytree argument of compiled code); rme.proposal(x) reads the same on both",
}


# --- collecting the differences ---------------------------------------------------------------------------------
def _label(pyro_name: str) -> str:
    parts = pyro_name.split(".")
    return ".".join("*" if p == "pyro" else p for p in parts)


def _twin(pyro_name: str) -> str:
    """The NumPyro twin's name of a module name (itself for a backend-free module)."""
    return ".".join("numpyro" if p == "pyro" else p for p in pyro_name.split("."))


def _twin_modules() -> list[tuple[str, str]]:
    pairs = []
    for pyro_pkg, numpyro_pkg in PACKAGES:
        pairs.append((pyro_pkg, numpyro_pkg))
        a, b = importlib.import_module(pyro_pkg), importlib.import_module(numpyro_pkg)
        names_a = {m.name for m in pkgutil.iter_modules(a.__path__)}
        names_b = {m.name for m in pkgutil.iter_modules(b.__path__)}
        pairs += [(f"{pyro_pkg}.{n}", f"{numpyro_pkg}.{n}") for n in sorted(names_a & names_b)
                  if not n.startswith("_")]  # a private module's names are its backend's machinery
    return pairs


def _is_project(cls: type) -> bool:
    return (getattr(cls, "__module__", "") or "").startswith("tilted_priors")


def _framework_names(cls: type) -> set[str]:
    """Names defined by a non-project class in ``cls``'s MRO (the backend framework's API)."""
    return {n for k in cls.__mro__ if not _is_project(k) for n in vars(k)}


def _members(cls: type) -> dict[str, str]:
    """Public methods and properties introduced by the project's classes: ``{name: "method" | "property"}``."""
    framework = _framework_names(cls)
    out = {}
    for k in reversed(cls.__mro__):
        if not _is_project(k):
            continue
        for name, value in vars(k).items():
            if name.startswith("_") or name in framework:
                continue
            if isinstance(value, property):
                out[name] = "property"
            elif inspect.isfunction(value) or isinstance(value, (staticmethod, classmethod)):
                out[name] = "method"
    return out


def _constructor(cls: type):
    init = cls.__init__
    if any(_is_project(k) and "__init__" in vars(k) for k in cls.__mro__):
        sig = inspect.signature(init)
        return sig.replace(parameters=list(sig.parameters.values())[1:])  # drop self
    return inspect.signature(cls)


def _default(value) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    if isinstance(value, tuple):  # torch.Size([]) == ()
        value = tuple(value)
    if callable(value) and hasattr(value, "__name__"):  # functions, classes: compare by name
        return value.__name__
    return repr(value)


def _compare_signatures(sig_a: inspect.Signature, sig_b: inspect.Signature) -> Iterator[str]:
    pa, pb = sig_a.parameters, sig_b.parameters
    for name in pa:
        if name not in pb:
            yield f"param {name} only on pyro"
    for name in pb:
        if name not in pa:
            yield f"param {name} only on numpyro"
    common_a = [n for n in pa if n in pb]
    common_b = [n for n in pb if n in pa]
    if common_a != common_b:
        yield f"param order: pyro {common_a}, numpyro {common_b}"
    for name in common_a:
        a, b = pa[name], pb[name]
        if a.kind != b.kind:
            yield f"param {name} kind: pyro {a.kind.description}, numpyro {b.kind.description}"
        if _default(a.default) != _default(b.default):
            yield f"param {name} default: pyro {_default(a.default)}, numpyro {_default(b.default)}"


def _signature(obj):
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature
        return None


def _compare_callables(member: str, a, b) -> Iterator[tuple[str, str]]:
    sig_a, sig_b = _signature(a), _signature(b)
    if sig_a is not None and sig_b is not None:
        for d in _compare_signatures(sig_a, sig_b):
            yield member, d


def _compare_classes(name: str, a: type, b: type) -> Iterator[tuple[str, str]]:
    for d in _compare_signatures(_constructor(a), _constructor(b)):
        yield f"{name}.__init__", d
    ma, mb = _members(a), _members(b)
    for m in sorted(set(ma) | set(mb)):
        member = f"{name}.{m}"
        kind_a = ma.get(m) or ("attribute" if hasattr(a, m) else None)
        kind_b = mb.get(m) or ("attribute" if hasattr(b, m) else None)
        if kind_a == "property" and kind_b is None or kind_b == "property" and kind_a is None:
            continue  # a property may be a plain instance attribute on the other side (not visible on the class)
        if kind_a is None or kind_b is None:
            if (kind_a or kind_b) != "attribute":
                yield member, f"only on {'pyro' if kind_b is None else 'numpyro'}"
            continue
        if kind_a != kind_b:
            if "attribute" not in (kind_a, kind_b):
                yield member, f"kind: pyro {kind_a}, numpyro {kind_b}"
            continue
        if kind_a == "method":
            yield from _compare_callables(member, inspect.getattr_static(a, m).__get__(None, a)
                                          if isinstance(inspect.getattr_static(a, m), (staticmethod, classmethod))
                                          else getattr(a, m),
                                          inspect.getattr_static(b, m).__get__(None, b)
                                          if isinstance(inspect.getattr_static(b, m), (staticmethod, classmethod))
                                          else getattr(b, m))


def _differences(pyro_name: str, numpyro_name: str) -> list[tuple[str, str]]:
    """``[(member, difference)]`` between the two twin modules."""
    a, b = importlib.import_module(pyro_name), importlib.import_module(numpyro_name)
    out: list[tuple[str, str]] = []
    if hasattr(a, "__path__"):
        # public modules only: a backend's private helpers (e.g. its process group or sharding) need no twin
        subs_a = {m.name for m in pkgutil.iter_modules(a.__path__) if not m.name.startswith("_")}
        subs_b = {m.name for m in pkgutil.iter_modules(b.__path__) if not m.name.startswith("_")}
        out += [("<submodules>", f"module {n} only on pyro") for n in sorted(subs_a - subs_b)]
        out += [("<submodules>", f"module {n} only on numpyro") for n in sorted(subs_b - subs_a)]
    all_a, all_b = list(getattr(a, "__all__", [])), list(getattr(b, "__all__", []))
    out += [("__all__", f"name {n} only on pyro") for n in all_a if n not in all_b]
    out += [("__all__", f"name {n} only on numpyro") for n in all_b if n not in all_a]
    for name in all_a:
        if name not in all_b:
            continue
        oa, ob = getattr(a, name), getattr(b, name)
        home_a, home_b = getattr(oa, "__module__", None), getattr(ob, "__module__", None)
        if home_a != pyro_name and (home_a or "").startswith("tilted_priors."):
            # a re-export: both sides re-export twins; the object is compared in its own module
            if home_b != _twin(home_a):
                out.append((name, f"re-exported from {home_a} on pyro, {home_b} on numpyro"))
            continue
        if inspect.isclass(oa) and inspect.isclass(ob):
            out += list(_compare_classes(name, oa, ob))
        elif inspect.ismodule(oa) or inspect.ismodule(ob):
            if not (inspect.ismodule(oa) and inspect.ismodule(ob)):
                out.append((name, "kind: one side is a module"))
        elif callable(oa) and callable(ob):
            if inspect.isclass(oa) != inspect.isclass(ob):
                out.append((name, f"kind: pyro {type(oa).__name__}, numpyro {type(ob).__name__}"))
            else:
                out += list(_compare_callables(name, oa, ob))
        elif callable(oa) != callable(ob):
            out.append((name, f"kind: pyro {type(oa).__name__}, numpyro {type(ob).__name__}"))
    return out


def _allowed(label: str, member: str, difference: str) -> tuple[str, str, str] | None:
    for key in ALLOWED:
        module_pat, member_pat, diff = key
        if diff == difference and fnmatch.fnmatchcase(label, module_pat) and fnmatch.fnmatchcase(member, member_pat):
            return key
    return None


TWINS = _twin_modules()


@pytest.mark.parametrize("pyro_name, numpyro_name", TWINS, ids=[_label(p) for p, _ in TWINS])
def test_twin_modules_match(pyro_name, numpyro_name):
    label = _label(pyro_name)
    unexplained = [f"{member}: {d}" for member, d in _differences(pyro_name, numpyro_name)
                   if _allowed(label, member, d) is None]
    assert not unexplained, (f"{pyro_name} and {numpyro_name} differ (make them the same, or add an entry with "
                             "its reason to ALLOWED in tests/test_twins.py):\n  " + "\n  ".join(unexplained))


def test_allow_list_has_no_stale_entries():
    used = set()
    for pyro_name, numpyro_name in TWINS:
        label = _label(pyro_name)
        for member, d in _differences(pyro_name, numpyro_name):
            key = _allowed(label, member, d)
            if key is not None:
                used.add(key)
    stale = [k for k in ALLOWED if k not in used]
    assert not stale, "ALLOWED entries that match no difference any more (remove them):\n  " + "\n  ".join(
        map(repr, stale))


# --- one spelling of the PRNG key ---------------------------------------------------------------------------------
#: Parameter names that would be another spelling of the PRNG key (the project's is ``rng_key``).
OTHER_KEY_SPELLINGS = {"key", "prng_key", "rngkey", "random_key", "jax_key", "seed_key", "rng"}

#: ``(module, member) -> reason`` for methods that must keep another spelling.
KEY_SPELLING_ALLOWED: dict[tuple[str, str], str] = {
    ("tilted_priors.numpyro.distributions", "EnergyTilted.sample"):
        "overrides numpyro.distributions.Distribution.sample(key, sample_shape), and keeps NumPyro's name",
    ("tilted_priors.numpyro.distributions", "EnergyTiltedNormal.sample"):
        "overrides numpyro.distributions.Distribution.sample(key, sample_shape), and keeps NumPyro's name",
}


def _public_callables(module) -> Iterator[tuple[str, object]]:
    """``(member, callable)`` for the public functions, constructors and project-defined methods of ``module``
    (overrides of the framework's API included)."""
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # checked in its own module
        if inspect.isclass(obj):
            yield f"{name}.__init__", _constructor(obj)
            for k in obj.__mro__:
                if not _is_project(k):
                    continue
                for m, value in vars(k).items():
                    if not m.startswith("_") and (inspect.isfunction(value)
                                                  or isinstance(value, (staticmethod, classmethod))):
                        yield f"{name}.{m}", inspect.signature(getattr(obj, m))
        elif callable(obj):
            sig = _signature(obj)
            if sig is not None:
                yield name, sig


def _all_modules() -> list[str]:
    names = []
    for pyro_pkg, numpyro_pkg in PACKAGES:
        for pkg in (pyro_pkg, numpyro_pkg):
            names.append(pkg)
            names += [f"{pkg}.{m.name}" for m in pkgutil.iter_modules(importlib.import_module(pkg).__path__)]
    return names


@pytest.mark.parametrize("module_name", _all_modules())
def test_prng_key_is_spelled_rng_key(module_name):
    module = importlib.import_module(module_name)
    bad = []
    for member, sig in _public_callables(module):
        if (module_name, member) in KEY_SPELLING_ALLOWED:
            continue
        bad += [f"{member}({p})" for p in sig.parameters if p in OTHER_KEY_SPELLINGS]
    assert not bad, (f"{module_name}: name the PRNG key argument rng_key (NumPyro; Pyro takes none): "
                     + ", ".join(sorted(set(bad))))


def test_key_spelling_allow_list_has_no_stale_entries():
    found = set()
    for module_name in _all_modules():
        for member, sig in _public_callables(importlib.import_module(module_name)):
            if any(p in OTHER_KEY_SPELLINGS for p in sig.parameters):
                found.add((module_name, member))
    stale = [k for k in KEY_SPELLING_ALLOWED if k not in found]
    assert not stale, "KEY_SPELLING_ALLOWED entries that match nothing any more (remove them): " + repr(stale)
