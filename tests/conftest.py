import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml

from busi.config import load_params
from busi.evaluation.metrics import METRICS, Metric
from busi.stages.merge_masks import merge_masks
from busi.stages.preprocess import preprocess
from busi.stages.split import split
from synthetic import make_busi, zip_folder

REPO = Path(__file__).resolve().parents[1]
# The archive the real-data tests read: $BUSI_ARCHIVE, as the pipeline reads it, else the one beside the clone.
REAL_ARCHIVE = Path(os.environ.get("BUSI_ARCHIVE")
                    or REPO.parent / "shared" / "data" / "busi" / "Dataset_BUSI_with_GT.zip")


def committed_params() -> Path:
    """The params.yaml of the checked-out commit, not the workspace's: `dvc exp run -S ...` rewrites the
    workspace file, and the tests must not depend on the last experiment a user ran. Outside git: the file."""
    found = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO, capture_output=True, text=True)
    if found.returncode != 0:
        return REPO / "params.yaml"
    path = Path(tempfile.mkdtemp(prefix="busi-tests-")) / "params.yaml"
    path.write_text(found.stdout)
    return path


PARAMS_FILE = committed_params()


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
    """A working folder holding the repository's params.yaml (as committed), as the CLI expects."""
    shutil.copy(PARAMS_FILE, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BUSI_ARCHIVE", raising=False)
    return tmp_path


@pytest.fixture
def real_archive() -> Path:
    if not REAL_ARCHIVE.exists():
        pytest.skip(f"real BUSI archive not found at {REAL_ARCHIVE} (set BUSI_ARCHIVE)")
    return REAL_ARCHIVE


def run_env(**extra: str) -> dict:
    """Environment for a subprocess running `python -m busi` from a copy of the repository."""
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), **extra}


SIZE = 64


@pytest.fixture(scope="session")
def processed(synthetic_source, tmp_path_factory):
    """Synthetic BUSI, merged, split and preprocessed at 64 px."""
    work = tmp_path_factory.mktemp("processed")
    params = load_params(PARAMS_FILE)
    merge_masks(synthetic_source, work / "masks")
    split(synthetic_source, params.split.model_copy(update={"folds": 2}), work / "splits.csv", work / "split.json")
    preprocess(synthetic_source, work / "masks", work / "splits.csv", SIZE, work / "processed")
    return work / "processed"


def tiny_params(**train_changes):
    """The repository's params with a small, fast configuration."""
    params = load_params(PARAMS_FILE)
    no_augment = {key: 0.0 for key in ["horizontal_flip"]}
    augment = params.augment.model_copy(update=no_augment)
    for name in ["affine", "brightness_contrast", "clahe", "median_blur", "gaussian_blur"]:
        augment = augment.model_copy(update={name: getattr(augment, name).model_copy(update={"p": 0.0})})
    return params.model_copy(update={
        # Average pooling: at one or two epochs its networks already draw lesions on the synthetic images, which
        # the tests look at (max pooling's, the default's, draw none that early).
        "model": params.model.model_copy(update={"encoder": "resnet18", "encoder_weights": None, "pooling": "avg"}),
        "augment": augment,
        "train": params.train.model_copy(update={"epochs": 2, "batch_size": 4, "precision": "fp32", **train_changes}),
        "crop": params.crop.model_copy(update={"size": 32, "epochs": 1, "batch_size": 8, "precision": "fp32"}),
    })


def untrained_network(size: int = SIZE):
    """A seeded, untrained resnet18 U-Net and its NetworkConfig. Untrained, its median lesion probability is
    about 0.4: the bias is lifted so that its masks are neither empty nor full."""
    import torch

    from busi.config import NetworkConfig
    from busi.model.network import build_model

    model = load_params(PARAMS_FILE).model.model_copy(update={"encoder": "resnet18"})
    torch.manual_seed(0)
    network = build_model(model)
    with torch.no_grad():
        network.segmentation_head[0].bias += 0.5
    return network.eval(), NetworkConfig(model=model, image_size=size)


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return mlflow.MlflowClient(uri)


@pytest.fixture(scope="module")
def one_thread():
    """Another process may be training on the same few cores: more threads than cores would crawl."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sh(*args, cwd, env=None, timeout: float = 900):
    """Run a command; its output, or a failure with its output (and never a hang: a timeout)."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def set_param(repo, section, key, value):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def project_copy(repo: Path) -> Path:
    """The pipeline's files (dvc.yaml, params as committed, src/) in a new folder `repo`."""
    repo.mkdir()
    for name in ["dvc.yaml", ".gitignore", ".dvcignore"]:
        shutil.copy(REPO / name, repo / name)
    shutil.copy(PARAMS_FILE, repo / "params.yaml")
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    return repo


@pytest.fixture
def dvc_repo(tmp_path, busi_zip):
    repo = project_copy(tmp_path / "repo")
    (repo / "metrics").mkdir()
    set_param(repo, "split", "folds", 2)  # the synthetic archive is small
    set_param(repo, "preprocess", "image_size", 64)
    set_param(repo, "train", "epochs", 1)
    set_param(repo, "train", "precision", "fp32")
    set_param(repo, "crop", "epochs", 1)
    set_param(repo, "crop", "precision", "fp32")
    set_param(repo, "evaluate", "bootstrap", 50)
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "config", "core.analytics", "false", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=repo)
    return repo, run_env(BUSI_ARCHIVE=str(busi_zip))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A server in its own process group, its output in `log`: a pipe nobody reads fills up and blocks it."""
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to its process group (its workers follow), SIGKILL if it does not stop within 30 s."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def wait_until_up(url: str, server: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    """Poll `url` until it answers; fail with the server's last output if it exits or takes too long."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{url} did not come up: {log.read_text(errors='replace')[-3000:]}") from None
            time.sleep(1)


def as_postgres(*command: str) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL 15 cluster on a loopback port: its URI."""
    if not shutil.which("initdb") or not shutil.which("pg_ctl"):
        pytest.skip("PostgreSQL's initdb/pg_ctl not found (Debian: apt install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="busi-pg-"))  # not under pytest's root-only folder: postgres reads it
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    port = free_port()
    data = folder / "data"
    sh(*as_postgres("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"), cwd=folder)
    sh(*as_postgres("pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"), "start", cwd=folder)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_postgres("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory):
    """`mlflow server` as docs/team.md starts it: PostgreSQL backend store, artifacts proxied from a folder."""
    artifacts = tmp_path_factory.mktemp("artifacts")
    port = free_port()
    log = artifacts.parent / "mlflow-server.log"
    server = start_server([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres,
                           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                           "--workers", "1"], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", server, log)
        yield url, postgres, artifacts
    finally:
        stop_server(server)


SLOW_LEFT_OUT = []


def pytest_deselected(items):
    SLOW_LEFT_OUT.extend(item for item in items if item.get_closest_marker("slow"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say how to run what the default fast set left out."""
    if SLOW_LEFT_OUT and config.getoption("markexpr") == "not slow":
        terminalreporter.write_line(f'{len(SLOW_LEFT_OUT)} slow tests not run (real archive, DVC, servers, trainings): '
                                    'python -m pytest -m "slow or not slow" runs every test, as CI does')


@pytest.fixture
def extra_metric():
    """A metric added as a user would: one entry appended to METRICS (removed afterwards)."""
    extra = Metric("lesions_drawn", "lesions drawn", lambda cases: float((cases["predicted_area_px"] > 0).mean()),
                   interval=True, paired=True, fold=True, tolerance=0.1)
    METRICS.append(extra)
    yield extra
    METRICS.remove(extra)
