"""MoCo v3's ViT-S/16 (vit_s16_mocov3) against facebookresearch/moco-v3 vits.py."""
import math

import pytest
import torch
from torch import nn

from bcssl.models import count_params, create_backbone
from bcssl.models.vit_mocov3 import sincos_position_embedding

# moco-v3 vits.vit_small: patch 16, width 384, depth 12, 12 heads, MLP ratio 4, qkv bias. Parameter count
# from its shapes (the head is replaced by MoCo's projector, so not counted); the number of heads does not
# change it. Building vits.py itself (timm 1.0.31) gives the same 21,665,664 and, with --stop-grad-conv1,
# 21,294,720 trainable (the frozen patch projection and the fixed position embedding left out).
D, P, N = 384, 16, 14 * 14
PATCH = 3 * P * P * D + D
POS = (1 + N) * D
BLOCK = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D)
OFFICIAL_VIT_S_PARAMS = PATCH + D + POS + 12 * BLOCK + 2 * D  # + cls token + final norm
OFFICIAL_VIT_S_TRAINABLE_STOP_GRAD = OFFICIAL_VIT_S_PARAMS - PATCH - POS


def test_parameter_count_heads_and_size_equal_moco_v3s():
    assert (OFFICIAL_VIT_S_PARAMS, OFFICIAL_VIT_S_TRAINABLE_STOP_GRAD) == (21_665_664, 21_294_720)
    with torch.device("meta"):
        m = create_backbone("vit_s16_mocov3")
    assert count_params(m) == OFFICIAL_VIT_S_PARAMS
    assert count_params(m, trainable_only=True) == OFFICIAL_VIT_S_PARAMS - POS  # the sin-cos table is fixed
    attn = m.model.blocks[0].attn
    assert attn.num_heads == 12 and attn.head_dim == 32 and len(m.model.blocks) == 12
    assert m.model.blocks[0].norm1.eps == 1e-6 and m.num_features == 384
    with torch.device("meta"):
        assert create_backbone("vit_s16").model.blocks[0].attn.num_heads == 6  # DINO's ViT-S/16: by design


def test_position_embedding_is_the_fixed_2d_sincos_table():
    m = create_backbone("vit_s16_mocov3", dims=64, depths=1, img_size=64)  # 4 x 4 patches of 16
    pos = m.model.pos_embed
    assert not pos.requires_grad and pos.shape == (1, 17, 64)
    assert torch.count_nonzero(pos[0, 0]) == 0  # the cls token's position is zero
    q = 16  # 64 / 4 frequencies per part
    omega = 1.0 / 10000 ** (torch.arange(q) / q)
    # token 1 + r * 4 + c; vits.py's meshgrid(arange(w), arange(h)) puts r in the first ("w") half
    for r, c in ((0, 0), (0, 1), (2, 3), (3, 1)):
        want = torch.cat([torch.sin(r * omega), torch.cos(r * omega), torch.sin(c * omega), torch.cos(c * omega)])
        assert torch.allclose(pos[0, 1 + r * 4 + c], want, atol=1e-6), (r, c)
    assert torch.equal(pos, sincos_position_embedding(4, 4, 64))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(2, 2, 6)


def test_initialisation_follows_vits_py():
    torch.manual_seed(0)
    m = create_backbone("vit_s16_mocov3", dims=128, depths=2, img_size=32)
    vit = m.model
    qkv = vit.blocks[0].attn.qkv  # Q, K, V treated as three (out / 3) x in matrices
    bound = math.sqrt(6.0 / (qkv.weight.shape[0] // 3 + qkv.weight.shape[1]))
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.95 * bound
    for lin in (vit.blocks[0].attn.proj, vit.blocks[1].mlp.fc1, vit.blocks[1].mlp.fc2):  # xavier-uniform
        b = math.sqrt(6.0 / sum(lin.weight.shape))
        assert lin.weight.abs().max() <= b and lin.weight.abs().max() > 0.95 * b
    linears = [mod for mod in vit.modules() if isinstance(mod, nn.Linear)]
    assert linears and all(torch.count_nonzero(mod.bias) == 0 for mod in linears)
    proj = vit.patch_embed.proj  # xavier-uniform over the flattened patch: sqrt(6 / (3 p p + D))
    b = math.sqrt(6.0 / (3 * 16 * 16 + 128))
    assert proj.weight.abs().max() <= b and proj.weight.abs().max() > 0.95 * b and torch.count_nonzero(proj.bias) == 0
    assert 0 < vit.cls_token.abs().max() < 1e-5  # normal(std 1e-6)
    assert m.patch_projection is proj and proj.weight.requires_grad  # frozen by MoCo v3, not by the model


def test_forward_and_contract():
    m = create_backbone("vit_s16_mocov3", dims=64, depths=1, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, maps = m.forward_intermediates(x)
        assert torch.allclose(m.forward_head(final), m(x)) and m(x).shape == (2, 64)
    assert maps[0].shape == (2, 64, 2, 2) and m.feature_info[0].reduction == 16
