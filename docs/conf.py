"""Sphinx configuration of the tilted-priors documentation.

Built offline, warnings as errors (``make docs``: tutorials in full mode; ``make docs-quick``: quick mode, the test
suite's check)::

    TILTED_PRIORS_QUICK=1 .venv/bin/sphinx-build -q -W --keep-going -b html docs docs/_build/html-quick

At build start (``builder-inited``) this file copies the tutorials (``tutorials/*.ipynb``, stored without outputs)
and the benchmark figures into git-ignored folders of the source tree, and the local extension
``_ext/api_reference.py`` writes the API reference from every public module's ``__all__`` (see
``docs/contributing.md``). Notebooks and text-based notebook pages are executed at build time; the tutorials read
``TILTED_PRIORS_QUICK`` from the environment, which the kernels inherit.
"""
from __future__ import annotations

import filecmp
import hashlib
import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
# The kernels inherit this process's environment: a MPLBACKEND (e.g. Agg, set for headless test runs) would replace
# Jupyter's inline backend and the notebooks' figures would not be rendered. Without it matplotlib picks Agg here.
os.environ.pop("MPLBACKEND", None)

import tilted_priors  # noqa: E402  (the installed package: `make install` / `pip install -e ".[docs]"`)

# --- project ------------------------------------------------------------------------------------------------------
project = "tilted-priors"
author = "The tilted-priors developers"
copyright = "the tilted-priors developers; Apache-2.0"
release = version = tilted_priors.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_nb",
    "api_reference",  # docs/_ext/api_reference.py
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "jupyter_execute", ".jupyter_cache", "**.ipynb_checkpoints", ".gitignore"]
templates_path: list[str] = []
nitpicky = False  # third-party targets (torch, JAX, Pyro) are not linked; our own are checked by api_reference

# --- API reference ------------------------------------------------------------------------------------------------
autodoc_typehints = "none"            # types are in the numpydoc Parameters / Returns sections
autodoc_inherit_docstrings = False    # members inherited from torch / Pyro / NumPyro / Flax are not ours to document
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True     # defaults as written in the source (`activation=nn.GELU`)
autosummary_generate = False          # the pages are written by api_reference from __all__
numpydoc_show_class_members = False   # autodoc's :members: documents them once
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_attributes_as_param_list = True

# --- Markdown and notebooks (MyST-NB) ---------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "force"           # always run: outputs come from this version of the code (see fingerprint)
nb_execution_timeout = 1800
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_output_stderr = "remove"           # library warnings (e.g. tqdm's IProgress notice) are not part of the story
nb_render_markdown_format = "gfm"     # Markdown outputs (the diagnostics reports) hold tables
nb_kernel_rgx_aliases = {".*": "python3"}

# --- HTML ---------------------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"tilted-priors {version}"
html_theme_options = {"source_repository": "https://github.com/tilted-priors/tilted-priors/",
                      "source_branch": "main", "source_directory": "docs/"}

# --- the library's fingerprint ------------------------------------------------------------------------------------
# A change of any library source file, of this file or of docs/_ext (or of the quick/full mode) changes this value;
# it is registered below as a config value that rebuilds the environment, so an incremental build re-reads every
# page: docstrings and notebook outputs always come from the code (and the settings) being documented.
_QUICK = os.environ.get("TILTED_PRIORS_QUICK", "")


def _fingerprint() -> str:
    digest = hashlib.sha256(f"quick={_QUICK}".encode())
    sources = [path for folder in ("tilted_priors", "inference", "models", "docs/_ext")
               for path in (ROOT / folder).rglob("*.py")]
    for path in sorted(sources) + [DOCS / "conf.py"]:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


tilted_priors_fingerprint = _fingerprint()


# --- files copied into the source tree at build start ---------------------------------------------------------------
def _sync(sources: list[Path], target: Path, pattern: str) -> None:
    """Mirror ``sources`` into ``target`` (a git-ignored folder): copy new or changed files, drop stale ones.

    Unchanged files are left alone, so Sphinx's incremental build does not re-read (re-execute) them.
    """
    target.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in sources}
    for stale in target.glob(pattern):
        if stale.name not in names:
            stale.unlink()
    for src in sources:
        dst = target / src.name
        if not dst.exists() or not filecmp.cmp(src, dst, shallow=False):
            shutil.copy2(src, dst)


def copy_sources(app) -> None:
    # The tutorials live at the repository's top (tutorials/), outside the source directory: render copies.
    _sync(sorted((ROOT / "tutorials").glob("*.ipynb")), DOCS / "tutorials", "*.ipynb")
    # The benchmark figures (benchmarks/figures/) used by the results page.
    _sync(sorted((ROOT / "benchmarks" / "figures").glob("*.png")), DOCS / "_figures", "*.png")


def setup(app):
    app.add_config_value("tilted_priors_fingerprint", "", "env")
    app.connect("builder-inited", copy_sources, priority=100)  # before api_reference and source discovery
    return {"parallel_read_safe": True}
