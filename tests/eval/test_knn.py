"""k-NN against a direct implementation of DINO's weighted vote."""
import pytest
import torch
import torch.nn.functional as F

from bcssl.eval.knn import knn_classify


def direct_knn(train_f, train_y, test_f, k, T, C):
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    preds = []
    for q in test_f:
        sim = train_f @ q
        top = sim.topk(k)
        votes = torch.zeros(C)
        for s, i in zip(top.values, top.indices):
            votes[train_y[i]] += torch.exp(s / T)
        preds.append(int(votes.argmax()))
    return torch.tensor(preds)


def test_matches_direct_vote_and_chunking_does_not_change_it():
    torch.manual_seed(0)
    C = 7
    train_f, train_y = torch.randn(300, 16), torch.randint(0, C, (300,))
    test_f, test_y = torch.randn(50, 16), torch.randint(0, C, (50,))
    want = direct_knn(train_f, train_y, test_f, 20, 0.07, C)
    full = knn_classify(train_f, train_y, test_f, test_y, k=20, temperature=0.07, num_classes=C)
    tiny_chunks = knn_classify(train_f, train_y, test_f, test_y, k=20, temperature=0.07, num_classes=C,
                               max_chunk_elements=300 * 3)
    assert torch.equal(full["predictions"], want)
    assert torch.equal(tiny_chunks["predictions"], want)
    assert full["top1"] == tiny_chunks["top1"] == pytest.approx(100.0 * (want == test_y).sum().item() / 50)
    assert full["top5"] >= full["top1"]


def test_separable_clusters_are_classified_perfectly_with_many_classes():
    torch.manual_seed(0)
    C = 1000  # any number of classes
    centers = torch.randn(C, 32) * 10
    train_y = torch.arange(C).repeat(3)
    train_f = centers[train_y] + torch.randn(3 * C, 32) * 0.1
    test_y = torch.arange(C)
    test_f = centers + torch.randn(C, 32) * 0.1
    out = knn_classify(train_f, train_y, test_f, test_y, k=20, num_classes=C)
    assert out["top1"] == 100.0
    # shuffled labels destroy it: the metric can fail
    bad = knn_classify(train_f, train_y[torch.randperm(3 * C)], test_f, test_y, k=20, num_classes=C)
    assert bad["top1"] < 5.0


def test_two_processes_give_the_one_process_knn_exactly(tmp_path, tiny_fmnist, capsys):
    """`bcssl pretrain/eval knn --nproc 2` (gloo): each process encodes a contiguous block of whole
    batches -- uneven here: 64 train images in batches of 24 split 24 / 40, 32 test images 24 / 8 --
    and the gathered features, hence top-1, are those of one process. The k-NN monitor inside the
    2-process pre-training runs the same sharded code on both ranks."""
    import json
    import shutil
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from bcssl.cli import main
    from tests.conftest import tiny_config
    from tests.engine.test_distributed import ENV

    cfg = tiny_config(tmp_path, tiny_fmnist, "train.epochs=1", "eval.batch_size=24", "eval.final_knn=true")
    OmegaConf.save(cfg, tmp_path / "c.yaml")
    run = tmp_path / "runs" / "tiny"

    def bcssl(*args):
        proc = subprocess.run([sys.executable, "-m", "bcssl", *args, "--json"], env=ENV, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    trained = bcssl("pretrain", "--nproc", "2", "--config", str(tmp_path / "c.yaml"))
    two = bcssl("eval", "knn", str(run), "--nproc", "2")
    assert two["processes"] == 2 and (two["train_images"], two["eval_images"]) == (64, 32)
    sharded = {p.name: torch.load(p, weights_only=True) for p in (run / "cache").glob("features-*.pt")}
    shutil.rmtree(run / "cache")
    assert main(["eval", "knn", str(run), "--json"]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert one["processes"] == 1
    assert two["knn_top1"] == one["knn_top1"] == trained["knn_top1"] and two["knn_top5"] == one["knn_top5"]
    for p in (run / "cache").glob("features-*.pt"):  # bit for bit: the same batches went through the network
        blob = torch.load(p, weights_only=True)
        assert torch.equal(blob["features"], sharded[p.name]["features"])
        assert torch.equal(blob["labels"], sharded[p.name]["labels"])
    assert len(sharded) == 2
