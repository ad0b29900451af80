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
