"""Data: datasets of uint8 images and the deterministic, resumable batch loader.

(The batched multi-crop augmentation lives in ``bcssl.data.multicrop``; import it from there.)
"""

from .datasets import (
    DATASET_NAMES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIRS,
    IMG_EXTENSIONS,
    DatasetNotFoundError,
    ImageFolderDataset,
    InMemoryImages,
    build_dataset,
    dataset_from_config,
    load_fashion_mnist,
    load_torchvision,
    train_and_eval_sets,
)
from .canvas import grid_canvas, load_fashion_mnist_canvas, scatter_canvas
from .loader import BatchLoader, epoch_order, steps_per_epoch

__all__ = [
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "IMG_EXTENSIONS",
    "DatasetNotFoundError",
    "ImageFolderDataset",
    "InMemoryImages",
    "build_dataset",
    "dataset_from_config",
    "load_fashion_mnist",
    "load_fashion_mnist_canvas",
    "grid_canvas",
    "scatter_canvas",
    "load_torchvision",
    "train_and_eval_sets",
    "BatchLoader",
    "epoch_order",
    "steps_per_epoch",
]
