"""How a convolution is computed: three forms with the same values (NHWC inputs, HWIO kernels).

`CONV_FUNCTIONS` maps each ``conv_impl`` (models.CONV_IMPLS, resolved by `idm_jax.backend`) to a
drop-in for `lax.conv_general_dilated` that flax's ``nn.Conv`` calls; values agree up to
float32 rounding:

* ``"xla"``: XLA's convolution and its gradients.
* ``"matmul"``: XLA's convolution, its weight gradient one im2col matmul
  (`conv_general_dilated_matmul_grad`): XLA:CPU computes conv weight gradients slowly (several
  times its input gradient), and slower again inside while loops; the matmul is faster there
  and keeps its speed inside loops (docs/RESULTS.md#xlacpu-behaviours-behind-the-cpu-defaults).
* ``"taps"``: no convolution at all: one matmul per kernel tap over shifted views of the padded
  input (`conv_general_dilated_taps`), and so are its gradients. Networks vmapped over different
  weights (queue members, evaluation seeds) then become batched matmuls, where XLA's convolution
  becomes a grouped convolution, whose backward pass CUDA runs far slower than a plain one
  (docs/RESULTS.md#convolutions-of-the-accelerator-programs).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x: Array, kernel: Array, strides: tuple[int, int], pads: tuple[tuple[int, int], ...],
              precision: Any) -> Array:
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC_HWIO,
                                    precision=precision)


# Up to this many im2col columns (kh*kw*Cin), the weight gradient is one matmul over the
# concatenated views; wider layers take one matmul per tap (see conv_weight_grad_matmul).
IM2COL_MAX_COLUMNS = 512


def _tap_views(x: Array, kernel_hw: tuple[int, int], out_hw: tuple[int, int], strides: tuple[int, int],
               pads: Sequence[tuple[int, int]]) -> list[Array]:
    """The (strided) view of the padded input that meets each kernel tap (i, j), row-major:
    kh * kw arrays f32[N, Ho, Wo, Cin]. Pads and slices only (lax.pad also crops, as the conv does)."""
    kh, kw = kernel_hw
    ho, wo = out_hw
    sh, sw = strides
    n, cin = x.shape[0], x.shape[-1]
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    return [lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def conv_weight_grad_matmul(x: Array, g: Array, kernel_shape: tuple[int, int, int, int],
                            strides: tuple[int, int], pads: Sequence[tuple[int, int]],
                            precision: Any = None) -> Array:
    """Gradient w.r.t. the kernel of `lax.conv_general_dilated(x, kernel, strides, pads)` (NHWC, HWIO).

    x: f32[N, H, W, Cin], g (output cotangent): f32[N, Ho, Wo, Cout] -> f32[kh, kw, Cin, Cout].
    The (strided) view of the padded input that meets kernel tap (i, j), as [N*Ho*Wo, Cin],
    gives dkernel[i, j] = view^T @ g: one matmul per tap. (One im2col matmul over the
    concatenated views is as fast but holds all kh*kw views at once: 288 MiB for a 3x3,
    128-channel layer on 256 16x16 images.)
    """
    kh, kw, cin, cout = kernel_shape
    n, ho, wo, _ = g.shape
    g2 = g.reshape(n * ho * wo, cout)
    views = [v.reshape(n * ho * wo, cin) for v in _tap_views(x, (kh, kw), (ho, wo), strides, pads)]
    if kh * kw * cin <= IM2COL_MAX_COLUMNS:
        cols = jnp.concatenate(views, axis=-1)
        return jnp.matmul(cols.T, g2, precision=precision).reshape(kernel_shape)
    return jnp.stack([jnp.matmul(v.T, g2, precision=precision) for v in views]).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_grad(x: Array, kernel: Array, strides: tuple[int, int],
                      pads: tuple[tuple[int, int], ...], precision: Any) -> Array:
    return _xla_conv(x, kernel, strides, pads, precision)


def _conv_matmul_grad_fwd(x, kernel, strides, pads, precision):
    return _xla_conv(x, kernel, strides, pads, precision), (x, kernel)


def _conv_matmul_grad_bwd(strides, pads, precision, residuals, g):
    x, kernel = residuals
    # The conv is linear in x: its transpose is XLA's own input gradient (fast on CPU).
    dx, = jax.linear_transpose(lambda x_: _xla_conv(x_, kernel, strides, pads, precision), x)(g)
    dkernel = conv_weight_grad_matmul(x, g, kernel.shape, strides, pads, precision)
    return dx, dkernel.astype(kernel.dtype)


_conv_matmul_grad.defvjp(_conv_matmul_grad_fwd, _conv_matmul_grad_bwd)


def conv_general_dilated_matmul_grad(lhs: Array, rhs: Array, window_strides: Sequence[int],
                                     padding: str | Sequence[tuple[int, int]],
                                     lhs_dilation: Sequence[int] | None = None,
                                     rhs_dilation: Sequence[int] | None = None,
                                     dimension_numbers: Any = None, feature_group_count: int = 1,
                                     precision: Any = None) -> Array:
    """Drop-in for `lax.conv_general_dilated` (as `nn.Conv` calls it) with an im2col weight gradient.

    Forward and input gradient are XLA's; the kernel gradient is `conv_weight_grad_matmul`.
    lhs: f32[N, H, W, Cin] (NHWC), rhs: f32[kh, kw, Cin, Cout] (HWIO) -> f32[N, Ho, Wo, Cout].
    Supports 2-D convs without dilation or feature groups (all that the networks here need).
    """
    strides, pads = _conv_args(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                               dimension_numbers, feature_group_count, "matmul-gradient")
    return _conv_matmul_grad(lhs, rhs, strides, pads, precision)


def _conv_args(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: str | Sequence[tuple[int, int]],
               lhs_dilation: Sequence[int] | None, rhs_dilation: Sequence[int] | None, dimension_numbers: Any,
               feature_group_count: int, what: str) -> tuple[tuple[int, int], tuple[tuple[int, int], ...]]:
    """(strides, pads) of a conv that `nn.Conv` asks for; refuses what the hand-written convs lack.

    They support 2-D NHWC/HWIO convs without dilation or feature groups (all the networks here need).
    """
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO)
    if lhs.ndim != 4 or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc:
        raise ValueError(f"{what} conv needs 2-D NHWC/HWIO convs, got input shape {lhs.shape}, "
                         f"dimension_numbers {dimension_numbers}")
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))) or feature_group_count != 1:
        raise ValueError(f"{what} conv has no dilation or feature groups, got lhs_dilation "
                         f"{lhs_dilation}, rhs_dilation {rhs_dilation}, feature_group_count {feature_group_count}")
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    return strides, tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_taps(x: Array, kernel: Array, strides: tuple[int, int], pads: Sequence[tuple[int, int]],
              precision: Any = None) -> Array:
    """`lax.conv_general_dilated(x, kernel, strides, pads)` (NHWC, HWIO) without a convolution.

    x: f32[N, H, W, Cin], kernel: f32[kh, kw, Cin, Cout] -> f32[N, Ho, Wo, Cout], the sum over
    taps of view_ij @ kernel[i, j]. Narrow layers (kh*kw*Cin <= IM2COL_MAX_COLUMNS, e.g. the RGB
    stem, Cin = 3) take one matmul over the concatenated views instead, so no matmul has a
    contraction of only Cin. Autodiff of pads, slices and matmuls gives the gradients, so under
    vmap over weights every piece is a batched matmul.
    """
    kh, kw, cin, cout = kernel.shape
    ho = (x.shape[1] + pads[0][0] + pads[0][1] - kh) // strides[0] + 1
    wo = (x.shape[2] + pads[1][0] + pads[1][1] - kw) // strides[1] + 1
    views = _tap_views(x, (kh, kw), (ho, wo), strides, pads)
    if kh * kw * cin <= IM2COL_MAX_COLUMNS:  # columns ordered (i, j, c), as the HWIO kernel's rows
        return jnp.matmul(jnp.concatenate(views, axis=-1), kernel.reshape(kh * kw * cin, cout),
                          precision=precision)
    taps = kernel.reshape(kh * kw, cin, cout)
    return sum(jnp.matmul(v, taps[t], precision=precision) for t, v in enumerate(views))


def conv_general_dilated_taps(lhs: Array, rhs: Array, window_strides: Sequence[int],
                              padding: str | Sequence[tuple[int, int]],
                              lhs_dilation: Sequence[int] | None = None,
                              rhs_dilation: Sequence[int] | None = None,
                              dimension_numbers: Any = None, feature_group_count: int = 1,
                              precision: Any = None) -> Array:
    """Drop-in for `lax.conv_general_dilated` (as `nn.Conv` calls it) computed by `conv_taps`."""
    strides, pads = _conv_args(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                               dimension_numbers, feature_group_count, "matmul-per-tap")
    return conv_taps(lhs, rhs, strides, pads, precision)


CONV_FUNCTIONS = {"xla": lax.conv_general_dilated, "matmul": conv_general_dilated_matmul_grad,
                  "taps": conv_general_dilated_taps}
