"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3), a model rewrite for XLA's CPU backend.

Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016
(https://arxiv.org/abs/1509.09308). Each 2x2 block of the output is computed from a 4x4
tile of the input as A^T [(G g G^T) * (B^T d B)] A: the tiles' 16 transformed positions
become 16 matrix products (tiles x C_in) @ (C_in x C_out), 16 multiplies per 4 outputs
where a direct 3x3 convolution takes 36 (2.25x fewer). The transforms are additions
and halvings, so the result is the convolution's to float32 rounding (relative error
about 1e-6, `tests/test_winograd.py`). On the ResNet50V2 step of the reference job, XLA's
CPU backend ran the stride-1 3x3 convolutions and their input gradients this way about
8% faster in throughput than as library convolutions (experiments/results/README.md).

The input gradient of a stride-1 3x3 convolution is itself one (of the padded output
gradient, kernel flipped and its channel axes swapped), so it runs by Winograd too
(`conv3x3`'s custom VJP); the kernel's gradient is a library convolution, which XLA
drops where nothing uses it (fvis differentiates the image only). Being a custom VJP, it
supports reverse-mode differentiation only: forward mode (`jax.jvp`, `jax.jacfwd`) through
it raises JAX's error; fvis only uses `jax.grad`.
"""

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def _input_transform(d):
    """B^T d (along the first axis of a length-4 list)."""
    return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _filter_transform(g):
    """G g (along a length-3 list) -> 4."""
    return [g[0], (g[0] + g[1] + g[2]) * 0.5, (g[0] - g[1] + g[2]) * 0.5, g[2]]


def _output_transform(m):
    """A^T m (along a length-4 list) -> 2."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def _along(transform, x, axis):
    """`transform` (a list of arrays -> a list of arrays) applied along `axis` of `x`."""
    parts = [lax.index_in_dim(x, i, axis, keepdims=False) for i in range(x.shape[axis])]
    return jnp.stack(transform(parts), axis)


def _tiles(x, th, tw):
    """(16, N * th * tw, C): B^T d B of each 4x4 input tile (stride 2) of the (N, 2th+2, 2tw+2, C) `x`,
    position-major. The overlapping tiles are two shifted grids of 2x2 blocks, joined along each axis."""
    n, c = x.shape[0], x.shape[-1]
    blocks = x.reshape(n, th + 1, 2, tw + 1, 2, c)
    rows = jnp.concatenate([blocks[:, :th], blocks[:, 1:]], axis=2)  # (n, th, 4, tw + 1, 2, c)
    d = jnp.concatenate([rows[:, :, :, :tw], rows[:, :, :, 1:]], axis=4)  # (n, th, 4, tw, 4, c)
    v = _along(_input_transform, _along(_input_transform, d, 2), 4)
    return v.transpose(2, 4, 0, 1, 3, 5).reshape(16, n * th * tw, c)


def _filters(kernel):
    """(16, C_in, C_out): G g G^T of a (3, 3, C_in, C_out) kernel, position-major."""
    u = _along(_filter_transform, _along(_filter_transform, kernel, 0), 1)
    return u.reshape(16, *kernel.shape[2:])


def _valid(x, filters, contract=1):
    """The VALID stride-1 3x3 convolution of (N, H, W, C_in) `x`, given the kernel's `_filters`
    (16, A, B): C_in is axis `contract` of A, B (1: a kernel's own; 2: its transpose)."""
    n, h, w, _ = x.shape
    oh, ow = h - 2, w - 2
    th, tw = -(-oh // 2), -(-ow // 2)
    x = jnp.pad(x, ((0, 0), (0, 2 * th + 2 - h), (0, 2 * tw + 2 - w), (0, 0)))  # whole tiles
    m = lax.dot_general(_tiles(x, th, tw), filters, (((2,), (contract,)), ((0,), (0,))))
    y = _along(_output_transform, _along(_output_transform, m.reshape(4, 4, n, th, tw, -1), 0), 1)
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * th, 2 * tw, -1)[:, :oh, :ow]


# G g reversed along the taps is G applied to the reversed taps: positions 0 and 3 swap, 1 and 2 stay.
_REVERSED = (3, 1, 2, 0)
_FLIPPED = [4 * _REVERSED[a] + _REVERSED[b] for a in range(4) for b in range(4)]


@jax.custom_vjp
def _conv_valid(x, kernel):
    return _valid(x, _filters(kernel))


def _conv_valid_forward(x, kernel):
    filters = _filters(kernel)
    return _valid(x, filters), (x, kernel, filters)


def _conv_valid_backward(saved, g):
    """The input gradient: the convolution of the output gradient (padded by 2) with the kernel flipped
    and its channel axes swapped, whose transform is the forward's, positions permuted (`_FLIPPED`)."""
    x, kernel, filters = saved
    dx = _valid(jnp.pad(g, ((0, 0), (2, 2), (2, 2), (0, 0))), filters[jnp.asarray(_FLIPPED)], contract=2)
    _, kernel_vjp = jax.vjp(lambda k: lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=_NHWC),
                            kernel)
    return dx, kernel_vjp(g)[0]


_conv_valid.defvjp(_conv_valid_forward, _conv_valid_backward)


def applies(x_shape, kernel_shape, strides, dilation, pads):
    """Whether `conv3x3` computes this convolution: a 2-D (N, H, W, C) input, a (3, 3, C, C_out) kernel
    (not grouped), stride 1, no dilation, non-negative padding and an output at least 1x1."""
    return (len(x_shape) == 4 and len(kernel_shape) == 4 and tuple(kernel_shape[:2]) == (3, 3)
            and kernel_shape[2] == x_shape[-1] and tuple(strides) == (1, 1) and tuple(dilation) == (1, 1)
            and all(p >= 0 for pair in pads for p in pair)
            and all(n + sum(pair) >= 3 for n, pair in zip(x_shape[1:3], pads)))


def worthwhile(x_shape, kernel_shape):
    """Whether `conv3x3` is expected to beat the library convolution on XLA's CPU backend: input
    maps of 16x16 to 48x48 pixels, at least 32 channels in and out, C_in * C_out <= 128 * 128, and
    H * W * C_in * C_out <= 26 * 26 * 128 * 128 (the direct convolution's multiplies per tap no more
    than those of a 26x26 map with 128 channels in and out). The input map is the convolution's, as
    padded by the model: Keras' ResNet50V2 pads its 23x23 maps to 25x25 (ZeroPadding2D), a "same"
    convolution takes them as 23x23; the bound lies between those and the 28x28 (30x30) maps below.

    Measured on a 2-core AMD EPYC (experiments/results/README.md, "Winograd"), the ResNet50V2 step
    of one image, two in flight: at 180 pixels, Winograd on the 45x45 maps with 64 channels and the
    23x23 ones with 128 ran 8-10% faster than the library, the 23x23 ones giving 7 points of it; at
    224 pixels, on the 28x28 maps with 128 channels, 4-5% slower, and on the 56x56 maps with 64 as
    fast, compiling longer. One convolution alone lost at 12x12 and 14x14 with 256 channels and 7x7 with
    512 (tiny matrix products, a large kernel transform), at 112x112 with 64 (the transformed tiles
    outgrow the caches) and at 180x180 with 3 channels in.
    """
    _, h, w, c_in = x_shape
    c_out = kernel_shape[-1]
    return (16 <= h <= 48 and 16 <= w <= 48 and min(c_in, c_out) >= 32 and c_in * c_out <= 128 * 128
            and h * w * c_in * c_out <= 26 * 26 * 128 * 128)


def takes(x_shape, kernel_shape, strides, dilation, pads):
    """Whether a model rewrite should compute this convolution by `conv3x3`: it `applies` and is
    `worthwhile` (the one test the Keras and Flax hooks share)."""
    return applies(x_shape, kernel_shape, strides, dilation, pads) and worthwhile(x_shape, kernel_shape)


def conv3x3(x, kernel, pads=((0, 0), (0, 0))):
    """A stride-1 3x3 convolution by Winograd's F(2x2, 3x3) (Lavin and Gray 2016,
    https://arxiv.org/abs/1509.09308).

    Args:
        x: (N, H, W, C_in) float32, channels last.
        kernel: (3, 3, C_in, C_out) float32 (HWIO).
        pads: ((top, bottom), (left, right)) zero padding, non-negative ints.

    Returns:
        (N, H + top + bottom - 2, W + left + right - 2, C_out): `lax.conv_general_dilated(x,
        kernel, (1, 1), pads)` to float32 rounding. Differentiable in both arguments.

    Raises:
        ValueError: a convolution `applies` rejects (names the shapes received).
    """
    if not applies(x.shape, kernel.shape, (1, 1), (1, 1), pads):
        raise ValueError(f"conv3x3 takes (N, H, W, C) inputs, (3, 3, C, C_out) kernels and non-negative pads "
                         f"leaving at least 3x3. Received: x {tuple(x.shape)}, kernel {tuple(kernel.shape)}, "
                         f"pads {pads}")
    return _conv_valid(jnp.pad(x, ((0, 0), *pads, (0, 0))), kernel)
