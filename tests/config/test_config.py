"""Config loading: presets, overrides, unknown keys, validation."""
import pytest
import torch

from bcssl.config import ConfigError, list_presets, load_config


def test_defaults_follow_the_paper_recipe():
    cfg = load_config()
    from bcssl.methods.base import backbone_from_config

    with torch.device("meta"):
        net = backbone_from_config(cfg.model)  # bcssl_t with its own defaults: k9, BN after DW
    assert net.kernel_sizes == (9, 9, 9, 9) and net.dw_norm == "bn+ln"
    with torch.device("meta"):
        vanilla = backbone_from_config(load_config(None, ["model.name=convnext_t"]).model)
        resnet = backbone_from_config(load_config(None, ["model.name=resnet50"]).model)
    assert vanilla.num_features == 768 and resnet.num_features == 2048
    assert cfg.method.norm_last_layer is False and cfg.method.out_dim == 65536
    assert (cfg.method.warmup_teacher_temp, cfg.method.teacher_temp) == (0.04, 0.07)
    assert (cfg.train.weight_decay, cfg.train.weight_decay_end, cfg.train.clip_grad) == (0.04, 0.4, 3.0)
    assert list(cfg.crops.blur_p) == [1.0, 0.1, 0.5] and list(cfg.crops.solarize_p) == [0.0, 0.2, 0.0]


def test_overrides_and_inheritance():
    cfg = load_config("imagenet_bcssl_s_300ep", ["train.epochs=3", "model.kernel_size=[3,5,7,9]"])
    assert cfg.model.name == "bcssl_s" and cfg.train.epochs == 3 and list(cfg.model.kernel_size) == [3, 5, 7, 9]
    assert cfg.data.name == "image_folder"  # from the _base_ chain
    assert load_config("imagenet_bcssl_t_300ep").train.epochs == 300


@pytest.mark.parametrize("override,closest", [("train.epoch=3", "train.epochs"),
                                              ("modle.kernel_size=3", "model.kernel_size"),
                                              ("crops.nlocal=2", "crops.n_local")])
def test_unknown_key_names_closest(override, closest):
    with pytest.raises(ConfigError, match=f"Did you mean '{closest}'"):
        load_config(None, [override])


def test_bad_values_and_forms():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["epochs"])
    with pytest.raises(ConfigError, match="train.amp"):
        load_config(None, ["train.amp=fp8"])
    with pytest.raises(ConfigError, match="Did you mean 'demo_fmnist'"):
        load_config("demo_fminst")


def test_yaml_file_with_unknown_key(tmp_path):
    p = tmp_path / "my.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="train.epochz.*my.yaml.*train.epochs|train.epochs"):
        load_config(str(p))


def test_presets_listed():
    assert {"demo_fmnist", "demo_fmnist_long", "imagenet_bcssl_t_100ep", "imagenet_bcssl_t_300ep",
            "imagenet_bcssl_s_300ep"} <= set(list_presets())


def test_retired_key_is_dropped_from_files_and_refused_as_override(tmp_path, caplog):
    """data.load_size is gone: an older run's config.yaml still loads (one log line); an override is an error."""
    old = tmp_path / "config.yaml"
    old.write_text("data:\n  name: image_folder\n  load_size: 256\n")
    with caplog.at_level("INFO", logger="bcssl"):
        cfg = load_config(str(old))
    assert cfg.data.name == "image_folder" and "load_size" not in cfg.data
    assert "ignoring data.load_size (retired: " in caplog.text
    with pytest.raises(ConfigError, match="data.load_size was retired: .*eval.data.resize_size"):
        load_config(None, ["data.load_size=128"])
