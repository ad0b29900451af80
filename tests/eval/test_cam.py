"""CAM maps (the paper's Table 6; docs/recipe.md section 5): image loading, Grad-CAM / Eigen-CAM through the backbone
contract (BC-SSL and timm baselines), the targets, the grid PNG and the per-run driver."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from bcssl.engine.trainer import train
from bcssl.eval.cam import (FeatureSimilarityTarget, cam_area, cam_for_runs, cam_grid, cam_maps,
                            grid_size_px, load_images)
from bcssl.eval.features import eval_preprocess
from bcssl.eval.linear import make_classifier, save_linear_classifier
from bcssl.models import create_backbone
from tests.conftest import tiny_config

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def tiny_bcssl(kernel_size=3):
    return create_backbone("bcssl_atto", dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), stem_stride=2,
                           kernel_size=kernel_size)


def structured_images(size=48):
    """Dark images with one bright object each (a square, a bar, a half plane)."""
    x = torch.full((3, 3, size, size), 30, dtype=torch.uint8)
    s = size // 48 if size >= 48 else 1
    x[0, :, 10 * s:30 * s, 10 * s:30 * s] = 220
    x[1, :, 20 * s:44 * s, 4 * s:20 * s] = 200
    x[2, 0, :, size // 2:] = 250
    return x


def _save(path, array):
    Image.fromarray(array).save(path)


# ----------------------------------------------------------------------------- images


def test_load_images_dir_resize_crop_and_errors(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    wide = np.zeros((40, 80, 3), np.uint8)  # 80 wide: the centre crop keeps the middle 40 columns
    wide[:, 20:60] = (255, 0, 0)
    _save(d / "b_wide.png", wide)
    _save(d / "a_gray.png", np.full((64, 64), 128, np.uint8))  # grayscale -> RGB
    Image.fromarray(np.full((30, 30, 3), 90, np.uint8)).save(d / "c_small.jpg")  # smaller: resized up
    (d / "notes.txt").write_text("not an image")  # ignored by extension
    imgs, names = load_images(d, 32)
    assert names == ["a_gray.png", "b_wide.png", "c_small.jpg"]
    assert imgs.dtype == torch.uint8 and imgs.shape == (3, 3, 32, 32)
    assert (imgs[0] == 128).all()
    assert imgs[1, 0].float().mean() > 250 and imgs[1, 1:].float().mean() < 5  # only the red middle kept
    assert abs(imgs[2].float().mean() - 90) < 3
    one, n1 = load_images([d / "b_wide.png"], 16)
    assert one.shape == (1, 3, 16, 16) and n1 == ["b_wide.png"]

    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_images([d / "a_gray.png", d / "missing.png"], 32)
    (d / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_images(d, 32)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_images(empty, 32)


# ----------------------------------------------------------------------------- maps


def test_eigencam_tiny_bcssl_shape_range_and_state_restored():
    bb = tiny_bcssl()
    bb.train()
    bb.stages[0].requires_grad_(False)  # a mixed requires_grad state must come back as it was
    before = {n: p.requires_grad for n, p in bb.named_parameters()}
    imgs = structured_images(48)
    maps = cam_maps(bb, imgs, method="eigencam", size=48, mean=MEAN, std=STD)
    assert maps.dtype == torch.float32 and maps.shape == (3, 48, 48)
    assert maps.min() >= 0 and maps.max() <= 1 and (maps.flatten(1).amax(1) > 0.99).all()
    assert (maps.flatten(1).std(1) > 0.05).all()  # structure -> non-constant maps
    assert all(m.training for m in bb.modules())  # train mode restored
    assert {n: p.requires_grad for n, p in bb.named_parameters()} == before
    assert all(p.grad is None for p in bb.parameters())
    assert not bb.cam_target_layer._forward_hooks  # pytorch-grad-cam's hooks released
    # a uint8 grayscale batch at another resolution goes through the same preprocessing
    g = cam_maps(bb.eval(), imgs[:, :1, :40, :40], method="eigencam", size=32, mean=MEAN, std=STD)
    assert g.shape == (3, 32, 32) and not bb.training
    with pytest.raises(ValueError, match="method"):
        cam_maps(bb, imgs, method="scorecam", size=48, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="uint8"):
        cam_maps(bb, imgs.float(), method="eigencam", size=48, mean=MEAN, std=STD)


def test_gradcam_with_classifier_targets_the_predicted_class():
    torch.manual_seed(1)
    bb = tiny_bcssl().eval()
    cls = nn.Linear(bb.num_features, 10)
    imgs = structured_images(32)
    maps, predicted = cam_maps(bb, imgs, method="gradcam", size=32, mean=MEAN, std=STD, classifier=cls,
                               return_targets=True)
    x = eval_preprocess(imgs, 32, MEAN, STD)
    model = nn.Sequential(bb, cls).eval()
    with torch.no_grad():
        pred = model(x).argmax(1).tolist()
    assert predicted == pred
    with GradCAM(model=model, target_layers=[bb.cam_target_layer]) as cam:
        direct = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in pred]))
        other = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget((c + 1) % 10) for c in pred]))
    assert maps.shape == (3, 32, 32)
    torch.testing.assert_close(maps, direct.clamp(0, 1), atol=1e-5, rtol=0)
    assert (maps - other).abs().amax() > 1e-2  # another class's map differs: the target matters


def test_feature_similarity_target():
    ref = torch.tensor([3.0, 4.0])
    assert FeatureSimilarityTarget(ref)(ref).item() == pytest.approx(1.0)
    assert FeatureSimilarityTarget(ref, "projection")(ref).item() == pytest.approx(5.0)
    assert FeatureSimilarityTarget(ref)(torch.stack([ref, -ref])).tolist() == pytest.approx([1.0, -1.0])
    with pytest.raises(ValueError, match="kind"):
        FeatureSimilarityTarget(ref, "dot")
    # Why the projection for the self-reference: the cosine to oneself is at its maximum, so its
    # gradient vanishes (a Grad-CAM of it would be float noise); the projection's does not.
    f = torch.tensor([1.0, 2.0, -0.5], requires_grad=True)
    FeatureSimilarityTarget(f.detach())(f).backward()
    assert f.grad.abs().max() < 1e-6
    f.grad = None
    FeatureSimilarityTarget(f.detach(), "projection")(f).backward()
    torch.testing.assert_close(f.grad, F.normalize(f.detach(), dim=0))


def test_gradcam_without_classifier_uses_feature_similarity():
    torch.manual_seed(0)
    bb = tiny_bcssl()
    imgs = structured_images(48)
    maps = cam_maps(bb, imgs, method="gradcam", size=48, mean=MEAN, std=STD)
    assert maps.shape == (3, 48, 48) and maps.min() >= 0 and maps.max() <= 1
    assert (maps.flatten(1).std(1) > 0.05).all()  # non-constant where the input has structure
    # the same target through pytorch-grad-cam directly
    x = eval_preprocess(imgs, 48, MEAN, STD)
    with torch.no_grad():
        feats = bb.eval()(x)
    with GradCAM(model=bb, target_layers=[bb.cam_target_layer]) as cam:
        direct = torch.from_numpy(cam(input_tensor=x, targets=[FeatureSimilarityTarget(f, "projection")
                                                               for f in feats]))
    torch.testing.assert_close(maps, direct.clamp(0, 1), atol=1e-5, rtol=0)
    # an explicit reference (another image's feature) gives a different, cosine, target
    other = cam_maps(bb, imgs, method="gradcam", size=48, mean=MEAN, std=STD, reference=feats[[1, 2, 0]])
    assert other.shape == maps.shape and (other - maps).abs().amax() > 1e-2
    with pytest.raises(ValueError, match="not both"):
        cam_maps(bb, imgs, method="gradcam", size=48, mean=MEAN, std=STD, classifier=nn.Linear(64, 2),
                 reference=feats)


@pytest.mark.parametrize("name,kw", [
    ("vit_s16", dict(img_size=32, stem_stride=1, depths=1, dims=64)),  # 4 px patches: an 8x8 token grid
    ("swin_t", dict(img_size=32, stem_stride=1, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))),
])
def test_transformer_baselines_through_cam_reshape(name, kw):
    torch.manual_seed(0)
    bb = create_backbone(name, **kw)
    assert bb.cam_reshape is not None
    imgs = structured_images(32)
    for method in ("eigencam", "gradcam"):
        maps = cam_maps(bb, imgs, method=method, size=32, mean=MEAN, std=STD)
        assert maps.shape == (3, 32, 32) and maps.min() >= 0 and maps.max() <= 1, method
        assert (maps.flatten(1).std(1) > 0.02).all(), method
        if method == "eigencam":  # same as pytorch-grad-cam given the backbone's reshape_transform
            x = eval_preprocess(imgs, 32, MEAN, STD)
            with EigenCAM(model=bb, target_layers=[bb.cam_target_layer], reshape_transform=bb.cam_reshape) as cam:
                torch.testing.assert_close(maps, torch.from_numpy(cam(input_tensor=x, targets=None)).clamp(0, 1),
                                           atol=1e-5, rtol=0)
    assert not bb.cam_target_layer._forward_hooks


def test_one_pixel_feature_map_warns():
    bb = create_backbone("bcssl_atto", dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), stem_stride=4, kernel_size=3)
    with pytest.warns(UserWarning, match="1x1"):
        maps = cam_maps(bb, structured_images(32), method="eigencam", size=32, mean=MEAN, std=STD)
    assert (maps == 0).all()


def test_cam_area():
    m = torch.zeros(2, 4, 4)
    m[0, :2] = 0.9
    m[1] = 0.5  # not above the threshold
    assert cam_area(m).tolist() == [0.5, 0.0]


# ----------------------------------------------------------------------------- grid


def test_cam_grid_png(tmp_path):
    imgs = structured_images(32)
    ramp = torch.linspace(0, 1, 32).expand(32, 32)
    maps = torch.stack([ramp, ramp.T, 1 - ramp])
    rows = [("run_a k=3 gradcam", imgs, maps), ("run_b k=9 eigencam", imgs, maps[:, :8, :8])]  # coarse maps ok
    out = cam_grid(rows, ["img0", "img1", "img2"], tmp_path / "fig" / "cam.png", title="CAM")
    with Image.open(out) as im:
        im.load()
        size = im.size
        arr = np.asarray(im.convert("RGB"))
    w, h = grid_size_px(2, 3, [r[0] for r in rows], title="CAM")
    assert abs(size[0] - w) <= 2 and abs(size[1] - h) <= 2
    assert 3 * 150 < size[0] < 3 * 160 + 250 and 2 * 150 < size[1] < 2 * 160 + 100  # ~160 px cells
    assert out.stat().st_size < 200_000
    # the heat map is drawn: the jet colormap gives strongly blue and strongly red pixels
    red = (arr[..., 0] > 180) & (arr[..., 2] < 80)
    blue = (arr[..., 2] > 120) & (arr[..., 0] < 60)
    assert red.sum() > 1000 and blue.sum() > 1000
    with pytest.raises(ValueError, match="expected 2"):
        cam_grid(rows, ["a", "b"], tmp_path / "bad.png")


# ----------------------------------------------------------------------------- runs


def test_cam_for_runs(tmp_path, tiny_fmnist):
    runs = []
    for k in (3, 5):
        cfg = tiny_config(tmp_path, tiny_fmnist, f"run.name=k{k}", f"model.kernel_size={k}", "train.epochs=1",
                          "data.limit=16", "eval.final_knn=false")
        train(cfg)
        runs.append(tmp_path / "runs" / f"k{k}")
    save_linear_classifier(make_classifier(64, 10, seed=0), runs[1])  # only the second run has a probe
    d = tmp_path / "imgs"
    d.mkdir()
    for i, img in enumerate(structured_images(48)):
        _save(d / f"img{i}.png", img.permute(1, 2, 0).numpy())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 32 px with stem 2: 2x2 maps, no 1x1 warning
        s = cam_for_runs(runs, d, out_png=tmp_path / "out" / "cam.png")
    assert s["images"] == ["img0.png", "img1.png", "img2.png"]
    assert [r["label"] for r in s["rows"]] == ["k3 k=3 gradcam", "k3 k=3 eigencam", "k5 k=5 gradcam",
                                               "k5 k=5 eigencam"]
    assert [r["target"] for r in s["rows"]] == ["feature similarity", "none", "predicted class", "none"]
    assert s["rows"][0]["predicted"] is None and len(s["rows"][2]["predicted"]) == 3
    for r in s["rows"]:
        assert len(r["cam_area"]) == 3 and all(0 <= a <= 1 for a in r["cam_area"])
        assert r["cam_area_mean"] == pytest.approx(np.mean(r["cam_area"]), abs=1e-3)
    assert s["n_images"] == 3 and s["cam_area_mean"]["k5 k=5 gradcam"] == s["rows"][2]["cam_area_mean"]
    assert json.loads(open(s["json"]).read()) == json.loads(json.dumps(s))
    with Image.open(s["png"]) as im:
        w, h = grid_size_px(4, 3, [r["label"] for r in s["rows"]])
        assert abs(im.size[0] - w) <= 2 and abs(im.size[1] - h) <= 2

    one = cam_for_runs(runs[0], structured_images(28), methods=["eigencam"], out_png=tmp_path / "one.png")
    assert len(one["rows"]) == 1 and one["images"] == ["image 0", "image 1", "image 2"]
    with pytest.raises(FileNotFoundError, match="nope.png"):
        cam_for_runs(runs, [d / "nope.png"], out_png=tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="not a bcssl run"):
        cam_for_runs([tmp_path], d, out_png=tmp_path / "x.png")
