"""BC-SSL: self-supervised pre-training of large-kernel ConvNeXt backbones.

``bcssl.pretrain(config, overrides, train_set=...)`` pre-trains from Python (on a preset's data or on
any map-style dataset of images); ``bcssl.load_backbone(path)`` turns an export (``bcssl export``)
or a run directory into a ready feature extractor (:mod:`bcssl.export`). Both are imported
lazily, so ``import bcssl`` stays light.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bcssl")  # one place: pyproject.toml
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"

__all__ = ["load_backbone", "pretrain", "__version__"]


def pretrain(config="demo_fmnist", overrides=(), *, train_set=None, knn_monitor: bool | None = None,
             resume_changed: bool = False):
    """Pre-train as ``bcssl pretrain`` does; returns the ``TrainResult`` (``run_dir``, ``images_seen``, ...).

    ``config``: a resolved config (``bcssl.config.load_config``), or a preset name / YAML path that
    ``overrides`` (``["train.epochs=1", ...]``) complete. ``train_set``: any map-style dataset whose
    items are images (PIL, uint8 tensor or ndarray), with or without a label, pre-trained on instead
    of ``data.*``. ``knn_monitor``: run the k-NN monitor on the config's labelled ``data.*`` sets
    (default: yes without ``train_set``, no with it).
    """
    from omegaconf import DictConfig

    from bcssl.config import check_required, load_config
    from bcssl.engine.trainer import train
    from bcssl.eval.knn import knn_monitor as monitor_of

    if isinstance(config, DictConfig):
        if overrides:
            raise ValueError("overrides go with a preset name or YAML path; a loaded config is used as it is "
                             "(load_config(preset, overrides) applies them)")
        cfg = config
    else:
        cfg = load_config(config, list(overrides))
    if train_set is None:
        check_required(cfg)
    monitor = (train_set is None) if knn_monitor is None else knn_monitor
    return train(cfg, knn_eval=monitor_of(cfg) if monitor else None, resume_changed=resume_changed,
                 train_set=train_set)


def __getattr__(name: str):
    if name == "load_backbone":
        from bcssl.export import load_backbone

        return load_backbone
    raise AttributeError(f"module 'bcssl' has no attribute {name!r}")
