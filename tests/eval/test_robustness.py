"""Robustness evaluation: ImageNet-C corruptions (checked against the published formulas), the
AlexNet-normalised mCE, on-the-fly corruption evaluation, ImageNet-A/-R/-Sketch/-C folders."""
from __future__ import annotations

import hashlib
import io
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from bcssl.eval.imagenet_subsets import (
    IMAGENET_A_INDICES,
    IMAGENET_A_WNIDS,
    IMAGENET_R_INDICES,
    IMAGENET_R_WNIDS,
    IMAGENET_WNIDS,
    WNID_TO_INDEX,
)
from bcssl.eval.linear import load_linear_classifier
from bcssl.eval.robustness import (
    ALEXNET_ERR,
    CORRUPTIONS,
    _Predictor,
    corrupt,
    corruption_errors,
    evaluate_corruptions,
    evaluate_folder,
    subset_indices,
    robustness_report_rows,
)

RNG = torch.Generator().manual_seed(0)
RANDOM_32 = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=RNG)


# ----------------------------------------------------------------------------- class lists


def _digest(words):
    return hashlib.sha256(",".join(words).encode()).hexdigest()


def test_imagenet_class_lists():
    assert len(IMAGENET_WNIDS) == 1000 and list(IMAGENET_WNIDS) == sorted(set(IMAGENET_WNIDS))
    assert IMAGENET_WNIDS[0] == "n01440764" and IMAGENET_WNIDS[999] == "n15075141"  # tench .. toilet tissue
    for sub, idx in ((IMAGENET_A_WNIDS, IMAGENET_A_INDICES), (IMAGENET_R_WNIDS, IMAGENET_R_INDICES)):
        assert len(sub) == 200 and list(sub) == sorted(set(sub)) and set(sub) <= set(IMAGENET_WNIDS)
        assert [IMAGENET_WNIDS[i] for i in idx] == list(sub)
    # ImageNet-A's official thousand_k_to_200 starts 6 -> 0, 11 -> 1, 13 -> 2 (stingray, goldfinch, junco)
    assert IMAGENET_A_INDICES[:3] == (6, 11, 13) and IMAGENET_R_WNIDS[0] == "n01443537"  # goldfish
    assert len(set(IMAGENET_A_WNIDS) & set(IMAGENET_R_WNIDS)) == 86
    # Pinned content (digests of the lists as taken from the official repositories).
    assert _digest(IMAGENET_WNIDS) == "858fd8cc1983d57f3a05012a7aacf30415a430b1efb5bd17284bb3282160c0d5"
    assert _digest(IMAGENET_A_WNIDS) == "b42e81c12a300300b184e87ddfbb7ea60d94501d0403fe80727f25839866db80"
    assert _digest(IMAGENET_R_WNIDS) == "98ce4fd873b9b46b5761d21549c019aa8ce0047775b0e4ff3822336b2762b476"


# ----------------------------------------------------------------------------- metrics


def test_alexnet_reference_is_the_paper_table():
    assert tuple(ALEXNET_ERR) == CORRUPTIONS and len(CORRUPTIONS) == 15
    assert ALEXNET_ERR["gaussian_noise"] == 0.886428 and ALEXNET_ERR["jpeg_compression"] == 0.606500
    assert ALEXNET_ERR["brightness"] == 0.564592


def test_corruption_errors_hand_computed():
    table = {"gaussian_noise": [0.1, 0.2, 0.3, 0.4, 0.5], "brightness": [0.2, 0.2, 0.2, 0.2, 0.2]}
    m = corruption_errors(table)
    # By hand: CE = sum of the 5 errors / (5 * AlexNet mean error), x100.
    ce_gauss = 100 * 1.5 / (5 * 0.886428)  # = 33.8436...
    ce_bright = 100 * 1.0 / (5 * 0.564592)  # = 35.4238...
    assert m["ce"]["gaussian_noise"] == pytest.approx(33.84369, abs=1e-4) == pytest.approx(ce_gauss)
    assert m["ce"]["brightness"] == pytest.approx(35.42382, abs=1e-4) == pytest.approx(ce_bright)
    assert m["mce"] == pytest.approx((ce_gauss + ce_bright) / 2)
    assert m["mean_error"] == pytest.approx(2.5 / 10)
    assert m["mean_error_by_corruption"] == pytest.approx({"gaussian_noise": 0.3, "brightness": 0.2})
    assert m["complete"] is False
    # AlexNet itself scores 100 on every corruption.
    alex = corruption_errors({c: [e] * 5 for c, e in ALEXNET_ERR.items()})
    assert alex["mce"] == pytest.approx(100.0) and alex["complete"] is True

    with pytest.raises(ValueError, match="5 severities"):
        corruption_errors({"fog": [0.1] * 4})
    with pytest.raises(ValueError, match="fractions"):
        corruption_errors({"fog": [45.0] * 5})  # percentages by mistake
    with pytest.raises(ValueError, match="AlexNet"):
        corruption_errors({"speckle_noise": [0.1] * 5})


# ----------------------------------------------------------------------------- corruptions vs formulas


def test_gaussian_noise_std_matches_formula():
    grey = torch.full((4, 3, 64, 64), 128, dtype=torch.uint8)
    x0 = 128 / 255
    rng = np.random.default_rng(1)
    for s, c in zip(range(1, 6), [0.08, 0.12, 0.18, 0.26, 0.38]):
        noise = corrupt(grey, "gaussian_noise", s).double() / 255 - x0
        # ImageNet-C: clip(x + N(0, c), 0, 1). The std of that clipped noise, by Monte Carlo:
        expected = np.clip(x0 + rng.normal(0, c, 10**6), 0, 1).std()
        assert noise.std().item() == pytest.approx(expected, rel=0.03), s
        if c <= 0.12:  # clipping negligible (> 4 sigma): the std is c itself
            assert noise.std().item() == pytest.approx(c, rel=0.03)


def test_brightness_adds_c_to_hsv_value():
    x = RANDOM_32.double() / 255
    v = x.amax(1, keepdim=True)
    for s, c in zip(range(1, 6), [0.1, 0.2, 0.3, 0.4, 0.5]):
        v2 = (v + c).clamp(max=1)
        # Same hue and saturation, V -> min(V + c, 1): RGB scales by V'/V.
        expected = torch.where(v > 0, x * v2 / v.clamp(min=1e-12), v2.expand_as(x)) * 255
        out = corrupt(RANDOM_32, "brightness", s).double()
        assert (out - expected).abs().max() <= 1.01, s  # uint8 truncation


def test_contrast_scales_around_the_mean():
    x = RANDOM_32.double() / 255
    m = x.mean((2, 3), keepdim=True)
    for s, c in zip(range(1, 6), [0.4, 0.3, 0.2, 0.1, 0.05]):
        expected = ((x - m) * c + m).clamp(0, 1) * 255
        assert (corrupt(RANDOM_32, "contrast", s).double() - expected).abs().max() <= 1.0, s


def _pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def test_jpeg_quality_and_pixelate_factor():
    for s, q in zip(range(1, 6), [25, 18, 15, 10, 7]):
        expected = []
        for img in RANDOM_32:
            buf = io.BytesIO()
            _pil(img).save(buf, "JPEG", quality=q)
            expected.append(_tensor(Image.open(buf)))
        assert torch.equal(corrupt(RANDOM_32, "jpeg_compression", s), torch.stack(expected)), s
    for s, c in zip(range(1, 6), [0.6, 0.5, 0.4, 0.3, 0.25]):
        out = corrupt(RANDOM_32, "pixelate", s)
        side = int(32 * c)
        # ImageNet-C: box-downsample by the factor, then back up.
        expected = torch.stack([_tensor(_pil(i).resize((side, side), Image.BOX).resize((32, 32), Image.BOX))
                                for i in RANDOM_32])
        assert torch.equal(out, expected), s
        assert len(torch.unique(out[0].reshape(3, -1).T, dim=0)) <= side * side


def test_all_15_corruptions_run_and_grow_with_severity():
    img = RANDOM_32[:1]
    smooth = F.interpolate(RANDOM_32[:1].float(), size=32, mode="bilinear").to(torch.uint8)
    for name in CORRUPTIONS:
        diffs = []
        for s in range(1, 6):
            out = corrupt(img, name, s)
            assert out.shape == img.shape and out.dtype == torch.uint8, name
            diffs.append((out.float() - img.float()).abs().mean().item())
        assert diffs[-1] > 1.0, name  # it changes the image
        if name in ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "contrast", "pixelate"):
            assert diffs == sorted(diffs), (name, diffs)
    assert corrupt(smooth, "snow", 5).float().mean() > smooth.float().mean()  # snow brightens


# ----------------------------------------------------------------------------- seeding, sizes, arguments


def test_seeding_is_reproducible_batch_independent_and_leaves_numpy_alone():
    np.random.seed(123)
    state = np.random.get_state()
    for name in CORRUPTIONS:
        a = corrupt(RANDOM_32, name, 3, seed=7)
        assert torch.equal(a, corrupt(RANDOM_32, name, 3, seed=7)), name
    for name in ("gaussian_noise", "impulse_noise", "glass_blur", "frost", "elastic_transform"):
        assert not torch.equal(corrupt(RANDOM_32, name, 3, seed=7), corrupt(RANDOM_32, name, 3, seed=8)), name
        # image i's result does not depend on the batch it came in
        part = corrupt(RANDOM_32[1:], name, 3, seed=7, start_index=1)
        assert torch.equal(part, corrupt(RANDOM_32, name, 3, seed=7)[1:]), name
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]


def test_small_and_grayscale_images_are_upsampled_to_32():
    small = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=RNG)
    out = corrupt(small, "contrast", 2)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
    up = F.interpolate(small.float(), size=(32, 32), mode="bicubic", align_corners=False).round().clamp(0, 255)
    up = up.expand(-1, 3, -1, -1) / 255
    m = up.mean((2, 3), keepdim=True)
    assert (out.double() - ((up - m) * 0.3 + m).clamp(0, 1) * 255).abs().max() <= 1.0
    # aspect kept: the shorter side becomes 32; big images keep their size; one image (C, H, W) works
    assert corrupt(torch.zeros(1, 3, 20, 40, dtype=torch.uint8), "fog", 1).shape == (1, 3, 32, 64)
    assert corrupt(torch.zeros(1, 3, 40, 48, dtype=torch.uint8), "fog", 1).shape == (1, 3, 40, 48)
    assert corrupt(torch.zeros(3, 32, 32, dtype=torch.uint8), "frost", 1).shape == (3, 32, 32)


def test_corrupt_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(RANDOM_32, "speckle", 1)
    for bad in (0, 6, True, "3"):
        with pytest.raises(ValueError, match="severity"):
            corrupt(RANDOM_32, "fog", bad)
    with pytest.raises(TypeError, match="uint8"):
        corrupt(RANDOM_32.float(), "fog", 1)
    with pytest.raises(ValueError, match="C in"):
        corrupt(torch.zeros(1, 4, 32, 32, dtype=torch.uint8), "fog", 1)


# ----------------------------------------------------------------------------- evaluation


def _tiny(size=8, dim=16, classes=10):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, dim))
    return backbone, nn.Linear(dim, classes)


def _manual_error(backbone, classifier, images, labels, size):
    from bcssl.eval.features import eval_preprocess

    with torch.no_grad():
        pred = classifier(backbone(eval_preprocess(images, size, (0.5,) * 3, (0.25,) * 3))).argmax(1)
    return (pred != labels).float().mean().item()


def test_evaluate_corruptions_table_matches_manual_and_is_reproducible():
    backbone, classifier = _tiny()
    backbone.train()
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=RNG)
    labels = torch.randint(0, 10, (16,), generator=RNG)
    kw = dict(size=8, mean=(0.5,) * 3, std=(0.25,) * 3, corruptions=("gaussian_noise", "contrast"),
              progress=False, seed=3)
    r = evaluate_corruptions(backbone, classifier, images, labels, batch_size=5, **kw)
    assert backbone.training and classifier.training  # modes restored
    assert r["benchmark"] == "corruptions" and r["normalised_by_alexnet"] is False and "mce" not in r
    assert r["severities"] == [1, 2, 3, 4, 5] and set(r["errors"]) == {"gaussian_noise", "contrast"}
    assert r["n_images"] == 16 and all(len(v) == 5 for v in r["errors"].values())
    assert r["clean_error"] == pytest.approx(_manual_error(backbone, classifier, images, labels, 8))
    manual = _manual_error(backbone, classifier, corrupt(images, "gaussian_noise", 4, seed=3), labels, 8)
    assert r["errors"]["gaussian_noise"][3] == pytest.approx(manual)
    cells = r["errors"]["gaussian_noise"] + r["errors"]["contrast"]
    assert r["mean_error"] == pytest.approx(sum(cells) / 10)
    # same seed, other batch size: identical table
    assert evaluate_corruptions(backbone, classifier, images, labels, batch_size=16, **kw)["errors"] == r["errors"]
    json.dumps(r)

    # ImageNet: the AlexNet-normalised CE / mCE are added and agree with corruption_errors
    im = evaluate_corruptions(backbone, classifier, images, labels, batch_size=16, imagenet=True, limit=8, **kw)
    assert im["normalised_by_alexnet"] is True and im["mce_complete"] is False and im["n_images"] == 8
    assert im["mce"] == pytest.approx(corruption_errors(im["errors"])["mce"])
    # without all 5 severities there is no mCE
    part = evaluate_corruptions(backbone, classifier, images, labels, imagenet=True, limit=4,
                                **{**kw, "corruptions": ("fog",)}, severities=(1, 5))
    assert part["normalised_by_alexnet"] is False and "mce" not in part and part["severities"] == [1, 5]

    rows = robustness_report_rows(im)
    assert [row["name"] for row in rows] == ["gaussian_noise", "contrast", "clean", "mean"]
    assert rows[-1]["ce"] == pytest.approx(im["mce"]) and rows[0]["sev_4"] == pytest.approx(
        100 * im["errors"]["gaussian_noise"][3])
    assert all(set(row) == set(rows[0]) for row in rows)


def test_class_subset_restricts_predictions():
    torch.manual_seed(0)
    backbone, classifier = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16)), nn.Linear(16, 1000)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=RNG)
    kw = dict(size=8, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu")
    with _Predictor(backbone, classifier, **kw) as p:
        unmasked = p(images)
    with _Predictor(backbone, classifier, class_indices=IMAGENET_A_INDICES, **kw) as p:
        masked = p(images)
    allowed = set(IMAGENET_A_INDICES)
    assert any(int(i) not in allowed for i in unmasked)  # the mask is needed ...
    assert all(int(i) in allowed for i in masked)  # ... and it works
    with torch.no_grad():
        logits = classifier(backbone((images.float() / 255 - 0.5) / 0.25))
    idx = torch.tensor(IMAGENET_A_INDICES)
    assert torch.equal(masked, idx[logits[:, idx].argmax(1)])


# ----------------------------------------------------------------------------- folders

COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}


class _ColourNet(nn.Module):
    """Features = per-channel means (with mean 0, std 1 preprocessing: in [0, 1])."""

    num_features = 3

    def forward(self, x):
        return x.mean((2, 3))


def _colour_classifier(wnids, outside_bias: float = 0.0):
    """1000-way: the class of wnids[k] fires on colour channel k; class 0 (tench) gets a bias."""
    clf = nn.Linear(3, 1000)
    with torch.no_grad():
        clf.weight.zero_()
        clf.bias.zero_()
        for k, w in enumerate(wnids):
            clf.weight[WNID_TO_INDEX[w], k] = 10.0
        clf.bias[0] = outside_bias
    return clf


def _write_folder(root, wnids, per_class=2, colour_of=None):
    for k, w in enumerate(wnids):
        (root / w).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour = COLOURS[colour_of(k, i) if colour_of else k]
            Image.new("RGB", (12, 12), colour).save(root / w / f"{i}.png")
    return root


EVAL = dict(size=8, mean=(0.0,) * 3, std=(1.0,) * 3, batch_size=4, progress=False)


def test_imagenet_a_r_use_only_their_200_logits(tmp_path):
    a_wnids = IMAGENET_A_WNIDS[:3]
    assert WNID_TO_INDEX["n01440764"] == 0 and 0 not in IMAGENET_A_INDICES and 0 not in IMAGENET_R_INDICES
    folder = _write_folder(tmp_path / "imagenet-a", a_wnids)
    # Class 0 (outside both subsets) dominates every logit vector: without the mask all is wrong.
    # The classifier goes through a run dir's linear.safetensors, as the linear probe saves it.
    run = tmp_path / "run"
    run.mkdir()
    made = _colour_classifier(a_wnids, outside_bias=100.0)
    save_file({"weight": made.weight.detach(), "bias": made.bias.detach()}, str(run / "linear.safetensors"))
    clf = load_linear_classifier(run)
    assert torch.equal(clf.weight, made.weight) and clf.out_features == 1000
    a = evaluate_folder(_ColourNet(), clf, folder, "imagenet_a", **EVAL)
    assert a["top1"] == 100.0 and a["error"] == 0.0 and a["n_images"] == 6 and a["n_classes"] == 200
    sketch = evaluate_folder(_ColourNet(), clf, folder, "imagenet_sketch", **EVAL)
    assert sketch["top1"] == 0.0 and sketch["n_classes"] == 1000

    r_wnids = IMAGENET_R_WNIDS[:2]
    r_folder = _write_folder(tmp_path / "imagenet-r", r_wnids)
    r = evaluate_folder(_ColourNet(), _colour_classifier(r_wnids, 100.0), r_folder, "imagenet_r", **EVAL)
    assert r["top1"] == 100.0
    rows = robustness_report_rows({"imagenet_a": a, "imagenet_r": r})
    assert [(row["benchmark"], row["top1"]) for row in rows] == [("ImageNet-A", 100.0), ("ImageNet-R", 100.0)]

    # a class of the other subset, names that aren't wnids, a classifier that isn't 1000-way
    only_r = [w for w in IMAGENET_R_WNIDS if w not in set(IMAGENET_A_WNIDS)][:1]
    with pytest.raises(ValueError, match="not among the 200 ImageNet-A"):
        evaluate_folder(_ColourNet(), clf, _write_folder(tmp_path / "r-as-a", only_r), "imagenet_a", **EVAL)
    with pytest.raises(ValueError, match="wnids"):
        evaluate_folder(_ColourNet(), clf, _write_folder(tmp_path / "pets", ["cat", "dog"]), "imagenet_sketch",
                        **EVAL)
    with pytest.raises(ValueError, match="1000-way"):
        evaluate_folder(_ColourNet(), nn.Linear(3, 10), folder, "imagenet_a", **EVAL)
    with pytest.raises(ValueError, match="unknown kind"):
        evaluate_folder(_ColourNet(), clf, folder, "imagenet_o", **EVAL)


def test_imagenet_c_tree_gives_table_and_mce(tmp_path):
    wnids = IMAGENET_WNIDS[10:13]
    root = tmp_path / "imagenet-c"
    for c in ("gaussian_noise", "fog"):
        for s in range(1, 6):
            # gaussian_noise severity 5: every image has another class's colour -> error 1
            wrong = c == "gaussian_noise" and s == 5
            _write_folder(root / c / str(s), wnids, colour_of=(lambda k, i: (k + 1) % 3) if wrong else None)
    _write_folder(root / "speckle_noise" / "1", wnids)  # an "extra" corruption: ignored
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = evaluate_folder(_ColourNet(), _colour_classifier(wnids), root, "imagenet_c", **EVAL)
    assert any("speckle_noise" in str(w.message) for w in caught)
    assert r["corruptions"] == ["gaussian_noise", "fog"]  # the paper's order
    assert r["errors"] == {"gaussian_noise": [0.0, 0.0, 0.0, 0.0, 1.0], "fog": [0.0] * 5}
    assert r["clean_error"] is None and r["n_images"] == 2 * 5 * 6 and r["normalised_by_alexnet"] is True
    ce_gauss = 100 * 1.0 / (5 * 0.886428)
    assert r["ce"] == pytest.approx({"gaussian_noise": ce_gauss, "fog": 0.0})
    assert r["mce"] == pytest.approx(ce_gauss / 2) and r["mce_complete"] is False
    assert r["mean_error"] == pytest.approx(0.1)
    rows = robustness_report_rows(r)
    assert rows[-1]["name"] == "mean" and rows[-1]["ce"] == pytest.approx(ce_gauss / 2)
    json.dumps(r)


def test_released_folder_uses_every_image_unless_limited(tmp_path):
    """A released-style folder of N images: all N by default; a limit is opt-in and recorded as a
    subset, strided over the class-sorted folder (every class) or the first N (the first classes)."""
    wnids = IMAGENET_R_WNIDS[:3]
    folder = _write_folder(tmp_path / "imagenet-r", wnids, per_class=5)  # 15 images, 5 per class
    clf = _colour_classifier(wnids)
    full = evaluate_folder(_ColourNet(), clf, folder, "imagenet_r", **EVAL)
    assert full["n_images"] == 15 and full["subset"] is None and full["images"] == "every image"
    strided = evaluate_folder(_ColourNet(), clf, folder, "imagenet_r", limit=6, sampling="strided", **EVAL)
    assert strided["n_images"] == 6 and strided["images"] == "subset of 6 of 15, strided"
    first = evaluate_folder(_ColourNet(), clf, folder, "imagenet_r", limit=6, sampling="first", **EVAL)
    assert first["subset"] == {"limit": 6, "of": 15, "sampling": "first"}
    assert subset_indices(15, 6, "strided") == [0, 2, 5, 7, 10, 12]  # two of each class of five
    assert list(subset_indices(15, 6, "first")) == [0, 1, 2, 3, 4, 5]
    assert list(subset_indices(15, None, "first")) == list(range(15))
