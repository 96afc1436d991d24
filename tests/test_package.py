"""The package's metadata: one version (the package's, the installed distribution's and
the command line's agree), the public names exist, the license is an SPDX expression.
The built wheel itself is checked by ``.ci/package``."""

from __future__ import annotations

import importlib.metadata
import pathlib
import subprocess
import sys
import tomllib

import optax_gradhealth as gh

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)


def test_version_is_the_installed_distributions():
    # An editable install records the version when it is installed: after changing
    # __version__, reinstall (pip install -e .) and this passes again.
    assert gh.__version__ == importlib.metadata.version("optax-gradhealth")


def test_version_is_defined_once():
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    dynamic = _pyproject()["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "optax_gradhealth.__version__"}


def test_unreleased_changes_are_not_under_a_released_version():
    # After 0.1.0 shipped, HEAD still said 0.1.0 while its guard state and metric names
    # differed: a bug report or a checkpoint tagged with the version could not tell the
    # builds apart.
    import re

    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    released = re.findall(r"^## \[(\d[^\]]*)\]", text, flags=re.MULTILINE)
    unreleased = text.split("## [Unreleased]", 1)[1].split("\n## [", 1)[0]
    if re.search(r"^- ", unreleased, flags=re.MULTILINE):
        assert gh.__version__ not in released, (gh.__version__, released)
        assert re.fullmatch(r"\d+\.\d+\.\d+\.dev\d+", gh.__version__), gh.__version__


def test_command_line_prints_the_version():
    result = subprocess.run(
        [sys.executable, "-m", "optax_gradhealth", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"optax-gradhealth {gh.__version__}"


def test_every_public_name_exists():
    assert len(gh.__all__) == len(set(gh.__all__))
    missing = [name for name in gh.__all__ if not hasattr(gh, name)]
    assert not missing, missing


def test_license_is_an_spdx_expression_with_its_file():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert importlib.metadata.metadata("optax-gradhealth")["License-Expression"] == "Apache-2.0"
    assert not any(c.startswith("License ::") for c in project.get("classifiers", []))
