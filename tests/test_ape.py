"""Absolute position embedding (the official `ape`): one model definition, both backends, every layout.

Facts checked against the public sources: official `absolute_pos_embed` [1, patches, C], trunc-normal
.02, added after the patch embedding (and its norm, and SimMIM's mask token) and excluded from weight
decay; Hugging Face `embeddings.position_embeddings`, [1, patches, C] for Swin v1 (transformers 5) and
[1, 1 + patches, C] for Swinv2, whose forward cannot add it (transformers issue #37161); timm and
torchvision have no such parameter.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import swinkit
from swinkit.api import save_weights
from swinkit.errors import SwinkitError
from swinkit.models.registry import MODELS, SwinConfig
from swinkit.models.simmim import SimMIM, random_mask
from swinkit.models.swin import SwinTransformer
from swinkit.train.optim import layer_id, param_groups
from swinkit.weights.io import read_checkpoint
from swinkit.weights.layouts import LayoutError
from swinkit.weights.resize import resize_absolute_position_embedding

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_ORT = all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime", "onnxscript"))


def _config(version: int, **changes) -> SwinConfig:
    # full windows in every stage, so Hugging Face's v1 (which never clamps the window) builds the same model
    fields = dict(version=version, img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2),
                  num_heads=(2, 4), num_classes=5, drop_path_rate=0.0, ape=True)
    return SwinConfig(**{**fields, **changes})


def _model(version: int, seed: int = 0, **changes) -> SwinTransformer:
    """An eval model with seeded noise on every parameter (no init symmetry hides a mistake) and a
    position table large enough to move the logits."""
    torch.manual_seed(seed)
    model = SwinTransformer(_config(version, **changes))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
        model.absolute_pos_embed.mul_(10)
    return model.eval()


def _images(batch: int, height: int, width: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_ape_is_a_checked_config_field_kept_in_the_file_and_off_for_every_registered_name(tmp_path):
    with pytest.raises(TypeError, match="SwinConfig.ape must be true or false"):
        SwinConfig(ape="yes")
    assert SwinConfig.from_dict({k: v for k, v in _config(1).to_dict().items() if k != "ape"}).ape is False
    assert not any(config.ape for config in MODELS.values())
    assert "absolute_pos_embed" not in SwinTransformer(MODELS["swin_nano_patch2_window4_32"]).state_dict()
    from swinkit.cli import model_info
    assert model_info("swin_tiny_patch4_window7_224")["params_m"] == 28.29  # the official Swin-T count
    model = _model(2)
    path = save_weights(model, tmp_path / "ape.safetensors")
    reloaded = swinkit.create_model(pretrained=path)
    assert reloaded.config == model.config and reloaded.config.ape
    assert torch.equal(reloaded.absolute_pos_embed, model.absolute_pos_embed)


def test_table_is_official_and_added_after_the_norm_and_the_mask_token():
    torch.manual_seed(0)
    model = SwinTransformer(_config(1, embed_dim=64, img_size=128))
    assert model.absolute_pos_embed.shape == (1, 32 * 32, 64)
    assert 0.018 < float(model.absolute_pos_embed.detach().std()) < 0.022  # trunc-normal std .02
    model = _model(1)
    model.add_mask_token()
    images = _images(2, 64, 64)
    mask = random_mask(2, (16, 16), 4, 8, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = model.mask_patches(model.patch_embed(images), mask)  # the embedding's norm, then the token
        x = x + model.absolute_pos_embed.view(1, 16, 16, -1)
        expected = model.norm(model.layers(x))
        torch.testing.assert_close(model.forward_features(images, mask), expected, atol=0, rtol=0)
        maps = model.forward_intermediates(images)
    torch.testing.assert_close(maps[-1], model.forward_features(images).permute(0, 3, 1, 2), atol=1e-6, rtol=0)


def test_no_weight_decay_and_the_official_layer_id():
    model = SwinTransformer(_config(1))
    groups = param_groups(model, 0.05, model.no_weight_decay_keywords())
    no_decay = [group for group in groups if group["weight_decay"] == 0.0]
    assert any(param is model.absolute_pos_embed for group in no_decay for param in group["params"])
    assert layer_id("absolute_pos_embed", (2, 2)) == 5  # official get_swin_layer: the top


@pytest.mark.parametrize("version", [1, 2])
def test_logits_match_hugging_face_after_converting_a_file(tmp_path, version):
    transformers = pytest.importorskip("transformers")
    model = _model(version)
    native = save_weights(model, tmp_path / "native.safetensors")
    official = swinkit.convert_checkpoint(native, tmp_path / "official.pth", to="official")
    folder = swinkit.convert_checkpoint(official, tmp_path / "hf", to="hf")
    assert json.loads((folder / "config.json").read_text())["use_absolute_embeddings"] is True
    hf = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    embeddings = (hf.swin if version == 1 else hf.swinv2).embeddings
    table = embeddings.position_embeddings
    images = _images(2, 64, 64)
    if version == 2:
        # Swinv2 keeps a ViT class slot first ([1, 1 + 256, C], zeros here) that its forward cannot add.
        assert table.shape == (1, 1 + 256, 32) and not table[:, 0].any()
        # Its interpolate_pos_encoding reads the patch grid from slot 1 on: our resize, the same numbers.
        with torch.no_grad():
            resized = embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + 20 * 12, 32), 80, 48)
        torch.testing.assert_close(resized[:, 1:], model.position_embedding(20, 12), atol=1e-6, rtol=0)
        embeddings.position_embeddings = torch.nn.Parameter(table[:, 1:].detach())  # transformers #37161
    else:
        assert table.shape == (1, 256, 32)
    with torch.no_grad():
        expected = hf(pixel_values=images).logits
        got = model(images)
        assert expected.std() > 0.1
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        # another size (a window multiple at every stage: Hugging Face does not mask padding as keys)
        other = _images(2, 96, 64)
        if version == 1:
            expected = hf(pixel_values=other, interpolate_pos_encoding=True).logits
            torch.testing.assert_close(model(other), expected, atol=1e-4, rtol=0)


def test_masked_image_modeling_matches_hugging_face(tmp_path):
    """SimMIM order (mask token, then the position embedding): Hugging Face's v1 masked-image model."""
    transformers = pytest.importorskip("transformers")
    model = SimMIM(_model(1, num_classes=0))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.encoder.mask_token.add_(torch.randn(model.encoder.mask_token.shape, generator=generator))
    save_weights(model, tmp_path / "hf", layout="hf")
    hf = transformers.AutoModelForMaskedImageModeling.from_pretrained(tmp_path / "hf").eval()
    images = _images(2, 64, 64)
    mask = random_mask(2, (16, 16), 4, 8, 0.6, generator=generator)
    with torch.no_grad():
        expected = hf(pixel_values=images, bool_masked_pos=mask.flatten(1).bool())
        loss, reconstruction = model(images, mask)
    torch.testing.assert_close(reconstruction, expected.reconstruction, atol=1e-4, rtol=0)
    torch.testing.assert_close(loss, expected.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", [1, 2])
def test_native_official_hf_native_is_bit_exact(tmp_path, version):
    model = _model(version)
    native = save_weights(model, tmp_path / "native.safetensors")
    official = swinkit.convert_checkpoint(native, tmp_path / "official.pth", to="official")
    hf = swinkit.convert_checkpoint(official, tmp_path / "hf", to="hf")
    back = swinkit.convert_checkpoint(hf, tmp_path / "back.safetensors", to="native")
    original, returned = read_checkpoint(native)[0], read_checkpoint(back)[0]
    assert original.keys() == returned.keys() and "absolute_pos_embed" in original
    for key in original:
        assert torch.equal(original[key], returned[key]), key
    hf_state = read_checkpoint(hf)[0]
    prefix = "swin." if version == 1 else "swinv2."
    assert hf_state[prefix + "embeddings.position_embeddings"].shape[1] == 256 + (version == 2)


def test_a_transformers_4_swin_file_with_the_extra_slot_loads(tmp_path):
    """transformers 4 built v1's table with the class slot too ([1, 1 + patches, C]); it is dropped."""
    model = _model(1)
    folder = save_weights(model, tmp_path / "hf", layout="hf")
    state = read_checkpoint(folder)[0]
    key = "swin.embeddings.position_embeddings"
    state[key] = torch.cat([torch.randn(1, 1, 32), state[key]], dim=1)
    loaded = swinkit.create_model(pretrained=state, img_size=64, window_size=4)
    assert torch.equal(loaded.absolute_pos_embed, model.absolute_pos_embed)


def test_an_official_file_loads_and_resizes_to_another_image_size(tmp_path):
    model = _model(1)
    path = save_weights(model, tmp_path / "official.pth", layout="official")
    state = torch.load(path, weights_only=True)["model"]
    assert state["absolute_pos_embed"].shape == (1, 256, 32)
    loaded = swinkit.create_model(pretrained=path).eval()  # config inferred from the tensors (ape, 64 px)
    assert loaded.config.ape and loaded.config.img_size == (64, 64)
    images = _images(2, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), atol=0, rtol=0)
    bigger = swinkit.create_model(pretrained=path, img_size=96).eval()
    assert bigger.absolute_pos_embed.shape == (1, 24 * 24, 32)
    expected = resize_absolute_position_embedding(model.absolute_pos_embed, (16, 16), (24, 24))
    assert torch.equal(bigger.absolute_pos_embed, expected)
    images = _images(2, 96, 96)
    with torch.no_grad():  # the loader's resize is the one the model runs at another input size
        torch.testing.assert_close(bigger(images), model(images), atol=1e-5, rtol=0)


def test_a_non_square_table_resizes_on_load_from_its_own_grid(tmp_path):
    model = _model(2, img_size=(32, 48))
    path = save_weights(model, tmp_path / "wide.safetensors")
    tall = swinkit.create_model(pretrained=path, img_size=(48, 32))
    expected = resize_absolute_position_embedding(model.absolute_pos_embed, (8, 12), (12, 8))
    assert torch.equal(tall.absolute_pos_embed, expected)


def test_checkpoints_with_and_without_it(tmp_path, caplog):
    nano = dict(img_size=32, patch_size=2, depths=(2, 2, 2), num_heads=(1, 2, 4))  # swin_nano's architecture
    path = save_weights(_model(1, **nano), tmp_path / "ape.pth", layout="official")
    named = swinkit.create_model("swin_nano_patch2_window4_32", pretrained=path)  # the weights decide
    assert named.config.ape and named.name == "swin_nano_patch2_window4_32"
    plain = save_weights(SwinTransformer(_config(1, ape=False)), tmp_path / "plain.safetensors")
    with caplog.at_level("WARNING", logger="swinkit"):
        fresh = swinkit.create_model(pretrained=plain, ape=True)
    assert fresh.config.ape and "absolute position embedding" in caplog.text
    with pytest.raises(SwinkitError, match="unexpected absolute_pos_embed"):
        swinkit.load_weights(SwinTransformer(_config(1, ape=False, **nano)), path)


@pytest.mark.parametrize("layout", ["timm", "torchvision"])
def test_layouts_without_it_refuse_it(tmp_path, layout):
    path = save_weights(_model(1), tmp_path / "ape.safetensors")
    with pytest.raises(LayoutError, match=f"{layout}'s Swin Transformer has no absolute position embedding"):
        swinkit.convert_checkpoint(path, tmp_path / "out.pth", to=layout)
    assert not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("version", [1, 2])
def test_other_input_sizes_fast_path_and_lean_training(version):
    from swinkit.infer.fast import FastSwin
    from swinkit.infer.optimize import optimize_for_inference
    from swinkit.train import lean
    model = _model(version)
    for height, width in [(64, 64), (45, 61), (23, 90)]:  # non-square, not multiples of the patch
        images = _images(2, height, width)
        with torch.no_grad():
            expected = model(images)
            assert torch.isfinite(expected).all() and expected.std() > 0.1
            torch.testing.assert_close(optimize_for_inference(model)(images), expected, atol=1e-4, rtol=0)
            plain = FastSwin(model, use_onednn=False)
            plain.symbolic_sizes = True  # the constants an ONNX export computes in its graph
            torch.testing.assert_close(plain(images), expected, atol=1e-4, rtol=0)
    model.train()
    images = _images(2, 45, 61)
    model(images).square().sum().backward()
    expected = model.absolute_pos_embed.grad.clone()
    model.zero_grad()
    lean.install(model, plan="full")
    model(images).square().sum().backward()
    torch.testing.assert_close(model.absolute_pos_embed.grad, expected, atol=1e-5, rtol=1e-4)
    assert expected.abs().max() > 0


@pytest.mark.skipif(not HAS_ORT, reason="onnx / onnxruntime / onnxscript not installed")
def test_onnx_export_with_dynamic_sizes_matches_pytorch(tmp_path):
    from swinkit.infer.export import export_onnx
    from swinkit.infer.onnx_runner import OnnxRunner
    model = _model(1, img_size=32, patch_size=2)
    runner = OnnxRunner(export_onnx(model, tmp_path / "ape.onnx"))
    for batch, height, width in [(1, 32, 32), (2, 45, 23)]:
        images = _images(batch, height, width)
        with torch.no_grad():
            torch.testing.assert_close(runner(images), model(images), atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", [1, 2])
def test_jax_matches_pytorch_and_round_trips_bit_exactly(tmp_path, version):
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax.nnx")
    import numpy as np

    import swinkit.jax as sj
    from swinkit.jax import convert
    from swinkit.jax.model import bicubic_matrix
    model = _model(version)
    jax_model = sj.from_torch(model)
    for height, width in [(64, 64), (45, 61)]:
        images = _images(2, height, width)
        with torch.no_grad():
            expected = model(images).numpy()
        got = np.asarray(sj.predict(jax_model, jax.numpy.asarray(images.permute(0, 2, 3, 1).numpy())))
        assert expected.std() > 0.1
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # the JAX resize is PyTorch's, read off as one matrix per axis
    table = torch.randn(1, 16 * 16, 8)
    resized = np.einsum("hr,rcd,wc->hwd", bicubic_matrix(16, 12), table.view(16, 16, 8).numpy(),
                        bicubic_matrix(16, 23))
    torch_resized = resize_absolute_position_embedding(table, (16, 16), (12, 23)).view(12, 23, 8).numpy()
    np.testing.assert_allclose(resized, torch_resized, atol=1e-6, rtol=0)
    first, second = tmp_path / "torch.safetensors", tmp_path / "jax.safetensors"
    save_weights(model, first)
    sj.save_weights(sj.create_model(pretrained=first), second)
    original, returned = read_checkpoint(first)[0], read_checkpoint(second)[0]
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) for k in original)
    assert convert.state_dict(jax_model)["absolute_pos_embed"].shape == (1, 256, 32)
