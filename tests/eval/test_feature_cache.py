"""Feature cache keyed by (checkpoint bytes, dataset, transform) and loading a run's eval backbone."""
import hashlib
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from bcssl.engine import checkpoint as ckpt
from bcssl.engine.runtime import build_method, file_sha256, load_run, load_run_backbone
from bcssl.engine.trainer import train
from bcssl.eval.features import cached_features, extract_features
from tests.conftest import tiny_config

EXTRACT = dict(size=8, mean=(0.5,) * 3, std=(0.5,) * 3, progress=False)


class CountingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x).mean((2, 3))


def batches(n_batches=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 255, (5, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(5))
            for _ in range(n_batches)]


@pytest.fixture
def setup(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ck = run / "checkpoint.pt"
    ck.write_bytes(b"weights v1")
    return run, ck, CountingNet()


def cache_files(run):
    return sorted(p.name for p in (run / "cache").glob("features-*.pt"))


def test_second_call_does_not_run_the_backbone(setup):
    run, ck, net = setup
    fetched = []

    def batches_fn():
        fetched.append(1)
        return batches()

    f1, y1 = cached_features(run, ck, net, "fmnist:train", "eval:8", batches_fn, **EXTRACT)
    assert net.calls == 3 and len(fetched) == 1 and f1.shape == (15, 4)
    f2, y2 = cached_features(run, ck, net, "fmnist:train", "eval:8", batches_fn, **EXTRACT)
    assert net.calls == 3 and len(fetched) == 1  # neither the loader nor the backbone ran
    assert torch.equal(f1, f2) and torch.equal(y1, y2)
    # a caller-supplied digest of the same bytes is the same key
    cached_features(run, ck, net, "fmnist:train", "eval:8", batches_fn, checkpoint_sha256=file_sha256(ck), **EXTRACT)
    assert net.calls == 3
    assert len(cache_files(run)) == 1 and not list((run / "cache").glob(".*tmp*"))


def test_modified_checkpoint_invalidates_and_replaces_the_cache(setup):
    run, ck, net = setup
    cached_features(run, ck, net, "d", "t", batches, **EXTRACT)
    before = cache_files(run)
    ck.write_bytes(b"weights v2")  # same file name, other bytes
    with torch.no_grad():
        net.conv.weight.add_(1.0)
    f, _ = cached_features(run, ck, net, "d", "t", batches, **EXTRACT)
    assert net.calls == 6  # recomputed
    after = cache_files(run)
    assert len(after) == 1 and after != before  # the stale file is gone
    want, _ = extract_features(net, batches(), **EXTRACT)
    assert torch.allclose(f, want)


def test_dataset_and_transform_keys_are_separate_files(setup):
    run, ck, net = setup
    a, _ = cached_features(run, ck, net, "train", "t", lambda: batches(3), **EXTRACT)
    b, _ = cached_features(run, ck, net, "test", "t", lambda: batches(2), **EXTRACT)
    c, _ = cached_features(run, ck, net, "train", "t2", lambda: batches(1), **EXTRACT)
    assert net.calls == 6 and len(cache_files(run)) == 3
    assert (a.shape[0], b.shape[0], c.shape[0]) == (15, 10, 5)
    a2, _ = cached_features(run, ck, net, "train", "t", lambda: batches(3), **EXTRACT)
    b2, _ = cached_features(run, ck, net, "test", "t", lambda: batches(2), **EXTRACT)
    assert net.calls == 6 and torch.equal(a, a2) and torch.equal(b, b2)
    # a new checkpoint removes only the stale file of the (dataset, transform) being recomputed
    ck.write_bytes(b"weights v2")
    cached_features(run, ck, net, "train", "t", lambda: batches(3), **EXTRACT)
    assert len(cache_files(run)) == 3


def test_unreadable_cache_file_is_recomputed(setup):
    run, ck, net = setup
    cached_features(run, ck, net, "d", "t", batches, **EXTRACT)
    path = run / "cache" / cache_files(run)[0]
    path.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        f, _ = cached_features(run, ck, net, "d", "t", batches, **EXTRACT)
    assert net.calls == 6 and f.shape == (15, 4)
    torch.load(path, weights_only=True)  # rewritten, loadable


def test_file_sha256_streams_the_bytes(tmp_path):
    p = tmp_path / "big"
    data = bytes(range(256)) * 40000  # > one 4 MiB chunk
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()


def test_load_run_errors(tmp_path, tiny_fmnist):
    with pytest.raises(FileNotFoundError, match="not a bcssl run directory"):
        load_run_backbone(tmp_path)
    from bcssl.engine.run_dir import save_config
    run = tmp_path / "run"
    run.mkdir()
    save_config(tiny_config(tmp_path, tiny_fmnist), run)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_run_backbone(run)


def test_load_run_backbone_gives_the_trained_teacher_in_eval_mode(tmp_path, tiny_fmnist):
    cfg = tiny_config(tmp_path, tiny_fmnist, "train.epochs=1", "eval.final_knn=false")
    run = train(cfg).run_dir
    cfg2, backbone, path = load_run_backbone(run, ["linear.epochs=3"])
    assert cfg2.linear.epochs == 3 and path.name == "checkpoint.pt" and not backbone.training
    method = build_method(cfg)
    method.load_state_dict(ckpt.load(path)["method"])
    want = method.eval_backbone().state_dict()
    got = backbone.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    loaded = load_run(run)
    assert loaded.checkpoint_sha256 == file_sha256(path) and loaded.step == 4


def test_load_run_digest_follows_the_fallback_checkpoint(tmp_path, tiny_fmnist):
    cfg = tiny_config(tmp_path, tiny_fmnist, "train.epochs=1", "eval.final_knn=false")
    run = train(cfg).run_dir
    path = ckpt.latest(run)
    state = ckpt.load(path)
    ckpt.save(state, path)  # now checkpoint.prev.pt holds a good copy
    prev = ckpt.prev_path(path)
    path.write_bytes(b"torn write")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_run(run)
    assert loaded.checkpoint_path == prev and loaded.checkpoint_sha256 == file_sha256(prev)
    assert any("previous checkpoint" in str(w.message) for w in caught)  # the warning is passed on


def test_load_run_retries_when_a_save_races_the_load(tmp_path, tiny_fmnist, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_fmnist, "train.epochs=1", "eval.final_knn=false")
    run = train(cfg).run_dir
    path = ckpt.latest(run)
    real_load = ckpt.load_with_source
    newer = ckpt.load(path)
    key = next(k for k, v in newer["method"].items() if k.startswith("teacher.backbone.") and v.is_floating_point())
    newer["method"][key] = newer["method"][key] + 1.0
    calls = []

    def racing_load(p, *a, **kw):  # the trainer writes a new checkpoint right after we read the old one
        out = real_load(p, *a, **kw)
        if not calls:
            ckpt.save(newer, path)
        calls.append(p)
        return out

    monkeypatch.setattr(ckpt, "load_with_source", racing_load)
    loaded = load_run(run)
    assert len(calls) == 2  # retried
    assert loaded.checkpoint_sha256 == file_sha256(path)  # digest of the file the weights came from
    got = loaded.backbone.state_dict()[key[len("teacher.backbone."):]]
    assert torch.equal(got, newer["method"][key])


def test_eval_encoder_chooses_the_backbone_and_keys_the_cache(tmp_path, tiny_fmnist):
    """eval.encoder=student evaluates DINO's student: other weights, so other cached features, and
    k-NN / linear results say which network they measured."""
    from bcssl.eval.features import run_features
    from bcssl.eval.knn import knn_of_run

    cfg = tiny_config(tmp_path, tiny_fmnist, "train.epochs=1", "eval.final_knn=false")
    run = train(cfg).run_dir
    method = build_method(cfg)
    method.load_state_dict(ckpt.load(ckpt.latest(run))["method"])
    for encoder, want in [("auto", method.teacher.backbone), ("teacher", method.teacher.backbone),
                          ("student", method.student.backbone)]:
        loaded = load_run(run, [f"eval.encoder={encoder}"])
        got = loaded.backbone.state_dict()
        assert loaded.encoder == ("teacher" if encoder == "auto" else encoder)
        assert all(torch.equal(v, got[k]) for k, v in want.state_dict().items())
    teacher_f, _ = run_features(load_run(run), cfg.data.eval_split, progress=False)
    student_f, _ = run_features(load_run(run, ["eval.encoder=student"]), cfg.data.eval_split, progress=False)
    assert not torch.allclose(teacher_f, student_f)  # not served from the teacher's cache file
    assert len(list((Path(run) / "cache").glob("features-*.pt"))) == 2
    assert knn_of_run(run, ["eval.encoder=student"], progress=False)["encoder"] == "student"
