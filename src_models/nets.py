"""U-Net, ResU-Net, RU-Net and R2U-Net (Alom et al. 2018, arXiv 1802.06955), one config, one factory.

This module owns the network definitions and :func:`build_model`, the only way to make one.

Equations implemented (``f`` is ONE module ``conv3x3 -> norm -> ReLU`` whose weights are shared
by every application inside a recurrent layer; ``t`` is the number of recurrent steps, 2 by
default as in the paper):

- recurrent convolutional layer (RCL)::

      x1 = f(x)
      repeat t times:  x1 = f(x + x1)        # t + 1 applications of the same f

  (same conv weights and norm scale/shift at every step; BatchNorm keeps running statistics per
  step, see :class:`RecurrentConv` for why and what it measured)

- U-Net block (Ronneberger 2015):           ``out = f2(f1(x))``  (``f1``: c_in -> c_out)
- ResU-Net block (residual units):          ``y = conv1x1(x);  out = y + f2(f1(y))``
- RU-Net block (recurrent, two RCLs):       ``y = conv1x1(x);  out = R2(R1(y))``
- R2U-Net block (recurrent residual):       ``y = conv1x1(x);  out = y + R2(R1(y))``

where ``R1``/``R2`` are two RCLs with their own weights. The ResU-Net block is the R2U-Net block
with ``t = 0``. All four use the same U-Net skeleton: ``depth = len(widths)`` levels, 2x2 max
pooling down, 2x2 transposed convolution up, skip concatenation, a 1x1 head giving logits.

Shapes: input ``(N, in_channels, H, W)`` for any ``H, W >= 1`` (the input is padded by edge
replication to a multiple of ``2 ** (depth - 1)``, and to at least twice that with instance
norm, which needs 2 x 2 pixels at the bottom level; the output is cropped back); output logits
``(N, out_channels, H, W)``. ``out_channels == 1`` is a binary head (use a sigmoid),
``out_channels >= 2`` a multi-class head (use a softmax); see :func:`logits_to_probabilities`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import ARCHITECTURES
from .configs import config_from_dict, config_to_json
from .settings import padded_size

NORMS = ("batch", "instance", "group", "none")
DEFAULT_WIDTHS = (16, 32, 64, 128, 256)
MAX_CHANNELS = 4096  # a bound that no sane model reaches and that keeps hostile configs small


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a network; serialisable to JSON and stored in checkpoints.

    Args:
        arch: one of ``unet``, ``resunet``, ``runet``, ``r2unet``.
        in_channels: image channels the network takes (1 for gray/green, 3 for RGB).
        out_channels: 1 for a binary (sigmoid) head, >= 2 for a multi-class (softmax) head.
        widths: feature channels per level, top to bottom, each level halving the resolution.
        t: recurrent steps of each RCL (RU-Net, R2U-Net); ignored by U-Net and ResU-Net.
        norm: ``batch``, ``instance``, ``group`` (8 groups or fewer) or ``none``.
    """

    arch: str = "r2unet"
    in_channels: int = 1
    out_channels: int = 1
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    t: int = 2
    norm: str = "batch"

    def __post_init__(self) -> None:
        widths = self.widths
        if isinstance(widths, (str, bytes)) or not hasattr(widths, "__len__") or not all(
            isinstance(w, int) and not isinstance(w, bool) for w in widths
        ):
            raise ValueError(f"widths={widths!r} must be a list of integers")
        object.__setattr__(self, "widths", tuple(widths))
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch={self.arch!r} is unknown; choose one of {sorted(ARCHITECTURES)}")
        for name in ("in_channels", "out_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_CHANNELS:
                raise ValueError(f"{name}={value!r} must be an integer in [1, {MAX_CHANNELS}]")
        if not 1 <= len(self.widths) <= 8 or any(not 1 <= w <= MAX_CHANNELS for w in self.widths):
            raise ValueError(f"widths={self.widths} must hold 1 to 8 channel counts in [1, {MAX_CHANNELS}]")
        if not isinstance(self.t, int) or isinstance(self.t, bool) or not 0 <= self.t <= 16:
            raise ValueError(f"t={self.t!r} must be an integer in [0, 16] (the paper uses 2)")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is unknown; choose one of {list(NORMS)}")

    @property
    def depth(self) -> int:
        return len(self.widths)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes the network takes without padding are multiples of this."""
        return 2 ** (self.depth - 1)

    @property
    def multiclass(self) -> bool:
        return self.out_channels >= 2

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    def to_json(self) -> str:
        return config_to_json(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return config_from_dict(cls, data, "model config")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _norm(kind: str, channels: int, affine: bool = True) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=affine)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=affine)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels, affine=affine)
    return nn.Identity()


class ConvNormAct(nn.Sequential):
    """``f``: conv3x3 -> norm -> ReLU, ``(N, c_in, H, W) -> (N, c_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm == "none"),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )


def _batch_norm(norm: nn.BatchNorm2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``norm(x) * weight + bias`` for an ``affine=False`` BatchNorm2d, in one call (nn.BatchNorm2d's own logic)."""
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(norm.num_batches_tracked)
    use_batch_stats = norm.training or norm.running_mean is None
    track = not norm.training or norm.track_running_stats
    return F.batch_norm(x, norm.running_mean if track else None, norm.running_var if track else None, weight, bias,
                        use_batch_stats, momentum, norm.eps)


class RecurrentConv(nn.Module):
    """RCL: ONE shared ``f`` applied ``t + 1`` times: ``x1 = f(x); repeat t: x1 = f(x + x1)``.

    ``f = ReLU(affine(norm_k(conv(.))))``: the conv weights and the norm's affine scale/shift are
    shared by all steps (the layer has exactly the parameters of one conv-BN); only BatchNorm's
    running statistics are kept per step ``k``. One set of statistics for all steps averages
    three different input distributions (``x``, then ``x + x1``) and breaks eval-mode
    inference: measured on DRIVE after 6 epochs, validation F1 0.55 with the shared statistics
    in eval mode against 0.78 with batch statistics. Per-step statistics are the standard fix
    (Cooijmans et al. 2017, "Recurrent Batch Normalization").

    ``(N, C, H, W) -> (N, C, H, W)``.
    """

    def __init__(self, channels: int, t: int, norm: str) -> None:
        super().__init__()
        self.t = t
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none")
        steps = t + 1 if norm == "batch" else 1  # instance/group norms keep no statistics
        self.norms = nn.ModuleList([_norm(norm, channels, affine=False) for _ in range(steps)])
        self.weight = nn.Parameter(torch.ones(channels)) if norm != "none" else None
        self.bias = nn.Parameter(torch.zeros(channels)) if norm != "none" else None

    def f(self, z: torch.Tensor, step: int) -> torch.Tensor:
        norm = self.norms[min(step, len(self.norms) - 1)]
        if type(norm) is nn.BatchNorm2d and self.weight is not None:
            # the step's statistics and the shared affine in ONE batch_norm kernel: the same maths
            # as norm(c) * weight + bias, without two extra passes over the tensor (and their backward)
            y = _batch_norm(norm, self.conv(z), self.weight, self.bias)
            return F.relu(y, inplace=True)
        y = norm(self.conv(z))
        if self.weight is not None:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return F.relu(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.f(x, 0)
        for step in range(1, self.t + 1):
            x1 = self.f(x + x1, step)
        return x1


class FoldedRecurrentConv(nn.Module):
    """An eval-mode :class:`RecurrentConv` for inference only, its batch norms folded away: step
    ``k``'s statistics and the shared affine become the weights and bias of step ``k``'s own copy
    of the conv, so ``f_k(z) = ReLU(conv_k(z))``, the same function to float32 rounding. It does
    the same arithmetic as the layer it replaces, without the normalisation passes: compiled with
    bf16 on the AMX Xeon, it halved inductor's elementwise time (76 -> 38 ms per DRIVE image). It
    stores ``t + 1`` copies of the conv (a few MB for the shipped widths) and cannot be trained
    (:func:`fold_batch_norms` makes it from a trained layer)."""

    def __init__(self, layer: RecurrentConv) -> None:
        super().__init__()
        if not foldable(layer):
            raise ValueError("only a RecurrentConv with batch norms (running statistics) and their affine folds")
        self.t = layer.t
        convs = []
        with torch.no_grad():
            for step in range(layer.t + 1):
                norm = layer.norms[min(step, len(layer.norms) - 1)]
                scale = layer.weight / torch.sqrt(norm.running_var + norm.eps)
                conv = nn.Conv2d(layer.conv.in_channels, layer.conv.out_channels, layer.conv.kernel_size,
                                 padding=layer.conv.padding, bias=True)
                conv.to(device=layer.conv.weight.device, dtype=layer.conv.weight.dtype)
                conv.weight.copy_(layer.conv.weight * scale[:, None, None, None])
                shift = layer.bias - norm.running_mean * scale
                conv.bias.copy_(shift if layer.conv.bias is None else shift + layer.conv.bias * scale)
                convs.append(conv.requires_grad_(False))
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.relu(self.convs[0](x))
        for step in range(1, self.t + 1):
            x1 = F.relu(self.convs[step](x + x1))
        return x1


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference in which every :class:`RecurrentConv` with batch norms
    is a :class:`FoldedRecurrentConv` (same outputs to float32 rounding, in eval mode); ``model``
    itself is left as it is. Layers with other norms (no running statistics) stay as they are."""
    import copy

    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        for name, child in list(module.named_children()):
            if foldable(child):
                setattr(module, name, FoldedRecurrentConv(child))
    return folded


def foldable(layer: nn.Module) -> bool:
    """Whether ``layer`` is a :class:`RecurrentConv` whose norms are batch norms with running
    statistics and a shared affine: what :class:`FoldedRecurrentConv` folds."""
    return (isinstance(layer, RecurrentConv) and layer.weight is not None
            and all(type(norm) is nn.BatchNorm2d and norm.running_var is not None for norm in layer.norms))


def split_bf16(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``z`` as two bf16 tensors, ``hi + lo`` equal to ``z`` within 2^-16 relative: ``hi``
    is ``z`` rounded to 8 significant bits by Veltkamp's split (``g = 65537 z; hi = g + (z - g)``,
    exact in bf16; float32 arithmetic only, for ``|z| < 1e33``) and ``lo`` the rest, rounded to
    bf16. Not ``bf16(z)`` and ``z - float(bf16(z))``: inductor keeps a cast's value in float32
    inside a fused kernel, which made that low half zero once compiled; a bit mask instead ran
    unvectorised (6 ms against 1 ms at 16 x 592 x 576)."""
    g = z * 65537.0
    high = g + (z - g)
    return high.to(torch.bfloat16), (z - high).to(torch.bfloat16)


class SplitBF16RecurrentConv(nn.Module):
    """A :class:`FoldedRecurrentConv` whose convolutions run in bf16 on float32 inputs split in two:
    ``z = hi + lo`` (:func:`split_bf16`: 16 bits of mantissa between them), and ONE bf16 convolution of ``[hi, lo]`` (channels
    concatenated) with ``[w, w]``: on AMX about 3.4x faster than the float32 convolution at 16
    channels (2.1 against 7.1 ms at 592 x 576), while the input keeps what bf16 would round away.
    The weights are bf16; the outputs are rounded to bf16 before the float32 bias and ReLU.
    Inference only, float32 in and out, outside autocast. (Inductor's switch that keeps a cast's
    rounding, ``emulate_precision_casts``, crashed a process on its third compiled shape together
    with freezing, torch 2.13: :func:`split_bf16` needs no such switch.)"""

    def __init__(self, folded: FoldedRecurrentConv) -> None:
        super().__init__()
        self.t = folded.t
        self.padding = folded.convs[0].padding
        with torch.no_grad():
            self.weights = nn.ParameterList(
                nn.Parameter(torch.cat([c.weight, c.weight], 1).to(torch.bfloat16), requires_grad=False) for c in folded.convs)
            self.biases = nn.ParameterList(
                nn.Parameter(c.bias.detach().float().reshape(-1, 1, 1).clone(), requires_grad=False) for c in folded.convs)

    def f(self, z: torch.Tensor, step: int) -> torch.Tensor:
        y = F.conv2d(torch.cat(split_bf16(z), 1), self.weights[step], None, padding=self.padding)
        return F.relu(y.float() + self.biases[step])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        with torch.autocast(x.device.type, enabled=False):
            x1 = self.f(x, 0)
            for step in range(1, self.t + 1):
                x1 = self.f(x + x1, step)
        return x1


class UNetBlock(nn.Module):
    """U-Net level: ``f2(f1(x))``, ``(N, c_in, H, W) -> (N, c_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.f1 = ConvNormAct(in_channels, out_channels, norm)
        self.f2 = ConvNormAct(out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f2(self.f1(x))


class RecurrentResidualBlock(nn.Module):
    """``y = conv1x1(x); out = [y +] R2(R1(y))`` with RCLs of ``t`` steps.

    ``t = 0, residual`` is the ResU-Net unit, ``residual=False`` RU-Net, both R2U-Net.
    ``(N, c_in, H, W) -> (N, c_out, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, t: int, residual: bool, norm: str) -> None:
        super().__init__()
        self.residual = residual
        self.conv1x1 = nn.Conv2d(in_channels, out_channels, 1)
        self.r1 = RecurrentConv(out_channels, t, norm)
        self.r2 = RecurrentConv(out_channels, t, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1x1(x)
        out = self.r2(self.r1(y))
        return y + out if self.residual else out


def _block(config: ModelConfig, in_channels: int, out_channels: int) -> nn.Module:
    if config.arch == "unet":
        return UNetBlock(in_channels, out_channels, config.norm)
    t = 0 if config.arch == "resunet" else config.t
    residual = config.arch in ("resunet", "r2unet")
    return RecurrentResidualBlock(in_channels, out_channels, t, residual, config.norm)


class SegmentationUNet(nn.Module):
    """The shared U-Net skeleton; the block type comes from ``config.arch``.

    ``forward``: ``(N, in_channels, H, W)`` float -> logits ``(N, out_channels, H, W)``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        w = config.widths
        self.encoder = nn.ModuleList(
            [_block(config, config.in_channels if i == 0 else w[i - 1], w[i]) for i in range(len(w))]
        )
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList([nn.ConvTranspose2d(w[i + 1], w[i], 2, stride=2) for i in range(len(w) - 1)])
        self.decoder = nn.ModuleList([_block(config, 2 * w[i], w[i]) for i in range(len(w) - 1)])
        self.head = nn.Conv2d(w[0], config.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        m = self.config.size_multiple
        pad_h, pad_w = padded_size(height, m) - height, padded_size(width, m) - width
        if self.config.norm == "instance" and self.config.depth > 1:  # needs >= 2x2 at the bottom level
            pad_h, pad_w = max(pad_h, 2 * m - height), max(pad_w, 2 * m - width)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        for i, block in enumerate(self.encoder):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.decoder))):
            x = self.decoder[i](torch.cat([skips.pop(), self.up[i](x)], dim=1))
        return self.head(x)[..., :height, :width]


def build_model(config: ModelConfig) -> SegmentationUNet:
    """The one factory: a freshly initialised network for ``config``."""
    return SegmentationUNet(config)


def state_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes of ``build_model(config).state_dict()``, without building it.

    Every checkpoint load checks its tensors against these. Building the network on the meta
    device for the same answer took 22 ms, an eighth of a fresh process's overhead on its first
    image. ``tests/test_nets.py`` checks that both agree for every architecture and norm."""
    shapes: dict[str, tuple[int, ...]] = {}
    w, norm = config.widths, config.norm

    def conv(prefix: str, c_in: int, c_out: int, kernel: int, bias: bool) -> None:
        shapes[prefix + "weight"] = (c_out, c_in, kernel, kernel)
        if bias:
            shapes[prefix + "bias"] = (c_out,)

    def norm_layer(prefix: str, channels: int, affine: bool) -> None:  # what _norm makes
        if affine and norm != "none":
            shapes[prefix + "weight"] = shapes[prefix + "bias"] = (channels,)
        if norm == "batch":  # instance norm keeps no running statistics by default
            shapes[prefix + "running_mean"] = shapes[prefix + "running_var"] = (channels,)
            shapes[prefix + "num_batches_tracked"] = ()

    def recurrent(prefix: str, channels: int, t: int) -> None:  # RecurrentConv
        conv(prefix + "conv.", channels, channels, 3, norm == "none")
        for step in range(t + 1 if norm == "batch" else 1):
            norm_layer(f"{prefix}norms.{step}.", channels, affine=False)
        if norm != "none":
            shapes[prefix + "weight"] = shapes[prefix + "bias"] = (channels,)

    def block(prefix: str, c_in: int, c_out: int) -> None:  # _block
        if config.arch == "unet":
            for name, channels in (("f1.", c_in), ("f2.", c_out)):
                conv(prefix + name + "0.", channels, c_out, 3, norm == "none")
                norm_layer(prefix + name + "1.", c_out, affine=True)
            return
        t = 0 if config.arch == "resunet" else config.t
        conv(prefix + "conv1x1.", c_in, c_out, 1, True)
        recurrent(prefix + "r1.", c_out, t)
        recurrent(prefix + "r2.", c_out, t)

    for i in range(len(w)):
        block(f"encoder.{i}.", config.in_channels if i == 0 else w[i - 1], w[i])
    for i in range(len(w) - 1):
        shapes[f"up.{i}.weight"], shapes[f"up.{i}.bias"] = (w[i + 1], w[i], 2, 2), (w[i],)  # ConvTranspose2d: (in, out, k, k)
        block(f"decoder.{i}.", 2 * w[i], w[i])
    conv("head.", w[0], config.out_channels, 1, True)
    return shapes


def logits_to_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """``(N, K, H, W)`` logits -> probabilities: sigmoid for K == 1, softmax over K otherwise."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_megapixel(config: ModelConfig) -> float:
    """Forward FLOPs (2 x multiply-adds) for a 1024 x 1024 input, counted by torch's FlopCounterMode.

    Counted on the meta device, so it costs no memory and no compute.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(config).eval()
        x = torch.zeros(1, config.in_channels, 1024, 1024)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops()) / (1024 * 1024 / 1e6)
