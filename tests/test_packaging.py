"""The version floors that ``pyproject.toml`` declares: each at least the version that introduced an
API the code uses (the table below), and satisfied by the packages installed here.

The table names the API, where the code uses it (a file and a piece of its text, checked to be
there, so that an entry goes when its use goes) and the first release that has it. A new use of a
newer API gets a row here and, if need be, a higher floor in ``pyproject.toml``.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10: the test extra brings tomli
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]

# (package, first version with the API, the API, file using it, text of that use)
NEEDS = [
    ("torch", "2.1", "torch.compiler.assume_constant_result",
     "fastkd/backends/native.py", "@torch.compiler.assume_constant_result"),
    ("torch", "2.4", "torch.library.custom_op with register_fake / register_autograd",
     "fastkd/logit.py", "register_autograd"),
    ("torch", "2.8", "torch.addmm(..., out_dtype=...), the aten.addmm.dtype overloads",
     "fastkd/fused_linear.py", "out_dtype=acc.dtype"),
    ("torch", "2.10", "torch.addmm(..., out_dtype=..., out=...) writing into out (pytorch PR #167931)",
     "fastkd/fused_linear.py", "out_dtype=acc.dtype, out=acc"),
    ("transformers", "4.53", "transformers.masking_utils.AttentionMaskInterface",
     "fastkd/runner/models.py", "AttentionMaskInterface.register"),
    ("transformers", "4.54", "PreTrainedModel.set_attn_implementation",
     "fastkd/runner/models.py", "set_attn_implementation"),
    # 4.57.6, the last 4.x, still has BERT's own attention classes: set_attn_implementation("fastkd")
    # leaves it on "sdpa", and the runner gets no attention maps from it.
    ("transformers", "5.0", "BERT (as GPT-2 and Llama) calling attention through AttentionInterface",
     "fastkd/runner/models.py", "AttentionInterface.register"),
    # Builds wheels without the "wheel" package (tests/test_native.py, fresh-venv install).
    ("setuptools", "70.1", "setuptools.build_meta building a wheel without the wheel package",
     "tests/test_native.py", "--no-build-isolation"),
]

# Where each package must be declared with a floor: the dependencies or these extras.
DECLARED_IN = {"torch": [None], "transformers": ["transformers", "test", "bench"], "setuptools": ["test"]}


def declared() -> dict[tuple[str, str | None], Requirement]:
    """(package, extra or None for the dependencies) -> its requirement in pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {None: project["dependencies"], **project["optional-dependencies"]}
    out = {}
    for extra, lines in groups.items():
        for line in lines:
            req = Requirement(line)
            out[(req.name.lower(), extra)] = req
    return out


def floor(req: Requirement) -> Version | None:
    """The lowest version ``req`` allows through a ``>=`` (or ``==``, ``~=``) clause, else None."""
    bounds = [Version(spec.version) for spec in req.specifier if spec.operator in (">=", "==", "~=")]
    return max(bounds, default=None)


@pytest.mark.parametrize("package,version,api,path,text", NEEDS, ids=[f"{n[0]}-{n[1]}" for n in NEEDS])
def test_declared_floor_covers_api(package, version, api, path, text):
    assert text in (REPO / path).read_text(), f"{path} no longer uses {api}: update this table"
    reqs = declared()
    for extra in DECLARED_IN[package]:
        where = "dependencies" if extra is None else f"the {extra!r} extra"
        req = reqs.get((package, extra))
        assert req is not None, f"{package} is not declared in {where}"
        got = floor(req)
        assert got is not None and got >= Version(version), (
            f"{where} declares {req}, but {api} needs {package}>={version}"
        )


@pytest.mark.parametrize("package", ["torch", "transformers"])
def test_installed_versions_satisfy_declared_floors(package):
    installed = importlib.metadata.version(package)
    for (name, extra), req in declared().items():
        if name == package:
            assert req.specifier.contains(installed, prereleases=True), (
                f"installed {package} {installed} does not satisfy {req} "
                f"({'dependencies' if extra is None else extra})"
            )
