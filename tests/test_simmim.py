"""SimMIM: the mask token in the one backbone, the decoder, peer parity (Hugging Face, official layout),
conversion, masking, fine-tuning from an encoder with layer-wise lr decay, few-label subsets."""
from __future__ import annotations

import json
import math

import pytest
import torch

import swinkit
from swinkit.api import read_native, save_weights
from swinkit.models.registry import SwinConfig
from swinkit.models.simmim import SimMIM, masked_l1, random_mask
from swinkit.models.swin import SwinTransformer
from swinkit.weights.io import CheckpointError, read_checkpoint

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
