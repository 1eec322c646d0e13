"""swinkit eval / predict: numbers match a direct computation, class names, bad inputs, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import swinkit
from swinkit.cli import main
from swinkit.data import DataError, build_eval_transform
from swinkit.infer import Preprocess, evaluate, load_runner, predict
from swinkit.weights.io import CheckpointError

MODEL = "swin_nano_patch2_window4_32"
# Deliberately not in sorted order: folders (sorted) must be matched to outputs by name.
CLASSES = ["zebra", "ant", "cat"]
PREPROCESS = {"img_size": [32, 32], "in_chans": 1, "mean": [0.5], "std": [0.25], "crop_pct": 0.875,
              "interpolation": "bicubic"}
IMAGES_PER_CLASS = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_gray_png(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256)
    pixels = np.clip(base + rng.normal(0, 60, (28, 28)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path)
    return path


@pytest.fixture(scope="module")
def model() -> swinkit.SwinTransformer:
    torch.manual_seed(0)
    return swinkit.create_model(MODEL, num_classes=3, in_chans=1).eval()


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "best.safetensors"
    swinkit.save_weights(model, path, metadata={"swinkit_classes": json.dumps(CLASSES),
                                                "swinkit_preprocess": json.dumps(PREPROCESS)})
    return path


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    """root/val/<class>/*.png, grey 28x28 (and a train split that eval must ignore)."""
    root = tmp_path_factory.mktemp("data")
    seed = 0
    for split in ("train", "val"):
        for name in sorted(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(IMAGES_PER_CLASS if split == "val" else 1):
                write_gray_png(root / split / name / f"{i}.png", seed)
                seed += 1
    return root


def direct_logits(model, paths: list[Path]) -> torch.Tensor:
    transform = build_eval_transform(32, PREPROCESS["mean"], PREPROCESS["std"], in_chans=1)
    batch = torch.stack([transform(Image.open(path).convert("L")) for path in paths])
    with torch.no_grad():
        return model(batch)


def test_eval_matches_direct_computation_with_classes_matched_by_name(model, weights, dataset_root):
    val = dataset_root / "val"
    paths, targets = [], []
    for name in sorted(CLASSES):
        for path in sorted((val / name).iterdir()):
            paths.append(path)
            targets.append(CLASSES.index(name))  # the checkpoint's output index, not the folder's
    logits = direct_logits(model, paths)
    targets = torch.tensor(targets)
    hits = logits.argmax(1) == targets

    result = evaluate(weights, dataset_root, batch_size=5, workers=0, device="cpu")

    assert result["images"] == len(paths) == 3 * IMAGES_PER_CLASS
    assert result["data"] == str(val)
    assert result["top1"] == pytest.approx(100.0 * hits.float().mean().item())
    assert result["top5_k"] == 3 and result["top5"] == pytest.approx(100.0)  # k = min(5, 3 classes)
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-4)
    for name in CLASSES:
        in_class = targets == CLASSES.index(name)
        assert result["per_class"][name] == pytest.approx(100.0 * hits[in_class].float().mean().item())
        assert result["per_class_images"][name] == IMAGES_PER_CLASS
    assert result["failed"] == []


def test_eval_of_a_class_folder_directly_and_with_workers(weights, dataset_root):
    from_root = evaluate(weights, dataset_root, workers=0, device="cpu")
    direct = evaluate(weights, dataset_root / "val", workers=1, batch_size=4, device="cpu")
    assert direct["top1"] == pytest.approx(from_root["top1"])
    assert direct["per_class"] == pytest.approx(from_root["per_class"])


def test_eval_class_folder_unknown_to_the_model_is_named(weights, tmp_path):
    for name in ("ant", "dog"):
        (tmp_path / name).mkdir()
        write_gray_png(tmp_path / name / "0.png", 1)
    with pytest.raises(DataError, match="'dog'"):
        evaluate(weights, tmp_path, workers=0, device="cpu")


def test_checkpoint_without_names_uses_sorted_folders_and_index_names(model, tmp_path, dataset_root):
    bare = swinkit.save_weights(model, tmp_path / "bare.safetensors")
    runner = load_runner(bare, device="cpu")
    assert runner.classes == ["0", "1", "2"] and not runner.named_classes
    assert runner.preprocess == Preprocess((32, 32), 1, model.config.mean, model.config.std, 0.875, "bicubic")
    result = evaluate(bare, dataset_root, workers=0, device="cpu", preprocess=Preprocess.from_metadata(
        {"swinkit_preprocess": json.dumps(PREPROCESS)}, model.config))
    val = dataset_root / "val"
    paths = [path for name in sorted(CLASSES) for path in sorted((val / name).iterdir())]
    targets = torch.arange(3).repeat_interleave(IMAGES_PER_CLASS)
    expected = (direct_logits(model, paths).argmax(1) == targets).float().mean().item() * 100
    assert result["top1"] == pytest.approx(expected)


def test_preprocess_from_metadata_and_overrides(model):
    stored = Preprocess.from_metadata({"swinkit_preprocess": json.dumps(PREPROCESS)}, model.config)
    assert stored == Preprocess((32, 32), 1, (0.5,), (0.25,), 0.875, "bicubic")
    changed = stored.replace(img_size=(40, 48), crop_pct=1.0, interpolation=None)
    assert changed.img_size == (40, 48) and changed.crop_pct == 1.0 and changed.interpolation == "bicubic"
    assert changed.transform()(Image.new("L", (28, 28))).shape == (1, 40, 48)
    with pytest.raises(CheckpointError, match="swinkit_preprocess"):
        Preprocess.from_metadata({"swinkit_preprocess": "{not json"}, model.config, source="x.safetensors")


def test_eval_cli_json_is_one_object(weights, dataset_root, capsys):
    assert main(["eval", "--weights", str(weights), "--data", str(dataset_root), "--workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"top1", "top5", "images", "per_class"} <= set(result) and result["images"] == 3 * IMAGES_PER_CLASS


def test_eval_cli_preprocessing_flags_override_the_checkpoint(weights, dataset_root, capsys):
    args = ["eval", "--weights", str(weights), "--data", str(dataset_root), "--workers", "0", "--json", "--threads", "1"]
    assert main(args + ["--img-size", "28", "--crop-pct", "1.0", "--interpolation", "bilinear"]) == 0
    overridden = json.loads(capsys.readouterr().out)
    expected = evaluate(weights, dataset_root, workers=0, device="cpu",
                        preprocess={"img_size": 28, "crop_pct": 1.0, "interpolation": "bilinear"})
    assert overridden["top1"] == pytest.approx(expected["top1"])
    assert overridden["loss"] == pytest.approx(expected["loss"])
    assert overridden["loss"] != pytest.approx(evaluate(weights, dataset_root, workers=0, device="cpu")["loss"])


def test_eval_cli_text_shows_accuracy_per_class_and_count(weights, dataset_root, capsys):
    assert main(["eval", "--weights", str(weights), "--data", str(dataset_root), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "top-5" in out and f"{3 * IMAGES_PER_CLASS} images" in out
    assert all(name in out for name in CLASSES)


def test_predict_topk_matches_model_softmax(model, weights, dataset_root):
    paths = sorted((dataset_root / "val" / "cat").iterdir())[:2]
    results = predict(weights, paths, topk=2, device="cpu")
    probs = torch.softmax(direct_logits(model, paths).double(), dim=1)
    for entry, row in zip(results, probs):
        predictions = entry["predictions"]
        assert len(predictions) == 2 and sum(p["prob"] for p in predictions) <= 1 + 1e-9
        assert predictions[0]["prob"] >= predictions[1]["prob"]
        for prediction in predictions:
            assert prediction["prob"] == pytest.approx(row[prediction["index"]].item(), abs=1e-5)
            assert prediction["class"] == CLASSES[prediction["index"]]
    assert len(predict(weights, paths[:1], topk=10, device="cpu")[0]["predictions"]) == 3  # capped at classes


def test_predict_reports_a_corrupt_image_by_name_and_predicts_the_rest(weights, dataset_root, tmp_path, capsys):
    good = sorted((dataset_root / "val" / "ant").iterdir())[0]
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:40])
    missing = tmp_path / "missing.png"
    code = main(["predict", "--weights", str(weights), str(corrupt), str(good), str(missing), "--json"])
    captured = capsys.readouterr()
    results = json.loads(captured.out)["results"]
    assert code == 1
    assert [entry["image"] for entry in results] == [str(corrupt), str(good), str(missing)]
    assert "error" in results[0] and "error" in results[2] and len(results[1]["predictions"]) == 3
    assert str(corrupt) in captured.err and str(missing) in captured.err

    assert main(["predict", "--weights", str(weights), str(good), "--topk", "1"]) == 0
    assert str(good) in capsys.readouterr().out


def test_eval_aborts_when_more_than_one_percent_of_images_are_unreadable(weights, tmp_path):
    for name in CLASSES:
        (tmp_path / name).mkdir()
        write_gray_png(tmp_path / name / "0.png", 3)
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match="broken.png"):
        evaluate(weights, tmp_path, workers=0, device="cpu")


@pytest.mark.parametrize("problem", ["missing data", "missing weights", "bad weights"])
def test_bad_inputs_exit_2_with_one_line_naming_them(problem, weights, dataset_root, tmp_path, capsys):
    data, weights_path = dataset_root, weights
    if problem == "missing data":
        data = tmp_path / "nowhere"
    elif problem == "missing weights":
        weights_path = tmp_path / "absent.safetensors"
    else:
        weights_path = tmp_path / "garbage.safetensors"
        weights_path.write_bytes(b"not a checkpoint at all")
    code = main(["eval", "--weights", str(weights_path), "--data", str(data), "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(data if problem == "missing data" else weights_path) in err
