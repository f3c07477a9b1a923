"""The four networks: equations, shared weights, shapes, parameter parity, ill configs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import with_trained_statistics
from hypothesis import given, settings
from hypothesis import strategies as st

from src_models.nets import (
    ARCHITECTURES,
    FoldedRecurrentConv,
    ModelConfig,
    RecurrentConv,
    RecurrentResidualBlock,
    build_model,
    count_parameters,
    flops_per_megapixel,
    fold_batch_norms,
    logits_to_probabilities,
    state_shapes,
)

CASES = [  # (config kwargs, input shape)
    ({"arch": "unet", "widths": (8, 16)}, (2, 1, 32, 32)),
    ({"arch": "resunet", "widths": (8, 16, 16)}, (1, 1, 32, 32)),
    ({"arch": "runet", "widths": (8, 16), "t": 1}, (2, 1, 32, 32)),
    ({"arch": "r2unet", "widths": (8, 16, 32), "in_channels": 3}, (1, 3, 64, 64)),
    ({"arch": "r2unet", "widths": (8, 16), "out_channels": 4, "norm": "group"}, (2, 1, 32, 32)),
    ({"arch": "r2unet", "widths": (8, 16), "norm": "instance"}, (2, 1, 32, 48)),
    ({"arch": "unet", "widths": (8, 16), "norm": "none"}, (1, 1, 17, 33)),
]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_state_shapes_are_the_networks_own(arch, norm):
    """The shapes every checkpoint load checks against, computed without building the network, are
    exactly the built network's state dict: names and shapes, for every architecture and norm."""
    for t, widths, in_channels, out_channels in ((2, (16, 32, 64, 128, 256), 1, 1), (0, (8,), 3, 4), (3, (4, 12, 20), 3, 1), (1, (5, 3), 1, 2)):
        config = ModelConfig(arch=arch, norm=norm, t=t, widths=widths, in_channels=in_channels, out_channels=out_channels)
        with torch.device("meta"):
            built = {name: tuple(tensor.shape) for name, tensor in build_model(config).state_dict().items()}
        assert state_shapes(config) == built


@pytest.mark.parametrize(("kwargs", "shape"), CASES)
def test_forward_backward_shapes(kwargs, shape):
    config = ModelConfig(**kwargs)
    model = build_model(config)
    x = torch.randn(*shape, requires_grad=True)
    out = model(x)
    assert out.shape == (shape[0], config.out_channels, *shape[2:])
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())


ILL = [
    ({"arch": "r3unet"}, "arch"),
    ({"in_channels": 0}, "in_channels"),
    ({"out_channels": -1}, "out_channels"),
    ({"widths": ()}, "widths"),
    ({"widths": (8, 0)}, "widths"),
    ({"t": -1}, "t="),
    ({"t": 2.5}, "t="),
    ({"norm": "layer"}, "norm"),
]


@pytest.mark.parametrize(("kwargs", "word"), ILL)
def test_ill_configs_raise_with_the_rule(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ModelConfig(**kwargs)


def test_config_round_trips_and_rejects_unknown_keys():
    config = ModelConfig(arch="runet", widths=[8, 16], t=3)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**config.to_dict(), "dropout": 0.1})


def test_wrong_input_channels_message():
    model = build_model(ModelConfig(widths=(4, 8), in_channels=3))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3, H, W\)"):
        model(torch.zeros(1, 1, 16, 16))


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("t", [0, 1, 2, 3])
def test_recurrent_layer_applies_one_shared_conv_t_plus_1_times(t, norm):
    torch.manual_seed(0)
    layer = RecurrentConv(6, t, norm).train()
    convs = [m for m in layer.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1, "one conv, its weights shared by every step"
    # the layer has exactly the parameters of one conv + one norm's scale and shift
    expected = 6 * 6 * 9 + (6 if norm == "none" else 12)
    assert sum(p.numel() for p in layer.parameters()) == expected
    calls = []
    convs[0].register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].clone()))
    x = torch.randn(2, 6, 12, 12)
    out = layer(x)
    assert len(calls) == t + 1
    # the paper's equations: x1 = f(x); repeat t: x1 = f(x + x1)
    layer.eval() if norm != "batch" else None
    with torch.no_grad():
        x1 = layer.f(x, 0)
        assert torch.allclose(calls[0], x)
        for step in range(1, t + 1):
            assert torch.allclose(calls[step], x + x1, atol=1e-6)
            x1 = layer.f(x + x1, step)
    assert torch.allclose(out, x1, atol=1e-5)
    if t >= 1:  # and not the popular mistake f(2 * f(x))
        with torch.no_grad():
            wrong = layer.f(2 * layer.f(x, 0), 1)
        assert not torch.allclose(out, wrong, atol=1e-4)


def test_batchnorm_statistics_are_kept_per_step():
    torch.manual_seed(0)
    layer = RecurrentConv(4, 2, "batch").train()
    layer(torch.randn(8, 4, 16, 16) * 3 + 1)
    means = [n.running_mean.clone() for n in layer.norms]
    assert len(means) == 3 and not torch.allclose(means[0], means[1])
    layer.eval()
    x = torch.randn(8, 4, 16, 16) * 3 + 1
    assert torch.isfinite(layer(x)).all()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fused_batchnorm_step_equals_norm_then_shared_affine(mode):
    """f's single batch_norm call == the step's BatchNorm2d (affine=False), then weight/bias, then ReLU;
    outputs, gradients and running statistics (momentum, batch counter) all match."""
    torch.manual_seed(0)
    layer = RecurrentConv(5, 2, "batch")
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-0.5, 0.5)
        for norm in layer.norms:
            norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
    reference = [copy.deepcopy(norm) for norm in layer.norms]
    weight, bias = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    getattr(layer, mode)(), [getattr(norm, mode)() for norm in reference]
    z = torch.randn(4, 5, 9, 9) * 2 + 0.5
    for step in range(3):
        out = layer.f(z, step)
        conv = layer.conv(z).detach()
        expected = torch.relu(reference[step](conv) * weight[:, None, None] + bias[:, None, None])
        # the same batch statistics (one kernel) then the affine in another order: one or two float32
        # roundings of values ~5 (measured 2.4e-7 on AVX2 and default kernels; 1e-5 is 40x that)
        assert torch.allclose(out, expected, atol=1e-5)
        out.pow(2).sum().backward(), expected.pow(2).sum().backward()
        # gradients are sums over N*H*W = 324 pixels: float32 summation error <= 324 * 6e-8 = 2e-5
        # relative in the worst case; rtol 1e-4 is 5x that bound (measured: 0.2% of the tolerance)
        assert torch.allclose(layer.weight.grad, weight.grad, rtol=1e-4, atol=1e-4)
        assert torch.allclose(layer.bias.grad, bias.grad, rtol=1e-4, atol=1e-4)
        layer.weight.grad = layer.bias.grad = weight.grad = bias.grad = None
        for a, b in zip(layer.norms[step].buffers(), reference[step].buffers()):
            assert torch.allclose(a.float(), b.float(), atol=1e-6)  # running stats: the same kernel (measured equal)


@pytest.mark.parametrize(("arch", "residual", "t"), [("r2unet", True, 2), ("runet", False, 2), ("resunet", True, 0)])
def test_block_equations(arch, residual, t):
    torch.manual_seed(1)
    model = build_model(ModelConfig(arch=arch, widths=(6, 12), t=3 if arch == "resunet" else 2)).eval()
    block = model.encoder[1]
    assert isinstance(block, RecurrentResidualBlock)
    assert block.r1.t == t and block.r2.t == t
    x = torch.randn(1, 6, 16, 16)
    y = block.conv1x1(x)
    expected = block.r2(block.r1(y)) + (y if residual else 0)
    assert torch.allclose(block(x), expected, atol=1e-6)


def test_parameter_counts_stay_within_15_percent_of_unet():
    counts = {a: count_parameters(build_model(ModelConfig(arch=a))) for a in ARCHITECTURES}
    for arch in ("runet", "r2unet", "resunet"):
        assert abs(counts[arch] / counts["unet"] - 1) <= 0.15, counts
    assert counts["runet"] == counts["r2unet"]  # the residual adds no parameters


def test_recurrence_costs_flops_not_parameters():
    unet = flops_per_megapixel(ModelConfig(arch="unet"))
    r2 = flops_per_megapixel(ModelConfig(arch="r2unet"))
    t1 = flops_per_megapixel(ModelConfig(arch="r2unet", t=1))
    assert 2.0 < r2 / unet < 3.5
    assert t1 < r2
    assert count_parameters(build_model(ModelConfig(t=1))) == count_parameters(build_model(ModelConfig(t=2)))


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 1000), w=st.integers(1, 1000))
def test_any_size_from_1_to_1000_keeps_its_shape(h, w):
    model = build_model(ModelConfig(widths=(2, 2, 2, 2, 2), t=1)).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 1, h, w)).shape == (1, 1, h, w)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 1000), (1000, 1), (15, 17), (16, 16), (999, 1000)])
def test_corner_sizes(h, w):
    model = build_model(ModelConfig(widths=(2, 2, 2, 2, 2), t=1)).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 1, h, w)).shape == (1, 1, h, w)


def test_heads():
    logits = torch.randn(2, 3, 4, 4)
    probs = logits_to_probabilities(logits)
    assert torch.allclose(probs.sum(1), torch.ones(2, 4, 4))
    binary = logits_to_probabilities(logits[:, :1])
    assert torch.allclose(binary, torch.sigmoid(logits[:, :1]))


@pytest.mark.parametrize("arch", ["r2unet", "runet"])
def test_folded_batch_norms_give_the_same_network(arch):
    """fold_batch_norms (what the compiled inference runs): each recurrent step's statistics and
    the shared affine folded into that step's copy of the conv; the same logits to float32
    rounding, and the model it was given untouched."""
    model = with_trained_statistics(build_model(ModelConfig(arch=arch, widths=(8, 16, 32), in_channels=3)))
    before = copy.deepcopy(model.state_dict())
    folded = fold_batch_norms(model)
    layers = [m for m in folded.modules() if isinstance(m, FoldedRecurrentConv)]
    assert len(layers) == 2 * (2 * 3 - 1) and not any(isinstance(m, RecurrentConv) for m in folded.modules())
    assert all(len(layer.convs) == 3 for layer in layers)  # t = 2: three steps, three convs
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        expected, out = model(x), folded(x)
    # a few float32 roundings per step through 20 convolutions: measured 1.5-3e-7 on logits of size ~0.7
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, RecurrentConv) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_only_batch_norms_fold():
    """Instance and group norms keep no statistics to fold: those layers stay as they are."""
    for norm in ("instance", "group", "none"):
        model = build_model(ModelConfig(arch="r2unet", widths=(8, 16), norm=norm)).eval()
        folded = fold_batch_norms(model)
        assert not any(isinstance(m, FoldedRecurrentConv) for m in folded.modules())
        x = torch.randn(1, 1, 32, 32)
        with torch.no_grad():
            assert torch.allclose(folded(x), model(x))
    with pytest.raises(ValueError, match="batch norms"):
        FoldedRecurrentConv(RecurrentConv(4, 2, "instance"))
