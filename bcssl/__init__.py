"""BC-SSL: self-supervised pre-training of large-kernel ConvNeXt backbones.

``bcssl.load_backbone(path)`` turns an export (``bcssl export``) or a run directory into a ready
feature extractor; see :mod:`bcssl.export`. It is imported lazily, so ``import bcssl`` stays light.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bcssl")  # one place: pyproject.toml
except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "0+unknown"

__all__ = ["load_backbone", "__version__"]


def __getattr__(name: str):
    if name == "load_backbone":
        from bcssl.export import load_backbone

        return load_backbone
    raise AttributeError(f"module 'bcssl' has no attribute {name!r}")
