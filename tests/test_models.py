"""Tests for idm_jax.models: parameter counts, shapes, torch-default init, norm semantics, BN state."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idm_jax import backend, convs, models
from idm_jax.models import (AlexNet, BasicBlock, ConvNet, MODEL_NAMES, ResNet18, VGG11, apply_model,
                            count_params, get_model, has_batch_stats, init_variables)

KEY = jax.random.PRNGKey(0)


def _shapes(model, image_shape):
    """Variables as ShapeDtypeStructs: counts without running (or compiling) the init."""
    return jax.eval_shape(lambda k: init_variables(model, k, image_shape), KEY)


def _np_variables(model, image_shape, seed=0):
    """Variables of the right shapes filled on the host (numpy), torch-like ranges, random norm affine.

    Avoids the per-shape PRNG compilation of a real init (seconds per shape on a busy CPU); the real
    init is tested separately in test_torch_default_init.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        layer, name = path[-2].key, path[-1].key
        if path[0].key == "batch_stats":  # running mean 0, running var 1, as a fresh init
            return jnp.zeros(leaf.shape) if name == "mean" else jnp.ones(leaf.shape)
        if "norm" in layer:  # random affine so that tests see it
            return jnp.asarray((name == "scale") + 0.3 * rng.standard_normal(leaf.shape), jnp.float32)
        fan_in = math.prod(leaf.shape[:-1]) if name == "kernel" else 16
        return jnp.asarray(rng.uniform(-1, 1, leaf.shape) / math.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, _shapes(model, image_shape))


def _np_conv(x, kernel, bias=None, stride=1, padding=1):
    """Reference conv with PyTorch semantics. x: [N, H, W, Cin], kernel: [k, k, Cin, Cout]."""
    k = kernel.shape[0]
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    h_out = (x.shape[1] + 2 * padding - k) // stride + 1
    w_out = (x.shape[2] + 2 * padding - k) // stride + 1
    out = np.zeros((x.shape[0], h_out, w_out, kernel.shape[-1]), np.float64)
    for di in range(k):
        for dj in range(k):
            patch = xp[:, di:di + stride * h_out:stride, dj:dj + stride * w_out:stride, :]
            out += patch @ kernel[di, dj]
    return out if bias is None else out + bias


# ----------------------------------------------------------------------------- parameter counts

# ConvNet-3, CIFAR-10 (32x32x3): conv0 3*9*128+128 = 3,584; conv1, conv2 128*9*128+128 = 147,584 each;
#   3 instance norms 2*128 = 256 each; linear 128*4*4*10+10 = 20,490.
#   3,584 + 2*147,584 + 768 + 20,490 = 320,010.
# ConvNetD4, TinyImageNet (64x64x3, 200 classes): 3,584 + 3*147,584 = 446,336 conv; 4*256 = 1,024 norms;
#   64->32->16->8->4 so the embedding is 128*4*4 = 2,048; linear 2,048*200+200 = 409,800.  Total 857,160.
# AlexNet (32x32x3, 10): conv 5*5*3*128+128 = 9,728; 5*5*128*192+192 = 614,592; 3*3*192*256+256 = 442,624;
#   3*3*256*192+192 = 442,560; 3*3*192*192+192 = 331,968; linear 192*4*4*10+10 = 30,730.  Total 1,872,202.
#   AlexNetBN adds 2*(128+192+256+192+192) = 1,920 norm params: 1,874,122.
# VGG11 (32x32x3, 10): convs (with bias) 3*9*64+64 = 1,792; 64*9*128+128 = 73,856; 128*9*256+256 = 295,168;
#   256*9*256+256 = 590,080; 256*9*512+512 = 1,180,160; 3 x (512*9*512+512 = 2,359,808) = 7,079,424
#   -> 9,220,480; norms 2*(64+128+256+256+512*4) = 5,504; linear 512*10+10 = 5,130.  Total 9,231,114.
# ResNet18 (32x32x3, 10; convs without bias): stem 3*9*64 = 1,728 + norm 128;
#   layer1 2 x (2*64*9*64 + 2*128) = 147,968;
#   layer2 (64*9*128 + 128*9*128 + 64*128 + 3*256) + (2*128*9*128 + 2*256) = 230,144 + 295,424 = 525,568;
#   layer3 (128*9*256 + 256*9*256 + 128*256 + 3*512) + (2*256*9*256 + 2*512) = 919,040 + 1,180,672 = 2,099,712;
#   layer4 (256*9*512 + 512*9*512 + 256*512 + 3*1024) + (2*512*9*512 + 2*1024) = 3,673,088 + 4,720,640
#   = 8,393,728; linear 512*10+10 = 5,130.  Total 1,856 + 147,968 + 525,568 + 2,099,712 + 8,393,728 + 5,130
#   = 11,173,962.  Batch norm has the same learnable parameters as affine instance norm.
@pytest.mark.parametrize("name, image_shape, num_classes, expected", [
    ("ConvNet", (32, 32, 3), 10, 320_010),
    ("ConvNetBN", (32, 32, 3), 10, 320_010),
    ("ConvNetD4", (64, 64, 3), 200, 857_160),
    ("AlexNet", (32, 32, 3), 10, 1_872_202),
    ("AlexNetBN", (32, 32, 3), 10, 1_874_122),
    ("VGG11", (32, 32, 3), 10, 9_231_114),
    ("VGG11BN", (32, 32, 3), 10, 9_231_114),
    ("ResNet18", (32, 32, 3), 10, 11_173_962),
    ("ResNet18BN", (32, 32, 3), 10, 11_173_962),
])
def test_parameter_counts(name, image_shape, num_classes, expected):
    variables = _shapes(get_model(name, num_classes, image_shape[-1]), image_shape)
    assert count_params(variables["params"]) == expected
    assert has_batch_stats(variables) == name.endswith("BN")


def test_convnet3_layer_counts():
    params = _shapes(get_model("ConvNet", 10, 3), (32, 32, 3))["params"]
    per_layer = {name: count_params(p) for name, p in params.items()}
    assert per_layer == {"conv0": 3_584, "conv1": 147_584, "conv2": 147_584,
                         "norm0": 256, "norm1": 256, "norm2": 256, "classifier": 20_490}


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("name, image_shape, embed_dim", [
    ("ConvNet", (32, 32, 3), 2048),     # 128 * 4 * 4
    ("ConvNet", (28, 28, 1), 1152),     # 28 -> 14 -> 7 -> 3 (floor): 128 * 3 * 3
    ("ConvNetD2", (8, 8, 1), 128 * 2 * 2),
    ("ConvNetD4", (64, 64, 3), 2048),
    ("ConvNetD6", (64, 64, 3), 128),    # 64 / 2**6 = 1
    ("AlexNet", (32, 32, 3), 3072),     # 192 * 4 * 4
    ("AlexNet", (28, 28, 1), 3072),     # pad 4 on the first conv: 28 -> 32
    ("VGG11", (32, 32, 3), 512),
    ("VGG11", (28, 28, 1), 512),        # pad 3 on the first conv: 28 -> 32
    ("ResNet18", (32, 32, 3), 512),
    ("ResNet18", (28, 28, 1), 512),     # global average pooling works on any size
])
def test_output_shapes(name, image_shape, embed_dim):
    model = get_model(name, 7, image_shape[-1])
    variables = _shapes(model, image_shape)
    x = jax.ShapeDtypeStruct((3, *image_shape), jnp.float32)
    emb, logits = jax.eval_shape(
        lambda v, x: model.apply(v, x, method="embed_and_logits"), variables, x)
    assert emb.shape == (3, embed_dim) and logits.shape == (3, 7)
    assert emb.dtype == logits.dtype == jnp.float32


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetBN", "AlexNet", "VGG11", "ResNet18"])
def test_methods_share_parameters_and_agree(name):
    model = get_model(name, 10, 3)
    variables = _np_variables(model, (32, 32, 3))
    # init through any of the three methods builds the same parameter tree
    via_embed = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), method="embed"), KEY)
    assert jax.tree_util.tree_structure(via_embed) == jax.tree_util.tree_structure(variables)

    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    (emb, logits), same = apply_model(model, variables, x, train=False, method="embed_and_logits")
    assert same is variables
    assert emb.shape[0] == 2 and logits.shape == (2, 10)
    assert not np.allclose(emb[0], emb[1])  # the two images are embedded independently
    assert np.all(np.isfinite(emb)) and np.all(np.isfinite(logits))
    emb_only, _ = apply_model(model, variables, x, train=False, method="embed")
    logits_only, _ = apply_model(model, variables, x, train=False)
    np.testing.assert_allclose(emb_only, emb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits_only, logits, rtol=1e-5, atol=1e-6)
    # the logits are the linear layer applied to the embedding
    dense = variables["params"]["classifier"]
    np.testing.assert_allclose(emb @ dense["kernel"] + dense["bias"], logits, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- initialization

def _weight_layers(params, prefix=""):
    """Yield (path, layer dict) for every dict holding a 'kernel' (conv or dense)."""
    for name, sub in params.items():
        if "kernel" in sub:
            yield prefix + name, sub
        elif "scale" not in sub:
            yield from _weight_layers(sub, prefix + name + "/")


def _norm_layers(params):
    for name, sub in params.items():
        if "scale" in sub:
            yield sub
        elif "kernel" not in sub:
            yield from _norm_layers(sub)


@pytest.fixture(scope="module")
def convnet3_init():
    """A real init of ConvNet-3 for CIFAR-10 (the layers every other net is built from)."""
    return init_variables(get_model("ConvNet", 10, 3), KEY, (32, 32, 3))


def test_torch_default_init(convnet3_init):
    params = convnet3_init["params"]
    n_large = 0
    for path, layer in _weight_layers(params):
        kernel = np.asarray(layer["kernel"])
        fan_in = math.prod(kernel.shape[:-1])  # k*k*Cin for convs, D for the linear layer
        bound = 1.0 / math.sqrt(fan_in)
        assert np.abs(kernel).max() <= bound, path
        if kernel.size >= 20_000:  # U(-b, b) has std b/sqrt(3); sample error ~ 0.5% at this size
            n_large += 1
            assert kernel.std() == pytest.approx(bound / math.sqrt(3), rel=0.03), path
            assert abs(kernel.mean()) < 0.05 * bound, path
        if "bias" in layer:
            bias = np.asarray(layer["bias"])
            assert np.abs(bias).max() <= bound, path
            # zeros (flax's default) would fail this: P(all of >=10 draws within b/10) < 1e-10
            assert np.abs(bias).max() > 0.1 * bound, path
    assert n_large >= 3
    for norm in _norm_layers(params):
        np.testing.assert_array_equal(norm["scale"], 1.0)
        np.testing.assert_array_equal(norm["bias"], 0.0)


def test_bias_init_factory_range():
    bias = models.torch_bias_init(16)(KEY, (10_000,))
    assert float(jnp.abs(bias).max()) <= 0.25
    assert float(bias.std()) == pytest.approx(0.25 / math.sqrt(3), rel=0.03)


# ----------------------------------------------------------------------------- norms and pooling

@pytest.fixture(scope="module")
def depth1_instance():
    """ConvNet with one block, 4 channels, no pooling, random affine norm params; and a 2x6x6x2 input."""
    model = ConvNet(num_classes=3, depth=1, width=4, pooling="none")
    variables = _np_variables(model, (6, 6, 2), seed=3)  # random norm scale/bias: tests the affine part
    x = np.random.default_rng(2).standard_normal((2, 6, 6, 2)).astype(np.float32)
    return model, variables, x


def test_instance_norm_matches_reference(depth1_instance):
    model, variables, x = depth1_instance
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    conv = _np_conv(x.astype(np.float64), p["conv0"]["kernel"], p["conv0"]["bias"])
    # per image, per channel statistics over H, W (biased variance, eps 1e-5 as torch)
    mean = conv.mean(axis=(1, 2), keepdims=True)
    var = conv.var(axis=(1, 2), keepdims=True)
    ref = (conv - mean) / np.sqrt(var + 1e-5) * p["norm0"]["scale"] + p["norm0"]["bias"]
    ref = np.maximum(ref, 0.0).reshape(2, -1)
    emb = model.apply(variables, x, method="embed")
    np.testing.assert_allclose(emb, ref, rtol=1e-4, atol=1e-5)


def test_instance_norm_is_per_image(depth1_instance):
    # conv(a*x) = a*conv_w(x) + bias: the conv bias is cancelled by the mean subtraction, so a positive
    # per-image scale leaves the normalized output unchanged up to eps (var ~ 1e-1 >> eps here).
    # (x + c is NOT invariant: zero padding makes conv of a constant non-constant near the border.)
    model, variables, x = depth1_instance
    batch = np.stack([x[0], 5.0 * x[0], x[1]])
    emb = np.asarray(model.apply(variables, batch, method="embed"))
    np.testing.assert_allclose(emb[1], emb[0], rtol=1e-3, atol=1e-4)
    assert not np.allclose(emb[2], emb[0], atol=1e-2)
    # without normalization the same scaling changes the embedding: the check above can fail
    no_norm = ConvNet(num_classes=3, depth=1, width=4, norm="none", pooling="none")
    raw = np.asarray(no_norm.apply({"params": {k: variables["params"][k] for k in ("conv0", "classifier")}},
                                   batch, method="embed"))
    assert not np.allclose(raw[1], raw[0], atol=1e-2)


@pytest.mark.parametrize("pooling, reduce", [("avg", np.mean), ("max", np.max)])
def test_pooling_2x2_floor(pooling, reduce):
    x = np.random.default_rng(4).standard_normal((1, 7, 7, 2)).astype(np.float32)
    unpooled_model = ConvNet(num_classes=3, depth=1, width=4, pooling="none")
    variables = _np_variables(unpooled_model, (7, 7, 2))
    full = np.asarray(unpooled_model.apply(variables, x, method="embed")).reshape(1, 7, 7, 4)
    pooled_model = ConvNet(num_classes=3, depth=1, width=4, pooling=pooling)
    # same conv and norm parameters; only the classifier's input size shrinks (4*7*7 -> 4*3*3)
    params = {**variables["params"], "classifier": {"kernel": jnp.zeros((36, 3)), "bias": jnp.zeros(3)}}
    pooled = np.asarray(pooled_model.apply({"params": params}, x, method="embed")).reshape(1, 3, 3, 4)
    # 7 -> 3: the last row and column are dropped, as PyTorch's floor mode
    ref = reduce(full[:, :6, :6, :].reshape(1, 3, 2, 3, 2, 4), axis=(2, 4))
    np.testing.assert_allclose(pooled, ref, rtol=1e-5, atol=1e-6)


class _StridedConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return models._conv(x, 3, 3, stride=2, padding=1, use_bias=False)


def test_strided_conv_pads_symmetrically_like_torch():
    # flax "SAME" would pad 5x5 stride 2 as (1, 1) but 6x6 as (0, 1); torch pads (1, 1) always.
    x = np.random.default_rng(6).standard_normal((1, 6, 6, 2)).astype(np.float32)
    kernel = np.random.default_rng(7).standard_normal((3, 3, 2, 3)).astype(np.float32)
    variables = {"params": {"Conv_0": {"kernel": kernel}}}
    out = _StridedConv().apply(variables, x)
    ref = _np_conv(x.astype(np.float64), kernel.astype(np.float64), stride=2)
    assert out.shape == (1, 3, 3, 3)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_resnet_block_shortcut_only_when_shape_changes():
    x = jnp.zeros((1, 8, 8, 4))
    same = jax.eval_shape(lambda: BasicBlock(4, 1).init(KEY, x))["params"]
    down = jax.eval_shape(lambda: BasicBlock(8, 2).init(KEY, x))["params"]
    assert set(same) == {"conv0", "norm0", "conv1", "norm1"}
    assert set(down) == {"conv0", "norm0", "conv1", "norm1", "shortcut_conv", "shortcut_norm"}
    assert down["shortcut_conv"]["kernel"].shape == (1, 1, 4, 8)
    assert "bias" not in down["conv0"] and "bias" not in down["shortcut_conv"]


# ----------------------------------------------------------------------------- batch norm state

def test_batch_norm_updates_running_stats_only_in_training():
    model = ConvNet(num_classes=3, depth=1, width=4, norm="batch", pooling="none")
    variables = _np_variables(model, (6, 6, 2))
    assert has_batch_stats(variables)
    x = np.random.default_rng(5).standard_normal((3, 6, 6, 2)).astype(np.float32)

    _, unchanged = apply_model(model, variables, x, train=False)
    assert unchanged is variables

    _, updated = apply_model(model, variables, x, train=True)
    assert set(updated) == {"params", "batch_stats"} and updated["params"] is variables["params"]
    p = variables["params"]["conv0"]
    conv = _np_conv(x.astype(np.float64), np.asarray(p["kernel"]), np.asarray(p["bias"]))
    stats = updated["batch_stats"]["norm0"]
    # PyTorch momentum 0.1 from mean 0 / var 1 (flax keeps the biased batch variance)
    np.testing.assert_allclose(stats["mean"], 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * conv.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    assert not np.allclose(stats["mean"], variables["batch_stats"]["norm0"]["mean"])


def test_instance_norm_model_has_no_state(depth1_instance):
    model, variables, x = depth1_instance
    assert not has_batch_stats(variables)
    _, out_vars = apply_model(model, variables, x, train=True)
    assert out_vars is variables


# ----------------------------------------------------------------------------- registry and errors

def test_registry_names():
    assert set(MODEL_NAMES) == {"ConvNet", "ConvNetD2", "ConvNetD4", "ConvNetD6", "ConvNetBN", "AlexNet",
                                "AlexNetBN", "VGG11", "VGG11BN", "ResNet18", "ResNet18BN"}
    assert get_model("ConvNetD6", 5, 3) == ConvNet(5, depth=6)
    assert get_model("AlexNet", 5, 1) == AlexNet(5, channels=1)
    assert isinstance(get_model("VGG11BN", 5, 3), VGG11) and get_model("VGG11BN", 5, 3).norm == "batch"
    assert isinstance(get_model("ResNet18", 5, 3), ResNet18)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="ConvNetXL") as err:
        get_model("ConvNetXL", 10, 3)
    assert "ResNet18" in str(err.value)  # lists the valid names
    with pytest.raises(ValueError, match="num_classes"):
        get_model("ConvNet", 0, 3)
    with pytest.raises(ValueError, match="layer"):
        _shapes(ConvNet(10, norm="layer"), (8, 8, 1))
    with pytest.raises(ValueError, match="'sum'"):
        _shapes(ConvNet(10, pooling="sum"), (8, 8, 1))
    with pytest.raises(ValueError, match="3-channel"):
        _shapes(AlexNet(10, channels=3), (32, 32, 1))
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        init_variables(ConvNet(10), KEY, (32, 32))
    variables = _shapes(ConvNet(10, depth=1), (8, 8, 1))
    with pytest.raises(ValueError, match="logits"):
        apply_model(ConvNet(10, depth=1), variables, jnp.zeros((1, 8, 8, 1)), train=False, method="logits")


# ----------------------------------------------------------------------------- conv weight-gradient impls

class _OneConv(nn.Module):
    """One `models._conv` layer: the layer every network is built from."""
    features: int
    kernel: int
    stride: int
    padding: int
    use_bias: bool
    conv_impl: str

    @nn.compact
    def __call__(self, x, train=False):
        return models._conv(x, self.features, self.kernel, stride=self.stride, padding=self.padding,
                            use_bias=self.use_bias, conv_impl=self.conv_impl, name="conv")


def _outputs_and_grads(model, variables, x, cotangent):
    """(model(x), d<model(x), cotangent>/d(params, x)) in one jitted call."""
    def f(params, x):
        out, vjp = jax.vjp(lambda p, x: model.apply({**variables, "params": p}, x), params, x)
        return out, vjp(cotangent)
    return jax.jit(f)(variables["params"], x)


# (model with conv_impl left out, image shape HWC): tiny versions of the networks' conv shapes
_IMPL_CASES = {
    "convnet_d2_w8": (lambda impl: ConvNet(5, depth=2, width=8, conv_impl=impl), (8, 8, 3)),
    "alexnet_5x5_pad2": (lambda impl: _OneConv(6, 5, 1, 2, True, impl), (6, 6, 3)),
    # 7 -> 4 with pad 1 stride 2: the last strided view ends exactly at the padded border
    "stride2_3x3": (lambda impl: _OneConv(6, 3, 2, 1, False, impl), (7, 7, 4)),
    "resnet_shortcut_1x1_stride2": (lambda impl: _OneConv(6, 1, 2, 0, False, impl), (6, 6, 4)),
}


@pytest.mark.parametrize("impl", ["matmul", "taps"])
@pytest.mark.parametrize("case", list(_IMPL_CASES))
def test_conv_impls_match_xla_values_and_gradients(case, impl):
    make, image_shape = _IMPL_CASES[case]
    variables = _np_variables(make("xla"), image_shape, seed=8)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, *image_shape)).astype(np.float32)
    out_shape = jax.eval_shape(lambda v, x: make("xla").apply(v, x), variables, x).shape
    cotangent = rng.standard_normal(out_shape).astype(np.float32)
    out_x, (grads_x, dx_x) = _outputs_and_grads(make("xla"), variables, x, cotangent)
    out_m, (grads_m, dx_m) = _outputs_and_grads(make(impl), variables, x, cotangent)
    np.testing.assert_allclose(out_m, out_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx_m, dx_x, rtol=1e-4, atol=1e-6)
    flat_x = jax.tree_util.tree_leaves_with_path(grads_x)
    assert jax.tree_util.tree_structure(grads_m) == jax.tree_util.tree_structure(grads_x)
    for (path, gx), gm in zip(flat_x, jax.tree_util.tree_leaves(grads_m)):
        if path[-1].key == "kernel":  # (instance norm cancels conv biases: their gradient is ~0)
            assert float(jnp.abs(gx).max()) > 1e-3, path  # a vanishing gradient would compare trivially
        # atol: float32 sums of ~100 products reorder differently per CPU (seen 1.3e-6 on AVX-512)
        np.testing.assert_allclose(gm, gx, rtol=1e-4, atol=1e-5, err_msg=str(path))


@pytest.mark.parametrize("im2col_max_columns", [512, 0], ids=["one_im2col_matmul", "matmul_per_tap"])
def test_conv_weight_grad_matmul_against_numpy(im2col_max_columns, monkeypatch):
    # asymmetric padding (0 before, 2 after) and stride 2 on 5x6, kernel 2x3: the function alone,
    # both ways of computing it (narrow layers: one matmul; wide ones: a matmul per kernel tap)
    monkeypatch.setattr(convs, "IM2COL_MAX_COLUMNS", im2col_max_columns)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 5, 6, 3))
    strides, pads, (kh, kw) = (2, 2), ((0, 2), (0, 2)), (2, 3)
    xp = np.pad(x, ((0, 0), *pads, (0, 0)))
    ho, wo = (5 + 2 - kh) // 2 + 1, (6 + 2 - kw) // 2 + 1  # 3, 3
    g = rng.standard_normal((2, ho, wo, 4))
    # dL/dk[i, j, c, o] = sum_{n, a, b} xp[n, i + 2a, j + 2b, c] g[n, a, b, o]
    ref = np.zeros((kh, kw, 3, 4))
    for i in range(kh):
        for j in range(kw):
            ref[i, j] = np.einsum("nabc,nabo->co", xp[:, i:i + 2 * ho:2, j:j + 2 * wo:2], g)
    dk = convs.conv_weight_grad_matmul(jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32),
                                        (kh, kw, 3, 4), strides, pads)
    assert dk.shape == (kh, kw, 3, 4)
    np.testing.assert_allclose(dk, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("im2col_max_columns", [512, 0], ids=["one_im2col_matmul", "matmul_per_tap"])
def test_conv_taps_against_numpy(im2col_max_columns, monkeypatch):
    # the forward conv as matmuls, on the shapes of the weight-gradient test above:
    # out[n, a, b, o] = sum_{i, j, c} xp[n, i + 2a, j + 2b, c] k[i, j, c, o]
    monkeypatch.setattr(convs, "IM2COL_MAX_COLUMNS", im2col_max_columns)
    rng = np.random.default_rng(14)
    x, kernel = rng.standard_normal((2, 5, 6, 3)), rng.standard_normal((2, 3, 3, 4))
    strides, pads = (2, 2), ((0, 2), (0, 2))
    xp = np.pad(x, ((0, 0), *pads, (0, 0)))
    ref = sum(np.einsum("nabc,co->nabo", xp[:, i:i + 2 * 3:2, j:j + 2 * 3:2], kernel[i, j])
              for i in range(2) for j in range(3))
    out = convs.conv_taps(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32), strides, pads)
    assert out.shape == (2, 3, 3, 4)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_conv_impl_dispatch_and_same_parameters():
    x = jnp.zeros((1, 6, 6, 2))
    make = lambda impl: ConvNet(3, depth=1, width=4, conv_impl=impl)  # noqa: E731
    inits = {impl: init_variables(make(impl), KEY, (6, 6, 2)) for impl in ("xla", "matmul", "taps")}
    jax.tree_util.tree_map(np.testing.assert_array_equal, inits["xla"], inits["matmul"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, inits["xla"], inits["taps"])

    def uses_matmul_grad(impl):
        return "custom_vjp_call" in str(jax.make_jaxpr(lambda v: make(impl).apply(v, x))(inits["xla"]))

    assert uses_matmul_grad("matmul") and not uses_matmul_grad("xla")
    taps = str(jax.make_jaxpr(jax.grad(lambda v: make("taps").apply(v, x).sum()))(inits["xla"]))
    assert "conv_general_dilated" not in taps and "dot_general" in taps  # no convolution at all
    assert uses_matmul_grad("auto") == (jax.default_backend() == "cpu")  # plain XLA conv on GPU/TPU
    assert backend.conv_impl("auto") == ("matmul" if jax.default_backend() == "cpu" else "xla")
    assert get_model("ResNet18", 5, 3, conv_impl="xla") == ResNet18(5, conv_impl="xla")
    assert get_model("AlexNet", 5, 3).conv_impl == "auto"


def test_bad_conv_impl_raises():
    with pytest.raises(ValueError, match="'cudnn'"):
        get_model("ConvNet", 10, 3, conv_impl="cudnn")
    with pytest.raises(ValueError, match="'fast'"):
        _shapes(ConvNet(10, depth=1, conv_impl="fast"), (8, 8, 1))
    with pytest.raises(ValueError, match="'im2col'"):
        _shapes(ResNet18(10, conv_impl="im2col"), (8, 8, 3))


@pytest.mark.parametrize("impl", ["matmul", "taps"])
def test_vmapped_training_step_over_members(impl):
    # The model queue / evaluator vmap one SGD step over members with different weights and data.
    model_m = ConvNet(3, depth=1, width=4, conv_impl=impl)
    model_x = ConvNet(3, depth=1, width=4, conv_impl="xla")
    members = [_np_variables(model_x, (6, 6, 2), seed=s)["params"] for s in (11, 12)]
    stacked = jax.tree_util.tree_map(lambda *p: jnp.stack(p), *members)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, 4, 6, 6, 2)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 4))

    def step(model, params, x, labels):
        def loss(p):
            logits = model.apply({"params": p}, x)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
        grads = jax.grad(loss)(params)
        return jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads)

    vmapped = jax.jit(jax.vmap(lambda p, x, y: step(model_m, p, x, y)))(stacked, x, labels)
    step_x = jax.jit(lambda p, x, y: step(model_x, p, x, y))
    for m in range(2):
        ref = step_x(members[m], x[m], labels[m])
        moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), ref, members[m])
        assert moved["conv0"]["kernel"] > 1e-4  # the step changed the conv weights
        got = jax.tree_util.tree_map(lambda a: a[m], vmapped)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, ref)


def test_convnet_embedding_before_last_pool_is_the_unpooled_last_block():
    # The release script's default `--embed_last -1`: the last block without its pooling
    # (8192 values for ConvNet-3 on 32x32). Average-pooling it 2x2 gives the usual embedding.
    model = get_model("ConvNet", 10, 3)
    variables = _np_variables(model, (32, 32, 3))
    x = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
    emb, logits = model.apply(variables, x, method="embed_and_logits")
    unpooled, logits2 = model.apply(variables, x, skip_last_pool=True, method="embed_and_logits")
    assert emb.shape == (2, 2048) and unpooled.shape == (2, 8192)
    np.testing.assert_array_equal(logits, logits2)  # the logits always use the whole network
    pooled = np.asarray(unpooled).reshape(2, 4, 2, 4, 2, 128).mean(axis=(2, 4)).reshape(2, -1)
    np.testing.assert_allclose(pooled, emb, rtol=1e-5, atol=1e-6)
