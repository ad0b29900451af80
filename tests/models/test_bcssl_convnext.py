"""BC-SSL ConvNeXt: shapes, paper complexity, options, validation, BN folding, timm compatibility."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bcssl.models import BCSSLConvNeXt, count_macs, count_params, create_backbone, fold_bn
from bcssl.models.bcssl_convnext import VARIANTS, BCSSLBlock
from tests.conftest import randomise

TINY = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))


def tiny(**kw) -> BCSSLConvNeXt:
    return BCSSLConvNeXt(**{**TINY, **kw})


def blocks(model):
    return [b for b in model.modules() if isinstance(b, BCSSLBlock)]


# --- shapes and the backbone contract ---------------------------------------------------------


def test_atto_forward_shapes():
    torch.manual_seed(0)
    m = create_backbone("bcssl_atto").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = m.forward_features(x)
        pooled = m.forward_head(fmap)
    assert fmap.shape == (2, 320, 2, 2)
    assert pooled.shape == (2, m.num_features) == (2, 320)
    with torch.no_grad():
        assert torch.allclose(m(x), pooled, atol=1e-6)


# backbone params (no classifier), timm's ConvNeXt sizes with k7 -> k9 and one BN per block
VARIANT_PARAMS_M = {"bcssl_atto": 3.44, "bcssl_femto": 4.91, "bcssl_pico": 8.63,
                    "bcssl_nano": 15.10, "bcssl_t": 28.05, "bcssl_s": 49.91}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_structure(name):
    depths, dims = VARIANTS[name]
    with torch.device("meta"):  # structure and counts need no real weights (atto runs above)
        m = create_backbone(name)
    assert m.depths == depths and m.dims == dims and m.num_features == dims[-1]
    assert [len(s.blocks) for s in m.stages] == list(depths)
    assert [s.blocks[0].conv_dw.in_channels for s in m.stages] == list(dims)
    assert count_params(m) / 1e6 == pytest.approx(VARIANT_PARAMS_M[name], abs=0.01)


@pytest.mark.parametrize("stem_stride,size,out", [(4, 64, 2), (2, 32, 2), (1, 24, 3)])
def test_stem_stride_shapes(stem_stride, size, out):
    m = tiny(stem_stride=stem_stride).eval()
    assert m.stem[0].stride == (stem_stride, stem_stride)
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, size, size)).shape == (1, 32, out, out)
    assert m.min_input_size == 8 * stem_stride


def test_in_chans_and_contract_attributes():
    m = tiny(in_chans=1).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 32, 32)).shape == (2, 32)
    assert m.cam_target_layer is blocks(m)[-1] is m.stages[3].blocks[-1]
    assert m.cam_reshape is None


def test_train_step_gives_every_parameter_a_gradient():
    m = tiny(drop_path_rate=0.1).train()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing


# --- paper complexity (params / MACs with a 1000-class linear classifier) ----------------------


@pytest.mark.parametrize(
    "name,k,target,tol",
    [("bcssl_t", 9, 29, 0.5), ("bcssl_t", 3, 28, 0.5), ("bcssl_t", 15, 30, 0.5), ("bcssl_s", 9, 50, 1)],
)
def test_paper_param_counts(name, k, target, tol):
    with torch.device("meta"):  # counting needs shapes only
        m = create_backbone(name, kernel_size=k)
        with_fc = nn.Sequential(m, nn.Linear(m.num_features, 1000))
    n = count_params(m, num_classes=1000)
    assert n == count_params(with_fc)
    assert abs(n / 1e6 - target) <= tol, n


def test_vanilla_tiny_matches_timm_param_count():
    # dw_norm='ln', k7 is exactly timm's convnext_tiny (28,589,128 params with its 1000-way fc)
    with torch.device("meta"):
        m = create_backbone("bcssl_t", dw_norm="ln", kernel_size=7)
    assert count_params(m, num_classes=1000) == 28_589_128


def test_paper_macs_bcssl_t_k9():
    m = create_backbone("bcssl_t", kernel_size=9)
    with_fc = nn.Sequential(m, nn.Linear(m.num_features, 1000))
    macs = count_macs(with_fc, 224)
    assert abs(macs / 1e9 - 4.5) <= 0.2, macs


def test_count_macs_classifier_option_and_mode_restore():
    m = tiny().train()
    analytic = count_macs(m, 64, num_classes=10)
    assert m.training and all(mod.training for mod in m.modules())
    measured = count_macs(nn.Sequential(m, nn.Linear(m.num_features, 10)), (3, 64, 64))
    assert analytic == measured > 0


def test_count_params_trainable_only():
    m = tiny()
    stem = sum(p.numel() for p in m.stem.parameters())
    m.stem.requires_grad_(False)
    assert count_params(m, trainable_only=True) == count_params(m) - stem


# --- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dw_norm,bn,ln", [("bn+ln", nn.BatchNorm2d, nn.LayerNorm), ("ln", nn.Identity, nn.LayerNorm), ("bn", nn.BatchNorm2d, nn.Identity)]
)
def test_dw_norm_modules(dw_norm, bn, ln):
    m = tiny(dw_norm=dw_norm)
    for b in blocks(m):
        assert type(b.bn_dw) is bn and type(b.norm) is ln
    n_bn = sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert n_bn == (sum(TINY["depths"]) if "bn" in dw_norm else 0)


def test_default_is_paper_config():
    m = create_backbone("bcssl_atto")
    assert m.dw_norm == "bn+ln" and m.kernel_sizes == (9, 9, 9, 9) and m.stem_stride == 4
    b = m.stages[0].blocks[0]
    assert b.conv_dw.kernel_size == (9, 9) and b.conv_dw.padding == (4, 4) and b.conv_dw.groups == 40
    assert isinstance(b.bn_dw, nn.BatchNorm2d)
    assert b.gamma.shape == (40,) and torch.all(b.gamma == 1e-6)


def test_per_stage_kernel_sizes():
    from omegaconf import OmegaConf

    for ks in [(3, 5, 7, 9), [3, 5, 7, 9], OmegaConf.create([3, 5, 7, 9])]:
        m = tiny(kernel_size=ks)
        for stage, k in zip(m.stages, (3, 5, 7, 9)):
            for b in stage.blocks:
                assert b.conv_dw.kernel_size == (k, k) and b.conv_dw.padding == (k // 2, k // 2)
    with torch.no_grad():  # 'same' padding keeps the map size for every kernel
        assert m.eval().forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 32, 2, 2)


def test_drop_path_rates_increase_linearly():
    m = tiny(drop_path_rate=0.4)
    rates = [b.drop_path.drop_prob for b in blocks(m)]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    x = torch.randn(4, 3, 32, 32)
    m = randomise(m).eval()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))  # no stochastic depth at eval time


def test_drop_path_drops_whole_samples_and_keeps_expectation():
    dp = blocks(tiny(drop_path_rate=0.5))[-1].drop_path.train()
    torch.manual_seed(0)
    y = dp(torch.ones(4000, 3, 2, 2))
    per_sample = y.flatten(1)
    assert torch.all(per_sample == per_sample[:, :1])  # one decision per sample
    assert set(per_sample[:, 0].unique().tolist()) == {0.0, 2.0}  # kept paths scaled by 1/keep
    assert abs(y.mean().item() - 1.0) < 0.05
    assert torch.equal(dp.eval()(torch.ones(2, 3)), torch.ones(2, 3))


def test_init_follows_timm():
    torch.manual_seed(0)
    m = create_backbone("bcssl_atto")
    w = m.stages[2].blocks[0].mlp.fc1.weight
    assert 0.018 < w.std().item() < 0.022
    assert all(torch.all(mod.bias == 0) for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear)))


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [8, 1, 33, 9.0, "9", True, (9, 9, 9), [9, 9, 9, 10], None])
def test_invalid_kernel_size(k):
    with pytest.raises(ValueError, match=r"kernel_size must be an odd int in 3\.\.31"):
        tiny(kernel_size=k)


@pytest.mark.parametrize("dw_norm", ["gn", "BN", "ln+bn", ""])
def test_invalid_dw_norm(dw_norm):
    with pytest.raises(ValueError, match=r"bn\+ln, ln, bn"):
        tiny(dw_norm=dw_norm)


@pytest.mark.parametrize("s", [3, 8, 0, "4"])
def test_invalid_stem_stride(s):
    with pytest.raises(ValueError, match="stem_stride must be one of 4, 2, 1"):
        tiny(stem_stride=s)


def test_invalid_depths_dims():
    with pytest.raises(ValueError, match="dims"):
        tiny(dims=(8, 16, 24))
    with pytest.raises(ValueError, match="depths"):
        tiny(depths=(1, 0, 1, 1))


def test_too_small_input():
    m = tiny().eval()
    with pytest.raises(ValueError, match="input 16x16 is too small for stem_stride=4: need at least 32x32"):
        m(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="input 32x31"):
        m.forward_features(torch.randn(1, 3, 32, 31))
    with torch.no_grad():  # the boundary size works
        assert m.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 32, 1, 1)
    m2 = tiny(stem_stride=2).eval()
    with pytest.raises(ValueError, match="stem_stride=2: need at least 16x16"):
        m2(torch.randn(1, 3, 15, 15))


# --- BN folding and timm compatibility ------------------------------------------------------


@pytest.mark.parametrize("dw_norm", ["bn+ln", "bn", "ln"])
def test_fold_bn_equivalence(dw_norm):
    torch.manual_seed(0)
    m = randomise(tiny(dw_norm=dw_norm)).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    folded = fold_bn(m)

    # the original is untouched: same modules, same values, same mode
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    n_bn = sum(isinstance(b.bn_dw, nn.BatchNorm2d) for b in blocks(m))
    assert n_bn == (len(blocks(m)) if "bn" in dw_norm else 0)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in folded.modules())
    assert not folded.training

    x = torch.randn(2, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        ref, out = m(x), folded(x)
        assert (ref - out).abs().max().item() < 1e-4
        if "bn" in dw_norm:  # dropping the BN without folding must change the output
            dropped = fold_bn(m)
            dropped.load_state_dict({k: v for k, v in m.state_dict().items() if "bn_dw" not in k})
            assert (ref - dropped(x)).abs().max().item() > 1e-2


def test_folded_bcssl_loads_strictly_into_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = randomise(create_backbone("bcssl_atto", dw_norm="bn+ln")).eval()
    # timm builds atto..nano with 1x1-conv MLPs; conv_mlp=False gives the Linear layout of tiny/small
    ref = timm.create_model("convnext_atto", kernel_sizes=9, num_classes=0, conv_mlp=False).eval()
    with pytest.raises(RuntimeError, match="bn_dw"):
        ref.load_state_dict(m.state_dict(), strict=True)
    ref.load_state_dict(fold_bn(m).state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = m.forward_features(x)
        assert (fmap - ref.forward_features(x)).abs().max().item() < 1e-4
        assert (m.forward_head(fmap) - ref(x)).abs().max().item() < 1e-4


@pytest.mark.parametrize("name,timm_name", [("bcssl_t", "convnext_tiny"), ("bcssl_s", "convnext_small")])
def test_full_size_state_dict_layout_matches_timm(name, timm_name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        m = fold_bn(create_backbone(name, dw_norm="bn+ln"))
    ref = timm.create_model(timm_name, kernel_sizes=9, num_classes=0, device="meta")
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs


@pytest.mark.parametrize("k,h,w", [(9, 4, 4), (9, 2, 3), (9, 1, 1), (15, 3, 6), (9, 5, 5), (3, 1, 2)])
def test_depthwise_conv_on_small_maps_equals_the_full_kernel(k, h, w):
    """The kernel cut to the taps that reach a pixel gives the full conv's output and gradients."""
    from bcssl.models.bcssl_convnext import depthwise_conv

    conv = nn.Conv2d(6, 6, k, padding=k // 2, groups=6)
    x = torch.randn(2, 6, h, w, requires_grad=True)
    ref = F.conv2d(x, conv.weight, conv.bias, padding=k // 2, groups=6)  # the full k x k kernel
    g_ref = torch.autograd.grad(ref.square().sum(), [x, conv.weight, conv.bias])
    out = depthwise_conv(conv, x)
    g = torch.autograd.grad(out.square().sum(), [x, conv.weight, conv.bias])
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-6)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-5)
    if k > 2 * h - 1:
        assert g[1][:, :, 0].abs().sum() == 0  # a cut tap gets no gradient, as in the full conv


def test_traced_model_keeps_the_full_kernel_for_other_sizes():
    model = BCSSLConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), kernel_size=9, stem_stride=2).eval()
    traced = torch.jit.trace(model, torch.randn(1, 3, 16, 16), check_trace=False)  # 8/4/2/1 px maps
    x = torch.randn(2, 3, 64, 64)  # 32/16/8/4 px maps: a trace that baked in the cut kernels would differ
    assert torch.allclose(traced(x), model(x), atol=1e-5)
