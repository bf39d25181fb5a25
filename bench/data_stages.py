"""Benchmark: wall time of the four data stages on the real BUSI archive, and of a no-op `dvc repro`.

Runs in a throw-away copy of the repository (git + DVC), so the workspace is untouched:
    python bench/data_stages.py [--archive ../shared/data/busi/Dataset_BUSI_with_GT.zip]
Figures, not pass/fail: targets on a 2-core machine are < 120 s for the stages and < 2 s for the no-op.
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ["source", "fetch", "merge_masks", "split", "preprocess"]


def timed(*args: str, cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=REPO.parent / "shared/data/busi/Dataset_BUSI_with_GT.zip")
    return run(parser.parse_args().archive)


def run(archive: Path) -> dict:
    env = {**os.environ, "BUSI_ARCHIVE": str(archive.resolve())}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        for name in ["dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"]:
            shutil.copy(REPO / name, repo / name)
        shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
        (repo / "metrics").mkdir()
        for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
            subprocess.run(command, cwd=repo, check=True)
        figures = {f"{stage}_s": timed("dvc", "repro", "-s", stage, cwd=repo, env=env) for stage in STAGES}
        figures["data_stages_s"] = sum(figures.values())
        # The no-op: everything up to preprocess is cached now, so DVC only checks hashes.
        figures["noop_repro_s"] = timed("dvc", "repro", "preprocess", cwd=repo, env=env)
    for name, seconds in figures.items():
        print(f"{name:>16}: {seconds:6.1f} s")
    print(json.dumps({k: round(v, 2) for k, v in figures.items()}))
    return figures


if __name__ == "__main__":
    main()
