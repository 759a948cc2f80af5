"""What a user who installs one extra gets, checked in fresh virtual environments from a wheel.

1. The wheel built from this checkout has one import root: ``tilted_priors`` (no top-level ``inference`` or
   ``models``), and holds ``tilted_priors/inference`` and ``tilted_priors/models``.
2. ``pip install "tilted-priors[numpyro]"`` into a fresh environment: torch is not installed, and the README's
   NumPyro example runs.
3. ``pip install "tilted-priors[pyro]"``: JAX is not installed, and the README's Pyro example runs.

Run by ``make check-install`` (and CI); exact versions from .ci/constraints.txt; torch as the CPU build.
"""
import os
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"
# PyTorch's CPU wheel index, where the package index has no `+cpu` build of torch (set by the Makefile).
TORCH_CPU_INDEX = os.environ.get("TORCH_CPU_INDEX", "https://download.pytorch.org/whl/cpu")
sys.path.insert(0, str(ROOT / "tests" / "support"))
from readme import readme_examples  # noqa: E402


def run(*cmd, **kw):
    print("+", " ".join(str(c) if len(str(c)) < 200 else "<code>" for c in cmd), flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, **kw)


def build_wheel(out: Path) -> Path:
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, ROOT)
    wheel, = out.glob("tilted_priors-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    packages = tops - {t for t in tops if t.endswith((".dist-info", ".data"))}
    assert packages == {"tilted_priors"}, f"the wheel installs {sorted(packages)}, not one import root"
    names = zipfile.ZipFile(wheel).namelist()
    for sub in ("inference/pyro/guides.py", "models/cli.py", "pyro/distributions.py"):
        assert f"tilted_priors/{sub}" in names, f"the wheel lacks tilted_priors/{sub}"
    return wheel


def fresh_env(where: Path, wheel: Path, extra: str) -> Path:
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    pip = [python, "-m", "pip", "install", "-q", "-c", CONSTRAINTS]
    if extra == "pyro":  # the CPU build of torch first, as the Makefile installs it
        if subprocess.run([*map(str, pip), "torch"]).returncode:
            run(*pip, "--index-url", TORCH_CPU_INDEX, "torch")
    run(*pip, f"{wheel}[{extra}]")
    return python


def main() -> int:
    examples = readme_examples()
    checks = {"numpyro": ("torch", "pyro"), "pyro": ("jax", "numpyro")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheel = build_wheel(tmp / "dist")
        print(f"{wheel.name}: one import root, tilted_priors", flush=True)
        for extra, absent in checks.items():
            python = fresh_env(tmp / f"env-{extra}", wheel, extra)
            probe = ("import importlib.util as u, sys; "
                     f"found = [m for m in {absent!r} if u.find_spec(m)]; "
                     "sys.exit(f'installed although not asked for: {found}' if found else 0)")
            run(python, "-c", probe)
            # One compute thread: torch's two threads on small tensors crawl when anything else shares the cores.
            run(python, "-c", examples[extra], cwd=tmp, env={**os.environ, "OMP_NUM_THREADS": "1"})
            print(f"[{extra}] without {' or '.join(absent)}: the README's {extra} example ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
