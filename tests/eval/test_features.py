"""Evaluation preprocessing and feature extraction."""
import torch

from bcssl.eval.features import eval_preprocess, extract_features


def test_preprocess_centre_crops_large_and_upsamples_small():
    big = torch.zeros(2, 3, 256, 256, dtype=torch.uint8)
    big[:, :, 16:240, 16:240] = 255  # the centre 224 crop is all white
    x = eval_preprocess(big, 224, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (2, 3, 224, 224) and torch.allclose(x, torch.ones_like(x))
    small = torch.full((1, 1, 28, 28), 255, dtype=torch.uint8)  # grayscale -> 3 channels, resized up
    y = eval_preprocess(small, 32, (0.0,) * 3, (1.0,) * 3)
    assert y.shape == (1, 3, 32, 32) and torch.allclose(y, torch.ones_like(y), atol=1e-5)


def test_extract_features_restores_mode_and_uses_eval_bn():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    net.train()
    batches = [(torch.randint(0, 255, (5, 3, 8, 8), dtype=torch.uint8), torch.arange(5)) for _ in range(3)]
    f, y = extract_features(net, batches, size=8, mean=(0.5,) * 3, std=(0.5,) * 3, progress=False)
    assert f.shape == (15, 4) and torch.equal(y, torch.arange(5).repeat(3))
    assert net.training  # restored
    assert int(net[1].num_batches_tracked) == 0  # eval mode: running stats untouched
