"""Weighted k-NN classification, the DINO protocol: L2-normalised features, cosine similarity,
the k=20 nearest training features vote for their label with weight exp(sim / 0.07)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from bcssl.eval.features import extract_features


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor | None = None, *, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, max_chunk_elements: int = 2 ** 26) -> dict:
    """Return ``{"top1", "top5"}`` (percent, when ``test_labels`` is given) and ``predictions``.

    Test features are processed in chunks so that the (chunk x n_train) similarity matrix has at
    most ``max_chunk_elements`` entries: memory stays bounded for any bank size. Votes are
    accumulated with ``scatter_add`` into a (chunk x classes) table, so any number of classes works.
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_features.shape[0]} train features but {train_labels.shape[0]} labels")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have dim {train_features.shape[1]}, test {test_features.shape[1]}")
    train_labels = train_labels.long()
    num_classes = num_classes or int(train_labels.max().item()) + 1
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1).t().contiguous()
    queries = F.normalize(test_features.float(), dim=1)
    chunk = max(1, max_chunk_elements // bank.shape[1])
    preds = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ bank
        top_sim, top_idx = sim.topk(k, dim=1, largest=True, sorted=True)
        neighbour_labels = train_labels[top_idx]
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, neighbour_labels, (top_sim / temperature).exp())
        preds.append(votes.topk(min(5, num_classes), dim=1).indices)
    ranked = torch.cat(preds) if preds else torch.zeros(0, 1, dtype=torch.long)
    out: dict = {"predictions": ranked[:, 0]}
    if test_labels is not None:
        correct = ranked.eq(test_labels.long().view(-1, 1).to(ranked.device))
        n = max(len(test_labels), 1)
        out["top1"] = 100.0 * correct[:, :1].any(1).sum().item() / n
        out["top5"] = 100.0 * correct[:, :5].any(1).sum().item() / n
    return out


class KNNEvaluator:
    """k-NN of a backbone on a run's data: bank = the training split, queries = ``data.eval_split``.

    Datasets are loaded once and reused across calls (the k-NN monitor calls it every few epochs).
    ``eval.knn_train_limit`` / ``eval.knn_test_limit`` take the first N images for a cheap monitor.
    """

    def __init__(self, cfg, device="cpu", progress: bool = True, train_limit=None, test_limit=None):
        from bcssl.data import BatchLoader, dataset_from_config  # late: keep `import bcssl.eval.knn` light

        self.cfg, self.device, self.progress = cfg, torch.device(device), progress
        d = cfg.data
        self.train_set = dataset_from_config(cfg, d.split)
        self.test_set = dataset_from_config(cfg, d.eval_split)
        bs = cfg.eval.batch_size
        kw = dict(shuffle=False, drop_last=False, workers=d.workers, pin_memory=self.device.type == "cuda")
        self.train_loader = BatchLoader(self.train_set, bs, limit=train_limit, **kw)
        self.test_loader = BatchLoader(self.test_set, bs, limit=test_limit, **kw)

    def features(self, backbone, which: str):
        from bcssl.data import eval_image_size

        loader = self.train_loader if which == "train" else self.test_loader
        c = self.cfg
        return extract_features(backbone, loader.epoch(0), size=eval_image_size(c), mean=c.crops.mean,
                                std=c.crops.std, device=self.device, amp=c.train.amp,
                                channels_last=c.train.channels_last, total=len(loader),
                                desc=f"k-NN {which} features", progress=self.progress)

    def __call__(self, backbone) -> dict:
        train_f, train_y = self.features(backbone, "train")
        test_f, test_y = self.features(backbone, "test")
        return knn_classify(train_f, train_y, test_f, test_y, k=self.cfg.eval.knn_k,
                            temperature=self.cfg.eval.knn_temperature, num_classes=self.train_set.num_classes)


def knn_of_run(run_dir, overrides=(), *, device=None, progress: bool = True) -> dict:
    """k-NN of a run's eval backbone on its full train (bank) and eval splits, with the features
    cached per checkpoint (shared with the linear probe). Writes ``<run>/knn.json`` and returns it."""
    from pathlib import Path

    from bcssl.data import train_and_eval_sets
    from bcssl.engine.run_dir import write_json
    from bcssl.engine.runtime import load_run, resolve_device
    from bcssl.eval.features import run_features

    loaded = load_run(run_dir, overrides)
    cfg, d = loaded.cfg, loaded.cfg.data
    device = resolve_device(str(device) if device is not None else cfg.device)
    sets = train_and_eval_sets(cfg)
    # the dataset's class count, not the largest label seen: a class missing from the data
    # would otherwise shrink the vote vector (as the k-NN monitor and the linear probe count)
    num_classes = int(sets[d.split].num_classes)
    train_f, train_y = run_features(loaded, d.split, device=device, progress=progress, dataset=sets[d.split])
    test_f, test_y = run_features(loaded, d.eval_split, device=device, progress=progress, dataset=sets[d.eval_split])
    res = knn_classify(train_f, train_y, test_f, test_y, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                       num_classes=num_classes)
    result = {"run_dir": str(run_dir), "knn_top1": res["top1"], "knn_top5": res["top5"], "k": cfg.eval.knn_k,
              "encoder": loaded.encoder,
              "checkpoint_step": loaded.step, "checkpoint_sha256": loaded.checkpoint_sha256}
    write_json(Path(run_dir) / "knn.json", result)
    return result


def knn_monitor(cfg):
    """The k-NN monitor for :func:`bcssl.engine.trainer.train` (``eval.knn_every`` /
    ``eval.final_knn``; banks limited by ``eval.knn_train_limit`` / ``knn_test_limit``), or None.

    Its datasets are loaded at the first evaluation, on the device the method trains on: under
    DDP only rank 0 evaluates, so the other ranks never load them."""
    if not (cfg.eval.knn_every or cfg.eval.final_knn):
        return None
    from bcssl.data import evaluation_labels_missing
    from bcssl.engine.distributed import env_rank

    missing = evaluation_labels_missing(cfg)
    if missing:
        if env_rank() == 0:
            logging.getLogger("bcssl").warning("k-NN monitor off: %s", missing)
        return None
    evaluator = None

    def monitor(method, epoch):
        nonlocal evaluator
        if evaluator is None:
            evaluator = KNNEvaluator(cfg, next(method.parameters()).device, progress=cfg.train.progress,
                                     train_limit=cfg.eval.knn_train_limit, test_limit=cfg.eval.knn_test_limit)
        return evaluator(method.eval_backbone(cfg.eval.encoder))
    return monitor
