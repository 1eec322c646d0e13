"""The model itself: every variant's size, agreement with timm, any input size, and its utilities."""
from __future__ import annotations

import json

import pytest
import torch

import swinkit
from swinkit.models import STANDARD_MODELS, SwinConfig, SwinTransformer, get_config
from swinkit.models import swin as swin_module
from swinkit.train import lean

timm = pytest.importorskip("timm")

TINY_V1 = SwinConfig(version=1, img_size=64, window_size=4, embed_dim=16, depths=(2, 2, 2, 2),
                     num_heads=(1, 2, 2, 4), num_classes=7, drop_path_rate=0.0)
TINY_V2 = TINY_V1.replace(version=2)


def perturb(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter away from its init (v2's zero post-norms would hide mistakes)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


@pytest.mark.parametrize("name", STANDARD_MODELS)
def test_param_count_equals_timm(name):
    config = get_config(name)
    with torch.device("meta"):
        ours = SwinTransformer(config)
        theirs = timm.create_model(name, num_classes=config.num_classes)
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
    assert set(ours.state_dict()) == {k for k in theirs.state_dict() if not k.endswith(("attn_mask", "k_bias",
                                      "relative_position_index", "relative_coords_table"))}


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_full_size_matches_timm_logits(name):
    config = get_config(name)
    theirs = perturb(timm.create_model(name).eval())
    ours = SwinTransformer(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=False)
    x = torch.randn(2, 3, *config.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-4)


def test_window_clamped_stage_matches_timm():
    # swinv2 window16 at 256: the last stage (8x8) clamps its window to 8 and does not shift.
    name = "swinv2_tiny_window16_256"
    kwargs = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), num_classes=5)
    theirs = perturb(timm.create_model(name, **kwargs).eval())
    ours = SwinTransformer(get_config(name).replace(**kwargs)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=False)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-4)


@pytest.mark.parametrize("config", [TINY_V1, TINY_V2], ids=["v1", "v2"])
@pytest.mark.parametrize("size", [(64, 64), (200, 333), (97, 64), (13, 9)])
def test_any_input_size_runs(config, size):
    model = perturb(SwinTransformer(config)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_full_size_odd_inputs_run():
    model = swinkit.create_model("swin_tiny_patch4_window7_224").eval()
    with torch.no_grad():
        for size in [(224, 224), (200, 333), (97, 64)]:
            assert model(torch.randn(1, 3, *size)).shape == (1, 1000)


@pytest.mark.parametrize("config", [TINY_V1, TINY_V2], ids=["v1", "v2"])
def test_padded_tokens_do_not_leak(config, monkeypatch):
    """Padded keys are masked: filling the attention padding with noise instead of zeros changes nothing."""
    model = perturb(SwinTransformer(config)).eval()
    x = torch.randn(1, 3, 97, 70)
    with torch.no_grad():
        reference = model(x)

        def noisy_pad(t, multiple_h, multiple_w):
            _, height, width, _ = t.shape
            pad_h, pad_w = -height % multiple_h, -width % multiple_w
            out = torch.randn(t.shape[0], height + pad_h, width + pad_w, t.shape[3]) * 10
            out[:, :height, :width] = t
            return out

        original = swin_module.to_windows
        monkeypatch.setattr(swin_module, "to_windows",
                            lambda t, window, shift: original(noisy_pad(t, window, window), window, shift))
        noisy = model(x)
    assert torch.allclose(reference, noisy, atol=1e-5)


def test_forward_intermediates_shapes():
    model = swinkit.create_model("swin_tiny_patch4_window7_224").eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]


def test_forward_features_and_head_compose():
    model = perturb(SwinTransformer(TINY_V2)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 2, 2, 128)
        assert torch.equal(model.forward_head(features), model(x))
        assert model.forward_head(features, pre_logits=True).shape == (2, 128)


def test_masks_are_built_once_per_size():
    model = SwinTransformer(TINY_V1).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        first = model.layers[0].attention_mask(16, 16, (2, 2), torch.device("cpu"))
        model(torch.randn(1, 3, 64, 64))
        assert model.layers[0].attention_mask(16, 16, (2, 2), torch.device("cpu")) is first
        model(torch.randn(1, 3, 96, 96))
    assert len(model.layers[0]._mask_cache) == 4  # two sizes, plain and shifted blocks


@pytest.mark.parametrize("config", [TINY_V1, TINY_V2], ids=["v1", "v2"])
@pytest.mark.parametrize("plan", ["full", "selective", ["full", "none", "selective"] * 2 + ["none", "full"]])
def test_recomputation_gives_identical_gradients(config, plan):
    """Recomputing (with drop path on: RNG state must be replayed) changes neither loss nor gradients."""
    model = perturb(SwinTransformer(config.replace(drop_path_rate=0.3))).train()
    x = torch.randn(2, 3, 64, 64)

    def grads():
        torch.manual_seed(5)
        model.zero_grad()
        loss = model(x).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_plain, grads_plain = grads()
    lean.install(model, plan)
    loss_recomputed, grads_recomputed = grads()
    assert torch.equal(loss_plain, loss_recomputed)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(grads_plain, grads_recomputed))


def test_grad_checkpointing_gives_identical_gradients_and_bad_plans_are_refused():
    model = perturb(SwinTransformer(TINY_V1)).train()
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.layers)
    model(x).sum().backward()
    assert all(torch.allclose(a, p.grad, rtol=0, atol=1e-6) for a, p in zip(plain, model.parameters()))
    with pytest.raises(ValueError, match="recompute plan"):
        lean.install(model, ["full"])
    assert lean.plan_of(SwinTransformer(TINY_V1)) == ["none"] * 8


def test_reset_classifier():
    model = SwinTransformer(TINY_V1)
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 128)


def test_flops_match_official_table():
    assert round(swinkit.create_model("swin_tiny_patch4_window7_224").flops() / 1e9, 1) == 4.5
    with torch.device("meta"):
        base = SwinTransformer(get_config("swin_base_patch4_window7_224"))
    assert round(base.flops() / 1e9, 1) == 15.4


def test_unknown_name_suggests_closest():
    with pytest.raises(swinkit.UnknownModelError, match="swin_tiny_patch4_window7_224"):
        swinkit.create_model("swin_tiny_patch4_window7")


def test_list_models_pattern():
    assert "swinv2_tiny_window8_256" in swinkit.list_models("swinv2_*")
    assert all(n.startswith("swinv2") for n in swinkit.list_models("swinv2_*"))
    assert len([n for n in swinkit.list_models() if n in STANDARD_MODELS]) == 18


def test_cli_info_and_unknown_name(capsys):
    from swinkit.cli import main
    assert main(["info", "swin_tiny_patch4_window7_224", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_m"] == 28.29 and info["gmacs"] == 4.49 and info["window"] == 7
    assert main(["info", "swin_tiny_patch4_window8_224"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'swin_tiny_patch4_window8_224'" in err and "swin_tiny_patch4_window7_224" in err


@pytest.mark.parametrize("height,width,window,shift", [(7, 14, 7, (0, 3)), (9, 13, 4, (2, 2)), (8, 8, 4, (0, 0)),
                                                       (5, 3, 4, (2, 0))])
def test_window_layout_index_map_is_the_layout_of_to_windows(height, width, window, shift):
    """The fast path's gathers come from `attention.window_layout`; it must place every token where
    the definition's `to_windows` (pad, roll, partition) does, and mask exactly the padded slots."""
    from swinkit.models.attention import PAD_MASK_VALUE, window_layout
    from swinkit.models.layers import to_windows
    grid = torch.arange(height * width, dtype=torch.float64).view(1, height, width, 1) + 1  # 0 = padding
    expected = to_windows(grid, window, shift).flatten().long() - 1
    token, mask = window_layout(height, width, window, shift)
    assert torch.equal(token, expected)
    padded_keys = (mask <= PAD_MASK_VALUE / 2).all(dim=1)  # [num_windows, N]: masked for every query
    assert torch.equal(padded_keys.flatten(), expected < 0)
