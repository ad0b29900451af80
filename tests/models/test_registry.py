"""Backbone registry: lookup errors, registration, every registered name builds and meets the contract."""

import pytest
import torch.nn as nn

from bcssl.models import Backbone, create_backbone, list_backbones, register_backbone
from bcssl.models import registry

BCSSL_NAMES = ["bcssl_atto", "bcssl_femto", "bcssl_pico", "bcssl_nano", "bcssl_t", "bcssl_s"]


def test_bcssl_variants_registered_and_sorted():
    names = list_backbones()
    assert set(BCSSL_NAMES) <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("typo,closest", [("bcssl_tt", "bcssl_t"), ("bcssl_ato", "bcssl_atto"), ("BCSSL_S", "bcssl_s")])
def test_unknown_name_names_closest_and_lists_valid(typo, closest):
    with pytest.raises(ValueError) as err:
        create_backbone(typo)
    msg = str(err.value)
    assert f"unknown backbone {typo!r}" in msg
    assert f"did you mean {closest!r}?" in msg
    assert all(n in msg.split("valid backbones:")[1] for n in list_backbones())


@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_name_constructible(name):
    m = create_backbone(name)
    assert isinstance(m, nn.Module)
    assert isinstance(m.num_features, int) and m.num_features > 0
    assert isinstance(m, Backbone) and callable(m.forward_features) and callable(m.forward_intermediates)
    assert isinstance(m.cam_target_layer, nn.Module)
    assert hasattr(m, "cam_reshape")
    assert m.feature_info and m.feature_info[-1].channels == m.num_features


def test_kwargs_are_passed_through():
    m = create_backbone("bcssl_atto", kernel_size=3, dw_norm="ln", depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
    assert m.kernel_sizes == (3, 3, 3, 3) and m.dw_norm == "ln" and m.num_features == 8


def test_register_new_backbone(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    class Toy(Backbone):
        def __init__(self, width):
            super().__init__()
            self.num_features = width

    @register_backbone("toy_net")
    def toy_net(width=4):
        return Toy(width)

    assert "toy_net" in list_backbones()
    assert create_backbone("toy_net", width=7).num_features == 7
    assert register_backbone("toy_net")(toy_net) is toy_net  # same function again: fine

    def other():
        return nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        register_backbone("toy_net")(other)

    @register_backbone("not_a_backbone")
    def not_a_backbone():
        return nn.Linear(2, 2)

    with pytest.raises(TypeError, match="not_a_backbone.*Linear.*bcssl.models.Backbone"):
        create_backbone("not_a_backbone")
