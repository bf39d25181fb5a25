"""busi predict with a tiny untrained U-Net: every image mode and size, broken inputs, MLflow model URIs, and the
predictor's post-processing applied without flags."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from busi import CLASSES, BusiError, tracking
from busi.commands.predict import predict, read_image
from busi.config import load_params
from busi.model import serving
from busi.model.checkpoint import load_checkpoint, save_checkpoint
from busi.model.postprocessing import PostProcessing
from busi.model.predictor import Predictor
from conftest import PARAMS_FILE, REPO, run_env, untrained_network
from synthetic import speckle
from test_fetch import huge_png_header

SIZE = 64
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model, config = untrained_network(SIZE)
    path = tmp_path_factory.mktemp("model") / "best.pt"
    save_checkpoint(path, model, config, epoch=1)
    return path


@pytest.fixture(scope="module")
def predictor_dir(checkpoint, tmp_path_factory) -> Path:
    """The checkpoint with post-processing chosen (as the evaluate stage writes it)."""
    folder = tmp_path_factory.mktemp("predictor") / "predictor"
    Predictor.from_checkpoints([checkpoint], PostProcessing(threshold=0.6, flip_tta=True, largest_component=True,
                                                            label_from_mask=True)).save(folder)
    return folder


def gray(seed: int, height: int, width: int) -> np.ndarray:
    return speckle(np.random.default_rng(seed), height, width)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """One folder of every mode and odd sizes; `twin_*` files hold the same pixels as `l_small.png`."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "sub").mkdir()
    small, large = gray(1, 90, 130), gray(2, 301, 207)
    Image.fromarray(small).save(folder / "l_small.png")
    Image.fromarray(np.dstack([small] * 3)).save(folder / "twin_rgb.png")
    Image.fromarray(np.dstack([small] * 3 + [np.full_like(small, 255)]), "RGBA").save(folder / "twin_rgba.png")
    Image.fromarray(small.astype(np.uint16) * 257).save(folder / "twin_16bit.png")  # full 16-bit range
    Image.fromarray(large).save(folder / "sub" / "large.jpg", quality=95)
    Image.fromarray(gray(3, 40, 500)).save(folder / "sub" / "wide.png")
    Image.fromarray(gray(4, 90, 130)).save(folder / "sub" / "l_small.png")  # same stem as the top one
    Image.fromarray(np.zeros((90, 130), np.uint8)).save(folder / "l_small_mask.png")  # BUSI ground truth: skipped
    return folder


@pytest.fixture(scope="module")
def predicted(images, checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    counts = predict([images], str(checkpoint.parent), out)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return counts, {Path(r["path"]).relative_to(images).as_posix(): r for r in records}, out


def test_every_mode_and_size_gets_a_mask_overlay_and_json_line(predicted, images):
    (done, failed, _), records, out = predicted
    expected = ["l_small.png", "sub/l_small.png", "sub/large.jpg", "sub/wide.png", "twin_16bit.png",
                "twin_rgb.png", "twin_rgba.png"]
    assert (done, failed) == (len(expected), 0)
    assert sorted(records) == expected
    for name, record in records.items():
        width, height = Image.open(images / name).size
        mask = np.asarray(Image.open(out / record["mask"]))
        assert mask.shape == (height, width) == (record["height"], record["width"]), name
        assert set(np.unique(mask)) <= {0, 255}
        assert record["lesion_area_px"] == (mask == 255).sum()
        assert 0 < record["lesion_area_px"] < height * width, name  # neither empty nor full: a real test below
        probs = record["probabilities"]
        assert list(probs) == list(CLASSES)
        assert sum(probs.values()) == pytest.approx(1, abs=1e-5)
        assert record["label"] == max(probs, key=probs.get)
        overlay = np.asarray(Image.open(out / record["overlay"]))
        assert overlay.shape == (height, width, 3)
    assert records["l_small.png"]["mask"] == "l_small_mask.png"
    assert records["sub/l_small.png"]["mask"] == "l_small-2_mask.png"  # same stem: not overwritten


def test_twins_of_one_image_predict_the_same(predicted, images):
    """RGB, RGBA and 16-bit copies of one grayscale image give its prediction: 16-bit is scaled, not clipped."""
    _, records, out = predicted
    np.testing.assert_array_equal(read_image(images / "twin_16bit.png"), read_image(images / "l_small.png"))
    reference = records["l_small.png"]
    for name in ("twin_rgb.png", "twin_rgba.png", "twin_16bit.png"):
        assert records[name]["probabilities"] == pytest.approx(reference["probabilities"], abs=1e-6), name
        assert records[name]["lesion_area_px"] == reference["lesion_area_px"], name
    assert records["sub/l_small.png"]["probabilities"] != pytest.approx(reference["probabilities"], abs=1e-6)


def test_mask_is_the_probability_at_the_image_size_thresholded(predicted, images, checkpoint):
    """Independently of busi.inference: torch's bilinear resize to 64 px and back, threshold 0.5."""
    _, records, out = predicted
    model, _, _ = load_checkpoint(checkpoint)
    image = np.asarray(Image.open(images / "sub" / "wide.png"), np.float32) / 255
    with torch.no_grad():
        x = torch.nn.functional.interpolate(torch.from_numpy(image)[None, None], (SIZE, SIZE), mode="bilinear")
        logits, class_logits = model(x)
        back = torch.nn.functional.interpolate(torch.sigmoid(logits), image.shape, mode="bilinear")[0, 0].numpy()
    probs = records["sub/wide.png"]["probabilities"]
    np.testing.assert_allclose(list(probs.values()), torch.softmax(class_logits, 1)[0].numpy(), atol=2e-4)
    mask = np.asarray(Image.open(out / records["sub/wide.png"]["mask"])) > 0
    sure = np.abs(back - 0.5) > 0.05  # the two resizers round differently right at the threshold
    assert sure.mean() > 0.5
    np.testing.assert_array_equal(mask[sure], back[sure] >= 0.5)
    overlay = np.asarray(Image.open(out / records["sub/wide.png"]["overlay"])).astype(int)
    gray = np.asarray(Image.open(images / "sub" / "wide.png")).astype(int)
    inside = mask & (overlay[..., 0] != overlay[..., 1])  # tinted lesion (contour pixels are yellow)
    assert inside.sum() > 0.5 * mask.sum()
    assert (overlay[~mask][:, 2] == gray[~mask]).mean() > 0.9  # outside the lesion (but the contour): the image


def test_broken_files_are_reported_and_the_others_done(images, checkpoint, project):
    good = project / "in"
    good.mkdir()
    Image.fromarray(gray(5, 70, 80)).save(good / "ok.png")
    (good / "corrupt.png").write_bytes((images / "l_small.png").read_bytes()[:300])  # truncated
    (good / "fake.jpg").write_text("not an image")
    huge_png_header(good / "huge.png")  # a header claiming 20000x20000 pixels: refused, not decoded
    (good / "loop.png").symlink_to("loop.png")  # a link to itself: reported, not silently skipped
    (project / "notes.txt").write_text("hello")
    (project / "empty").mkdir()
    command = [sys.executable, "-m", "busi", "predict", "in", "notes.txt", "missing.png", "empty",
               "--model", str(checkpoint), "--out", "out"]
    result = subprocess.run(command, cwd=project, env=run_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = result.stderr.splitlines()
    for name in ("corrupt.png", "fake.jpg", "notes.txt", "missing.png", "empty:", "huge.png: image larger than",
                 "loop.png: a link that leads nowhere"):
        assert sum(name in line for line in errors) == 1, result.stderr
    assert errors[0].startswith("predict: threshold 0.5")  # what it applied: a checkpoint has only defaults
    assert len(errors) == 9 and "error: 7 of 8 inputs failed" in errors[-1]
    lines = (project / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["path"] for line in lines] == ["in/ok.png"]
    assert np.asarray(Image.open(project / "out" / "ok_mask.png")).shape == (70, 80)


def test_an_unknown_model_is_one_error(tmp_path, images, monkeypatch):
    with pytest.raises(BusiError, match=f"no such predictor or checkpoint in {tmp_path}"):
        monkeypatch.chdir(tmp_path)  # outside any repository: the error says where it looked
        predict([images], "predictor", tmp_path / "out")
    # A models:/ URI with no tracking store: one line naming the store, and no empty mlflow.db left behind.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    with pytest.raises(BusiError, match=f"no MLflow store at sqlite:///{tmp_path}/mlflow.db"):
        predict([images], "models:/m-0123", tmp_path / "out")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)  # MLflow sets MLFLOW_EXPERIMENT_ID in os.environ itself
    yield
    mlflow.end_run()
    mlflow.set_tracking_uri(None)


def test_mlflow_model_uris_load_the_logged_predictor(store, predictor_dir, images, tmp_path):
    predict([images / "l_small.png"], str(predictor_dir), tmp_path / "folder")
    expected = json.loads((tmp_path / "folder" / "predictions.jsonl").read_text())
    run_id = tracking.start_run(load_params(PARAMS_FILE))
    model_uri = tracking.log_model(predictor_dir, serving)
    tracking.end_run()
    for uri in (model_uri, f"runs:/{run_id}/model"):
        out = tmp_path / uri.split(":")[0]
        done, failed, applied = predict([images / "l_small.png"], uri, out)
        assert (done, failed) == (1, 0) and "flip tta on, min lesion area off, largest component on" in applied
        record = json.loads((out / "predictions.jsonl").read_text())
        assert record["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
        assert record["lesion_area_px"] == expected["lesion_area_px"] and record["label"] == expected["label"]
    with pytest.raises(BusiError, match="models:/nope/1: cannot load"):
        predict([images], "models:/nope/1", tmp_path / "out")


def test_flip_tta_and_largest_component_as_in_evaluation(images, checkpoint, tmp_path):
    """--flip-tta averages with the mirrored image's class probabilities, --largest-component leaves one region,
    --label-from-mask names a class with a lesion."""
    model, _, _ = load_checkpoint(checkpoint)
    image = np.asarray(Image.open(images / "sub" / "wide.png"), np.float32) / 255
    with torch.no_grad():
        x = torch.nn.functional.interpolate(torch.from_numpy(image)[None, None], (SIZE, SIZE), mode="bilinear")
        expected = (torch.softmax(model(x)[1], 1) + torch.softmax(model(x.flip(3))[1], 1))[0].numpy() / 2
    main_args = [sys.executable, "-m", "busi", "predict", str(images / "sub" / "wide.png"), "--model",
                 str(checkpoint), "--out", str(tmp_path), "--flip-tta", "--largest-component", "--label-from-mask"]
    result = subprocess.run(main_args, env=run_env(), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "predictions.jsonl").read_text())
    np.testing.assert_allclose(list(record["probabilities"].values()), expected, atol=2e-4)
    mask = (np.asarray(Image.open(tmp_path / record["mask"])) > 0).astype(np.uint8)
    assert mask.any() and cv2.connectedComponents(mask)[0] == 2  # background + one region
    assert record["label"] == ("benign" if expected[0] > expected[1] else "malignant")  # a lesion: not normal


def test_the_predictor_post_processing_applies_without_flags_and_flags_override(predictor_dir, images, tmp_path):
    """No flags: the predictor's threshold, flip TTA, largest component and labels from the mask, said on stderr;
    a flag replaces one step; the overlay carries the label and class probabilities."""
    def run(*flags):
        out = tmp_path / f"out{len(flags)}"
        command = [sys.executable, "-m", "busi", "predict", str(images / "sub" / "wide.png"), "--model",
                   str(predictor_dir), "--out", str(out), *flags]
        result = subprocess.run(command, env=run_env(), capture_output=True, text=True, cwd=REPO, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads((out / "predictions.jsonl").read_text()), result.stderr, out

    record, said, out = run()
    assert ("predict: threshold 0.6, flip tta on, min lesion area off, largest component on, crop weight off, "
            "label from mask on, mask from label off, temperature 1.00 (from") in said
    mask = (np.asarray(Image.open(out / record["mask"])) > 0).astype(np.uint8)
    assert mask.any() and cv2.connectedComponents(mask)[0] == 2  # background + one region
    assert record["label"] in ("benign", "malignant")  # a lesion: not normal
    overlay = np.asarray(Image.open(out / record["overlay"]))
    assert (overlay[:8, :120] == 0).mean() > 0.5  # the caption's dark band, top left

    plain, said, out = run("--threshold", "0.5", "--no-flip-tta", "--no-largest-component", "--no-label-from-mask")
    assert ("threshold 0.5, flip tta off, min lesion area off, largest component off, crop weight off, "
            "label from mask off") in said
    assert "threshold, flip_tta, largest_component, label_from_mask from the command line" in said
    probs = plain["probabilities"]
    assert plain["label"] == max(probs, key=probs.get)
    assert plain["probabilities"] != pytest.approx(record["probabilities"], abs=1e-6)  # no flip: another answer


def test_out_naming_a_file_is_one_error(predictor_dir, images, tmp_path):
    (tmp_path / "taken").write_text("keep me")
    with pytest.raises(BusiError, match="taken: --out names an existing file"):
        predict([images], str(predictor_dir), tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "keep me"


def test_out_among_the_inputs_is_refused_before_anything_is_written(predictor_dir, images, tmp_path):
    """BUSI's reference masks are <name>_mask.png, the name predict gives its masks: never write beside inputs."""
    folder = tmp_path / "scans"
    folder.mkdir()
    Image.fromarray(gray(5, 90, 130)).save(folder / "benign (1).png")
    Image.fromarray(np.full((90, 130), 255, np.uint8)).save(folder / "benign (1)_mask.png")
    reference = (folder / "benign (1)_mask.png").read_bytes()
    for inputs in ([folder / "benign (1).png"], [folder]):
        with pytest.raises(BusiError, match="scans: --out is a folder of input images"):
            predict(inputs, str(predictor_dir), folder)
    assert (folder / "benign (1)_mask.png").read_bytes() == reference
    assert sorted(p.name for p in folder.iterdir()) == ["benign (1).png", "benign (1)_mask.png"]


def test_model_files_that_are_not_checkpoints_are_one_line(images, checkpoint, tmp_path):
    """A text file, a bare state dict, weights that do not fit their network: no traceback, and never PyTorch's
    advice to load with weights_only=False."""
    (tmp_path / "notes.pt").write_text("hello")
    torch.save(load_checkpoint(checkpoint)[0].state_dict(), tmp_path / "bare.pt")
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["model"]["encoder"] = "resnet34"
    torch.save(state, tmp_path / "wrong.pt")
    for name, message in [("notes.pt", "not a readable checkpoint"), ("bare.pt", "not a busi checkpoint"),
                          ("wrong.pt", "the weights do not fit the resnet34 U-Net")]:
        result = subprocess.run([sys.executable, "-m", "busi", "predict", str(images / "l_small.png"), "--model",
                                 str(tmp_path / name), "--out", str(tmp_path / "out")], env=run_env(), cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr and "weights_only" not in result.stderr and "Traceback" not in result.stderr


def tamper(folder: Path, change) -> None:
    manifest = json.loads((folder / "predictor.json").read_text())
    change(manifest)
    (folder / "predictor.json").write_text(json.dumps(manifest))


def nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "network-0.safetensors")
    next(tensor for tensor in weights.values() if tensor.is_floating_point()).fill_(float("nan"))
    save_file(weights, folder / "network-0.safetensors")


TAMPERED = {  # what was done to the predictor folder -> what the one line says
    "truncated weights": (lambda f: (f / "network-0.safetensors").write_bytes(
        (f / "network-0.safetensors").read_bytes()[:1000]), "network-0.safetensors: cannot read the weights"),
    "weights linked to a text file": (lambda f: ((f / "notes.txt").write_text("hello"),
                                                 (f / "network-0.safetensors").unlink(),
                                                 (f / "network-0.safetensors").symlink_to(f / "notes.txt")),
                                      "network-0.safetensors: cannot read the weights"),
    "NaN weights": (nan_weights, "the weights hold NaN or infinite values"),
    "flip_tta 'no'": (lambda f: tamper(f, lambda m: m["postprocessing"].update(flip_tta="no")),
                      "postprocessing.flip_tta: 'no' is not true or false"),
    "threshold 'abc'": (lambda f: tamper(f, lambda m: m["postprocessing"].update(threshold="abc")),
                        "postprocessing.threshold: 'abc' is not a number in range"),
    "image_size 8192": (lambda f: tamper(f, lambda m: m.update(image_size=8192)),
                        "image_size 8192 is not a multiple of 32 up to 1024"),
    "a missing field": (lambda f: tamper(f, lambda m: m.pop("networks")), "missing field 'networks'"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_predictor_is_one_line(case, predictor_dir, images, tmp_path):
    folder = tmp_path / "predictor"
    shutil.copytree(predictor_dir, folder)
    change, message = TAMPERED[case]
    change(folder)
    result = subprocess.run([sys.executable, "-m", "busi", "predict", str(images / "l_small.png"), "--model",
                             str(folder), "--out", str(tmp_path / "out")], env=run_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "predictions.jsonl").exists()
