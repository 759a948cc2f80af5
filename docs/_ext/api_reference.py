"""The API reference, generated from ``__all__`` at build start, and its completeness check.

A local Sphinx extension (``docs/conf.py`` loads it):

- ``builder-inited``: finds every public module of the installed ``tilted_priors`` import root (the roots are the
  keys of pyproject.toml's ``package-dir`` mapping; a module is public when no part of its name starts with
  ``_``), and writes one page per module into the git-ignored ``docs/api/`` folder: the module's docstring, a
  table of every name in its ``__all__``, and the documentation of the names that this module owns. Each object
  is documented once, under its *canonical* module: the module that defines it when that module is public and
  lists it in ``__all__``, else the first public module that exports it (fewest dots first, Pyro before NumPyro,
  then alphabetical). Other modules' tables link to it. Data (constants) are documented in every module that
  lists them. A new name in some ``__all__`` (or a new module) appears without editing the docs.
- ``missing-reference``: a cross-reference to a public alias (``tilted_priors.pyro.Contrastive``, or
  ``Contrastive`` inside :mod:`tilted_priors.pyro`) resolves to the canonical description
  (``tilted_priors.pyro.normalizers.Contrastive``); attributes follow their class. A reference to a
  ``tilted_priors`` name that still does not resolve is a warning (an error under ``-W``).
- ``env-check-consistency``: every name of every public module's ``__all__`` must be described in the reference
  (its canonical target exists in the Python domain), and every public module must have a page; anything
  missing is a warning, so ``sphinx-build -W`` fails.
- ``autodoc-process-signature``: Flax NNX modules show their ``__init__`` signature instead of the metaclass's
  ``(*args, **kwargs)``.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from docutils import nodes
from sphinx.util import logging

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
API_DIR = "api"
_REFERENCE: list = [None]  # this build's Reference (kept out of the pickled environment: it holds modules)
GROUPS = {  # the root packages, in the order of the reference's index
    "tilted_priors": "The prior: distribution, energies, normalizers, samplers",
    "tilted_priors.inference": "Inference: guides, handlers, kernels, training, diagnostics",
    "tilted_priors.models": "Ready models, data, metrics and the command line",
}


# --- what there is to document --------------------------------------------------------------------------------
def root_packages() -> list[str]:
    """The import roots that pyproject.toml maps to folders (``tilted_priors``, ``tilted_priors.inference``, ...)."""
    try:
        settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
        return sorted(settings["package-dir"])
    except (OSError, KeyError):
        return list(GROUPS)


def _is_public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


def public_modules() -> list[str]:
    """Every public module under the roots, imported, in the reference's order."""
    names: set[str] = set()
    for root in root_packages():
        package = importlib.import_module(root)
        names.add(root)
        for info in pkgutil.walk_packages(package.__path__, root + "."):
            if _is_public(info.name):
                names.add(info.name)
    for name in names:
        importlib.import_module(name)
    return sorted(names, key=_module_key)


def _module_key(name: str) -> tuple:
    # Pyro before NumPyro, then as written: "~" sorts after every letter.
    return tuple(part.replace("numpyro", "pyro~") for part in name.split("."))


def _kind(obj) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isroutine(obj):
        return "function"
    return "data"


@dataclass
class Entry:
    """One name of one module's ``__all__``."""

    module: str
    name: str
    kind: str
    target: str  # the full name under which it is described

    @property
    def owned(self) -> bool:
        return self.kind != "module" and self.target == f"{self.module}.{self.name}"


@dataclass
class Reference:
    modules: list[str]
    entries: dict[str, list[Entry]] = field(default_factory=dict)  # by module
    canonical: dict[int, str] = field(default_factory=dict)  # id(object) -> described full name
    objects: dict[int, object] = field(default_factory=dict)  # keeps those objects alive (ids stay unique)


def build_reference() -> Reference:
    modules = public_modules()
    ref = Reference(modules)
    exporters: dict[int, list[tuple[str, str]]] = {}
    for modname in modules:
        module = importlib.import_module(modname)
        exported = getattr(module, "__all__", None)
        if exported is None:
            logger.warning("%s has no __all__ (every public module declares its public names)", modname,
                           type="tilted_priors", subtype="api")
            exported = []
        for name in exported:
            if not hasattr(module, name):
                logger.warning("%s.__all__ lists %r, which the module does not define", modname, name,
                               type="tilted_priors", subtype="api")
                continue
            obj = getattr(module, name)
            if _kind(obj) in ("class", "exception", "function"):
                exporters.setdefault(id(obj), []).append((modname, name))
                ref.objects[id(obj)] = obj
    for key, places in exporters.items():
        obj = ref.objects[key]
        home = getattr(obj, "__module__", None)
        defined = [(m, n) for m, n in places if m == home and n == obj.__name__]
        modname, name = defined[0] if defined else min(places, key=lambda p: (p[0].count("."), _module_key(p[0])))
        ref.canonical[key] = f"{modname}.{name}"
    for modname in modules:
        module = importlib.import_module(modname)
        module_entries = []
        for name in getattr(module, "__all__", []):
            if not hasattr(module, name):
                continue
            obj = getattr(module, name)
            kind = _kind(obj)
            if kind == "module":
                target = obj.__name__
                ref.canonical[id(obj)] = target
            elif kind == "data":
                target = f"{modname}.{name}"
            else:
                target = ref.canonical[id(obj)]
            module_entries.append(Entry(modname, name, kind, target))
        ref.entries[modname] = module_entries
    for modname in modules:
        ref.canonical.setdefault(id(importlib.import_module(modname)), modname)
    return ref


# --- the pages ------------------------------------------------------------------------------------------------
def _title(text: str, char: str = "=") -> str:
    return f"{text}\n{char * len(text)}\n"


_DIRECTIVE = {"class": "autoclass", "exception": "autoexception", "function": "autofunction", "data": "autodata"}


def _relative(target: str, modname: str) -> str:
    """autosummary wants names below the current module written relative to it."""
    return target[len(modname) + 1:] if target.startswith(modname + ".") else target


def module_page(ref: Reference, modname: str) -> str:
    entries = ref.entries[modname]
    lines = [_title(f"``{modname}``"), f".. automodule:: {modname}", "", f".. currentmodule:: {modname}", ""]
    if entries:
        lines += [".. rubric:: Public names (``__all__``)", "", ".. autosummary::", "   :nosignatures:", ""]
        lines += [f"   ~{_relative(e.target, modname)}" for e in entries]
        lines.append("")
        if any(not e.owned and e.kind != "data" for e in entries):
            lines += ["Names defined in another module (or modules themselves) link to their description there.", ""]
    owned = [e for e in entries if e.owned]
    if owned:
        lines += [".. rubric:: Reference", ""]
    for e in owned:
        lines.append(f".. {_DIRECTIVE[e.kind]}:: {e.name}")
        if e.kind in ("class", "exception"):
            lines += ["   :members:", "   :inherited-members:", "   :show-inheritance:"]
        lines.append("")
    return "\n".join(lines)


def index_page(ref: Reference) -> str:
    lines = [_title("API reference"),
             "Every public module and every name of its ``__all__``, generated from the docstrings at build "
             "time. Both backends have the same public names: :mod:`tilted_priors.pyro` and "
             ":mod:`tilted_priors.numpyro` (the prior), :mod:`tilted_priors.inference.pyro` and "
             ":mod:`tilted_priors.inference.numpyro` (inference), and :doc:`/backends` lists what differs "
             "between them. A name exported by several modules is described once, where it is defined, and the "
             "other modules link to it.", ""]
    roots = root_packages()
    for root in sorted(roots, key=lambda r: list(GROUPS).index(r) if r in GROUPS else len(GROUPS)):
        inner = [r for r in roots if r != root and r.startswith(root + ".")]
        members = [m for m in ref.modules if (m == root or m.startswith(root + "."))
                   and not any(m == r or m.startswith(r + ".") for r in inner)]
        lines += [".. toctree::", f"   :caption: {GROUPS.get(root, root)}", "   :maxdepth: 1", ""]
        lines += [f"   {m}" for m in members]
        lines.append("")
    return "\n".join(lines)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def write_pages(app) -> None:
    ref = build_reference()
    _REFERENCE[0] = ref  # for the resolver and the check (kept out of the pickled environment)
    out = Path(app.srcdir) / API_DIR
    out.mkdir(exist_ok=True)
    wanted = {"index.rst": index_page(ref)}
    wanted.update({f"{m}.rst": module_page(ref, m) for m in ref.modules})
    for stale in out.glob("*.rst"):
        if stale.name not in wanted:
            stale.unlink()
    for name, text in wanted.items():
        _write_if_changed(out / name, text)


# --- cross-references to public aliases -------------------------------------------------------------------------
def _import(dotted: str):
    """``(object, described full name)`` for a dotted path to one of our objects, through public modules and
    attributes; ``None`` when it leads elsewhere (a module's ``jax`` attribute is JAX, not ours)."""
    parts = dotted.split(".")
    if parts[0] != "tilted_priors" or _REFERENCE[0] is None:
        return None
    ref = _REFERENCE[0]
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        described = ref.canonical.get(id(obj), ".".join(parts[:cut]))
        for attr in parts[cut:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                return None
            if inspect.ismodule(obj) and not obj.__name__.startswith("tilted_priors"):
                return None
            described = ref.canonical.get(id(obj), f"{described}.{attr}")
        home = getattr(getattr(obj, "__func__", obj), "__module__", None)
        if (inspect.isclass(obj) or inspect.isroutine(obj)) and not str(home).startswith("tilted_priors"):
            return None
        return obj, described
    return None


def resolve_alias(app, env, node, contnode):
    if node.get("refdomain") != "py" or _REFERENCE[0] is None:
        return None
    target = node["reftarget"].lstrip("~.")
    module, cls = node.get("py:module"), node.get("py:class")
    candidates = [target]
    if module:
        if cls:
            candidates.append(f"{module}.{cls}.{target}")
        candidates.append(f"{module}.{target}")
    domain = env.get_domain("py")
    ours = target.startswith("tilted_priors")
    for candidate in candidates:
        found = _import(candidate)
        if found is None:
            continue
        ours = True
        _, described = found
        if described == candidate and candidate == target:
            continue  # nothing new to try: Sphinx already failed on it
        new = domain.resolve_xref(env, node.get("refdoc", ""), app.builder, node["reftype"], described, node,
                                  contnode)
        if new is not None:
            return new
    if ours and node["reftype"] in ("attr", "obj"):
        # An attribute described in its class's numpydoc Attributes section has no target of its own: link to
        # the class (``FitResult.params`` -> ``FitResult``).
        for candidate in candidates:
            found = _import(candidate.rpartition(".")[0])
            if found is not None and inspect.isclass(found[0]):
                new = domain.resolve_xref(env, node.get("refdoc", ""), app.builder, "class", found[1], node,
                                          contnode)
                if new is not None:
                    return new
    if ours and _is_public(target):
        logger.warning("unresolved reference to %r (%s): not in the API reference", node["reftarget"],
                       node["reftype"], location=node, type="tilted_priors", subtype="ref")
    return None


# --- completeness check -----------------------------------------------------------------------------------------
def check_reference(app, env) -> None:
    ref = _REFERENCE[0]
    if ref is None:
        return
    domain = env.get_domain("py")
    described = set(domain.objects)
    for modname in ref.modules:
        if modname not in domain.objects and modname not in getattr(domain, "modules", {}):
            logger.warning("API reference: module %s has no page", modname, type="tilted_priors", subtype="api")
        for entry in ref.entries.get(modname, []):
            if entry.target not in described:
                logger.warning("API reference: %s.%s (in __all__) is not described (expected %s)",
                               modname, entry.name, entry.target, type="tilted_priors", subtype="api")


# --- signatures -------------------------------------------------------------------------------------------------
def init_signature(app, what, name, obj, options, signature, return_annotation):
    """NNX modules: the signature of ``__init__``, not the metaclass's ``(*args, **kwargs)``."""
    if what not in ("class", "exception") or not inspect.isclass(obj):
        return None
    if type(obj).__module__.split(".")[0] != "flax":
        return None
    try:
        sig = inspect.signature(obj.__init__)
    except (TypeError, ValueError):
        return None
    params = [p.replace(default=_Shown(p.default)) if p.default is not inspect.Parameter.empty else p
              for p in list(sig.parameters.values())[1:]]
    if app.config.autodoc_typehints == "none":
        params = [p.replace(annotation=inspect.Parameter.empty) for p in params]
    return str(inspect.Signature(params)), None


class _Shown:
    """A default value as the source names it: a function by its name, not ``<function f at 0x...>``."""

    def __init__(self, value):
        self.text = value.__name__ if inspect.isroutine(value) or inspect.isclass(value) else repr(value)

    def __repr__(self) -> str:
        return self.text


def skip_foreign_member(app, what, name, obj, skip, options):
    """Classes are documented with ``:inherited-members:``; keep only what ``tilted_priors`` defines (members of a
    private base such as ``Persistent.reset``), not what torch, Pyro, NumPyro or Flax define."""
    if what not in ("class", "exception"):
        return None
    inner = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)
    home = getattr(inner, "__module__", None)
    if not (isinstance(home, str) and home.startswith("tilted_priors")):
        return True
    return None


def public_bases(app, name, obj, options, bases) -> None:
    """Show-inheritance lists public classes: a private base (``_Frozen``) is replaced by its own bases."""
    def expand(base):
        if _is_public(f"{base.__module__}.{base.__qualname__}"):
            return [base]
        return [b for parent in base.__bases__ for b in expand(parent)]

    new = []
    for base in bases:
        for b in (expand(base) if inspect.isclass(base) else [base]):
            if b not in new:
                new.append(b)
    if len(new) > 1 and object in new:
        new.remove(object)
    bases[:] = new


def drop_type_docstring(app, what, name, obj, options, lines) -> None:
    """A constant without a ``#:`` comment would show its type's docstring ("Built-in immutable sequence.")."""
    if what not in ("data", "attribute") or inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj):
        return
    own = inspect.cleandoc(type(obj).__doc__ or "")
    if own and "\n".join(lines).strip() == own.strip():
        lines[:] = []


def setup(app):
    app.connect("autodoc-process-docstring", drop_type_docstring, priority=100)  # before numpydoc
    app.connect("autodoc-skip-member", skip_foreign_member)
    app.connect("autodoc-process-bases", public_bases)
    app.connect("builder-inited", write_pages)
    app.connect("missing-reference", resolve_alias)
    app.connect("env-check-consistency", check_reference)
    app.connect("autodoc-process-signature", init_signature)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
