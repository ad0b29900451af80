"""Every evaluation, by name: what ``bcssl eval NAME RUN``, ``bcssl eval --help``, ``bcssl sweep
--evals`` and ``bcssl report`` loop over.

An evaluation is one module that defines ``EVALUATION``, an instance of a subclass of
:class:`Evaluation`: its name, config section, CLI options, ``run(run_dir, overrides) -> dict``
(which writes ``<run>/<name>.json`` atomically) and how it appears in the report (results-table
columns, a section with figures) and in a sweep. Adding one is that file plus one line in
:data:`REGISTRY` (the line holds the one-line help so that ``bcssl --help`` needs no import of
torch).
"""
from __future__ import annotations

import argparse
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from bcssl.eval.report import RunData


@dataclass(frozen=True)
class Entry:
    name: str  # `bcssl eval NAME`, the result file NAME.json
    module: str  # the module that defines EVALUATION
    help: str  # one line for `bcssl eval --help`


REGISTRY: tuple[Entry, ...] = (
    Entry("knn", "bcssl.eval.knn", "weighted k-NN top-1/top-5 of the eval backbone (DINO protocol)"),
    Entry("random_init", "bcssl.eval.random_init", "k-NN of the run's network at random initialisation (same "
          "config and seed): the baseline of its pre-training"),
    Entry("linear", "bcssl.eval.linear", "linear probe: DINO's eval_linear on image folders, cached features "
          "on in-memory sets; saves the classifier"),
    Entry("robustness", "bcssl.eval.robustness", "15 corruptions x 5 severities on the fly, or a released "
          "ImageNet-C/-A/-R/-Sketch folder, with the linear probe"),
    Entry("detection", "bcssl.eval.detection", "Mask R-CNN + FPN fine-tuned from the backbone on COCO-format "
          "data (3x recipe): box and mask AP"),
    Entry("throughput", "bcssl.eval.throughput", "forward images/s, parameters and MACs of the run's backbone "
          "(BN folded; per model, not per checkpoint)"),
    Entry("cam", "bcssl.eval.cam", "Grad-CAM / Eigen-CAM grid of the run on one image per class"),
    Entry("embedding", "bcssl.eval.embedding", "2-D t-SNE of the eval features: a scatter coloured by class + coordinates"),
)


class Evaluation:
    """One evaluation. Subclasses set the class attributes and implement :meth:`run`."""

    name: str = ""
    section: str | None = None  # its config section (keys `section.*`), None when it has none
    distributed: bool = False  # `--nproc N` / torchrun: every process runs it, rank 0 writes
    requires: tuple[str, ...] = ()  # evaluations whose results it reads (run first in a sweep)
    per_model: bool = False  # measures the architecture, not the checkpoint's weights
    sweep_metrics: dict[str, tuple[str, bool]] = {}  # sweep_result.json key -> (table title, higher is better)

    @property
    def result_file(self) -> str:
        return f"{self.name}.json"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Options beyond RUN and KEY=VALUE overrides; their values reach :meth:`run` as keywords."""

    def run(self, run_dir: str | os.PathLike, overrides: Sequence[str] = (), *, progress: bool = True,
            **options) -> dict:
        """Evaluate the run (its config + ``overrides``); write ``<run>/<name>.json`` (rank 0) and
        return the result (``{}`` on other ranks)."""
        raise NotImplementedError

    def summary(self, result: dict, run_dir: str | os.PathLike) -> str:
        """What ``bcssl eval NAME`` prints (before the ``--json`` line)."""
        return f"written to {Path(run_dir) / self.result_file}"

    def report_columns(self, run: RunData) -> list[tuple[str, Any]]:
        """``(header, value)`` cells of this run's row in the report's results table."""
        return []

    def report_section(self, runs: Sequence[RunData], out_dir: Path, fig_dir: Path) -> list[str]:
        """Markdown lines of this evaluation's report section (figures written under ``fig_dir``)."""
        return []

    def report_sources(self, run: RunData) -> list[str]:
        """Where the table's numbers came from (a line under the results table)."""
        return []

    def sweep_values(self, result: dict) -> dict:
        """The values ``bcssl sweep`` keeps from a result in ``sweep_result.json``."""
        return {}


def names() -> list[str]:
    return [e.name for e in REGISTRY]


def entry(name: str) -> Entry:
    for e in REGISTRY:
        if e.name == name:
            return e
    raise ValueError(f"unknown evaluation {name!r}; choose from {', '.join(names())}")


def get(name: str) -> Evaluation:
    """The evaluation registered as ``name`` (its module imported now)."""
    e = entry(name)
    ev = importlib.import_module(e.module).EVALUATION
    if ev.name != e.name:
        raise RuntimeError(f"{e.module}.EVALUATION is named {ev.name!r}, registered as {e.name!r}")
    return ev


def all_evaluations() -> list[Evaluation]:
    return [get(e.name) for e in REGISTRY]


def in_order(selected: Sequence[str]) -> list[Evaluation]:
    """``selected`` plus what they require, each after its requirements (a sweep's ``--evals``)."""
    out: list[Evaluation] = []

    def add(name: str, chain: tuple = ()) -> None:
        if name in chain:
            raise RuntimeError(f"evaluations require each other: {' -> '.join(chain + (name,))}")
        ev = get(name)
        for r in ev.requires:
            add(r, chain + (name,))
        if ev not in out:
            out.append(ev)
    for name in selected:
        add(name)
    return out
