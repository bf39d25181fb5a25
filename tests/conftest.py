import os
import shutil
from pathlib import Path

import pytest

from synthetic import make_busi, zip_folder

REPO = Path(__file__).resolve().parents[1]
REAL_ARCHIVE = REPO.parent / "shared" / "data" / "busi" / "Dataset_BUSI_with_GT.zip"


@pytest.fixture(scope="session")
def synthetic_source(tmp_path_factory) -> Path:
    """A synthetic BUSI folder, made once per test session: copy it before changing it."""
    return make_busi(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def busi_folder(synthetic_source, tmp_path) -> Path:
    """A private, modifiable copy of the synthetic dataset folder."""
    return Path(shutil.copytree(synthetic_source, tmp_path / "source" / synthetic_source.name))


@pytest.fixture(scope="session")
def busi_zip(synthetic_source, tmp_path_factory) -> Path:
    return zip_folder(synthetic_source, tmp_path_factory.mktemp("zip") / "Dataset_BUSI_with_GT.zip")


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A working folder holding the repository's params.yaml, as the CLI expects."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BUSI_ARCHIVE", raising=False)
    return tmp_path


@pytest.fixture
def real_archive() -> Path:
    if not REAL_ARCHIVE.is_file():
        pytest.skip(f"real BUSI archive not found at {REAL_ARCHIVE}")
    return REAL_ARCHIVE


def run_env(**extra: str) -> dict:
    """Environment for a subprocess running `python -m busi` from a copy of the repository."""
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), **extra}
