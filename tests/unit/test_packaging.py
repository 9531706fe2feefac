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


def test_a_plain_install_without_e_has_the_personas_model_and_safety_sets(tmp_path):
    """Builds the wheel from the tracked files (setuptools in process, no network) and imports the
    installed package from it, not from this checkout."""
    import os
    import shutil
    import subprocess
    import sys
    import zipfile

    from setuptools import build_meta

    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    here = os.getcwd()
    os.chdir(src)
    try:
        wheel = src / "dist" / build_meta.build_wheel(str(src / "dist"))
    finally:
        os.chdir(here)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install --no-deps puts in site-packages
    check = ("from chatbot.prompting import PROMPTS_DIR, list_personas; from chatbot.safety import LABELLED_SETS; "
             "from chatbot.generation import DEFAULT_MODEL; import chatbot; "
             "print(chatbot.__file__); print(sorted(list_personas())); "
             "print(all(p.is_file() for p in LABELLED_SETS)); print((DEFAULT_MODEL / 'model.safetensors').is_file()); "
             "from chatbot.config import known_sections; import sys; s = known_sections()['discord']; "
             "print(s.name, sys.modules[s.__module__].__file__)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path,
                         check=True).stdout.splitlines()
    assert out[0].startswith(str(site)), out
    assert out[1:4] == ["['concise', 'formal', 'friendly', 'playful']", "True", "True"]
    # The Discord face's settings table is declared by the installed package's entry point.
    assert out[4].startswith(f"discord {site}"), out
