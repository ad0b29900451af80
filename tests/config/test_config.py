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
    assert cfg.method.dino.norm_last_layer is False and cfg.method.dino.out_dim == 65536
    assert (cfg.method.dino.warmup_teacher_temp, cfg.method.dino.teacher_temp) == (0.04, 0.07)
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


def test_switching_the_model_drops_the_presets_model_specific_keys():
    """demo_fmnist sets BC-SSL keys (depths, dims, kernel, dw_norm, stem stride); with model.name=vit_s16 they
    go, and keys given on the command line stay."""
    cfg = load_config("demo_fmnist", ["model.name=vit_s16"])
    assert cfg.model.depths is None and cfg.model.dims is None and cfg.model.kernel_size is None
    assert cfg.model.dw_norm is None and cfg.model.stem_stride == 4
    assert cfg.model.drop_path_rate == 0.0  # not model-specific: the preset's value stays
    cfg = load_config("demo_fmnist", ["model.name=convnext_t", "model.kernel_size=5"])
    assert cfg.model.kernel_size == 5 and cfg.model.depths is None
    cfg = load_config("demo_fmnist", ["model.name=bcssl_atto"])  # the preset's own model: nothing dropped
    assert list(cfg.model.depths) == [1, 1, 3, 1] and cfg.model.stem_stride == 2


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


# --- one section per method ---------------------------------------------------------------------
@pytest.mark.parametrize("override,new", [
    ("method.out_dim=64", "method.dino.out_dim"),
    ("method.care_lambda=10", "method.care.lambda_fea"),
    ("method.care_pos_size=4", "method.care.fmap_size"),
    ("method.moco_temperature=0.2", "method.moco_v3.temperature"),
    ("method.moco_proj_layers=2", "method.moco_v3.proj_layers"),
    ("model.random_patch_projection=true", "method.moco_v3.stop_grad_conv1"),
])
def test_old_flat_keys_name_the_new_key(override, new):
    with pytest.raises(ConfigError, match=f"'{override.split('=')[0]}' is now '{new}'"):
        load_config(None, [override])


def test_shared_old_keys_name_the_key_of_the_chosen_method(tmp_path, caplog):
    with pytest.raises(ConfigError, match="is now 'method.byol.momentum'"):
        load_config(None, ["method.name=byol", "method.momentum_teacher=0.99"])
    with pytest.raises(ConfigError, match="is now 'method.care.proj_dim'"):
        load_config(None, ["method.name=care", "method.proj_dim=64"])
    p = tmp_path / "old.yaml"  # a config.yaml of a run saved with the flat section still loads
    p.write_text("method:\n  name: moco_v3\n  momentum_teacher: 0.97\n  out_dim: 1024\n")
    with caplog.at_level("INFO", logger="bcssl"):
        cfg = load_config(str(p))
    assert cfg.method.moco_v3.momentum == 0.97 and cfg.method.dino.out_dim == 65536  # dino's key: not this run's
    assert "'method.momentum_teacher' is now 'method.moco_v3.momentum'" in caplog.text


def test_a_key_of_another_method_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="'method.dino.out_dim'.*setting of method dino, but method.name is byol"):
        load_config(None, ["method.name=byol", "method.dino.out_dim=64"])
    with pytest.raises(ConfigError, match="method.care.lambda_fea.*method.name is dino"):
        load_config(None, ["method.care.lambda_fea=1"])  # method.name defaults to dino
    with pytest.raises(ConfigError, match="method.moco_v3.temperature.*method.name is byol"):
        load_config("fmnist_byol", ["method.moco_v3.temperature=0.2"])
    p = tmp_path / "mixed.yaml"
    p.write_text("method:\n  name: care\n  byol:\n    proj_dim: 8\n")
    with pytest.raises(ConfigError, match="method.byol.proj_dim.*mixed.yaml.*method byol, but method.name is care"):
        load_config(str(p))


def test_switching_the_method_drops_the_base_methods_section(tmp_path):
    # a preset / override that changes method.name does not inherit the previous method's settings
    cfg = load_config("demo_fmnist", ["method.name=byol", "method.byol.proj_dim=32"])
    assert cfg.method.name == "byol" and cfg.method.byol.proj_dim == 32
    assert cfg.method.dino.out_dim == 65536  # demo_fmnist's 2048 is gone with its method
    assert load_config("fmnist_byol").method.byol.momentum == 0.99
    child = tmp_path / "child.yaml"
    child.write_text("_base_: fmnist_care\nmethod:\n  care:\n    lambda_fea: 10.0\n")
    cfg = load_config(str(child))
    assert cfg.method.name == "care" and cfg.method.care.lambda_fea == 10.0 and cfg.method.care.fmap_size == 4


def test_saved_config_has_the_active_section_only_and_loads_back(tmp_path):
    from omegaconf import OmegaConf

    from bcssl.config import to_yaml

    cfg = load_config("fmnist_moco_v3")
    text = to_yaml(cfg)
    assert "moco_v3:" in text and "dino:" not in text and "care:" not in text
    p = tmp_path / "config.yaml"
    p.write_text(text)
    assert load_config(str(p)) == cfg
    OmegaConf.save(cfg, tmp_path / "full.yaml")  # a full dump: the other sections at their defaults pass
    assert load_config(str(tmp_path / "full.yaml")) == cfg
