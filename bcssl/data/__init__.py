"""Data: datasets of uint8 images, crop geometry for image files, and the deterministic, resumable
batch loader.

(The batched multi-crop augmentation lives in ``bcssl.data.multicrop``; import it from there.)
"""

from .crops import CropItem, Unreadable, crop_boxes, crop_seed, sample_box
from .datasets import (
    DATASET_NAMES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIRS,
    IMG_EXTENSIONS,
    DatasetNotFoundError,
    ImageFolderDataset,
    InMemoryImages,
    UnlabelledDataError,
    UnreadableDataError,
    build_dataset,
    dataset_from_config,
    eval_image_size,
    evaluation_labels_missing,
    load_fashion_mnist,
    load_torchvision,
    pretraining_dataset,
    probe_readable,
    train_and_eval_sets,
)
from .canvas import grid_canvas, load_fashion_mnist_canvas, scatter_canvas
from .loader import BatchLoader, CropBatch, WorkerPhotometric, epoch_order, steps_per_epoch

__all__ = [
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "IMG_EXTENSIONS",
    "DatasetNotFoundError",
    "ImageFolderDataset",
    "InMemoryImages",
    "UnlabelledDataError",
    "UnreadableDataError",
    "build_dataset",
    "dataset_from_config",
    "eval_image_size",
    "evaluation_labels_missing",
    "load_fashion_mnist",
    "load_fashion_mnist_canvas",
    "grid_canvas",
    "scatter_canvas",
    "load_torchvision",
    "pretraining_dataset",
    "probe_readable",
    "train_and_eval_sets",
    "BatchLoader",
    "CropBatch",
    "WorkerPhotometric",
    "CropItem",
    "Unreadable",
    "crop_boxes",
    "crop_seed",
    "sample_box",
    "epoch_order",
    "steps_per_epoch",
]
