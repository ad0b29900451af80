"""Tests of the batched DINO multi-crop (bcssl.data.multicrop): ops vs torchvision, sampling, API."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps

from bcssl.data.multicrop import (
    GRAY_WEIGHTS,
    MultiCrop,
    MultiCropConfig,
    _blur_conv,  # the GPU blur path
    _blur_rows,  # the CPU blur path
    _gaussian_kernels,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    crop_grid,
    cubic_taps,
    gaussian_blur,
    resized_crop,
    resized_crop_separable,
    rgb_to_grayscale,
    solarize,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEAN = torch.tensor(MultiCropConfig.mean).view(3, 1, 1)
STD = torch.tensor(MultiCropConfig.std).view(3, 1, 1)


def smooth_images(n: int, h: int = 20, w: int = 24, seed: int = 0, c: int = 3) -> torch.Tensor:
    """Float images in [0, 1] with structure (upsampled noise), plus saturated/gray corners."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, c, 5, 6, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    x = (x * 1.4 - 0.2).clamp(0, 1)  # some exact 0s and 1s
    if c == 3:
        x[:, :, :2, :2] = x[:, :1, :2, :2]  # gray pixels (hue undefined, chroma 0)
    return x


def uint8_images(n: int, h: int = 40, w: int = 48, seed: int = 0, c: int = 3) -> torch.Tensor:
    return (smooth_images(n, h, w, seed, c) * 255).round().to(torch.uint8)


def per_image(fn, x, factors):
    return torch.stack([fn(x[i], float(factors[i])) for i in range(len(x))])


# ------------------------------------------------------------------ single ops vs torchvision

FACTORS = torch.tensor([0.0, 0.3, 0.6, 0.95, 1.0, 1.2, 1.4, 2.5])


@pytest.mark.parametrize(
    "ours, ref",
    [(adjust_brightness, TF.adjust_brightness), (adjust_contrast, TF.adjust_contrast),
     (adjust_saturation, TF.adjust_saturation)],
    ids=["brightness", "contrast", "saturation"],
)
def test_blend_ops_match_torchvision(ours, ref):
    x = smooth_images(len(FACTORS))
    torch.testing.assert_close(ours(x, FACTORS), per_image(ref, x, FACTORS), atol=2e-6, rtol=0)


def test_hue_matches_torchvision():
    shifts = torch.tensor([-0.5, -0.37, -0.1, -0.02, 0.0, 0.05, 0.1, 0.26, 0.45, 0.5])
    x = smooth_images(len(shifts), seed=1)
    x[0, :, 5, :] = torch.tensor([1.0, 1.0, 0.0]).view(3, 1)  # ties: max == r == g
    x[1, :, 5, :] = torch.tensor([0.2, 0.7, 0.7]).view(3, 1)  # ties: max == g == b
    x[2, :, 5, :] = torch.tensor([0.9, 0.1, 0.9]).view(3, 1)  # ties: max == r == b
    torch.testing.assert_close(adjust_hue(x, shifts), per_image(TF.adjust_hue, x, shifts), atol=1e-3, rtol=0)


def test_grayscale_matches_torchvision():
    x = smooth_images(3)
    ref = TF.rgb_to_grayscale(x, num_output_channels=3)
    assert torch.equal(rgb_to_grayscale(x), ref)
    assert GRAY_WEIGHTS == (0.2989, 0.587, 0.114)


def test_solarize_matches_torchvision_and_pil():
    x = smooth_images(2)
    assert torch.equal(solarize(x), TF.solarize(x, threshold=0.5))
    # on uint8 values it is PIL's ImageOps.solarize (threshold 128), DINO's op
    levels = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16).contiguous()
    pil = Image.fromarray(levels.permute(1, 2, 0).numpy())
    ref = torch.from_numpy(np.array(ImageOps.solarize(pil))).permute(2, 0, 1)
    ours = (solarize(levels.float() / 255) * 255).round().to(torch.uint8)
    assert torch.equal(ours, ref)


def test_gaussian_blur_matches_torchvision():
    x = smooth_images(4, h=17, w=21, seed=2)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    radius = math.ceil(3 * 2.0)
    ours = gaussian_blur(x, sigma)  # default radius: ceil(3 * max sigma)
    ref = torch.stack([TF.gaussian_blur(x[i], [2 * radius + 1] * 2, [float(sigma[i])] * 2) for i in range(4)])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)  # all pixels: same reflect padding
    # an explicit smaller radius is a smaller torchvision kernel
    ref3 = TF.gaussian_blur(x[1], [7, 7], [0.7, 0.7])
    torch.testing.assert_close(gaussian_blur(x[1:2], sigma[1:2], radius=3)[0], ref3, atol=1e-5, rtol=0)


def test_crop_grid_equals_affine_grid():
    g = torch.Generator().manual_seed(0)
    box = torch.rand(6, 4, generator=g) * 0.5
    flip = torch.tensor([True, False] * 3)
    top, left, h, w = box.unbind(-1)
    theta = torch.zeros(6, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -w, w)
    theta[:, 0, 2] = 2 * left + w - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * top + h - 1
    ref = F.affine_grid(theta, [6, 3, 9, 9], align_corners=False)
    torch.testing.assert_close(crop_grid(box, flip, 9), ref, atol=1e-6, rtol=0)


def test_resized_crop_close_to_torchvision_bicubic():
    """Upsampling a 10x12 box to 32x32. torchvision resizes the cut-out box (replicating its
    edge), grid_sample reads the real neighbours: equal (1e-5) where all bicubic taps lie in the
    box, within 0.1 at the box edge; equal on a whole-image box, and flip is a mirror."""
    x = smooth_images(2, h=20, w=24, seed=3)
    top, left, h, w, s = 3, 5, 10, 12, 32
    box = torch.tensor([[top / 20, left / 24, h / 20, w / 24]] * 2)
    no_flip = torch.zeros(2, dtype=torch.bool)
    ours = resized_crop(x, box, no_flip, s)
    ref = torch.stack([TF.resized_crop(x[i], top, left, h, w, [s, s], interpolation=TF.InterpolationMode.BICUBIC,
                                       antialias=False) for i in range(2)]).clamp(0, 1)
    torch.testing.assert_close(ours[..., 6:-6, 6:-6], ref[..., 6:-6, 6:-6], atol=1e-5, rtol=0)
    assert (ours - ref).abs().max() < 0.1
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)
    ref_full = torch.stack([TF.resize(x[i], [s, s], interpolation=TF.InterpolationMode.BICUBIC, antialias=False)
                            for i in range(2)]).clamp(0, 1)
    torch.testing.assert_close(resized_crop(x, full, no_flip, s), ref_full, atol=1e-5, rtol=0)
    torch.testing.assert_close(resized_crop(x, full, ~no_flip, s), ref_full.flip(-1), atol=1e-5, rtol=0)


def test_separable_resize_equals_grid_sample():
    """The CPU's two-pass resize takes grid_sample's taps: equal up to float rounding, flips, image
    edges (border padding = clamped taps) and non-square images included."""
    x = smooth_images(3, h=20, w=27, seed=4)
    g = torch.Generator().manual_seed(1)
    box = torch.rand(3, 5, 4, generator=g) * 0.5
    box[:, :, 2:] += 0.2
    box[0, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # whole image
    box[1, 1] = torch.tensor([0.6, 0.7, 0.4, 0.3])  # bottom-right corner
    flip = torch.rand(3, 5, generator=g) < 0.5
    for size in (7, 16, 31):
        ours = resized_crop_separable(x, box, flip, size)
        ref = torch.stack([resized_crop(x, box[:, j], flip[:, j], size) for j in range(5)], 1)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_cubic_taps_weights_and_border():
    idx, w = cubic_taps(torch.tensor([0.0]), torch.tensor([1.0]), None, 8, 8)  # identity resize
    assert idx.shape == (1, 8, 4) and w.shape == (1, 8, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 8))  # a partition of unity
    torch.testing.assert_close(w[0, :, 1], torch.ones(8))  # on the pixel centres: the pixel itself
    assert idx.min() == 0 and idx.max() == 7  # clamped into the image (border padding)
    flipped, _ = cubic_taps(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([True]), 8, 8)
    assert torch.equal(flipped[0, :, 1], idx[0, :, 1].flip(0))


@pytest.mark.parametrize("radius", [1, 4, 11])
def test_blur_row_passes_equal_depthwise_convolutions(radius):
    x = smooth_images(5, h=12, w=15, seed=6)
    kern = _gaussian_kernels(torch.tensor([0.3, 0.8, 1.5, 2.0, 4.0]), radius)  # radius up to size - 1
    rows = _blur_rows(x, kern)
    torch.testing.assert_close(rows, _blur_conv(x, kern), atol=1e-6, rtol=0)
    assert rows.shape == x.shape


# ------------------------------------------------------------------ sampling


def test_crop_boxes_respect_scale_and_ratio():
    cfg = MultiCropConfig(n_local=6)
    for hw in [(1, 1), (300, 200), (200, 300)]:
        p = MultiCrop(cfg).sample_params(2000, seed=5, image_size=hw)
        top, left, h, w = p["box"].double().unbind(-1)
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= 1 + 1e-6).all() and (left + w <= 1 + 1e-6).all()
        area, ratio = h * w, (w * hw[1]) / (h * hw[0])
        fallback = (top - (1 - h) / 2).abs().lt(1e-6) & (left - (1 - w) / 2).abs().lt(1e-6) & (
            (h > 1 - 1e-6) | (w > 1 - 1e-6))
        ok = ~fallback
        for cols, (lo, hi) in ((slice(0, 2), cfg.global_scale), (slice(2, None), cfg.local_scale)):
            a, ok_c = area[:, cols], ok[:, cols]
            assert (a[ok_c] >= lo - 1e-5).all() and (a[ok_c] <= hi + 1e-5).all()
            if hw == (1, 1):  # a square holds every allowed box: the whole range is used
                assert a[ok_c].min() < lo + 0.05 and a[ok_c].max() > hi - 0.05
        assert (ratio[ok] >= 3 / 4 - 1e-5).all() and (ratio[ok] <= 4 / 3 + 1e-5).all()
        assert fallback.float().mean() < 0.01  # 10 tries almost always succeed
        assert (ok[:, 2:]).all()  # local boxes always fit


def test_crop_fallback_is_torchvision_center_crop():
    # a 4:1 panorama cannot hold a 90% area box of ratio <= 4/3: centre crop at the max ratio
    cfg = MultiCropConfig(n_local=0, global_scale=(0.9, 1.0))
    p = MultiCrop(cfg).sample_params(50, seed=0, image_size=(100, 400))
    top, left, h, w = p["box"].unbind(-1)
    torch.testing.assert_close(h, torch.ones_like(h))
    torch.testing.assert_close(w * 400, torch.full_like(w, 100 * 4 / 3))
    torch.testing.assert_close(left, (1 - w) / 2)


def test_probabilities_per_crop_group():
    n, cfg = 4000, MultiCropConfig()
    p = MultiCrop(cfg).sample_params(n, seed=11)

    def rate(key, cols):
        return p[key][:, cols].float().mean().item()

    assert p["blur"][:, 0].all()  # blur p=1.0 on global1
    assert not p["solarize"][:, 0].any() and not p["solarize"][:, 2:].any()  # p=0 there
    tol = 0.03  # > 4 standard errors at n=4000
    for key, cols, want in [("blur", 1, 0.1), ("blur", slice(2, None), 0.5), ("solarize", 1, 0.2),
                            ("jitter", slice(None), 0.8), ("grayscale", slice(None), 0.2),
                            ("flip", slice(None), 0.5)]:
        assert abs(rate(key, cols) - want) < tol, (key, cols, rate(key, cols))
    f = p["jitter_factors"]
    lo, hi = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
    assert ((f >= lo) & (f <= hi)).all()
    assert (f.flatten(0, 1).min(0).values < lo + 0.01).all() and (f.flatten(0, 1).max(0).values > hi - 0.01).all()
    assert (p["blur_sigma"] >= 0.1).all() and (p["blur_sigma"] <= 2.0).all()
    assert p["jitter_order"].shape == (10, 4)
    assert (p["jitter_order"].sort(-1).values == torch.arange(4)).all()  # a permutation per crop group


def test_sample_params_ignores_global_rng():
    mc = MultiCrop(MultiCropConfig(n_local=2))
    torch.manual_seed(0)
    a = mc.sample_params(5, seed=3)
    torch.manual_seed(123)
    torch.rand(10)
    b = mc.sample_params(5, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = mc.sample_params(5, seed=4)
    assert not torch.equal(a["box"], c["box"])


# ------------------------------------------------------------------ the whole transform

SMALL = MultiCropConfig(global_size=24, local_size=12, n_local=3)


def reference(images: torch.Tensor, params: dict, cfg: MultiCropConfig) -> list[torch.Tensor]:
    """Per-image torchvision ops in DINO's order, from the same parameters (and our crop)."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    sizes = [cfg.global_size] * 2 + [cfg.local_size] * cfg.n_local
    return photometric_reference([resized_crop(x, params["box"][:, j], params["flip"][:, j], s)
                                  for j, s in enumerate(sizes)], params, cfg)


def photometric_reference(crops_per_group: list[torch.Tensor], params: dict, cfg: MultiCropConfig) -> list[torch.Tensor]:
    """DINO's colour jitter, grayscale, blur, solarize and normalise, per image with torchvision ops,
    on float crops in [0, 1] (already cut and flipped), one (B, 3, S, S) per crop."""
    outs = []
    for j, crops in enumerate(crops_per_group):
        s = crops.shape[-1]
        radius = min(math.ceil(3 * cfg.blur_sigma[1]), s - 1)  # the config's, not the batch's
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        res = []
        for i, img in enumerate(crops):
            if params["jitter"][i, j]:
                for op in params["jitter_order"][j].tolist():
                    img = ops[op](img, float(params["jitter_factors"][i, j, op]))
            if params["grayscale"][i, j]:
                img = TF.rgb_to_grayscale(img, num_output_channels=3)
            if params["blur"][i, j] and radius > 0:
                sigma = float(params["blur_sigma"][i, j])
                img = TF.gaussian_blur(img, [2 * radius + 1] * 2, [sigma, sigma])
            if params["solarize"][i, j]:
                img = TF.solarize(img, 0.5)
            res.append(TF.normalize(img, list(cfg.mean), list(cfg.std)))
        outs.append(torch.stack(res))
    return outs


@pytest.mark.parametrize("probs", [
    # away from 0/1: every op runs on a partial subset of every crop group
    dict(jitter_p=0.5, grayscale_p=0.4, blur_p=(1.0, 0.5, 0.5), solarize_p=(0.0, 0.5, 0.5)),
    # all 1: every op runs on whole crop groups, in place
    dict(jitter_p=1.0, grayscale_p=0.0, blur_p=(1.0, 1.0, 1.0), solarize_p=(1.0, 1.0, 1.0)),
    dict(jitter_p=1.0, grayscale_p=1.0, blur_p=(0.0, 0.0, 0.0)),
], ids=["partial", "all", "all-gray"])
def test_pipeline_matches_per_image_torchvision_reference(probs):
    cfg = MultiCropConfig(global_size=24, local_size=12, n_local=3, **probs)
    images = uint8_images(6)
    mc = MultiCrop(cfg)
    params = mc.sample_params(6, seed=7, image_size=(40, 48))
    out = mc.apply(images, params)
    ref = reference(images, params, cfg)
    assert len(out) == len(ref) == 5
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-4, rtol=0)  # float rounding only (seen: 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(mc(images, seed=7), out))  # __call__ == sample + apply


def test_batched_crop_equals_resized_crop_at_image_edges():
    """One grid_sample for all crops (on a replicate-padded input) == per-crop border sampling."""
    mc = MultiCrop(SMALL)
    images = uint8_images(4, h=30, w=36, seed=5)
    params = mc.sample_params(4, seed=1, image_size=(30, 36))
    for key in ("jitter", "grayscale", "blur", "solarize"):
        params[key][:] = False
    edges = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.6, 0.5, 0.4], [0.0, 0.7, 0.3, 0.3], [0.8, 0.0, 0.2, 0.2]])
    params["box"][:, :4] = edges[:, None]  # full image, bottom-right, top-right, bottom-left corners
    out = mc.apply(images, params)
    sizes = [24, 24, 12, 12, 12]
    for j, (o, s) in enumerate(zip(out, sizes)):
        ref = resized_crop(images.float() / 255, params["box"][:, j], params["flip"][:, j], s)
        torch.testing.assert_close(o * STD + MEAN, ref, atol=1e-4, rtol=0)


def test_outputs_shapes_dtype_normalisation():
    images = uint8_images(3)
    out = MultiCrop(SMALL)(images, seed=0)
    assert [tuple(o.shape) for o in out] == [(3, 3, 24, 24)] * 2 + [(3, 3, 12, 12)] * 3
    for o in out:
        assert o.dtype == torch.float32 and o.device == images.device
        raw = o * STD + MEAN
        assert raw.min() > -1e-5 and raw.max() < 1 + 1e-5  # normalised [0, 1] images
    floats = MultiCrop(SMALL)(images.float() / 255, seed=0)  # float input in [0, 1] is accepted
    assert all(torch.equal(a, b) for a, b in zip(out, floats))


def test_grayscale_input_gives_rgb_outputs():
    gray = uint8_images(2, c=1)
    out = MultiCrop(SMALL)(gray, seed=1)
    assert all(o.shape[1] == 3 for o in out)
    rgb = MultiCrop(SMALL)(gray.expand(-1, 3, -1, -1).contiguous(), seed=1)
    for a, b in zip(out, rgb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_reproducible_and_independent_of_global_rng():
    images = uint8_images(2)
    mc = MultiCrop(SMALL)
    torch.manual_seed(0)
    a = mc(images, seed=5)
    torch.manual_seed(99)
    torch.rand(100)
    b = MultiCrop(SMALL)(images, seed=5)  # fresh instance, other global RNG state
    c = mc(images, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_outputs_survive_later_calls_and_workspace_resizes():
    mc = MultiCrop(SMALL)
    images = uint8_images(3)
    first = mc(images, seed=2)
    kept = [o.clone() for o in first]
    mc(uint8_images(5, h=30, w=30, seed=4), seed=3)  # other shapes reuse/grow the scratch space
    again = mc(images, seed=2)
    assert all(torch.equal(k, f) for k, f in zip(kept, first))
    assert all(torch.equal(k, a) for k, a in zip(kept, again))


def test_cpu_chunking_does_not_change_results():
    images = uint8_images(7)
    whole, chunked = MultiCrop(SMALL), MultiCrop(SMALL)
    chunked.CHUNK_PIXELS = 2 * 24 * 24  # 2 global / 8 local crops per chunk, a partial last chunk
    for a, b in zip(whole(images, seed=4), chunked(images, seed=4)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_an_images_crops_do_not_depend_on_the_rest_of_the_batch():
    """DDP: a rank's slice of the global batch (with the matching slice of the parameters, as
    ``MultiCrop(images, seed, rank, world_size)`` takes it) gets exactly the crops one process makes."""
    cfg = MultiCropConfig(global_size=24, local_size=12, n_local=2, blur_p=(0.5, 0.1, 0.5), blur_sigma=(0.1, 3.0))
    mc = MultiCrop(cfg)
    images = uint8_images(12, seed=3)
    params = mc.sample_params(12, seed=11, image_size=(40, 48))
    full = [o.clone() for o in mc.apply(images, params)]
    for lo, hi in ((0, 4), (4, 12)):
        for a, b in zip(full, mc.apply(images[lo:hi], MultiCrop.slice_params(params, lo, hi))):
            assert torch.equal(a[lo:hi], b)
    # the same through the call a DDP rank makes: rank 1 of 3, images 4:8
    for a, b in zip(full, mc(images[4:8], seed=11, rank=1, world_size=3)):
        assert torch.equal(a[4:8], b)


@pytest.mark.parametrize("c", [3, 1])
def test_cpu_resize_paths_agree(c):
    """separable (the CPU default) vs one grid_sample (the GPU path), run on the CPU: equal up to
    float rounding, for uint8 and float inputs."""
    images = uint8_images(5, h=30, w=44, seed=8, c=c)
    sep, grid = MultiCrop(SMALL), MultiCrop(SMALL)
    grid.separable = False
    params = sep.sample_params(5, seed=3, image_size=(30, 44))
    for inp in (images, images.float() / 255):
        for a, b in zip(sep.apply(inp, params), grid.apply(inp, params)):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_resize_chunking_does_not_change_results():
    images = uint8_images(7, seed=9)
    whole, chunked = MultiCrop(SMALL), MultiCrop(SMALL)
    chunked.CHUNK_PIXELS, chunked.RESIZE_CHUNK = 3 * 24 * 24, 1  # chunks of 3 images, one at a time
    for a, b in zip(whole(images, seed=2), chunked(images, seed=2)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_output_buffer_is_recycled_only_when_nothing_refers_to_it():
    mc = MultiCrop(SMALL)
    images = uint8_images(3)
    ptr = lambda crops: crops[0].untyped_storage().data_ptr()
    a = mc(images, seed=0)
    b = mc(images, seed=1)
    assert ptr(a) != ptr(b)  # a is alive: not reused
    seen = {ptr(a), ptr(b)}
    del a, b
    c = mc(images, seed=2)
    assert ptr(c) in seen  # nothing refers to the old buffers: one is reused
    keep = c[3][:, :, 2:5].clone(), c[3][:, :, 2:5]  # a small view keeps the whole buffer
    del c
    d = mc(images, seed=3)
    e = mc(images, seed=4)
    assert torch.equal(keep[0], keep[1])  # the view was not overwritten
    assert ptr(d) != keep[1].untyped_storage().data_ptr() != ptr(e)
    ref = MultiCrop(SMALL)(images, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(e, ref))  # recycled memory: same results


def test_small_inputs_batch_of_one_and_no_local_crops():
    fashion = uint8_images(1, h=28, w=28, c=1)  # Fashion-MNIST sized
    out = MultiCrop(MultiCropConfig(global_size=32, local_size=16, n_local=2))(fashion, seed=0)
    assert [tuple(o.shape) for o in out] == [(1, 3, 32, 32)] * 2 + [(1, 3, 16, 16)] * 2
    out = MultiCrop(MultiCropConfig(global_size=8, n_local=0, blur_p=(1.0, 1.0, 1.0)))(uint8_images(2), seed=0)
    assert len(out) == 2 and all(torch.isfinite(o).all() for o in out)


def test_bad_input_is_rejected():
    mc = MultiCrop(SMALL)
    with pytest.raises(ValueError):
        mc(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), seed=0)
    with pytest.raises(ValueError):
        mc(torch.zeros(3, 8, 8, dtype=torch.uint8), seed=0)
    with pytest.raises(ValueError):
        MultiCropConfig(local_scale=(0.5, 0.1))


def test_benchmark_script_runs():
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "augment_throughput.py"), "--batch", "2",
           "--iters", "1", "--size", "32", "--global-size", "24", "--local-size", "12", "--n-local", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert '"speedup"' in res.stdout.strip().splitlines()[-1]
