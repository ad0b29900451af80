"""Weighted k-NN classification, the DINO protocol (facebookresearch/dino eval_knn.py):
L2-normalised features, cosine similarity, the k=20 nearest training features vote for their
label with weight exp(sim / 0.07).

Under torchrun (``bcssl eval knn RUN --nproc N``, and the k-NN monitor of a multi-process
pre-training) every process encodes its shard of the bank and the queries, the features are
gathered to all, and each classifies the full query set (the same numbers on every process,
those of one process: the shards are whole batches of the one-process order)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from bcssl.eval.features import extract_dataset_features
from bcssl.eval.registry import Evaluation


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
    Under torchrun every process calls it and encodes its shard (see the module docstring).
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
        self.limits = {"train": train_limit, "test": test_limit}

    def features(self, backbone, which: str):
        from bcssl.data import eval_image_size

        c = self.cfg
        return extract_dataset_features(
            backbone, self.train_set if which == "train" else self.test_set, batch_size=c.eval.batch_size,
            limit=self.limits[which], workers=c.data.workers, size=eval_image_size(c), mean=c.crops.mean,
            std=c.crops.std, device=self.device, amp=c.train.amp, channels_last=c.train.channels_last,
            desc=f"k-NN {which} features", progress=self.progress)

    def __call__(self, backbone) -> dict:
        train_f, train_y = self.features(backbone, "train")
        test_f, test_y = self.features(backbone, "test")
        return knn_classify(train_f, train_y, test_f, test_y, k=self.cfg.eval.knn_k,
                            temperature=self.cfg.eval.knn_temperature, num_classes=self.train_set.num_classes)


def knn_of_run(run_dir, overrides=(), *, device=None, progress: bool = True) -> dict:
    """k-NN of a run's eval backbone on its full train (bank) and eval splits, with the features
    cached per checkpoint (shared with the linear probe). Under torchrun each process encodes its
    shard. Writes ``<run>/knn.json`` (rank 0) and returns it (every rank)."""
    from bcssl.data import train_and_eval_sets
    from bcssl.engine import distributed as ddp
    from bcssl.engine.run_dir import write_json
    from bcssl.engine.runtime import load_run
    from bcssl.eval.features import run_features

    loaded = load_run(run_dir, overrides)
    cfg, d = loaded.cfg, loaded.cfg.data
    with ddp.process_group(str(device) if device is not None else cfg.device) as (dist, device):
        sets = train_and_eval_sets(cfg)
        # the dataset's class count, not the largest label seen: a class missing from the data
        # would otherwise shrink the vote vector (as the k-NN monitor and the linear probe count)
        num_classes = int(sets[d.split].num_classes)
        train_f, train_y = run_features(loaded, d.split, device=device, progress=progress, dataset=sets[d.split])
        test_f, test_y = run_features(loaded, d.eval_split, device=device, progress=progress,
                                      dataset=sets[d.eval_split])
        res = knn_classify(train_f, train_y, test_f, test_y, k=cfg.eval.knn_k,
                           temperature=cfg.eval.knn_temperature, num_classes=num_classes)
        result = {"run_dir": str(run_dir), "knn_top1": res["top1"], "knn_top5": res["top5"], "k": cfg.eval.knn_k,
                  "temperature": cfg.eval.knn_temperature, "train_images": int(train_y.shape[0]),
                  "eval_images": int(test_y.shape[0]), "processes": dist.world_size, "encoder": loaded.encoder,
                  "checkpoint_step": loaded.step, "checkpoint_sha256": loaded.checkpoint_sha256}
        if dist.is_main:
            write_json(Path(run_dir) / "knn.json", result)
        ddp.barrier()
    return result


def knn_monitor(cfg):
    """The k-NN monitor for :func:`bcssl.engine.trainer.train` (``eval.knn_every`` /
    ``eval.final_knn``; banks limited by ``eval.knn_train_limit`` / ``knn_test_limit``), or None.

    Its datasets are loaded at the first evaluation, on the device the method trains on. Under
    DDP every rank calls it and encodes its shard of the bank and the queries."""
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


class KNN(Evaluation):
    name = "knn"
    section = "eval"  # eval.knn_k, eval.knn_temperature, eval.batch_size (shared with the monitor)
    distributed = True
    sweep_metrics = {"knn_top1": ("k-NN top-1 (%)", True)}

    def run(self, run_dir: str | os.PathLike, overrides: Sequence[str] = (), *, progress: bool = True,
            **options) -> dict:
        return knn_of_run(run_dir, overrides, progress=progress)

    def summary(self, result: dict, run_dir) -> str:
        return f"k-NN (k={result['k']}) top-1 {result['knn_top1']:.2f}%, top-5 {result['knn_top5']:.2f}%"

    def report_columns(self, run):
        from bcssl.eval.report import _f, _final_knn

        top1, top5, _ = _final_knn(run)
        return [("k-NN top-1", _f(top1)), ("k-NN top-5", _f(top5))]

    def report_sources(self, run):
        from bcssl.eval.report import _final_knn

        src = _final_knn(run)[2]
        return [f"k-NN from {src}"] if src else []

    def sweep_values(self, result: dict) -> dict:
        return {"knn_top1": result["knn_top1"], "knn_top5": result["knn_top5"]}


EVALUATION = KNN()
