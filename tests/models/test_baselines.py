"""timm baselines (resnet50, convnext_t, vit_s16, swin_t): paper param counts, the backbone
contract, kwargs honoured or rejected, input-size rules, random patch projection."""

import copy

import pytest
import torch
import torch.nn as nn

from bcssl.models import count_macs, count_params, create_backbone, list_backbones
from bcssl.models.baselines import TimmBackbone

NAMES = ["resnet50", "convnext_t", "vit_s16", "swin_t"]

# Small members of each family, so real forwards take milliseconds.
TINY = {
    "resnet50": dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
    "convnext_t": dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)),
    "vit_s16": dict(depths=2, dims=64, img_size=32),
    "swin_t": dict(depths=(1, 2, 1, 2), dims=(8, 16, 32, 64), img_size=32),
}


def tiny(name, **kw):
    return create_backbone(name, **{**TINY[name], **kw}).eval()


def meta(name, **kw):
    with torch.device("meta"):
        return create_backbone(name, **kw)


def test_registered():
    assert set(NAMES) <= set(list_backbones())


# --- paper / timm complexity (meta device: no memory, no init time) ---------------------------
@pytest.mark.parametrize(
    "name,backbone_m,with_fc_m,gmacs",
    [
        ("resnet50", 23.5, 25.6, 4.09),
        ("vit_s16", 21.7, 22.1, 4.60),
        ("swin_t", 27.5, 28.3, 4.49),
        ("convnext_t", 27.8, 28.6, 4.46),
    ],
)
def test_param_and_mac_counts(name, backbone_m, with_fc_m, gmacs):
    m = meta(name)
    assert count_params(m) / 1e6 == pytest.approx(backbone_m, abs=0.05)
    assert count_params(m, num_classes=1000) / 1e6 == pytest.approx(with_fc_m, abs=0.05)
    assert count_macs(m, 224, num_classes=1000) / 1e9 == pytest.approx(gmacs, abs=0.02)


def test_convnext_kernel_size_changes_params():
    k3, k9 = meta("convnext_t", kernel_size=3), meta("convnext_t", kernel_size=9)
    # depthwise weights: k*k per channel of every block; sum(depth * dim) = 6624 for ConvNeXt-T
    assert count_params(k9) - count_params(k3) == (81 - 9) * 6624
    assert k3.kernel_sizes == (3, 3, 3, 3) and k9.kernel_sizes == (9, 9, 9, 9)
    per_stage = meta("convnext_t", kernel_size=(3, 5, 7, 9))
    assert [s.blocks[0].conv_dw.kernel_size[0] for s in per_stage.model.stages] == [3, 5, 7, 9]


# --- contract ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,size,grid",
    [("resnet50", 64, 2), ("convnext_t", 64, 2), ("vit_s16", 32, 2), ("swin_t", 64, 2)],
)
def test_contract_shapes_and_cam(name, size, grid):
    m = tiny(name, img_size=size) if name in ("vit_s16", "swin_t") else tiny(name)
    assert isinstance(m, TimmBackbone)
    x = torch.randn(2, 3, size, size)
    acts = []
    handle = m.cam_target_layer.register_forward_hook(lambda mod, inp, out: acts.append(out))
    with torch.no_grad():
        pooled = m(x)
        fmap = m.forward_features(x)
    handle.remove()
    assert pooled.shape == (2, m.num_features)
    assert fmap.shape == (2, m.num_features, grid, grid)
    assert m.min_input_size <= size
    if name in ("resnet50", "convnext_t"):
        assert m.cam_reshape is None
        assert acts[0].shape == fmap.shape  # last block of the last stage
    else:
        assert isinstance(m.cam_target_layer, nn.LayerNorm)  # norm1 of the last block
        cam_map = m.cam_reshape(acts[0])
        assert cam_map.shape == (2, m.num_features, grid, grid)


def test_cam_target_layers_are_the_papers():
    m = meta("resnet50")
    assert m.cam_target_layer is m.model.layer4[-1]
    m = meta("convnext_t")
    assert m.cam_target_layer is m.model.stages[-1].blocks[-1]
    m = meta("vit_s16")
    assert m.cam_target_layer is m.model.blocks[-1].norm1
    m = meta("swin_t")
    assert m.cam_target_layer is m.model.layers[-1].blocks[-1].norm1


def test_pooled_matches_timm_head():
    m = tiny("convnext_t")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m.model.forward_head(m.model.forward_features(x), pre_logits=True)
        assert torch.allclose(m(x), ref)
        # ConvNeXt's pooled feature = LayerNorm(mean of the map)
        fmap = m.forward_features(x)
        assert torch.allclose(m(x), m.model.head.norm(fmap.mean((-2, -1), keepdim=True)).flatten(1), atol=1e-5)


def test_vit_feature_map_is_patch_tokens_without_cls():
    m = tiny("vit_s16")
    x = torch.randn(2, 3, 32, 48)  # non-square: grid 2 x 3
    with torch.no_grad():
        tokens = m.model.forward_features(x)
        fmap = m.forward_features(x)
        pooled = m(x)
    assert tokens.shape == (2, 1 + 6, 64)
    assert fmap.shape == (2, 64, 2, 3)
    assert torch.equal(fmap.flatten(2).transpose(1, 2), tokens[:, 1:])
    assert torch.allclose(pooled, tokens[:, 0])  # DINO uses the cls token
    assert m.cam_reshape(tokens).shape == (2, 64, 2, 3)


def test_swin_feature_map_is_nchw():
    m = tiny("swin_t")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        nhwc = m.model.forward_features(x)
        assert torch.equal(m.forward_features(x), nhwc.permute(0, 3, 1, 2))


def test_convnext_t_is_bcssl_with_ln_only():
    """convnext_t == bcssl (dw_norm='ln') with the same kernel and stem: same weights, same outputs."""
    for stem in (4, 2):
        arch = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), kernel_size=5, stem_stride=stem)
        ours = create_backbone("bcssl_atto", dw_norm="ln", **arch).eval()
        timm_net = create_backbone("convnext_t", **arch).eval()
        timm_net.model.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(timm_net(x), ours(x), atol=1e-5)
            assert torch.allclose(timm_net.forward_features(x), ours.forward_features(x), atol=1e-5)


def test_deepcopy_keeps_contract():  # DINO's teacher is a deepcopy
    m = tiny("vit_s16")
    t = copy.deepcopy(m)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(t(x), m(x))
    assert t.cam_target_layer is t.model.blocks[-1].norm1


# --- kwargs -----------------------------------------------------------------------------------
CONFIG_DEFAULTS = dict(kernel_size=9, dw_norm="bn+ln", stem_stride=4, drop_path_rate=0.1)


@pytest.mark.parametrize("name", ["resnet50", "vit_s16", "swin_t"])
def test_bcssl_config_defaults_are_accepted(name):
    # backbone_from_config always passes these; they mean "not set" for models without DW convs
    m = meta(name, **CONFIG_DEFAULTS)
    assert m.num_features > 0


@pytest.mark.parametrize(
    "name,kw,match",
    [
        ("resnet50", dict(dw_norm="bn"), "dw_norm='bn'"),
        ("resnet50", dict(dw_norm="ln"), "no depthwise conv"),
        ("resnet50", dict(kernel_size=5), "kernel_size=5"),
        ("resnet50", dict(layer_scale_init=0.1), "layer scale"),
        ("resnet50", dict(dims=(10, 20, 40, 80)), "multiples of 4"),
        ("vit_s16", dict(kernel_size=7), "no depthwise conv"),
        ("vit_s16", dict(depths=(2, 2, 2, 2)), "single stage"),
        ("vit_s16", dict(img_size=40), "multiple of the patch size 16"),
        ("swin_t", dict(dw_norm="bn"), "no depthwise conv"),
        ("swin_t", dict(dims=(8, 16, 24, 32)), "double"),
        ("swin_t", dict(img_size=30), "multiple of the patch size 4"),
        ("convnext_t", dict(dw_norm="bn+ln"), "use bcssl_t"),
        ("convnext_t", dict(dw_norm="bn"), "LayerNorm only"),
        ("convnext_t", dict(kernel_size=4), "odd int"),
        ("convnext_t", dict(img_size=16), "below its minimum 32"),
        ("resnet50", dict(stem_stride=3), "stem_stride must be one of"),
        ("swin_t", dict(drop_path_rate=1.5), "drop_path_rate"),
    ],
)
def test_rejected_kwargs(name, kw, match):
    with pytest.raises(ValueError, match=match):
        meta(name, **kw)


def test_drop_path_rate_honoured():
    assert meta("swin_t").model.layers[-1].blocks[-1].drop_path1.__class__ is nn.Identity  # timm default 0.1 -> 0
    for name in NAMES:
        m = meta(name, drop_path_rate=0.2)
        rates = [mod.drop_prob for mod in m.modules() if type(mod).__name__ == "DropPath"]
        assert rates and max(rates) == pytest.approx(0.2), name


@pytest.mark.parametrize(
    "name,stem,size,grid,min_size",
    [
        ("resnet50", 2, 32, 2, 16),
        ("resnet50", 1, 16, 2, 8),
        ("convnext_t", 2, 32, 2, 16),
        ("convnext_t", 1, 16, 2, 8),
        ("vit_s16", 2, 32, 4, 8),
        ("swin_t", 2, 32, 2, 2),
    ],
)
def test_stem_stride_scales_total_stride(name, stem, size, grid, min_size):
    kw = dict(img_size=size) if name in ("vit_s16", "swin_t") else {}
    m = tiny(name, stem_stride=stem, **kw)
    assert m.min_input_size == min_size
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, size, size)).shape[-2:] == (grid, grid)


def test_in_chans():
    m = tiny("resnet50", in_chans=1)
    assert m.in_chans == 1
    with torch.no_grad():
        assert m(torch.randn(1, 1, 32, 32)).shape == (1, 128)


# --- input sizes ------------------------------------------------------------------------------
def test_swin_any_multiple_of_patch_works():
    m = tiny("swin_t")  # dynamic_img_size=True by default (multi-crop)
    with torch.no_grad():
        for side, grid in [(32, 1), (36, 2), (64, 2), (96, 3)]:
            assert m.forward_features(torch.randn(1, 3, side, side)).shape[-2:] == (grid, grid)
    with pytest.raises(ValueError, match="multiples of its patch size 4"):
        m(torch.randn(1, 3, 30, 30))


def test_static_size_models_reject_other_sizes():
    for name in ("swin_t", "vit_s16"):
        m = tiny(name, dynamic_img_size=False)
        with torch.no_grad():
            assert m(torch.randn(1, 3, 32, 32)).shape == (1, m.num_features)
        with pytest.raises(ValueError, match="built for 32x32"):
            m(torch.randn(1, 3, 64, 64))


def test_swin_static_equals_dynamic():
    torch.manual_seed(0)
    dyn = tiny("swin_t", img_size=64)
    static = tiny("swin_t", img_size=64, dynamic_img_size=False)
    static.load_state_dict(dyn.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(dyn(x), static(x), atol=1e-5)


def test_vit_takes_multicrop_sizes():
    m = tiny("vit_s16")  # img_size 32, dynamic
    with torch.no_grad():
        assert m.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 64, 4, 4)
        assert m.forward_features(torch.randn(1, 3, 16, 16)).shape == (1, 64, 1, 1)
    with pytest.raises(ValueError, match="multiples of its patch size 16"):
        m(torch.randn(1, 3, 40, 40))


@pytest.mark.parametrize("name", ["resnet50", "convnext_t"])
def test_cnn_too_small_input(name):
    m = tiny(name)
    with pytest.raises(ValueError, match="too small.*at least 32x32"):
        m(torch.randn(1, 3, 16, 16))


# --- contract members that differ by family --------------------------------------------------
def test_stage_maps_channels_and_strides():
    x = torch.randn(2, 3, 64, 64)
    for name in NAMES:
        m = tiny(name, img_size=64) if name in ("vit_s16", "swin_t") else tiny(name)
        with torch.no_grad():
            final, maps = m.forward_intermediates(x)
            assert torch.allclose(m.forward_head(final), m(x), atol=1e-5)
            assert torch.allclose(maps[-1], m.forward_features(x), atol=1e-5)
        assert [(t.shape[1], 64 // t.shape[-1]) for t in maps] == [(s.channels, s.reduction) for s in m.feature_info]
    assert [s.reduction for s in tiny("resnet50").feature_info] == [4, 8, 16, 32]
    assert [s.reduction for s in tiny("resnet50", stem_stride=2).feature_info] == [2, 4, 8, 16]


def test_patch_projection_only_for_transformers():
    assert meta("resnet50").patch_projection is None and meta("convnext_t").patch_projection is None
    vit, swin = meta("vit_s16"), meta("swin_t")
    assert vit.patch_projection is vit.model.patch_embed.proj and swin.patch_projection is swin.model.patch_embed.proj


def test_resnet50_is_initialised_as_torchvision():
    torch.manual_seed(0)
    m = create_backbone("resnet50", **TINY["resnet50"])
    last_bns = [b.bn3.weight for layer in (m.model.layer1, m.model.layer2) for b in layer]
    assert all(torch.equal(w, torch.ones_like(w)) for w in last_bns)  # torchvision: zero_init_residual=False
    zero = create_backbone("resnet50", zero_init_last=True, **TINY["resnet50"])
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in zero.model.layer1)  # BYOL / MoCo v3 / timm
    conv = m.model.layer1[0].conv2  # kaiming-normal, fan-out: std sqrt(2 / (out * 3 * 3))
    assert conv.weight.std().item() == pytest.approx((2 / (conv.out_channels * 9)) ** 0.5, rel=0.1)


def test_vit_s16_linear_features_are_dinos_last_4_class_tokens():
    """facebookresearch/dino eval_linear.py for ViT-S: the class token of each of the last 4 blocks
    after the final norm, concatenated (n_last_blocks=4, no avgpool): 4 x 384 = 1536 features."""
    vit = create_backbone("vit_s16").eval()
    x = torch.randn(2, 3, 64, 64)
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in vit.model.blocks[-4:]]
    with torch.no_grad():
        pooled = vit(x)
        for h in hooks:
            h.remove()
        want = torch.cat([vit.model.norm(o)[:, 0] for o in outputs], dim=-1)
        got = vit.linear_features(x)
    assert got.shape == (2, 4 * 384) == (2, 1536) and vit.linear_features_kind == "cls_last_4_blocks"
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got[:, -384:], pooled, atol=1e-5)  # the last block's token is the forward
    cnn = create_backbone("resnet50").eval()  # CNNs (and Swin): the pooled features
    with torch.no_grad():
        assert torch.equal(cnn.linear_features(x), cnn(x)) and cnn.linear_features_kind == "pooled"
