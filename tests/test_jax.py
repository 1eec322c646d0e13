"""swinkit.jax: the Flax NNX port computes what the PyTorch model computes, and shares its checkpoints."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")

import swinkit  # noqa: E402
import swinkit.jax as sj  # noqa: E402
from swinkit.jax import convert  # noqa: E402
from swinkit.jax.model import SwinTransformer as JaxSwin  # noqa: E402
from swinkit.models.registry import MODELS, STANDARD_MODELS  # noqa: E402
from swinkit.models.swin import SwinTransformer as TorchSwin  # noqa: E402

V1, V2 = "swin_nano_patch2_window4_32", "swinv2_nano_patch2_window4_32"


def perturbed_torch_model(name: str, seed: int = 1, **overrides) -> TorchSwin:
    """A PyTorch model with seeded noise on every parameter, so no init symmetry (zero post-norms,
    zero biases, equal logit scales) can hide a mistake; in eval mode."""
    torch.manual_seed(0)
    model = swinkit.create_model(name, **overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def nhwc(images: torch.Tensor) -> jax.Array:
    return jax.numpy.asarray(images.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("name, overrides, size", [
    (V1, {}, (32, 32)),
    (V1, {}, (45, 61)),  # padding at patch embedding, merging and windows; shifts on one axis only
    (V2, {}, (32, 32)),
    (V2, {"pretrained_window_sizes": (8, 8, 8)}, (45, 61)),  # v2 fine-tune coordinate scaling
], ids=["v1-32", "v1-45x61", "v2-32", "v2-pretrained-window-45x61"])
def test_jax_logits_match_pytorch(name, overrides, size):
    torch_model = perturbed_torch_model(name, **overrides)
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = torch_model(images).numpy()
    model = sj.from_torch(torch_model)
    logits = np.asarray(sj.predict(model, nhwc(images)))
    assert expected.std() > 0.1  # a real signal, not a collapsed output
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_every_registered_variant_has_the_pytorch_parameters():
    """Same names and (converted) shapes as the PyTorch model, for the tiny configs and a standard
    v1 and v2 fine-tune name (the full registry: test_every_standard_name_builds, marked slow)."""
    for name in ("swin_tiny_patch4_window7_224", "swinv2_base_window12to16_192to256",
                 *(n for n in MODELS if n not in STANDARD_MODELS)):
        _check_parameter_shapes(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", STANDARD_MODELS)
def test_every_standard_name_builds(name):
    _check_parameter_shapes(name)


def _check_parameter_shapes(name: str) -> None:
    config = MODELS[name]
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in TorchSwin(config, name).state_dict().items()}
    model = nnx.eval_shape(lambda: JaxSwin(config, name, rngs=nnx.Rngs(0)))
    got = {convert.torch_key(path): tuple(convert.to_torch_layout(np.empty(var.shape), str(path[-1])).shape)
           for path, var in convert.parameter_paths(model)}
    assert got == expected, name


def test_native_file_round_trips_through_jax_bit_exactly(tmp_path):
    from safetensors import safe_open

    torch_model = perturbed_torch_model(V2, num_classes=7)
    first, second = tmp_path / "torch.safetensors", tmp_path / "jax.safetensors"
    swinkit.save_weights(torch_model, first)
    model = sj.create_model(pretrained=first)
    assert model.config == torch_model.config and model.name == V2
    sj.save_weights(model, second)
    with safe_open(first, "pt") as a, safe_open(second, "pt") as b:
        assert a.metadata() == b.metadata()
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and torch.equal(x, y), key
    back = swinkit.create_model(pretrained=second)  # and the PyTorch side reads the JAX file
    assert all(torch.equal(back.state_dict()[k], v) for k, v in torch_model.state_dict().items())


def test_create_model_takes_any_layout_and_resizes_on_load(tmp_path):
    """One loader: an official-layout v1 file at window 4 loaded at window 8 (bias tables resized),
    with another head, gives the same weights as swinkit.create_model."""
    source = tmp_path / "official.pth"
    swinkit.save_weights(perturbed_torch_model(V1), source, layout="official")
    options = dict(pretrained=source, img_size=64, window_size=8, num_classes=3)
    torch.manual_seed(5)
    expected = swinkit.create_model(V1, **options).state_dict()
    torch.manual_seed(5)
    got = convert.state_dict(sj.create_model(V1, **options))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert got["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (15 * 15, 1)


def test_a_checkpoint_that_does_not_fit_names_every_problem():
    model = sj.create_model(V1)
    state = convert.state_dict(model)
    state["head.fc.weight"] = state["head.fc.weight"][:3]
    del state["norm.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(swinkit.CheckpointError) as error:
        convert.load_state_dict(model, state, source="'x.safetensors'")
    message = str(error.value)
    assert "'x.safetensors'" in message and "head.fc.weight" in message and "missing norm.bias" in message
    assert "unexpected extra.weight" in message


def test_eval_is_deterministic_and_train_draws_drop_path():
    torch_model = perturbed_torch_model(V1, drop_path_rate=0.5, depths=(2,), num_heads=(1,), img_size=16)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = torch_model(images).numpy()
    model = sj.from_torch(torch_model, seed=0)
    x = nhwc(images)
    first, second = np.asarray(sj.predict(model, x)), np.asarray(sj.predict(model, x))
    np.testing.assert_array_equal(first, second)  # eval mode (create_model's default): no randomness
    np.testing.assert_allclose(first, expected, atol=1e-4, rtol=0)
    model.train()
    trained = [np.asarray(sj.predict(model, x)) for _ in range(2)]
    assert np.abs(trained[0] - first).max() > 1e-3  # blocks dropped
    assert np.abs(trained[0] - trained[1]).max() > 1e-3  # the stream advances between calls
    model.eval()
    np.testing.assert_array_equal(np.asarray(sj.predict(model, x)), first)


def test_import_swinkit_does_not_import_jax():
    code = "import sys, swinkit, swinkit.cli; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
