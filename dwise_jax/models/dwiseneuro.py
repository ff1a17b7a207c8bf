"""DwiseNeuro: the 3-D inverted-residual core, the shuffle cortex and the per-mouse readouts.

Inputs `(batch, time, height, width, channels)`; every readout returns `(batch, time, neurons)`
float32, frame t aligned with input frame t. Numerics follow the original PyTorch model
(docs/original.md#model, #pitfalls), whose state dict maps one to one (`convert.torch_name`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dwise_jax.models import depthwise, layers
from dwise_jax.models.grouped_readouts import grouped_readouts


def pe_frequencies(channels: int) -> np.ndarray:
    """inv_freq_k = 10000^(-2k/ch), ch = ceil(C/6)*2 bumped to even (22/44/86 for 64/128/256)."""
    ch = int(math.ceil(channels / 6) * 2)
    ch += ch % 2
    return (1.0 / 10000 ** (np.arange(0, ch, 2, dtype=np.float64) / ch)).astype(np.float32)


def positional_encoding_3d(time: int, height: int, width: int, channels: int) -> np.ndarray:
    """The original's 3-D sinusoidal encoding, `(time, height, width, channels)` float32, a
    NumPy constant: per axis T|H|W [sin(p*f_0..), cos(p*f_0..)] at integer positions p,
    concatenated and cut to `channels`."""
    f = pe_frequencies(channels)
    ch = 2 * f.shape[0]
    emb = np.zeros((time, height, width, 3 * ch), np.float32)
    for axis, size in enumerate((time, height, width)):
        arg = np.arange(size, dtype=np.float32)[:, None] * f[None, :]
        shape = [1, 1, 1, ch]
        shape[axis] = size
        emb[..., axis * ch : (axis + 1) * ch] = np.concatenate(
            [np.sin(arg), np.cos(arg)], axis=-1).reshape(shape)
    return emb[..., :channels]


def add_positional_encoding(x: jax.Array) -> jax.Array:
    """x + PE3d for x's own (time, height, width, channels)."""
    _, t, h, w, c = x.shape
    return x + jnp.asarray(positional_encoding_3d(t, h, w, c), dtype=x.dtype)


class InvertedResidual3d(nnx.Module):
    """Expand, spatial (1,3,3) and temporal (5,1,1) depthwise, SE, project, drop path, plus a
    shortcut (nearest downsample, cyclic tiling, BatchNorm)."""

    def __init__(self, in_features: int, out_features: int, *, stride: int, spatial_kernel: int,
                 temporal_kernel: int, expansion_ratio: int, se_reduce_ratio: int,
                 drop_path_rate: float, depthwise_impl: str, rngs: nnx.Rngs):
        mid, k, kt = in_features * expansion_ratio, spatial_kernel, temporal_kernel
        self.stride, self.out_features, self.depthwise_impl = stride, out_features, depthwise_impl
        self.expand_kernel = nnx.Param(layers.conv_init(rngs.params(), (in_features, mid), mid))
        self.expand_bn = layers.BatchNorm(mid)
        self.spatial_kernel = nnx.Param(layers.conv_init(rngs.params(), (k, k, mid), k * k))
        self.spatial_bn = layers.BatchNorm(mid)
        self.temporal_kernel = nnx.Param(layers.conv_init(rngs.params(), (kt, mid), kt))
        self.temporal_bn = layers.BatchNorm(mid)
        self.se = layers.SqueezeExcite(mid, mid // se_reduce_ratio, rngs=rngs)
        self.project_kernel = nnx.Param(layers.conv_init(rngs.params(), (mid, out_features),
                                                         out_features))
        self.project_bn = layers.BatchNorm(out_features)
        self.drop_path = layers.DropPath(drop_path_rate, rngs=rngs)
        self.shortcut_bn = layers.BatchNorm(out_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`(batch, time, h, w, c_in)` -> `(batch, time, ceil(h/s), ceil(w/s), c_out)`."""
        dt, s = x.dtype, self.stride
        k, kt = self.spatial_kernel.shape[0], self.temporal_kernel.shape[0]
        y = self.expand_bn(x, silu=True, kernel=self.expand_kernel[...])
        y = depthwise.depthwise_conv3d(y, self.spatial_kernel[...].astype(dt)[None], (1, s, s),
                                       ((0, 0), (k // 2, k // 2), (k // 2, k // 2)),
                                       self.depthwise_impl)
        y = self.spatial_bn(y, silu=True)
        y = depthwise.depthwise_conv3d(y, self.temporal_kernel[...].astype(dt)[:, None, None, :],
                                       padding=((kt // 2, kt // 2), (0, 0), (0, 0)),
                                       impl=self.depthwise_impl)
        y = self.se(self.temporal_bn(y, silu=True))
        y = self.project_bn(layers.pointwise(y, self.project_kernel[...]))
        shortcut = layers.tile_channels(layers.nearest_downsample(x, s), self.out_features)
        return self.drop_path(y) + self.shortcut_bn(shortcut)


class Core(nnx.Module):
    """Stem (1x1x1 conv + BN) and the inverted-residual blocks, each preceded by PE3d."""

    def __init__(self, *, in_channels: int, features: Sequence[int],
                 spatial_strides: Sequence[int], drop_path_rate: float, rngs: nnx.Rngs,
                 **block_kwargs):
        if len(spatial_strides) != len(features):
            raise ValueError("core_features and spatial_strides must have the same length")
        self.stem_kernel = nnx.Param(layers.conv_init(rngs.params(), (in_channels, features[0]),
                                                      features[0]))
        self.stem_bn = layers.BatchNorm(features[0])
        # Channels grow one block before the stride-2 block; the last block keeps its width.
        n, outs = len(features), (*features[1:], features[-1])
        self.blocks = nnx.List([
            InvertedResidual3d(features[i], outs[i], stride=spatial_strides[i],
                               drop_path_rate=drop_path_rate * i / n, rngs=rngs, **block_kwargs)
            for i in range(n)])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.stem_bn(x, kernel=self.stem_kernel[...])
        for block in self.blocks:
            x = block(add_positional_encoding(x))
        return x


class ShuffleLayer(nnx.Module):
    """Grouped 1x1 conv -> BN -> SiLU -> channel shuffle -> drop path, + BN(tiled shortcut)."""

    def __init__(self, in_features: int, out_features: int, *, groups: int,
                 drop_path_rate: float, rngs: nnx.Rngs):
        self.groups, self.out_features = groups, out_features
        shape = (groups, in_features // groups, out_features // groups)
        self.kernel = nnx.Param(layers.conv_init(rngs.params(), shape, out_features // groups))
        self.bn = layers.BatchNorm(out_features)
        self.drop_path = layers.DropPath(drop_path_rate, rngs=rngs)
        self.shortcut_bn = layers.BatchNorm(out_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.bn(layers.grouped_pointwise(x, self.kernel[...]), silu=True)
        y = layers.channel_shuffle(y, self.groups)
        return self.drop_path(y) + self.shortcut_bn(layers.tile_channels(x, self.out_features))


class Cortex(nnx.Module):
    """Shuffle layers on the pooled core features, `(batch, time, c)` -> `(batch, time, 4096)`."""

    def __init__(self, in_features: int, features: Sequence[int], *, groups: int,
                 drop_path_rate: float, rngs: nnx.Rngs):
        widths = (in_features, *features)
        self.layers = nnx.List([
            ShuffleLayer(widths[j], widths[j + 1], groups=groups, drop_path_rate=drop_path_rate,
                         rngs=rngs)
            for j in range(len(features))])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class Readout(nnx.Module):
    """One mouse: Dropout1d, grouped 1x1 conv with bias to ceil(N/g)*g outputs, keep the first N,
    softplus with fixed beta. `(batch, time, c)` -> `(batch, time, neurons)` float32."""

    def __init__(self, in_features: int, neurons: int, *, groups: int, softplus_beta: float,
                 drop_rate: float, rngs: nnx.Rngs):
        self.neurons, self.softplus_beta = neurons, softplus_beta
        padded = math.ceil(neurons / groups) * groups
        self.dropout = layers.ChannelDropout(drop_rate, rngs=rngs)
        shape = (groups, in_features // groups, padded // groups)
        self.kernel = nnx.Param(layers.conv_init(rngs.params(), shape, padded // groups))
        self.bias = nnx.Param(jnp.zeros((padded,), jnp.float32))

    def __call__(self, features: jax.Array) -> jax.Array:
        x = self.dropout(features)
        y = layers.grouped_pointwise(x, self.kernel[...]) + self.bias[...].astype(x.dtype)
        return layers.softplus(y[..., : self.neurons], self.softplus_beta)


class DwiseNeuro(nnx.Module):
    """The whole model: core -> mean over (height, width) -> cortex -> one readout per mouse.
    The original's arguments (`params["nn_module"][1]` of its .pth; defaults in `config.model`)
    plus `depthwise_impl`, `canvas_rows` (the core sees the middle rows) and the compute `dtype`."""

    def __init__(self, readout_outputs: Sequence[int], *, in_channels: int,
                 core_features: Sequence[int], spatial_strides: Sequence[int],
                 spatial_kernel: int, temporal_kernel: int, expansion_ratio: int,
                 se_reduce_ratio: int, cortex_features: Sequence[int], groups: int,
                 softplus_beta: float, drop_rate: float, drop_path_rate: float,
                 depthwise_impl: str, canvas_rows: int, dtype: layers.Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        depthwise.resolve_impl(depthwise_impl)  # an unknown name fails here, not at the first trace
        self.dtype, self.depthwise_impl, self.canvas_rows = dtype, depthwise_impl, canvas_rows
        self.readout_outputs = tuple(int(n) for n in readout_outputs)
        self.core = Core(in_channels=in_channels, features=tuple(core_features),
                         spatial_strides=spatial_strides, spatial_kernel=spatial_kernel,
                         temporal_kernel=temporal_kernel, expansion_ratio=expansion_ratio,
                         se_reduce_ratio=se_reduce_ratio, drop_path_rate=drop_path_rate,
                         depthwise_impl=depthwise_impl, rngs=rngs)
        self.cortex = Cortex(core_features[-1], cortex_features, groups=groups,
                             drop_path_rate=drop_path_rate, rngs=rngs)
        self.readouts = nnx.List([
            Readout(cortex_features[-1], n, groups=groups, softplus_beta=softplus_beta,
                    drop_rate=drop_rate, rngs=rngs)
            for n in self.readout_outputs])

    def features(self, x: jax.Array) -> jax.Array:
        """Core + spatial mean pool + cortex: `(batch, time, h, w, c)` -> `(batch, time, 4096)`
        in the compute dtype. Feed the result to `model.readouts[i]`."""
        if x.shape[2] > self.canvas_rows:  # the middle rows: the video's and a margin
            top = (x.shape[2] - self.canvas_rows) // 2
            x = x[:, :, top: top + self.canvas_rows]
        x = self.core(x.astype(self.dtype))
        x = jnp.mean(x, axis=(2, 3), dtype=jnp.float32).astype(self.dtype)
        return self.cortex(x)

    def __call__(self, x: jax.Array, readout_index: int | None = None,
                 ) -> list[jax.Array] | jax.Array:
        """All readouts' `(batch, time, neurons_m)` float32 outputs as a list, or the one of
        `readout_index`."""
        features = self.features(x)
        if readout_index is not None:
            return self.readouts[readout_index](features)
        return [readout(features) for readout in self.readouts]

    def own_readouts(self, features: jax.Array, mouse: jax.Array) -> jax.Array:
        """Row b is `self.readouts[mouse[b]](features)[b]`, zero-padded to max_neurons, float32,
        with `mouse` `(batch,)` int: only each sample's own readout runs (`grouped_readouts`)."""
        readouts, dt = list(self.readouts), features.dtype
        masks = [r.dropout.draw_mask(features) for r in readouts]
        z = grouped_readouts(
            features, mouse, tuple(r.kernel[...].astype(dt) for r in readouts),
            tuple(r.bias[...].astype(dt) for r in readouts),
            None if masks[0] is None else tuple(masks), self.readout_outputs,
            readouts[0].dropout.rate)
        y = layers.softplus(z, readouts[0].softplus_beta)
        counts = jnp.asarray(self.readout_outputs, jnp.int32)[mouse]
        valid = jnp.arange(y.shape[-1]) < counts[:, None]
        return jnp.where(valid[:, None, :], y, 0.0)


def parameter_shares(**kwargs) -> dict[str, int]:
    """Trainable parameter counts of `DwiseNeuro(**kwargs)` from shapes only (nnx.eval_shape):
    "stem", "block_<i>", "core_blocks", "core", "cortex_layer_<j>", "cortex", "readouts" and
    "total". BatchNorm running statistics are excluded."""
    model = nnx.eval_shape(lambda: DwiseNeuro(**kwargs, rngs=nnx.Rngs(0)))
    count = lambda m: sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
    core, cortex = model.core, model.cortex
    shares = {f"block_{i}": count(block) for i, block in enumerate(core.blocks)}
    shares |= {f"cortex_layer_{j}": count(layer) for j, layer in enumerate(cortex.layers)}
    return shares | {
        "stem": math.prod(core.stem_kernel.shape) + count(core.stem_bn),
        "core_blocks": count(core.blocks), "core": count(core), "cortex": count(cortex),
        "readouts": count(model.readouts), "total": count(model)}


def count_parameters(**kwargs) -> int:
    """Total trainable parameters of `DwiseNeuro(**kwargs)`, without allocating them."""
    return parameter_shares(**kwargs)["total"]
