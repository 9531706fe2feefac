"""What a fresh install gets: the library's ranges in pyproject.toml, the exact versions CI tested in
constraints.txt, and the README's set-up and CI both installing with them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            found[canonicalize_name(name)] = version
    return found


def test_every_dependency_is_pinned_within_its_range():
    pinned = pins()
    for spec in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pinned[name]}, outside pyproject's {req.specifier}"
    assert pinned["torch"] == "2.13.0"  # the CPU wheel the set-up installs


def test_test_tools_are_not_pulled_in_by_a_chat_install():
    for spec in PROJECT["dependencies"]:
        assert not canonicalize_name(Requirement(spec).name).startswith("pytest"), spec


def test_the_readme_set_up_and_ci_install_the_tested_versions():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    installs = re.findall(r"pip install [^\n&]*-e [.'\[a-z\]]+", readme)
    set_up = [line for line in installs if "-c constraints.txt" in line]
    assert len(set_up) >= 2, installs  # the chat and the test set-up
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = next(line for line in set_up if "[test]" in line)
    assert test_command in ci.replace("pip install -q ", "pip install "), "CI must run the README's set-up"
    assert "python -m pytest -q" in ci
