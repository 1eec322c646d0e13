"""Checkpoint layouts: every peer's weights load into swinkit with the peer's logits, and
swinkit's weights export to every peer's layout and load there strictly with swinkit's logits.

Peers are tiny random models built locally (timm, torchvision, transformers); every
parameter is perturbed away from its init, because v2's residual post-norms start at
zero and would hide a mis-mapped weight.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402
from timm.models import swin_transformer as timm_swin  # noqa: E402
from timm.models import swin_transformer_v2 as timm_swin_v2  # noqa: E402
from torchvision.models import swin_transformer as tv_swin  # noqa: E402

from swinkit.models.registry import SwinConfig  # noqa: E402
from swinkit.models.swin import SwinTransformer  # noqa: E402
from swinkit.weights.layouts import (LAYOUTS, LayoutError, detect_layout, from_native, hf_config,  # noqa: E402
                                     infer_config, to_native, version_of)

# Three stages at 4x the window: merging, shifted and unshifted blocks, and a last stage that
# is exactly one window, at a fraction of the cost of four stages at 224.
DIMS = dict(embed_dim=32, depths=(2, 2, 2), num_heads=(1, 2, 4))
WINDOW = {1: 7, 2: 8}
IMAGE = {1: 112, 2: 128}
PEERS = ("timm", "torchvision", "hf")


def swin_config(version: int, **changes) -> SwinConfig:
    return SwinConfig(version=version, img_size=IMAGE[version], window_size=WINDOW[version], num_classes=10,
                      drop_path_rate=0.0, **DIMS).replace(**changes)


def build_peer(peer: str, version: int, pretrained_windows=(0, 0, 0)) -> torch.nn.Module:
    window, image = WINDOW[version], IMAGE[version]
    if peer == "timm":
        name = "swin_tiny_patch4_window7_224" if version == 1 else "swinv2_tiny_window8_256"
        extra = {} if version == 1 else {"pretrained_window_sizes": pretrained_windows}
        return timm.create_model(name, pretrained=False, img_size=image, num_classes=10, **DIMS, **extra)
    if peer == "torchvision":
        extra = {} if version == 1 else dict(block=tv_swin.SwinTransformerBlockV2,
                                             downsample_layer=tv_swin.PatchMergingV2)
        return tv_swin.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2, 2], num_heads=[1, 2, 4],
                                       window_size=[window, window], stochastic_depth_prob=0.0, num_classes=10,
                                       **extra)
    common = dict(embed_dim=32, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=window,
                  image_size=image, num_labels=10)
    if version == 1:
        return transformers.SwinForImageClassification(transformers.SwinConfig(**common))
    return transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**common))


def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


@torch.no_grad()
def logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    return out.logits if hasattr(out, "logits") else out


def images(version: int) -> torch.Tensor:
    return torch.randn(2, 3, IMAGE[version], IMAGE[version], generator=torch.Generator().manual_seed(1))


def swinkit_from(state_dict: dict, config: SwinConfig) -> SwinTransformer:
    model = SwinTransformer(config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


@pytest.fixture(scope="module", params=[1, 2], ids=["v1", "v2"])
def version(request) -> int:
    return request.param


@pytest.fixture(scope="module")
def peers(version) -> dict[str, torch.nn.Module]:
    return {peer: perturb(build_peer(peer, version), seed=i) for i, peer in enumerate(PEERS)}


@pytest.fixture(scope="module")
def targets(version) -> dict[str, torch.nn.Module]:
    """Fresh peers to load exports into (every test overwrites all of their state)."""
    return {peer: build_peer(peer, version).eval() for peer in ("timm", "torchvision")}


@pytest.fixture(scope="module")
def swinkit_model(version) -> SwinTransformer:
    torch.manual_seed(3)
    return perturb(SwinTransformer(swin_config(version)), seed=3)


@pytest.fixture(scope="module")
def swinkit_logits(swinkit_model, version) -> torch.Tensor:
    return logits(swinkit_model, images(version))


# ------------------------------------------------------------------------------- import
@pytest.mark.parametrize("peer", PEERS)
def test_peer_checkpoint_reproduces_peer_logits(peers, version, peer):
    state_dict = peers[peer].state_dict()
    layout = detect_layout(state_dict)
    assert layout == peer
    assert version_of(state_dict, layout) == version
    model = swinkit_from(to_native(state_dict, layout), swin_config(version))
    x = images(version)
    torch.testing.assert_close(logits(model, x), logits(peers[peer], x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("peer", PEERS)
def test_infer_config_describes_peer_checkpoint(peers, version, peer):
    state_dict = peers[peer].state_dict()
    found = infer_config(state_dict, detect_layout(state_dict))
    assert found["version"] == version
    assert (found["embed_dim"], found["depths"], found["num_heads"]) == (32, (2, 2, 2), (1, 2, 4))
    assert (found["num_classes"], found["in_chans"], found["patch_size"]) == (10, 3, 4)
    assert (found["mlp_ratio"], found["qkv_bias"], found["patch_norm"]) == (4.0, True, True)
    # v1 tables and torchvision's persistent v2 coordinate tables give the window; timm/HF v2 keep no buffer
    has_window = version == 1 or peer == "torchvision"
    assert found["window_size"] == (WINDOW[version] if has_window else None)
    if version == 2 and peer == "torchvision":
        assert found["pretrained_window_sizes"] == (0, 0, 0)


def test_torchvision_v2_ignores_the_key_third_of_its_qkv_bias():
    """torchvision zeroes the key part of its 3C bias in forward, so a non-zero one is dropped exactly."""
    peer = perturb(build_peer("torchvision", 2), seed=5)
    bias = peer.features[1][0].attn.qkv.bias
    assert bias[32:64].abs().max() > 0.01
    model = swinkit_from(to_native(peer.state_dict(), "torchvision"), swin_config(2))
    torch.testing.assert_close(logits(model, images(2)), logits(peer, images(2)), atol=1e-4, rtol=0)


def test_old_timm_forms_are_read(peers, version):
    state_dict = dict(peers["timm"].state_dict())
    state_dict["head.weight"] = state_dict.pop("head.fc.weight")  # timm 0.6-0.8 head
    state_dict["head.bias"] = state_dict.pop("head.fc.bias")
    for name, buffer in peers["timm"].named_buffers():  # buffers older timm saved
        state_dict[name] = buffer
    native = to_native(state_dict, "timm")
    assert set(native) == set(peers["timm"].state_dict())


def test_hf_checkpoint_names_and_module_names_both_read(swinkit_model, peers, version):
    config = swin_config(version)
    checkpoint = from_native(swinkit_model.state_dict(), "hf", config)
    module_names = peers["hf"].state_dict()  # transformers 5 renamed v1's modules
    for state_dict in (checkpoint, {k: v for k, v in checkpoint.items() if not k.startswith("classifier")}):
        assert detect_layout(state_dict) == "hf"
    assert detect_layout(module_names) == "hf"
    assert set(to_native(module_names, "hf")) == set(swinkit_model.state_dict())
    bare = {k.split(".", 1)[1] if not k.startswith("classifier.") else k: v for k, v in checkpoint.items()}
    assert set(to_native(bare, "hf")) == set(swinkit_model.state_dict())  # SwinModel saved without the wrapper


# ------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("layout", LAYOUTS)
def test_native_round_trip_is_exact(swinkit_model, version, layout):
    native = swinkit_model.state_dict()
    back = to_native(from_native(native, layout, swin_config(version)), layout)
    assert set(back) == set(native)
    for key, value in native.items():
        assert torch.equal(back[key], value), key


# ------------------------------------------------------------------------------- export
@pytest.mark.parametrize("peer", ["timm", "torchvision"])
def test_export_loads_strict_into_peer_with_swinkit_logits(swinkit_model, swinkit_logits, targets, version, peer):
    exported = from_native(swinkit_model.state_dict(), peer, swin_config(version))
    assert detect_layout(exported) == peer
    target = targets[peer]
    target.load_state_dict(exported, strict=True)
    torch.testing.assert_close(logits(target, images(version)), swinkit_logits, atol=1e-4, rtol=0)


def test_hf_export_loads_with_from_pretrained(swinkit_model, swinkit_logits, version, tmp_path):
    config = swin_config(version)
    save_file(from_native(swinkit_model.state_dict(), "hf", config), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(config, 10)))
    cls = transformers.SwinForImageClassification if version == 1 else transformers.Swinv2ForImageClassification
    model, info = cls.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    torch.testing.assert_close(logits(model.eval(), images(version)), swinkit_logits, atol=1e-4, rtol=0)


def test_official_export_goes_through_timms_own_converter(swinkit_model, swinkit_logits, targets, version):
    """timm's checkpoint_filter_fn maps official -> timm; it must accept ours and give swinkit's logits."""
    official = from_native(swinkit_model.state_dict(), "official", swin_config(version))
    assert detect_layout(official) == "official"
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    target = targets["timm"]
    module = timm_swin if version == 1 else timm_swin_v2
    target.load_state_dict(module.checkpoint_filter_fn(official, target), strict=True)
    torch.testing.assert_close(logits(target, images(version)), swinkit_logits, atol=1e-4, rtol=0)


def official_from_timm(model: torch.nn.Module) -> dict:
    """The official state dict of a timm model, by reversing timm's conversion by hand:
    merging moves to the end of the previous stage, `head.fc` -> `head`, and the
    constant buffers official models persist are timm's own (non-persistent) ones."""
    out = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        out[key.replace("head.fc.", "head.")] = value
    for name, buffer in model.named_buffers():
        if name.endswith(("relative_position_index", "relative_coords_table", "attn_mask")):
            out[name] = buffer
    return out


@pytest.mark.parametrize("pretrained_windows", [(0, 0, 0), (6, 6, 4)], ids=["own", "pretrained"])
def test_official_export_equals_hand_reversed_timm(version, pretrained_windows):
    if version == 1 and pretrained_windows[0]:
        pytest.skip("pretrained windows are a v2 setting")
    timm_model = perturb(build_peer("timm", version, pretrained_windows), seed=7)
    config = swin_config(version, pretrained_window_sizes=pretrained_windows)
    official = from_native(timm_model.state_dict(), "official", config)
    expected = official_from_timm(timm_model)
    assert set(official) == set(expected)
    for key, value in expected.items():
        assert official[key].dtype == value.dtype and torch.equal(official[key], value), key
    found = infer_config(official, "official")
    assert found["window_size"] == WINDOW[version] and found["img_size"] == (IMAGE[version],) * 2
    if version == 2:
        assert found["pretrained_window_sizes"] == pretrained_windows


def test_torchvision_v2_export_keeps_a_pretrained_window():
    """torchvision persists its coordinate table, so a fine-tuned window's normalisation survives."""
    config = swin_config(2, pretrained_window_sizes=(6, 6, 4))
    model = perturb(SwinTransformer(config), seed=11)
    exported = from_native(model.state_dict(), "torchvision", config)
    assert infer_config(exported, "torchvision")["pretrained_window_sizes"] == (6, 6, 4)
    target = build_peer("torchvision", 2).eval()
    target.load_state_dict(exported, strict=True)
    torch.testing.assert_close(logits(target, images(2)), logits(model, images(2)), atol=1e-4, rtol=0)


def test_clamped_v2_stage_with_pretrained_windows_exports_to_timm_hf_official(tmp_path):
    """Window 16 at 128 px: the last stage (8x8) clamps to 8 and keeps its own pretrained window (6)."""
    config = swin_config(2, window_size=16, pretrained_window_sizes=(12, 12, 6))
    assert config.stage_windows() == [16, 16, 8]
    model = perturb(SwinTransformer(config), seed=13)
    expected = logits(model, images(2))
    timm_model = timm.create_model("swinv2_tiny_window16_256", pretrained=False, img_size=128, num_classes=10,
                                   pretrained_window_sizes=(12, 12, 6), **DIMS).eval()
    timm_model.load_state_dict(from_native(model.state_dict(), "timm", config), strict=True)
    torch.testing.assert_close(logits(timm_model, images(2)), expected, atol=1e-4, rtol=0)
    save_file(from_native(model.state_dict(), "hf", config), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config(config)))
    hf_model = transformers.Swinv2ForImageClassification.from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(logits(hf_model, images(2)), expected, atol=1e-4, rtol=0)
    found = infer_config(from_native(model.state_dict(), "official", config), "official")
    assert (found["window_size"], found["pretrained_window_sizes"]) == (16, (12, 12, 6))


# ------------------------------------------------------------------------------- errors
def test_unknown_checkpoint_is_rejected_with_its_keys():
    with pytest.raises(LayoutError, match="'backbone.conv.weight'"):
        detect_layout({"backbone.conv.weight": torch.zeros(1), "decoder.bias": torch.zeros(1)})
    with pytest.raises(ValueError, match="'conv1.weight'"):
        detect_layout({"conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        to_native({}, "keras")


def test_weights_swinkit_cannot_hold_are_named(swinkit_model):
    official = from_native(swinkit_model.state_dict(), "official", swin_config(swinkit_model.config.version))
    official["norm0.weight"] = torch.zeros(32)  # the official detection/segmentation backbone's per-stage norms
    with pytest.raises(LayoutError, match="'norm0.weight'"):
        to_native(official, "official")


def test_clamped_windows_cannot_go_to_torchvision():
    config = swin_config(1, window_size=12)  # at 112 the last stage (7x7) clamps the window to 7
    model = SwinTransformer(config)
    with pytest.raises(LayoutError, match="full window 12"):
        from_native(model.state_dict(), "torchvision", config)
    with pytest.raises(LayoutError, match="full window 12"):
        from_native(model.state_dict(), "hf", config)
    assert "layers.2.blocks.0.attn.relative_position_index" in from_native(model.state_dict(), "official", config)


def test_version_mismatch_is_rejected(swinkit_model):
    other = 1 if swinkit_model.config.version == 2 else 2
    with pytest.raises(LayoutError, match="config is v"):
        from_native(swinkit_model.state_dict(), "official", swin_config(other))
