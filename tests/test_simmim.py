"""SimMIM: the mask token in the one backbone, the decoder, peer parity (Hugging Face, official layout),
conversion, masking, fine-tuning from an encoder with layer-wise lr decay, few-label subsets."""
from __future__ import annotations

import json
import math

import pytest
import torch

import swinkit
from swinkit.api import save_weights
from swinkit.models.registry import SwinConfig
from swinkit.models.simmim import SimMIM, masked_l1, random_mask
from swinkit.models.swin import SwinTransformer
from swinkit.weights.io import read_checkpoint

transformers = pytest.importorskip("transformers")


def _config(version: int) -> SwinConfig:
    # full windows in every stage, so Hugging Face's v1 (which never clamps the window) builds the same model
    return SwinConfig(version=version, img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2),
                      num_heads=(2, 4), num_classes=0, drop_path_rate=0.0, in_chans=3)


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def _hf_model(version: int):
    from swinkit.weights import layouts
    config = _config(version)
    kwargs = layouts.hf_config(config, 0, masked_image_modeling=True)
    if version == 1:
        hf = transformers.SwinForMaskedImageModeling(transformers.SwinConfig(**kwargs))
    else:
        hf = transformers.Swinv2ForMaskedImageModeling(transformers.Swinv2Config(**kwargs))
    _perturb(hf, seed=version)
    return hf.eval()


def _inputs(config: SwinConfig, batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, config.in_chans, *config.img_size, generator=generator)
    grid = (config.img_size[0] // config.patch_size, config.img_size[1] // config.patch_size)
    mask = random_mask(batch, grid, config.patch_size, 8, 0.6, generator=generator)
    return images, mask


@pytest.mark.parametrize("version", [1, 2])
def test_simmim_forward_matches_hugging_face_masked_image_modeling(tmp_path, version):
    hf = _hf_model(version)
    hf.save_pretrained(tmp_path / "hf")
    model = swinkit.create_simmim(pretrained=tmp_path / "hf").eval()
    images, mask = _inputs(model.config)
    with torch.no_grad():
        expected = hf(pixel_values=images, bool_masked_pos=mask.flatten(1).bool())
        loss, reconstruction = model(images, mask)
    assert reconstruction.shape == images.shape
    torch.testing.assert_close(reconstruction, expected.reconstruction, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, expected.loss, atol=1e-4, rtol=0)
    assert float(loss) > 0.1  # the weights are far from reconstructing random images

    # an official-layout file built from it: the official names, and the same numbers after loading
    official = tmp_path / "simmim_official.pth"
    save_weights(model, official, layout="official")
    state, _ = read_checkpoint(official)
    assert "encoder.mask_token" in state and "decoder.0.weight" in state
    assert "encoder.layers.0.downsample.reduction.weight" in state  # merging at the end of a stage
    assert all(k.startswith(("encoder.", "decoder.")) for k in state)
    reloaded = swinkit.create_simmim(pretrained=official, img_size=64).eval()
    with torch.no_grad():
        loss2, reconstruction2 = reloaded(images, mask)
    torch.testing.assert_close(reconstruction2, expected.reconstruction, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss2, loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("version", [1, 2])
def test_simmim_files_convert_between_native_official_and_hf_exactly(tmp_path, version):
    model = SimMIM(SwinTransformer(_config(version)))
    _perturb(model, seed=3)
    native = save_weights(model, tmp_path / "native.safetensors")
    official = swinkit.convert_checkpoint(native, tmp_path / "official.pth", to="official")
    hf = swinkit.convert_checkpoint(official, tmp_path / "hf", to="hf")
    back = swinkit.convert_checkpoint(hf, tmp_path / "back.safetensors", to="native")
    original, _ = read_checkpoint(native)
    returned, _ = read_checkpoint(back)
    assert original.keys() == returned.keys()
    for key in original:
        assert torch.equal(original[key], returned[key]), key
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["architectures"][0].endswith("ForMaskedImageModeling")
    loaded = transformers.AutoModelForMaskedImageModeling.from_pretrained(tmp_path / "hf")
    assert torch.equal(loaded.decoder[0].weight, model.decoder[0].weight)
    with pytest.raises(ValueError, match="timm has no masked-image-modeling"):
        swinkit.convert_checkpoint(native, tmp_path / "x.safetensors", to="timm")


def test_a_simmim_file_initialises_a_classifier_without_its_decoder(tmp_path, caplog):
    model = SimMIM(SwinTransformer(_config(2)))
    _perturb(model, seed=4)
    path = save_weights(model, tmp_path / "simmim.pth", layout="official")
    encoder_file = save_weights(model.encoder, tmp_path / "encoder.safetensors")
    assert "mask_token" not in read_checkpoint(encoder_file)[0]
    with caplog.at_level("INFO", logger="swinkit"):
        classifier = swinkit.create_model(pretrained=path, num_classes=7, img_size=64)
    assert "dropped" in caplog.text and "head is freshly initialised" in caplog.text
    assert classifier.mask_token is None and "mask_token" not in classifier.state_dict()
    for key, value in classifier.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, model.encoder.state_dict()[key]), key
    from_encoder = swinkit.create_model(pretrained=encoder_file, num_classes=7).eval()
    classifier.eval()
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(from_encoder.forward_features(images), classifier.forward_features(images))


def test_finetune_loader_resizes_windows_and_image_size_like_the_official_one(tmp_path):
    """A 192 px / window 6 pre-training file fine-tuned at 224 px / window 7 (v1 bias tables resized)."""
    config = SwinConfig(version=1, img_size=192, window_size=6, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                        num_classes=0)
    model = SimMIM(SwinTransformer(config))
    path = save_weights(model, tmp_path / "simmim.pth", layout="official")
    classifier = swinkit.create_model(pretrained=path, img_size=224, window_size=7, num_classes=10)
    table = classifier.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (13 * 13, 2)
    assert classifier(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_random_mask_masks_whole_squares_at_the_ratio():
    generator = torch.Generator().manual_seed(0)
    mask = random_mask(4, (48, 48), 4, 32, 0.6, generator=generator)  # official: 192 px, 32 px squares
    assert mask.shape == (4, 48, 48)
    squares = mask[:, ::8, ::8]
    assert torch.equal(mask, squares.repeat_interleave(8, 1).repeat_interleave(8, 2))
    assert (squares.flatten(1).sum(1) == math.ceil(36 * 0.6)).all()
    assert not torch.equal(mask[0], mask[1])
    # a grid that is not a multiple of the square: 7x7 tokens, 2-token squares -> a 4x4 draw cropped
    odd = random_mask(3, (7, 7), 4, 8, 0.5, generator=generator)
    assert odd.shape == (3, 7, 7) and set(odd.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="multiple of the model's patch size"):
        random_mask(1, (7, 7), 4, 6, 0.5)


def test_loss_counts_masked_pixels_only_and_odd_sizes_work():
    config = SwinConfig(version=1, img_size=28, in_chans=1, patch_size=4, window_size=4, embed_dim=16,
                        depths=(2, 2), num_heads=(1, 2), num_classes=0)
    model = SimMIM(SwinTransformer(config)).eval()
    images = torch.randn(2, 1, 28, 28)
    mask = random_mask(2, (7, 7), 4, 8, 0.6, generator=torch.Generator().manual_seed(0))
    loss, reconstruction = model(images, mask)
    assert reconstruction.shape == images.shape
    pixels = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    expected = ((reconstruction - images).abs() * pixels).sum() / (pixels.sum() + 1e-5)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(masked_l1(images, reconstruction, mask, 4), loss)
    # unmasked pixels do not change the loss; the mask token does change the features
    edited = images + (1 - pixels) * 5.0
    with torch.no_grad():
        assert not torch.equal(model.encoder.forward_features(images, mask), model.encoder.forward_features(images))
    loss.backward()
    assert model.encoder.mask_token.grad is not None and model.encoder.mask_token.grad.abs().sum() > 0
    assert float(masked_l1(edited, reconstruction.detach(), mask, 4)) == pytest.approx(float(loss), abs=1e-6)


# ------------------------------------------------------------------------------ fine-tuning helpers
def test_layer_decay_scales_each_parameter_groups_lr_by_its_depth_from_the_top():
    from swinkit.train.optim import WarmupCosineSchedule, build_optimizer, layer_id
    model = SwinTransformer(SwinConfig(version=2, img_size=32, patch_size=2, window_size=4, embed_dim=16,
                                       depths=(2, 3), num_heads=(1, 2), num_classes=5))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, layer_decay=0.8)
    schedule = WarmupCosineSchedule(optimizer, 1e-3, 1e-5, 1e-5, 2, 10)
    for _ in range(4):
        schedule.step()
    top = 2 + 3 + 1
    expected_layer = {"patch_embed.proj.weight": 0, "layers.0.blocks.0.norm1.weight": 1,
                      "layers.0.blocks.1.mlp.fc1.weight": 2, "layers.1.downsample.reduction.weight": 2,
                      "layers.1.blocks.0.attn.qkv.weight": 3, "layers.1.blocks.2.attn.logit_scale": 5,
                      "norm.weight": 6, "head.fc.weight": 6}
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            layer = layer_id(name, (2, 3))
            if name in expected_layer:
                assert layer == expected_layer[name], name
            assert group["lr"] == pytest.approx(schedule.lr * 0.8 ** (top - layer)), name
            decays = param.ndim > 1 and not name.endswith(("logit_scale",)) and "cpb_mlp" not in name
            assert group["weight_decay"] == (0.05 if decays else 0.0), name
            seen.add(name)
    assert seen == set(names.values())
    assert schedule.lr == pytest.approx(optimizer.param_groups[-1]["lr"])  # the head trains at the full rate


def test_labels_per_class_keeps_a_fixed_balanced_subset(tmp_path):
    from PIL import Image
    from swinkit.data import DataError
    from swinkit.train.config import DataSection
    from swinkit.train.data import open_image_folders
    for split, count in (("train", 6), ("val", 2)):
        for name in ("a", "b", "c"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / split / name / f"{i}.png")
    section = DataSection(path=str(tmp_path), labels_per_class=2)
    train, val = open_image_folders(section, seed=3)
    assert len(train) == 6 and sorted(train.targets) == [0, 0, 1, 1, 2, 2] and len(val) == 6
    again, _ = open_image_folders(section, seed=3)
    assert again.samples == train.samples
    subsets = {tuple(open_image_folders(section, seed=s)[0].samples) for s in range(6)}
    assert len(subsets) > 1  # the seed picks the subset
    with pytest.raises(DataError, match="labels_per_class is 7 but class 'a'"):
        open_image_folders(DataSection(path=str(tmp_path), labels_per_class=7))


# ------------------------------------------------------------------------------ the pre-training run
def test_pretrain_command_resumes_exactly_and_its_encoder_fine_tunes(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from safetensors.torch import load_file
    from test_train import _env, assert_same_tensors, finish, synthetic

    def swinkit(*args):
        return subprocess.Popen([sys.executable, "-m", "swinkit", *map(str, args)], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    args = synthetic("--batch-size", 4, "--epochs", 2, "--save-every", 3, "--seed", 5, "--drop-path", 0.1,
                     pretrain__mask_patch_size=4, augment__mixup=0, augment__cutmix=0)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    output = finish(swinkit("pretrain", "--method", "simmim", "--output", reference, *args))
    assert "val reconstruction loss" in output
    for name in ("last.safetensors", "encoder.safetensors", "reconstructions/epoch_001.png",
                 "reconstructions/epoch_002.png"):
        assert (reference / name).is_file(), name
    assert "encoder.mask_token" in load_file(str(reference / "last.safetensors"))
    encoder = load_file(str(reference / "encoder.safetensors"))
    assert "mask_token" not in encoder and not any(k.startswith("head.") for k in encoder)

    process = swinkit("pretrain", "--method", "simmim", "--output", killed, *args)
    deadline = time.monotonic() + 120
    while not (killed / "last.ckpt").exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finish(swinkit("pretrain", "--method", "simmim", "--output", killed, "--resume", *args))
    assert_same_tensors(reference / "last.safetensors", killed / "last.safetensors")
    assert_same_tensors(reference / "encoder.safetensors", killed / "encoder.safetensors")
    records = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, (run / "metrics.jsonl").open())]
               for run in (reference, killed)]
    assert records[0] == records[1]

    tuned = tmp_path / "tuned"
    finish(swinkit("train", "--output", tuned, "--pretrained", reference / "encoder.safetensors",
                   "--layer-decay", "0.9", *synthetic("--batch-size", 4, "--max-steps", 2)))
    saved = json.loads((tuned / "metrics.jsonl").read_text().splitlines()[-1])
    assert saved["val_top1"] >= 0
    config = (tuned / "config.yaml").read_text()
    assert "layer_decay: 0.9" in config and "encoder.safetensors" in config


def test_pretraining_reads_a_folder_of_images_without_class_folders(tmp_path):
    from PIL import Image
    from swinkit.data import DataError
    from swinkit.train import load_config, train
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        Image.new("RGB", (32, 32), (i * 20, 100, 50)).save(images / f"{i:02d}.png")
    keys = ["model.name=swin_nano_patch2_window4_32", f"data.path={images}", "data.workers=0", "train.batch_size=4",
            "schedule.epochs=1", "schedule.warmup_epochs=0", "augment.mixup=0", "augment.cutmix=0",
            "augment.rand_augment=null", "augment.random_erasing=0", "pretrain.mask_patch_size=4",
            "output.tensorboard=false", "output.curves=false"]
    result = train(load_config(None, [*keys, "pretrain.method=simmim", f"output.dir={tmp_path / 'run'}"]))
    assert result["steps"] == 3 and result["val"]["images"] == 12  # the folder is its own val split
    assert (tmp_path / "run" / "encoder.safetensors").is_file()
    with pytest.raises(DataError, match="class folders"):  # a classifier still needs labels
        train(load_config(None, [*keys, f"output.dir={tmp_path / 'run2'}"]))


@pytest.mark.parametrize("keys", [["train.precision=bf16-mixed"], ["model.memory_budget=64GB"],
                                  ["model.grad_checkpointing=true", "train.ema=true"]],
                         ids=["bf16", "memory-budget", "recompute+ema"])
def test_pretraining_runs_under_the_trainers_policies(tmp_path, keys, caplog):
    from swinkit.train import lean, load_config
    from swinkit.train.trainer import Trainer, distributed
    config = load_config(None, ["model.name=swinv2_nano_patch2_window4_32", "data.synthetic=true",
                                "data.synthetic_train_size=16", "data.synthetic_val_size=8", "data.workers=0",
                                "train.batch_size=4", "schedule.epochs=1", "schedule.warmup_epochs=0",
                                "augment.mixup=0", "augment.cutmix=0", "pretrain.method=simmim",
                                "pretrain.mask_patch_size=4", "output.tensorboard=false", "output.curves=false",
                                f"output.dir={tmp_path / 'run'}", *keys])
    trainer = Trainer(config, distributed.setup("cpu"))
    plan = lean.plan_of(trainer.backbone)
    assert lean.is_installed(trainer.backbone) and len(plan) == len(trainer.backbone.blocks())
    if "model.grad_checkpointing=true" in keys:
        assert set(plan) == {"full"}
    before = trainer.model_raw.encoder.mask_token.detach().clone()
    result = trainer.fit()
    assert result["steps"] == 4 and math.isfinite(result["val"]["loss"])
    assert not torch.equal(before, trainer.model_raw.encoder.mask_token)  # the token is trained


def test_a_mask_square_that_is_not_a_multiple_of_the_patch_is_refused_before_training(tmp_path):
    from swinkit.train import ConfigError, load_config, train
    config = load_config(None, ["model.name=swin_nano_patch2_window4_32", "data.synthetic=true", "data.workers=0",
                                "augment.mixup=0", "augment.cutmix=0", "pretrain.method=simmim",
                                "pretrain.mask_patch_size=3", f"output.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"pretrain.mask_patch_size' \(3 px\) must be a multiple of .* \(2 px\)"):
        train(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "config.yaml").exists()
