"""Run registered model versions over every scan of a manifest.

Scans go through the spec's MONAI dictionary transforms and a MONAI
Dataset/DataLoader, in chunks submitted to a ``concurrent.futures`` executor:
a local process pool by default, a Dask cluster's executor with ``--scheduler``,
or inline for one worker. Every finished scan is appended (and flushed) to
``predictions.csv`` at once, so an interrupted run loses nothing it finished and
a rerun skips every scan already scored by the same weights (same weight hash,
same image hash).
"""

from __future__ import annotations

import csv
import os
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd

from sitebench.benchmarks.spec import BenchmarkSpec
from sitebench.datasets import manifest as mf
from sitebench.datasets.manifest import Manifest, read_manifest
from sitebench.errors import SitebenchError
from sitebench.models.base import ModelCard
from sitebench.models.registry import ResolvedModel, load_model, resolve_model
from sitebench.provenance import utc_now

PREDICTION_COLUMNS = ("scan_id", "model", "model_version", "model_key", "weights_sha256", "image_sha256",
                      "output", "prediction", "dice", "seconds", "scored_utc")
PREDICTIONS_FILE = "predictions.csv"


# --------------------------------------------------------------------------- executors


class InlineExecutor(Executor):
    """Runs each task at submit time, in this process: one code path for one worker."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future
            future.set_exception(exc)
        return future


def _prepare_worker() -> None:
    """Settings a worker (spawned or Dask) does not inherit from the command line.

    MONAI's reader chatter stays out of the output, and in a worker process torch
    uses one thread so that workers do not oversubscribe the cores.
    """
    import logging
    import multiprocessing
    import warnings

    import torch

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    if multiprocessing.parent_process() is not None:
        torch.set_num_threads(1)


def make_executor(workers: int = 2, scheduler: str | None = None) -> tuple[Executor, Callable[[], None]]:
    """An executor and its closer: Dask when ``scheduler`` is given, else processes or inline."""
    if scheduler:
        try:
            from distributed import Client
        except ImportError as exc:  # pragma: no cover - dask is a dependency
            raise SitebenchError("dask.distributed is not installed") from exc
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise SitebenchError(f"cannot reach Dask scheduler ({exc.__class__.__name__})", scheduler) from None
        return client.get_executor(), client.close
    if workers <= 1:
        return InlineExecutor(), lambda: None
    import multiprocessing

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    return pool, lambda: pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- the work of one chunk


@lru_cache(maxsize=4)
def _transforms(transform_items: tuple[tuple[str, str], ...]):
    import json

    from monai import transforms as T

    steps = [getattr(T, name)(**json.loads(arguments)) for name, arguments in transform_items]
    return T.Compose(steps)


def _freeze_transforms(spec: BenchmarkSpec) -> tuple[tuple[str, str], ...]:
    import json

    return tuple((name, json.dumps(args, sort_keys=True)) for item in spec.transforms for name, args in item.items())


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def score_chunk(resolved: ResolvedModel, records: list[dict[str, Any]],
                transform_items: tuple[tuple[str, str], ...], output: str,
                segmentation_label: int) -> list[dict[str, Any]]:
    """Score a list of scans with one model; runs in a worker (process, Dask or inline)."""
    from monai.data import DataLoader, Dataset
    from monai.data.utils import no_collation

    _prepare_worker()
    model = load_model(resolved)
    card = model.card
    loader = DataLoader(Dataset(records, transform=_transforms(transform_items)), batch_size=1,
                        num_workers=0, collate_fn=no_collation)
    rows = []
    iterator = iter(loader)
    for record in records:
        start = time.perf_counter()
        try:
            (data,) = next(iterator)
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
            raise SitebenchError(f"not a readable NIfTI image ({reason[:160]})", record["image"]) from None
        prediction = model.predict(data)
        if output not in prediction.values:
            raise SitebenchError(f"model {card.key} has no output '{output}' "
                                 f"(it gives: {', '.join(prediction.values)})")
        dice = None
        if record.get("label") and prediction.segmentation is not None:
            dice = _dice(prediction.segmentation, _label_mask(record["label"], segmentation_label))
        rows.append({
            "scan_id": record["scan_id"], "model": card.name, "model_version": card.version,
            "model_key": card.key, "weights_sha256": card.weights_sha256,
            "image_sha256": record["image_sha256"], "output": output,
            "prediction": prediction.values[output], "dice": dice,
            "seconds": round(time.perf_counter() - start, 4), "scored_utc": utc_now(),
        })
    return rows


def _label_mask(path: str, label: int) -> np.ndarray:
    import nibabel as nib

    try:
        return np.asarray(nib.load(path).dataobj) == label
    except Exception as exc:  # noqa: BLE001
        raise SitebenchError(f"not a readable label map ({exc.__class__.__name__})", path) from None


# --------------------------------------------------------------------------- the run


@dataclass
class BenchmarkRun:
    """Predictions of every model version on every scan, and how they were obtained."""

    spec: BenchmarkSpec
    manifest: Manifest
    models: list[ModelCard]
    resolved: list[ResolvedModel]
    predictions: pd.DataFrame
    predictions_path: Path
    computed: int
    reused: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"benchmark '{self.spec.name}': {len(self.manifest)} scans x {len(self.models)} models; "
                 f"{self.computed} scored, {self.reused} reused, {self.seconds:.1f} s",
                 f"predictions: {self.predictions_path}"]
        for card in self.models:
            part = self.predictions[self.predictions["weights_sha256"] == card.weights_sha256]
            lines.append(f"  {card.key:<24} sha256 {card.weights_sha256[:12]}…  n={len(part)}")
        return "\n".join(lines)


def _read_existing(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame(columns=list(PREDICTION_COLUMNS))
    try:
        return pd.read_csv(path, dtype={"scan_id": str, "model_version": str, "weights_sha256": str,
                                        "image_sha256": str})
    except (pd.errors.ParserError, ValueError) as exc:
        raise SitebenchError(f"cannot read earlier predictions ({exc})", path) from None


def _records(manifest: Manifest, spec: BenchmarkSpec) -> list[dict[str, Any]]:
    table = manifest.with_absolute_paths()
    if spec.reference not in table:
        raise SitebenchError(f"reference column '{spec.reference}' is not in the manifest", manifest.source)
    seg = spec.reference_segmentation
    if seg and seg not in table:
        raise SitebenchError(f"reference_segmentation column '{seg}' is not in the manifest", manifest.source)
    return [{"scan_id": row[mf.SCAN_ID], "image": row[mf.IMAGE_PATH], "image_sha256": row[mf.IMAGE_SHA256],
             "label": row[seg] if seg else None} for row in table.to_dict("records")]


def _chunks(items: list[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_benchmark(spec: BenchmarkSpec, *, workers: int = 2, scheduler: str | None = None,
                  executor: Executor | None = None, progress: bool = True,
                  tracking_uri: str | None = None) -> BenchmarkRun:
    """Score every scan with every model version in ``spec``; resume what is already scored."""
    started = time.perf_counter()
    manifest = read_manifest(spec.manifest_path)
    resolved = [resolve_model(m.source, expected_sha256=m.sha256, name=m.name, tracking_uri=tracking_uri)
                for m in spec.models]
    cards = [load_model(r).card for r in resolved]  # checks every hash before any work starts
    out_dir = spec.results_path
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions_path = out_dir / PREDICTIONS_FILE
    existing = _read_existing(predictions_path)
    done = set(zip(existing["scan_id"], existing["weights_sha256"], existing["image_sha256"]))
    records = _records(manifest, spec)
    transform_items = _freeze_transforms(spec)
    pending: list[tuple[ResolvedModel, list[dict[str, Any]]]] = []
    reused = 0
    for model_ref, card in zip(resolved, cards):
        todo = [r for r in records if (r["scan_id"], card.weights_sha256, r["image_sha256"]) not in done]
        reused += len(records) - len(todo)
        n_workers = max(1, workers)
        size = max(1, min(16, len(todo) // (n_workers * 4) or 1))
        pending += [(model_ref, chunk) for chunk in _chunks(todo, size)]
    total = sum(len(chunk) for _, chunk in pending)
    computed = 0
    if total:
        own_executor = executor is None
        closer: Callable[[], None] = lambda: None
        if own_executor:
            executor, closer = make_executor(workers, scheduler)
        try:
            computed = _drain(executor, pending, transform_items, spec, predictions_path, total, progress,
                              window=max(2, 2 * max(1, workers)))
        finally:
            closer()
    merged = _read_existing(predictions_path)
    keep = merged["weights_sha256"].isin([c.weights_sha256 for c in cards]) & merged["scan_id"].isin(
        manifest.table[mf.SCAN_ID])
    current = (merged[keep].drop_duplicates(["scan_id", "weights_sha256", "image_sha256"], keep="last")
               .merge(manifest.table[[mf.SCAN_ID, mf.IMAGE_SHA256]], left_on=["scan_id", "image_sha256"],
                      right_on=[mf.SCAN_ID, mf.IMAGE_SHA256])[list(PREDICTION_COLUMNS)]
               .sort_values(["model_key", "scan_id"]).reset_index(drop=True))
    return BenchmarkRun(spec=spec, manifest=manifest, models=cards, resolved=resolved, predictions=current,
                        predictions_path=predictions_path, computed=computed, reused=reused,
                        seconds=time.perf_counter() - started)


def _drain(executor: Executor, pending: list[tuple[ResolvedModel, list[dict[str, Any]]]],
           transform_items: tuple[tuple[str, str], ...], spec: BenchmarkSpec, predictions_path: Path,
           total: int, progress: bool, window: int) -> int:
    from tqdm.auto import tqdm

    new_file = not predictions_path.exists()
    computed = 0
    with open(predictions_path, "a", newline="") as handle, \
            tqdm(total=total, desc="scoring scans", unit="scan", disable=not progress) as bar:
        writer = csv.DictWriter(handle, fieldnames=list(PREDICTION_COLUMNS))
        if new_file:
            writer.writeheader()
        queue = iter(pending)
        in_flight: set[Future] = set()

        def submit_next() -> None:
            for ref, chunk in queue:
                in_flight.add(executor.submit(score_chunk, ref, chunk, transform_items, spec.output,
                                              spec.segmentation_label))
                return

        def keep(rows: list[dict[str, Any]]) -> None:
            nonlocal computed
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
            computed += len(rows)
            bar.update(len(rows))

        try:
            for _ in range(window):
                submit_next()
            while in_flight:
                finished = next(as_completed(in_flight))
                in_flight.discard(finished)
                keep(finished.result())
                submit_next()
        except BaseException:
            # keep every chunk that did finish, then stop the rest
            for future in in_flight:
                if not future.cancel() and future.done() and future.exception() is None:
                    keep(future.result())
            raise
    return computed
