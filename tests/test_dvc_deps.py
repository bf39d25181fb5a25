"""dvc.yaml names every project module a stage runs: a stage's code deps follow its real imports, so that a change
to any module it runs re-runs it (and nothing else)."""

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
STAGE_COMMAND = re.compile(r"python -m busi ([\w-]+)")


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def has_code(init: Path) -> bool:
    """A package __init__ that is more than its docstring runs code on import."""
    body = ast.parse(init.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def imported_files(path: Path) -> set[Path]:
    """Project files that importing `path` runs: its busi imports (also those inside functions), their parent
    packages, transitively."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        names = []
        for node in ast.walk(ast.parse(current.read_text())):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.append(node.module)
                names += [f"{node.module}.{alias.name}" for alias in node.names]  # from busi import tracking
        for name in names:
            if name.split(".")[0] != "busi":
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # the module and every package above it
                found = module_file(".".join(parts[:i]))
                if found and (found.name != "__init__.py" or i == 1 or has_code(found)):
                    todo.append(found)
    return seen


PIPELINES = ["dvc.yaml", "cv/dvc.yaml"]


def stages() -> dict[str, tuple[dict, Path]]:
    """Every stage of every pipeline, with the folder its paths are relative to (its wdir)."""
    found = {}
    for pipeline in PIPELINES:
        for name, stage in yaml.safe_load((ROOT / pipeline).read_text())["stages"].items():
            stage = stage.get("do", stage)  # a foreach stage: its template
            found[f"{pipeline}:{name}"] = (stage, ((ROOT / pipeline).parent / stage.get("wdir", ".")).resolve())
    return found


@pytest.mark.parametrize("name", list(stages()))
def test_a_stage_lists_every_project_module_it_runs(name):
    stage, wdir = stages()[name]
    command = STAGE_COMMAND.search(stage["cmd"])
    assert command, f"stage {name}: its command does not run `python -m busi <command>`"
    module = SRC / "busi" / "stages" / f"{command[1].replace('-', '_')}.py"
    assert module.is_file(), f"stage {name}: no module {module}"
    deps = [wdir / dep for dep in stage.get("deps", [])]
    # The CLI validates params.yaml (busi.config) before any stage runs.
    needed = imported_files(module) | imported_files(SRC / "busi" / "config.py")
    missing = sorted(str(path.relative_to(ROOT)) for path in needed
                     if not any(path == dep or dep in path.parents for dep in deps))
    assert not missing, f"stage {name} runs these modules but dvc.yaml does not list them: {missing}"


def test_the_import_walk_follows_imports_inside_functions_and_packages():
    found = {str(p.relative_to(SRC)) for p in imported_files(SRC / "busi" / "stages" / "evaluate.py")}
    assert {"busi/__init__.py", "busi/tracking.py", "busi/evaluation/metrics.py", "busi/model/serving.py",
            "busi/model/checkpoint.py", "busi/data/arrays.py"} <= found  # serving: imported inside log_model
    assert "busi/stages/train.py" not in found


def test_stages_stand_alone_and_inference_does_not_import_evaluation():
    """A stage imports the library, never another stage or a command (each such import widens its dvc.yaml
    deps); inference (busi.model) applies the post-processing without the code that decides it."""
    for module in sorted((SRC / "busi" / "stages").glob("*.py")):
        found = {str(p.relative_to(SRC)) for p in imported_files(module)} - {str(module.relative_to(SRC))}
        leaning = sorted(p for p in found if p.startswith(("busi/stages/", "busi/commands/"))
                         and not p.endswith("__init__.py"))
        assert not leaning, f"{module.name} imports {leaning}"
    for module in sorted((SRC / "busi" / "model").glob("*.py")):
        found = {str(p.relative_to(SRC)) for p in imported_files(module)}
        assert not [p for p in found if p.startswith("busi/evaluation/")], f"{module.name} imports evaluation"
