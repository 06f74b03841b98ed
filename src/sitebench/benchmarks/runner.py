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
from sitebench.models.base import ModelCard, voxel_volume_ml
from sitebench.models.biomarkers import BiomarkerError, BiomarkerSpec, as_label_map, check_model_labels, derive
from sitebench.models.registry import ResolvedModel, load_model, resolve_model
from sitebench.provenance import utc_now

PREDICTION_COLUMNS = ("scan_id", "model", "model_version", "model_key", "weights_sha256", "files_sha256",
                      "image_sha256", "biomarker", "output", "prediction", "reference", "dice", "seconds",
                      "scored_utc")
OVERLAP_COLUMNS = ("scan_id", "model_key", "files_sha256", "image_sha256", "biomarker", "label", "label_name",
                   "dice", "hd95_mm", "volume_ml", "reference_volume_ml", "volume_error_ml")
PREDICTIONS_FILE = "predictions.csv"
OVERLAP_FILE = "overlap_scores.csv"


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


def _hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float | None:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI's ``compute_hausdorff_distance``,
    surface distances, Huttenlocher et al. 1993); None when either mask is empty."""
    if not a.any() or not b.any():
        return None
    import warnings

    import torch
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():  # MONAI 1.5 deprecates an argument it passes to itself
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(torch.from_numpy(a[None, None]), torch.from_numpy(b[None, None]),
                                           include_background=True, percentile=95, spacing=list(spacing))
    return float(value.reshape(-1)[0])


def _spacing(data: dict[str, Any]) -> tuple[float, ...]:
    affine = getattr(data["image"], "affine", None)
    matrix = np.asarray(affine if affine is not None else data.get("affine"), dtype=np.float64)[:3, :3]
    return tuple(float(v) for v in np.linalg.norm(matrix, axis=0))


@dataclass(frozen=True)
class ChunkTask:
    """What a worker needs besides the scans: the model, the transforms and the declared biomarkers."""

    resolved: ResolvedModel
    transform_items: tuple[tuple[str, str], ...]
    biomarkers: tuple[BiomarkerSpec, ...]
    spec_file: str  # named in every error about the spec


def score_chunk(task: ChunkTask, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Score a list of scans with one model; runs in a worker (process, Dask or inline).

    Returns the prediction rows (one per scan and biomarker) and the overlap rows (one per
    scan, biomarker and label scored against the reference segmentation).
    """
    from monai.data import DataLoader, Dataset
    from monai.data.utils import no_collation

    _prepare_worker()
    model = load_model(task.resolved)
    card = model.card
    loader = DataLoader(Dataset(records, transform=_transforms(task.transform_items)), batch_size=1,
                        num_workers=0, collate_fn=no_collation)
    rows: list[dict[str, Any]] = []
    overlaps: list[dict[str, Any]] = []
    iterator = iter(loader)
    identity = {"model": card.name, "model_version": card.version, "model_key": card.key,
                "weights_sha256": card.weights_sha256, "files_sha256": card.files_sha256}
    for record in records:
        start = time.perf_counter()
        try:
            (data,) = next(iterator)
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad input file
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else exc.__class__.__name__
            raise SitebenchError(f"not a readable NIfTI image ({reason[:160]})", record["image"]) from None
        data = {**data, "image_path": record["image"]}
        try:
            prediction = model.predict(data)
        except SitebenchError:
            raise
        except Exception as exc:  # noqa: BLE001 - a team's model failing on a scan is reported, not a traceback
            lines = str(exc).strip().splitlines()
            reason = lines[-1][:200] if lines else ""
            raise SitebenchError(f"model {card.key} failed on this scan ({exc.__class__.__name__}: {reason}); "
                                 "does its input need a particular size or spacing?", record["image"]) from None
        voxel_ml, spacing = voxel_volume_ml(data), _spacing(data)  # once per scan, for every biomarker
        try:
            values = derive(list(task.biomarkers), prediction, voxel_ml)
        except BiomarkerError as exc:
            raise SitebenchError(f"{exc.key}: {exc} (model {card.key}, scan {record['scan_id']})",
                                 task.spec_file) from None
        segmentation = as_label_map(prediction.segmentation) if prediction.segmentation is not None else None
        reference_maps: dict[str, np.ndarray] = {}
        seconds = round(time.perf_counter() - start, 4)
        for i, marker in enumerate(task.biomarkers):
            ref = marker.reference
            reference_value = dice = None
            if ref and ref.labels:
                column = ref.segmentation or "_reference_segmentation"
                path = record.get(column) or record.get("_reference_segmentation")
                if path:
                    if path not in reference_maps:
                        reference_maps[path] = _label_map(path)
                    ref_map = reference_maps[path]
                    if not ref.column:
                        reference_value = float(np.isin(ref_map, ref.labels).sum()) * voxel_ml
                    if segmentation is not None:
                        if segmentation.shape != ref_map.shape:
                            raise SitebenchError(
                                f"biomarkers[{i}]: model {card.key} gives a segmentation of shape "
                                f"{segmentation.shape}, the reference label map is {ref_map.shape} (scan "
                                f"{record['scan_id']}); its output is not on the input grid", task.spec_file)
                        model_labels = marker.labels or [1]
                        dice = _dice(np.isin(segmentation, model_labels), np.isin(ref_map, ref.labels))
                        overlaps += _overlap_rows(marker, model_labels, ref.labels, segmentation, ref_map,
                                                  voxel_ml, spacing, record, identity)
            rows.append({"scan_id": record["scan_id"], **identity, "image_sha256": record["image_sha256"],
                         "biomarker": marker.name, "output": marker.output or marker.kind,
                         "prediction": values[marker.name], "reference": reference_value, "dice": dice,
                         "seconds": seconds, "scored_utc": utc_now()})
    return rows, overlaps


def _overlap_rows(marker: BiomarkerSpec, model_labels: list[int], reference_labels: list[int],
                  segmentation: np.ndarray, ref_map: np.ndarray, voxel_ml: float, spacing: tuple[float, ...],
                  record: dict[str, Any], identity: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-label Dice, HD95 and volume error; labels pair up by position, else the label set is one row."""
    pairs = (list(zip([[m] for m in model_labels], [[r] for r in reference_labels]))
             if len(model_labels) == len(reference_labels) else [(model_labels, reference_labels)])
    rows = []
    for mine, theirs in pairs:
        a, b = np.isin(segmentation, mine), np.isin(ref_map, theirs)
        volume, reference_volume = float(a.sum()) * voxel_ml, float(b.sum()) * voxel_ml
        label = "+".join(map(str, mine))
        rows.append({"scan_id": record["scan_id"], "model_key": identity["model_key"],
                     "files_sha256": identity["files_sha256"], "image_sha256": record["image_sha256"],
                     "biomarker": marker.name, "label": label,
                     "label_name": "+".join(marker.label_names.get(m, "") or str(m) for m in mine),
                     "dice": _dice(a, b), "hd95_mm": _hd95(a, b, spacing), "volume_ml": volume,
                     "reference_volume_ml": reference_volume, "volume_error_ml": volume - reference_volume})
    return rows


def _label_map(path: str) -> np.ndarray:
    import nibabel as nib

    try:
        return np.asarray(nib.load(path).dataobj)
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
    predictions: pd.DataFrame  # one row per scan, model version and biomarker
    predictions_path: Path
    computed: int
    reused: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    overlap: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(OVERLAP_COLUMNS)))

    @property
    def biomarkers(self) -> list[BiomarkerSpec]:
        return self.spec.declared_biomarkers

    def summary(self) -> str:
        names = ", ".join(m.name for m in self.biomarkers)
        lines = [f"benchmark '{self.spec.name}': {len(self.manifest)} scans x {len(self.models)} models "
                 f"x {len(self.biomarkers)} biomarkers ({names}); {self.computed} scored, {self.reused} reused, "
                 f"{self.seconds:.1f} s",
                 f"predictions: {self.predictions_path}"]
        for card in self.models:
            part = self.predictions[self.predictions["model_key"] == card.key]
            lines.append(f"  {card.key:<24} sha256 {card.weights_sha256[:12]}…  n={part['scan_id'].nunique()}")
        return "\n".join(lines)


_TEXT_COLUMNS = {"scan_id": str, "model_version": str, "weights_sha256": str, "files_sha256": str,
                 "image_sha256": str, "biomarker": str, "label": str, "label_name": str, "model_key": str}


def _read_existing(path: Path, columns: tuple[str, ...] = PREDICTION_COLUMNS) -> pd.DataFrame:
    """Rows already scored; a file written by an older version gets the current columns (missing ones empty)."""
    if not path.exists():
        return pd.DataFrame(columns=list(columns))
    try:
        frame = pd.read_csv(path, dtype={k: v for k, v in _TEXT_COLUMNS.items()})
    except (pd.errors.ParserError, ValueError) as exc:
        raise SitebenchError(f"cannot read earlier predictions ({exc})", path) from None
    for column in columns:
        if column not in frame:
            frame[column] = None
    return frame[list(columns)]


def _upgrade_file(path: Path, columns: tuple[str, ...]) -> None:
    """Rewrite a results file from an older version with today's header, so appended rows line up."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        header = next(csv.reader(handle), [])
    if tuple(header) != columns:
        frame = _read_existing(path, columns)
        temporary = path.with_suffix(".upgrading")
        frame.to_csv(temporary, index=False)
        os.replace(temporary, path)


def _records(manifest: Manifest, spec: BenchmarkSpec) -> list[dict[str, Any]]:
    table = manifest.with_absolute_paths()
    for column in spec.reference_columns:
        if column not in table:
            raise SitebenchError(f"reference column '{column}' is not in the manifest", manifest.source)
    segmentation_columns = {m.reference.segmentation for m in spec.declared_biomarkers
                            if m.reference and m.reference.labels and m.reference.segmentation}
    seg = spec.reference_segmentation
    for column in segmentation_columns | ({seg} if seg else set()):
        if column not in table:
            raise SitebenchError(f"reference segmentation column '{column}' is not in the manifest",
                                 manifest.source)
    if not seg and any(m.reference and m.reference.labels and not m.reference.segmentation
                       for m in spec.declared_biomarkers):
        raise SitebenchError("a biomarker's reference names labels, but the spec names no reference_segmentation "
                             "column", spec.source_path)
    records = []
    for row in table.to_dict("records"):
        record = {"scan_id": row[mf.SCAN_ID], "image": row[mf.IMAGE_PATH], "image_sha256": row[mf.IMAGE_SHA256],
                  "_reference_segmentation": row[seg] if seg else None}
        record.update({c: row[c] for c in segmentation_columns})
        records.append(record)
    return records


def subsample_scans(manifest: Manifest, subsample: Any) -> set[str]:
    """The scan ids of a seeded stratified subsample: ``n`` from each group of the ``per`` columns."""
    table = manifest.table
    missing = [c for c in subsample.per if c not in table]
    if missing:
        raise SitebenchError(f"subsample.per names column(s) not in the manifest: {', '.join(missing)}",
                             manifest.source)
    rng = np.random.default_rng(subsample.seed)
    chosen: set[str] = set()
    for _, group in table.sort_values(mf.SCAN_ID).groupby(subsample.per, sort=True, dropna=False):
        ids = group[mf.SCAN_ID].tolist()
        order = rng.permutation(len(ids))
        chosen.update(ids[i] for i in order[: subsample.n])
    return chosen


def _chunks(items: list[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_benchmark(spec: BenchmarkSpec, *, workers: int = 2, scheduler: str | None = None,
                  executor: Executor | None = None, progress: bool = True,
                  tracking_uri: str | None = None) -> BenchmarkRun:
    """Score every scan with every model version in ``spec``; resume what is already scored."""
    started = time.perf_counter()
    manifest = read_manifest(spec.manifest_path)
    biomarkers = spec.declared_biomarkers
    spec_file = str(spec.source_path or spec.base_dir / "benchmark spec")
    resolved, cards = [], []
    for i, model_spec in enumerate(spec.models):
        try:
            ref = resolve_model(model_spec.source, expected_sha256=model_spec.sha256, name=model_spec.name,
                                tracking_uri=tracking_uri)
            cards.append(load_model(ref).card)  # checks every hash before any work starts
        except SitebenchError as exc:
            raise SitebenchError(f"models[{i}].source: {exc}", spec_file) from None
        resolved.append(ref)
    for model_spec, card in zip(spec.models, cards):
        try:
            check_model_labels(spec.model_biomarkers(model_spec), card.output_labels, card.key)
        except BiomarkerError as exc:
            raise SitebenchError(f"{exc.key}: {exc}", spec_file) from None
    out_dir = spec.results_path
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions_path, overlap_path = out_dir / PREDICTIONS_FILE, out_dir / OVERLAP_FILE
    _upgrade_file(predictions_path, PREDICTION_COLUMNS)
    _upgrade_file(overlap_path, OVERLAP_COLUMNS)
    existing = _read_existing(predictions_path)
    names = [m.name for m in biomarkers]
    # a scan is done for a model when every biomarker it gives was scored from the same files and image;
    # the model key is part of the identity: two factories of one module share their files
    have: dict[tuple[str, str, str, str], set[str]] = {}
    for scan, files, key, image, marker in zip(existing["scan_id"], existing["files_sha256"], existing["model_key"],
                                               existing["image_sha256"], existing["biomarker"]):
        have.setdefault((scan, files, key, image), set()).add(marker)
    records = _records(manifest, spec)
    transform_items = _freeze_transforms(spec)
    pending: list[tuple[ChunkTask, list[dict[str, Any]]]] = []
    reused = 0
    allowed: set[tuple[str, str, str, str]] = set()  # (files_sha256, model_key, scan_id, biomarker) asked for
    for model_spec, model_ref, card in zip(spec.models, resolved, cards):
        mine = records
        if model_spec.subsample is not None:
            keep = subsample_scans(manifest, model_spec.subsample)
            mine = [r for r in records if r["scan_id"] in keep]
        model_markers = spec.model_biomarkers(model_spec)
        wanted = {m.name for m in model_markers}
        allowed.update((card.files_sha256, card.key, r["scan_id"], name) for r in mine for name in wanted)
        todo = [r for r in mine if not wanted <= have.get((r["scan_id"], card.files_sha256, card.key,
                                                             r["image_sha256"]), set())]
        reused += len(mine) - len(todo)
        task = ChunkTask(model_ref, transform_items, tuple(model_markers), spec_file)
        n_workers = max(1, workers)
        size = max(1, min(16, len(todo) // (n_workers * 4) or 1))
        pending += [(task, chunk) for chunk in _chunks(todo, size)]
    total = sum(len(chunk) for _, chunk in pending)
    computed = 0
    if total:
        own_executor = executor is None
        closer: Callable[[], None] = lambda: None
        if own_executor:
            executor, closer = make_executor(workers, scheduler)
        try:
            computed = _drain(executor, pending, predictions_path, overlap_path, total, progress,
                              window=max(2, 2 * max(1, workers)))
        finally:
            closer()
    scans = manifest.table[[mf.SCAN_ID, mf.IMAGE_SHA256]]
    predictions = _current(_read_existing(predictions_path), allowed, names, scans,
                           ["scan_id", "files_sha256", "model_key", "image_sha256", "biomarker"], PREDICTION_COLUMNS,
                           ["biomarker", "model_key", "scan_id"])
    overlap = _current(_read_existing(overlap_path, OVERLAP_COLUMNS), allowed, names, scans,
                       ["scan_id", "files_sha256", "model_key", "image_sha256", "biomarker", "label"],
                       OVERLAP_COLUMNS,
                       ["biomarker", "model_key", "label", "scan_id"])
    return BenchmarkRun(spec=spec, manifest=manifest, models=cards, resolved=resolved, predictions=predictions,
                        predictions_path=predictions_path, computed=computed, reused=reused,
                        seconds=time.perf_counter() - started, overlap=overlap)


def _current(frame: pd.DataFrame, allowed: set[tuple[str, str, str, str]], biomarkers: list[str], scans: pd.DataFrame,
             key: list[str], columns: tuple[str, ...], order: list[str]) -> pd.DataFrame:
    """The latest row per key for the models, scans and biomarkers this spec asks for, in a stable order."""
    keep = pd.Series([k in allowed for k in zip(frame["files_sha256"], frame["model_key"], frame["scan_id"],
                                                frame["biomarker"])],
                     index=frame.index, dtype=bool)
    current = (frame[keep].drop_duplicates(key, keep="last")
               .merge(scans, left_on=["scan_id", "image_sha256"], right_on=[mf.SCAN_ID, mf.IMAGE_SHA256])
               [list(columns)])
    rank = {name: i for i, name in enumerate(biomarkers)}
    current = current.assign(_rank=current["biomarker"].map(rank))
    return (current.sort_values(["_rank"] + order[1:], kind="stable").drop(columns="_rank")
            .reset_index(drop=True))


def _drain(executor: Executor, pending: list[tuple[ChunkTask, list[dict[str, Any]]]], predictions_path: Path,
           overlap_path: Path, total: int, progress: bool, window: int) -> int:
    from tqdm.auto import tqdm

    new_predictions, new_overlap = not predictions_path.exists(), not overlap_path.exists()
    computed = 0
    with open(predictions_path, "a", newline="") as handle, open(overlap_path, "a", newline="") as overlap_handle, \
            tqdm(total=total, desc="scoring scans", unit="scan", disable=not progress) as bar:
        writer = csv.DictWriter(handle, fieldnames=list(PREDICTION_COLUMNS))
        overlap_writer = csv.DictWriter(overlap_handle, fieldnames=list(OVERLAP_COLUMNS))
        if new_predictions:
            writer.writeheader()
        if new_overlap:
            overlap_writer.writeheader()
        queue = iter(pending)
        in_flight: set[Future] = set()

        def submit_next() -> None:
            for task, chunk in queue:
                in_flight.add(executor.submit(score_chunk, task, chunk))
                return

        def keep(result: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> None:
            nonlocal computed
            rows, overlaps = result
            overlap_writer.writerows(overlaps)  # overlap first: a prediction row marks the scan as done
            overlap_handle.flush()
            os.fsync(overlap_handle.fileno())
            writer.writerows(rows)
            handle.flush()
            os.fsync(handle.fileno())
            scans = len({r["scan_id"] for r in rows})
            computed += scans
            bar.update(scans)

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
