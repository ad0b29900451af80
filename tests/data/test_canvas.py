"""Fashion-MNIST canvases: one labelled item per canvas at a random place and scale; the detection grid."""
import numpy as np
import pytest
import torch

from bcssl.config import load_config
from bcssl.data import dataset_from_config, grid_canvas, load_fashion_mnist, load_fashion_mnist_canvas


def item_box(canvas: np.ndarray):
    ys, xs = np.nonzero(canvas)
    return ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def test_each_item_on_its_own_canvas_at_random_places_and_scales(tiny_fmnist):
    source = load_fashion_mnist(tiny_fmnist, "train")
    ds = load_fashion_mnist_canvas(tiny_fmnist, "train", size=64, scale=(1.0, 2.0))
    assert ds.images.shape == (64, 1, 64, 64) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.labels, source.labels) and ds.num_classes == 10
    boxes = np.array([item_box(ds.images[i, 0].numpy()) for i in range(len(ds))])
    # every pixel of the tiny set's items is > 0, so the non-zero box is the pasted item: square, 28-56 px
    assert (boxes[:, 2] == boxes[:, 3]).all() and boxes[:, 2].min() >= 28 and boxes[:, 2].max() <= 56
    assert boxes[:, 2].max() - boxes[:, 2].min() >= 10  # scales vary
    assert len(set(map(tuple, boxes[:, :2]))) > 32  # positions vary
    # the pasted item is the source image resized (its mean brightness survives the bicubic resize)
    for i in range(4):
        y, x, s, _ = boxes[i]
        patch = ds.images[i, 0, y:y + s, x:x + s].float()
        assert patch.mean().item() == pytest.approx(source.images[i].float().mean().item(), rel=0.05)


def test_canvases_are_deterministic_and_differ_between_splits_and_seeds(tiny_fmnist):
    a = load_fashion_mnist_canvas(tiny_fmnist, "train", size=48)
    b = load_fashion_mnist_canvas(tiny_fmnist, "train", size=48)
    assert torch.equal(a.images, b.images)
    c = load_fashion_mnist_canvas(tiny_fmnist, "train", size=48, seed=1)
    assert not torch.equal(a.images, c.images)
    test = load_fashion_mnist_canvas(tiny_fmnist, "val", size=48)  # 'val' means 'test'
    assert len(test) == 32


def test_clutter_adds_fragments_around_the_item(tiny_fmnist):
    plain = load_fashion_mnist_canvas(tiny_fmnist, "test", size=64, scale=(1.0, 1.0))
    busy = load_fashion_mnist_canvas(tiny_fmnist, "test", size=64, scale=(1.0, 1.0), clutter=3)
    lit_plain, lit_busy = ((x.images > 0).sum(dim=(1, 2, 3)) for x in (plain, busy))
    assert (lit_plain <= 28 * 28).all()  # the item alone
    assert (lit_busy > lit_plain).float().mean() > 0.9


def test_config_selects_the_canvas_set_and_bad_options_are_named(tiny_fmnist):
    cfg = load_config("demo_fmnist", [f"data.root={tiny_fmnist}", "data.name=fashion_mnist_canvas",
                                      "data.canvas.size=40", "data.canvas.scale=[1.0,1.2]"])
    ds = dataset_from_config(cfg.data, "test")
    assert ds.images.shape[-2:] == (40, 40)
    with pytest.raises(ValueError, match="data.canvas.size"):
        load_fashion_mnist_canvas(tiny_fmnist, "train", size=20)
    with pytest.raises(ValueError, match="data.canvas.scale"):
        load_fashion_mnist_canvas(tiny_fmnist, "train", scale=(2.0, 1.0))


def test_grid_canvas_items_sit_in_distinct_cells():
    rng = np.random.default_rng(0)
    items = np.full((5, 28, 28), 200, dtype=np.uint8)
    for _ in range(20):
        canvas, placed = grid_canvas(rng, items, 96)
        assert 1 <= len(placed) <= 3
        cells = {(p.y0 // 48, p.x0 // 48) for p in placed}
        assert len(cells) == len(placed)
        for p in placed:  # inside its cell, drawn where the placement says
            assert (p.y0 + p.side - 1) // 48 == p.y0 // 48 and (p.x0 + p.side - 1) // 48 == p.x0 // 48
            assert (canvas[p.y0:p.y0 + p.side, p.x0:p.x0 + p.side] == 200).all()
        assert (canvas > 0).sum() == sum(p.side ** 2 for p in placed)
