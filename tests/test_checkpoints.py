"""Checkpoint files end to end: every peer's own file layout loads through the public API and
reproduces that peer's logits; fine-tuning loads adapt; bad files fail clearly and run nothing."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import swinkit
from swinkit import CheckpointError, SwinConfig, SwinTransformer

timm = pytest.importorskip("timm")

SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter off its init: v2 starts its post-norms at zero, which would hide mistakes."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def logits(model, size, batch=2):
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


# ----------------------------------------------------------------------------- peers' files
@pytest.mark.parametrize("name,size", [("swin_tiny_patch4_window7_224", (224, 224)),
                                       ("swinv2_tiny_window8_256", (256, 256))])
def test_timm_file_loads_by_name(tmp_path, name, size):
    peer = perturb(timm.create_model(name, num_classes=10, **SMALL))
    torch.save(peer.state_dict(), tmp_path / "timm.pth")
    ours = swinkit.create_model(name, pretrained=tmp_path / "timm.pth", **SMALL).eval()
    assert ours.num_classes == 10
    assert torch.allclose(logits(ours, size), logits(peer, size), atol=1e-4)


def test_official_layout_file_loads_without_name(tmp_path):
    """An official `{'model': sd}` .pth, made from timm's model by reversing timm's own conversion."""
    from swinkit.weights import layouts
    peer = perturb(timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, **SMALL))
    config = swinkit.get_config("swin_tiny_patch4_window7_224").replace(num_classes=10, **SMALL)
    official = layouts.from_native(peer.state_dict(), "official", config)
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    assert "layers.0.blocks.1.attn_mask" in official
    torch.save({"model": official}, tmp_path / "official.pth")
    ours = swinkit.create_model(pretrained=tmp_path / "official.pth").eval()
    assert ours.config.window_size == 7 and ours.config.depths == SMALL["depths"]
    assert torch.allclose(logits(ours, (224, 224)), logits(peer, (224, 224)), atol=1e-4)


@pytest.mark.parametrize("version", [1, 2])
def test_hugging_face_folder_loads(tmp_path, version):
    transformers = pytest.importorskip("transformers")
    if version == 1:
        config = transformers.SwinConfig(image_size=224, window_size=7, num_labels=10, embed_dim=32,
                                         depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8])
        peer = transformers.SwinForImageClassification(config)
        size = (224, 224)
    else:
        config = transformers.Swinv2Config(image_size=256, window_size=8, num_labels=10, embed_dim=32,
                                           depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8])
        peer = transformers.Swinv2ForImageClassification(config)
        size = (256, 256)
    perturb(peer).save_pretrained(tmp_path / "hf")
    ours = swinkit.create_model(pretrained=tmp_path / "hf").eval()
    assert ours.config.version == version
    assert torch.allclose(logits(ours, size), logits(peer, size), atol=1e-4)


@pytest.mark.parametrize("version", [1, 2])
def test_torchvision_file_loads(tmp_path, version):
    tv = pytest.importorskip("torchvision.models.swin_transformer")
    if version == 1:
        peer = tv.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                                  window_size=[7, 7], stochastic_depth_prob=0.0, num_classes=10)
        name, size = "swin_tiny_patch4_window7_224", (224, 224)
    else:
        peer = tv.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                                  window_size=[8, 8], stochastic_depth_prob=0.0, num_classes=10,
                                  block=tv.SwinTransformerBlockV2, downsample_layer=tv.PatchMergingV2)
        name, size = "swinv2_tiny_window8_256", (256, 256)
    perturb(peer)
    with torch.no_grad():  # torchvision v2 keeps a full qkv bias whose k part is always zero
        for module in peer.modules():
            if isinstance(module, tv.ShiftedWindowAttentionV2):
                third = module.qkv.bias.shape[0] // 3
                module.qkv.bias[third:2 * third] = 0
    torch.save(peer.state_dict(), tmp_path / "tv.pth")
    ours = swinkit.create_model(name, pretrained=tmp_path / "tv.pth", **SMALL).eval()
    assert torch.allclose(logits(ours, size), logits(peer, size), atol=1e-4)


# ------------------------------------------------------------------------- save / convert
def test_native_safetensors_recreates_model_alone(tmp_path):
    model = perturb(swinkit.create_model("swinv2_nano_patch2_window4_32", num_classes=4))
    swinkit.save_weights(model, tmp_path / "m.safetensors")
    again = swinkit.create_model(pretrained=tmp_path / "m.safetensors").eval()
    assert again.config == model.config
    assert torch.equal(logits(again, (32, 32)), logits(model, (32, 32)))


@pytest.mark.parametrize("layout", ["official", "timm", "hf", "torchvision", "native"])
@pytest.mark.parametrize("name", ["swin_nano_patch2_window4_32", "swinv2_nano_patch2_window4_32"])
def test_convert_round_trip_is_exact(tmp_path, layout, name):
    model = perturb(swinkit.create_model(name))
    swinkit.save_weights(model, tmp_path / "src.safetensors")
    suffix = "" if layout == "hf" else (".safetensors" if layout in ("native", "timm") else ".pth")
    swinkit.convert_checkpoint(tmp_path / "src.safetensors", tmp_path / f"mid{suffix}", to=layout)
    swinkit.convert_checkpoint(tmp_path / f"mid{suffix}", tmp_path / "back.safetensors", to="native", model=name)
    back = swinkit.create_model(pretrained=tmp_path / "back.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_convert_refuses_what_a_layout_cannot_hold(tmp_path):
    # torchvision builds every stage with the full window; a model whose late stages clamp it has no equivalent.
    swinkit.save_weights(swinkit.create_model("swin_micro_patch4_window7_56"), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="torchvision"):
        swinkit.convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "tv.pth", to="torchvision")
    assert not (tmp_path / "tv.pth").exists()


def test_cli_convert(tmp_path):
    from swinkit.cli import main
    model = perturb(swinkit.create_model("swin_nano_patch2_window4_32"))
    swinkit.save_weights(model, tmp_path / "m.safetensors")
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "o.pth"), "--to", "official"]) == 0
    assert "model" in torch.load(tmp_path / "o.pth", weights_only=True)


# --------------------------------------------------------------------- fine-tuning loads
def test_window7_table_resized_to_window12_as_official(tmp_path):
    source = perturb(SwinTransformer(SwinConfig(img_size=224, window_size=7, **SMALL)))
    swinkit.save_weights(source, tmp_path / "w7.safetensors")
    target = SwinTransformer(SwinConfig(img_size=384, window_size=12, **SMALL))
    swinkit.load_weights(target, tmp_path / "w7.safetensors")
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    table = source.state_dict()[key]  # [(2*7-1)^2, heads]
    heads = table.shape[1]
    expected = F.interpolate(table.T.reshape(1, heads, 13, 13), size=(23, 23), mode="bicubic",
                             align_corners=False).reshape(heads, 23 * 23).T
    assert torch.allclose(target.state_dict()[key], expected, atol=1e-6)
    with torch.no_grad():
        assert target(torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_v2_loads_at_new_window_and_size(tmp_path):
    source = perturb(swinkit.create_model("swinv2_micro_window8_64"))
    swinkit.save_weights(source, tmp_path / "w8.safetensors")
    target = swinkit.create_model("swinv2_micro_window8_64", pretrained=tmp_path / "w8.safetensors",
                                  img_size=128, window_size=16, pretrained_window_sizes=(8, 8, 4, 2))
    assert target.layers[0].window == 16
    assert torch.equal(target.state_dict()["layers.0.blocks.0.attn.cpb_mlp.0.weight"],
                       source.state_dict()["layers.0.blocks.0.attn.cpb_mlp.0.weight"])
    with torch.no_grad():
        assert torch.isfinite(target(torch.randn(1, 3, 128, 128))).all()


def test_new_class_count_reinitialises_head_with_warning(tmp_path, caplog):
    source = perturb(swinkit.create_model("swin_nano_patch2_window4_32", num_classes=10))
    swinkit.save_weights(source, tmp_path / "m.safetensors")
    with caplog.at_level(logging.WARNING, logger="swinkit"):
        model = swinkit.create_model(pretrained=tmp_path / "m.safetensors", num_classes=3)
    assert model.num_classes == 3
    assert any("re-initialised" in r.message for r in caplog.records)
    assert torch.equal(model.state_dict()["norm.weight"], source.state_dict()["norm.weight"])


def test_22k_head_selects_1k_rows(tmp_path):
    from swinkit.weights.resize import imagenet22k_to_1k_rows
    source = perturb(SwinTransformer(SwinConfig(num_classes=21841, **SMALL)))
    swinkit.save_weights(source, tmp_path / "22k.safetensors")
    model = swinkit.create_model(pretrained=tmp_path / "22k.safetensors", num_classes=1000)
    rows = imagenet22k_to_1k_rows()
    assert rows.shape == (1000,)
    assert torch.equal(model.head.fc.weight, source.head.fc.weight[rows])
    assert torch.equal(model.head.fc.bias, source.head.fc.bias[rows])


def test_in_chans_adapted_from_rgb(tmp_path):
    source = perturb(swinkit.create_model("swin_nano_patch2_window4_32"))
    swinkit.save_weights(source, tmp_path / "rgb.safetensors")
    grey = swinkit.create_model(pretrained=tmp_path / "rgb.safetensors", in_chans=1).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(grey(x), source(x.expand(1, 3, 32, 32)), atol=1e-5)


# ---------------------------------------------------------------------------- bad files
def test_wrong_model_lists_every_mismatch(tmp_path):
    source = perturb(swinkit.create_model("swin_nano_patch2_window4_32"))
    swinkit.save_weights(source, tmp_path / "nano.safetensors")
    with pytest.raises(CheckpointError) as error:
        swinkit.create_model("swin_micro_patch4_window7_56", pretrained=tmp_path / "nano.safetensors")
    message = str(error.value)
    assert "nano.safetensors" in message and "swin_micro_patch4_window7_56" in message
    assert "shape mismatch patch_embed.proj.weight" in message and "missing layers.3." in message


def test_v2_checkpoint_into_v1_model_is_refused(tmp_path):
    source = perturb(swinkit.create_model("swinv2_nano_patch2_window4_32"))
    swinkit.save_weights(source, tmp_path / "v2.safetensors")
    with pytest.raises(CheckpointError, match="unexpected layers.0.blocks.0.attn.logit_scale"):
        swinkit.create_model("swin_nano_patch2_window4_32", pretrained=tmp_path / "v2.safetensors")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "foreign_pickle", "not_swin"])
def test_bad_checkpoint_files_fail_clearly(tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    marker = tmp_path / "pwned"
    model = swinkit.create_model("swin_nano_patch2_window4_32")
    if kind == "truncated":
        torch.save(model.state_dict(), path)
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign_pickle":
        torch.save({"model": model.state_dict(), "payload": _Exploit(str(marker))}, path)
    else:
        torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(CheckpointError, match=f"{kind}.pth"):
        swinkit.create_model("swin_nano_patch2_window4_32", pretrained=path)
    assert not marker.exists()


def test_cli_reports_bad_file_in_one_line(tmp_path, capsys):
    from swinkit.cli import main
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    assert main(["convert", str(bad), str(tmp_path / "out.pth"), "--to", "official"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.safetensors" in err[0]
    assert not (tmp_path / "out.pth").exists()
