"""Networks of IDM in flax linen: ConvNet (the matching/eval net), AlexNet, VGG-11, ResNet-18.

Every network exposes three methods that share one set of parameters:

* ``embed(x, train)``            -> f32[N, D], flattened output of the last feature block
* ``__call__(x, train)``         -> f32[N, num_classes], logits
* ``embed_and_logits(x, train)`` -> both, from one forward pass

Images are NHWC (``x: f32[N, H, W, C]``). Shapes, paddings and initialization follow the
PyTorch nets the release uses (docs/RELEASE.md#networks): weights and biases uniform in
+-1/sqrt(fan_in), norm scale 1 and bias 0, "instance norm" = flax InstanceNorm
(per image and channel, affine, eps 1e-5), batch norm with PyTorch's momentum 0.1 (flax momentum 0.9).
Paddings are explicit (PyTorch style, symmetric) so strided convs match torch exactly.

Every conv is a flax ``nn.Conv`` computed one of three ways (``conv_impl``, `idm_jax.convs`): XLA's
convolution, XLA's with an im2col weight gradient (the CPU's), or matmuls only (no grouped
convolution under vmap). Values and parameters are the same, up to float32 rounding; ``"auto"``
(the default) picks by backend (`idm_jax.backend`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idm_jax import backend
from idm_jax import convs

Array = jax.Array

NORMS = ("instance", "batch", "none")
POOLINGS = ("avg", "max", "none")
# The methods `apply_model` may run: all three share the parameters created by `init`.
METHODS = ("__call__", "embed", "embed_and_logits")
# What the matching loss compares (condense.make_apply_fn): the last block's flattened output,
# or, ConvNet only, the last block before its pooling.
EMBEDDINGS = ("last_block", "before_last_pool")
# How convs are computed (module notes); "auto" = "matmul" on the CPU backend, else "xla".
CONV_IMPLS = backend.CONV_IMPLS

# PyTorch's default kernel init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
# i.e. variance 1/(3 fan_in): variance scaling 1/3, fan_in, uniform.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Callable[..., Array]:
    """PyTorch's default bias init for a layer with `fan_in` inputs: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(choices)}")


def _conv(x: Array, features: int, kernel: int, *, stride: int = 1, padding: int = 0,
          use_bias: bool = True, conv_impl: str = "auto", name: str | None = None) -> Array:
    """Conv with PyTorch semantics: symmetric zero padding `padding`, torch default init.

    x: f32[N, H, W, Cin] -> f32[N, H', W', features], H' = floor((H + 2p - k) / stride) + 1.
    `conv_impl` (CONV_IMPLS) picks how the conv is computed (module notes); values are the same.
    """
    fan_in = x.shape[-1] * kernel * kernel
    conv_fn = convs.CONV_FUNCTIONS[backend.conv_impl(conv_impl)]
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                   kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in),
                   conv_general_dilated=conv_fn, name=name)(x)


def _dense(x: Array, features: int, name: str | None = None) -> Array:
    """Linear layer with torch default init. x: f32[N, D] -> f32[N, features]."""
    return nn.Dense(features, kernel_init=torch_kernel_init,
                    bias_init=torch_bias_init(x.shape[-1]), name=name)(x)


def _norm(x: Array, kind: str, train: bool, name: str | None = None) -> Array:
    """Instance norm (per image, per channel, affine), batch norm, or identity. x: f32[N, H, W, C]."""
    _check_choice("norm", kind, NORMS)
    if kind == "instance":
        # Same values and parameters as GroupNorm(group_size=1), but faster on XLA:CPU, where
        # GroupNorm's group reshapes are costly (docs/RESULTS.md#condensation-speed: instance norm).
        return nn.InstanceNorm(epsilon=1e-5, use_fast_variance=False, name=name)(x)
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            use_fast_variance=False, name=name)(x)
    return x


def _conv_norm_relu(x: Array, features: int, kernel: int, padding: int, norm: str, train: bool,
                    conv_impl: str, index: int) -> Array:
    """conv -> norm -> ReLU, with parameters named conv{index} / norm{index}."""
    x = _conv(x, features, kernel, padding=padding, conv_impl=conv_impl, name=f"conv{index}")
    return nn.relu(_norm(x, norm, train, name=f"norm{index}"))


def _pool(x: Array, kind: str) -> Array:
    """2x2 stride-2 pooling without padding (PyTorch floors odd sizes: 7 -> 3)."""
    _check_choice("pooling", kind, POOLINGS)
    if kind == "avg":
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    if kind == "max":
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    return x


def _check_channels(x: Array, channels: int, net: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"{net} was built for {channels}-channel NHWC images, got input shape {x.shape}")


def _flatten(x: Array) -> Array:
    return x.reshape(x.shape[0], -1)


class _TwoHeads(nn.Module):
    """Shared `embed` / `__call__` on top of a subclass's compact `embed_and_logits`.

    Only `embed_and_logits` creates parameters, so `init` through any method builds the same tree.
    Under jit, the unused logits of `embed` are removed by XLA.
    """

    def embed(self, x: Array, train: bool = False) -> Array:
        """x: f32[N, H, W, C] -> embedding f32[N, D]."""
        return self.embed_and_logits(x, train)[0]

    def __call__(self, x: Array, train: bool = False) -> Array:
        """x: f32[N, H, W, C] -> logits f32[N, num_classes]."""
        return self.embed_and_logits(x, train)[1]

    def embed_and_logits(self, x: Array, train: bool = False) -> tuple[Array, Array]:
        raise NotImplementedError


class ConvNet(_TwoHeads):
    """`depth` x [conv3x3 `width` (pad 1, bias) -> norm -> ReLU -> pool 2x2] -> flatten -> linear.

    ConvNet-3 on 32x32: embedding 128*4*4 = 2048; on CIFAR-10 it has 320,010 parameters.
    """

    num_classes: int
    depth: int = 3
    width: int = 128
    norm: str = "instance"
    pooling: str = "avg"
    conv_impl: str = "auto"  # CONV_IMPLS: how conv weight gradients are computed

    @nn.compact
    def embed_and_logits(self, x: Array, train: bool = False,
                         skip_last_pool: bool = False) -> tuple[Array, Array]:
        """x: f32[N, H, W, C] -> (embedding f32[N, width*H'*W'], logits f32[N, num_classes]).

        The embedding is the flattened output of the last block (2048 values for ConvNet-3 on
        32x32; the release's `--embed_last 1000`), or with skip_last_pool the last block before
        its pooling (8192 values on 32x32; the release script's default `--embed_last -1`).
        The logits always come from the whole network.
        """
        before_pool = x
        for i in range(self.depth):
            before_pool = _conv_norm_relu(x, self.width, 3, 1, self.norm, train, self.conv_impl, i)
            x = _pool(before_pool, self.pooling)
        emb = _flatten(x)
        logits = _dense(emb, self.num_classes, name="classifier")
        return (_flatten(before_pool) if skip_last_pool else emb), logits


class AlexNet(_TwoHeads):
    """The DC-benchmark AlexNet for 32x32 images (no norm unless norm="batch"/"instance").

    conv5x5 128 (pad 2; pad 4 for 1-channel 28x28 input so it reaches 32) - ReLU - maxpool;
    conv5x5 192 pad 2 - ReLU - maxpool; conv3x3 256, 192, 192 pad 1 - ReLU; maxpool;
    linear 192*4*4 -> classes. Each conv is followed by the norm when one is chosen.
    """

    num_classes: int
    channels: int = 3
    norm: str = "none"
    conv_impl: str = "auto"

    @nn.compact
    def embed_and_logits(self, x: Array, train: bool = False) -> tuple[Array, Array]:
        """x: f32[N, 32, 32, C] -> (f32[N, 3072], f32[N, num_classes])."""
        _check_channels(x, self.channels, "AlexNet")
        # (features, kernel, padding, pool after)
        layers = ((128, 5, 4 if self.channels == 1 else 2, True), (192, 5, 2, True),
                  (256, 3, 1, False), (192, 3, 1, False), (192, 3, 1, True))
        for i, (features, kernel, padding, pool) in enumerate(layers):
            x = _conv_norm_relu(x, features, kernel, padding, self.norm, train, self.conv_impl, i)
            if pool:
                x = _pool(x, "max")
        emb = _flatten(x)
        return emb, _dense(emb, self.num_classes, name="classifier")


_VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(_TwoHeads):
    """VGG-11: convs 3x3 pad 1 (pad 3 on the first for 1-channel input) - norm - ReLU, maxpools;
    linear 512 -> classes. 32x32 -> 1x1 after 5 pools."""

    num_classes: int
    channels: int = 3
    norm: str = "instance"
    conv_impl: str = "auto"

    @nn.compact
    def embed_and_logits(self, x: Array, train: bool = False) -> tuple[Array, Array]:
        """x: f32[N, 32, 32, C] -> (f32[N, 512], f32[N, num_classes])."""
        _check_channels(x, self.channels, "VGG11")
        i = 0
        for item in _VGG11_CFG:
            if item == "M":
                x = _pool(x, "max")
                continue
            padding = 3 if (i == 0 and self.channels == 1) else 1
            x = _conv_norm_relu(x, item, 3, padding, self.norm, train, self.conv_impl, i)
            i += 1
        emb = _flatten(x)
        return emb, _dense(emb, self.num_classes, name="classifier")


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3(stride)-norm-ReLU-conv3x3-norm + shortcut, ReLU. Convs without bias.

    The shortcut is conv1x1(stride)+norm when stride != 1 or the channel count changes.
    x: f32[N, H, W, Cin] -> f32[N, ceil(H/stride), ceil(W/stride), features].
    """

    features: int
    stride: int = 1
    norm: str = "instance"
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv = functools.partial(_conv, features=self.features, use_bias=False, conv_impl=self.conv_impl)
        out = conv(x, kernel=3, stride=self.stride, padding=1, name="conv0")
        out = nn.relu(_norm(out, self.norm, train, name="norm0"))
        out = conv(out, kernel=3, padding=1, name="conv1")
        out = _norm(out, self.norm, train, name="norm1")
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = conv(x, kernel=1, stride=self.stride, name="shortcut_conv")
            shortcut = _norm(shortcut, self.norm, train, name="shortcut_norm")
        return nn.relu(out + shortcut)


class ResNet18(_TwoHeads):
    """ResNet-18 for 32x32 images: conv3x3 64 stem (no bias) - norm - ReLU; 4 stages of 2 basic
    blocks (64, 128, 256, 512; strides 1, 2, 2, 2); global average pool (= avg pool 4 on the 4x4
    map of a 32x32 input); linear 512 -> classes."""

    num_classes: int
    channels: int = 3
    norm: str = "instance"
    conv_impl: str = "auto"

    @nn.compact
    def embed_and_logits(self, x: Array, train: bool = False) -> tuple[Array, Array]:
        """x: f32[N, H, W, C] -> (f32[N, 512], f32[N, num_classes])."""
        _check_channels(x, self.channels, "ResNet18")
        x = _conv(x, 64, 3, padding=1, use_bias=False, conv_impl=self.conv_impl, name="stem_conv")
        x = nn.relu(_norm(x, self.norm, train, name="stem_norm"))
        for stage, (features, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
            for block in range(2):
                x = BasicBlock(features, stride if block == 0 else 1, self.norm, self.conv_impl,
                               name=f"layer{stage + 1}_{block}")(x, train)
        emb = jnp.mean(x, axis=(1, 2))
        return emb, _dense(emb, self.num_classes, name="classifier")


# name -> constructor(num_classes, channels, conv_impl)
_REGISTRY: dict[str, Callable[[int, int, str], nn.Module]] = {
    "ConvNet": lambda k, c, i: ConvNet(k, depth=3, conv_impl=i),
    "ConvNetD2": lambda k, c, i: ConvNet(k, depth=2, conv_impl=i),
    "ConvNetD4": lambda k, c, i: ConvNet(k, depth=4, conv_impl=i),
    "ConvNetD6": lambda k, c, i: ConvNet(k, depth=6, conv_impl=i),
    "ConvNetBN": lambda k, c, i: ConvNet(k, depth=3, norm="batch", conv_impl=i),
    "AlexNet": lambda k, c, i: AlexNet(k, channels=c, norm="none", conv_impl=i),
    "AlexNetBN": lambda k, c, i: AlexNet(k, channels=c, norm="batch", conv_impl=i),
    "VGG11": lambda k, c, i: VGG11(k, channels=c, norm="instance", conv_impl=i),
    "VGG11BN": lambda k, c, i: VGG11(k, channels=c, norm="batch", conv_impl=i),
    "ResNet18": lambda k, c, i: ResNet18(k, channels=c, norm="instance", conv_impl=i),
    "ResNet18BN": lambda k, c, i: ResNet18(k, channels=c, norm="batch", conv_impl=i),
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_model(name: str, num_classes: int, channels: int, conv_impl: str = "auto") -> nn.Module:
    """The network registered as `name` (see MODEL_NAMES) for `channels`-channel images.

    conv_impl (CONV_IMPLS): how convs are computed; "auto" is resolved when the model is traced
    ("matmul" on CPU, XLA's conv elsewhere). It does not change values or parameters.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    _check_choice("conv_impl", conv_impl, CONV_IMPLS)
    return _REGISTRY[name](num_classes, channels, conv_impl)


def parse_archs(archs: str | Sequence[str]) -> list[str]:
    """"ConvNet, AlexNet" -> ["ConvNet", "AlexNet"] (e.g. config eval.archs), each checked against
    MODEL_NAMES."""
    names = [a.strip() for a in archs.split(",")] if isinstance(archs, str) else [str(a).strip() for a in archs]
    names = [a for a in names if a]
    if not names:
        raise ValueError(f"no evaluation architecture given in {archs!r}")
    for a in names:
        if a not in MODEL_NAMES:
            raise ValueError(f"unknown model {a!r} in {archs!r}; valid: {', '.join(MODEL_NAMES)}")
    return names


def init_variables(model: nn.Module, key: Array, image_shape: tuple[int, int, int]) -> dict:
    """Fresh variables {'params': ..., ['batch_stats': ...]} from one zero image of `image_shape` (H, W, C)."""
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
    return dict(model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False))


def count_params(params: Any) -> int:
    """Number of scalars in a pytree of arrays (or of jax.ShapeDtypeStruct, e.g. from jax.eval_shape)."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def has_batch_stats(variables: Any) -> bool:
    """True when the variables carry (non-empty) batch-norm running statistics."""
    return bool(jax.tree_util.tree_leaves(variables.get("batch_stats", {})))


def apply_model(model: nn.Module, variables: dict, x: Array, *, train: bool,
                method: str | None = None) -> tuple[Any, dict]:
    """Run `model.<method>` (None -> __call__) on x: f32[N, H, W, C]; returns (output, variables).

    With batch norm and train=True the running statistics are updated and returned in the new
    variables; otherwise the variables come back unchanged.
    """
    if method is not None and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if train and has_batch_stats(variables):
        out, updates = model.apply(variables, x, train=True, method=method, mutable=["batch_stats"])
        return out, {**variables, **updates}
    return model.apply(variables, x, train=train, method=method), variables
