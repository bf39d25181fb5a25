"""The command line: an installed `busi` command, help on every command and option, --params where users put it."""

import importlib
import os
import shutil
import subprocess
import sys
import venv

import pytest

from busi.cli import COMMANDS, NEEDS_PARAMS, build_parser, main
from conftest import REPO


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_every_command_has_a_module_with_run():
    assert set(COMMANDS) == set(subcommands())
    for name, module in COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), "run", None)), f"{name}: {module} has no run()"


def test_the_install_gives_a_busi_command_that_runs_anywhere(tmp_path):
    """The README's `pip install -e .` (here without dependencies, over this interpreter's packages) in a fresh
    virtual environment; then `busi --help` from a folder outside the repository, with no PYTHONPATH."""
    project = tmp_path / "project"
    shutil.copytree(REPO / "src" / "busi", project / "src" / "busi", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", project)
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    subprocess.run([bin_dir / "pip", "install", "-q", "--no-deps", "-e", str(project)], check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    for args in (["--help"], ["predict", "--help"]):
        done = subprocess.run([bin_dir / "busi", *args], cwd=elsewhere, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: busi {args[0] if len(args) > 1 else ''}".rstrip())
    where = subprocess.run([bin_dir / "python", "-c", "import busi; print(busi.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(project / "src" / "busi" / "__init__.py")


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_command_and_option_says_what_it_does(name):
    sub = subcommands()[name]
    assert sub.description and len(sub.description) > 20
    text = sub.format_help()
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
            if action.default not in (None, False, "") and not action.required and action.default != "==SUPPRESS==":
                assert f"(default: {action.default})" in " ".join(text.split())
    assert ("--params" in text) == (name in NEEDS_PARAMS)  # only commands that read params.yaml take it


def test_params_is_accepted_before_and_after_the_command(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("split: {seed: 1, fractions: {train: 0.5}}\n")
    given = str(tmp_path / "params.yaml")
    for argv in (["--params", given, "split"], ["split", "--params", given]):
        assert main(argv) == 1
        assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'params.yaml'}: ")  # that file was read


def test_commands_that_need_no_params_run_without_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    assert main(["check-metrics", str(tmp_path / "none.json"), "--baseline", str(tmp_path / "none.json")]) == 1
    err = capsys.readouterr().err
    assert "none.json" in err and "params" not in err


def test_module_and_command_are_the_same_program():
    done = subprocess.run([sys.executable, "-m", "busi", "--help"], env={**os.environ, "PYTHONPATH": str(REPO / "src")},
                          capture_output=True, text=True, check=True)
    assert done.stdout == build_parser().format_help()
