"""Where a task's rows come from, checked cheaply and then read, all by ``datasets``:

- data files: ``a.csv`` or a list of files of one format (csv, tsv, json, jsonl, parquet, txt);
- a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (then a split);
- a dataset as ``load_dataset`` takes it: ``{path: org/name, name: config, split: validation}``,
  where ``path`` is a Hub id (``org/name@revision`` for a branch, tag or commit, as for models)
  or a local dataset repository folder (data files, optionally a README with ``configs``).

Offline (``HF_HUB_OFFLINE``), a Hub dataset is read from its snapshot in the hub cache (put
there once by ``hf download ID --repo-type dataset``), as a local dataset repository folder.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from datasets import Dataset, DatasetDict, config, load_dataset, load_dataset_builder, load_from_disk

from .hub import hub_offline, is_hub_id, snapshot, split_revision

FILE_FORMATS: dict[str, tuple[str, dict[str, str]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),  # one row per line, in the field ``text``
}


@dataclass(frozen=True)
class DatasetSource:
    """A dataset where a task's files would go, named as ``load_dataset`` takes it."""

    path: str
    """A Hub dataset id (``org/name``, ``org/name@revision``), a local dataset repository
    folder, or a folder written by ``save_to_disk``."""
    name: str | None = None
    """The dataset's configuration (``load_dataset``'s ``name``), e.g. ``sst2`` of ``nyu-mll/glue``."""
    split: str | None = None
    """Which split to read (``train``, ``validation``, ``test[:200]``...); needed unless the
    folder holds a single saved ``Dataset``."""

    def describe(self) -> str:
        named = f", name {self.name!r}" if self.name else ""
        return f"dataset {self.path!r}{named}" + (f", split {self.split!r}" if self.split else "")


Files = str | list[str] | Mapping[str, str | None] | DatasetSource


def as_source(task: str, files: Files, source: str) -> list[Path] | DatasetSource:
    """Data files as paths, or a dataset (a mapping, or one folder)."""
    if isinstance(files, DatasetSource):
        return files
    if isinstance(files, Mapping):
        keys = {f.name for f in fields(DatasetSource)}
        unknown = sorted(set(files) - keys)
        if unknown or "path" not in files:
            raise ValueError(
                f"task {task!r}: {source} {dict(files)} is not a dataset: give path (and optionally name, "
                f"split); {'unknown key ' + repr(unknown[0]) if unknown else 'path is missing'}"
            )
        return DatasetSource(**files)
    names = [files] if isinstance(files, str) else list(files)
    if not names:
        raise ValueError(f"task {task!r}: {source} is an empty list; give at least one file")
    paths = [Path(f).expanduser() for f in names]
    if len(paths) == 1 and paths[0].is_dir():
        return DatasetSource(path=names[0])
    return paths


def is_saved_dataset(folder: Path) -> bool:
    """A folder ``save_to_disk`` wrote (the marker files ``load_from_disk`` looks for)."""
    markers = (config.DATASET_INFO_FILENAME, config.DATASET_STATE_JSON_FILENAME)
    single = all((folder / f).is_file() for f in markers)
    return single or (folder / config.DATASETDICT_JSON_FILENAME).is_file()


def peek_columns(path: Path) -> list[str] | None:
    """The columns of a data file from its first row or header, without reading the rest
    (None where that is not cheap: a JSON array, say)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if suffix == ".txt":
            return ["text"]
        with path.open(encoding="utf-8", newline="") as handle:
            if suffix in (".csv", ".tsv"):
                return next(csv.reader(handle, delimiter="\t" if suffix == ".tsv" else ","), None)
            for line in handle:
                if line.strip():
                    row = json.loads(line)
                    return list(row) if isinstance(row, dict) else None
    except (ValueError, OSError, UnicodeDecodeError):
        return None  # reading reports a malformed file properly
    return None


def check_paths(task: str, paths: list[Path], source: str) -> list[list[str] | None]:
    """Existence, format and emptiness of data files; their columns where cheap to see."""
    for path in paths:
        if path.is_dir():
            raise ValueError(
                f"task {task!r}: {str(path)!r} ({source}) is a folder in a list of files; give a saved "
                "or repository dataset folder alone, as {path: FOLDER, split: ...}"
            )
        if not path.is_file():
            hint = (
                f"; a Hub dataset is given as {{path: {path}, split: train}}"
                if is_hub_id(str(path)) and path.suffix.lower() not in FILE_FORMATS
                else ""
            )
            raise FileNotFoundError(f"task {task!r}: data file {str(path)!r} ({source}) does not exist{hint}")
        if path.suffix.lower() not in FILE_FORMATS:
            raise ValueError(
                f"task {task!r}: data file {str(path)!r} ({source}) must be one of {', '.join(FILE_FORMATS)}"
            )
    if len({p.suffix.lower() for p in paths}) != 1:
        raise ValueError(
            f"task {task!r}: data files {[str(p) for p in paths]} ({source}) mix formats; give files of one"
        )
    empty = [str(p) for p in paths if p.stat().st_size < 4096 and not p.read_bytes().strip()]
    if empty:
        raise ValueError(f"task {task!r}: {empty} ({source}) hold no rows (the file is empty)")
    return [peek_columns(p) for p in paths]


def read_paths(task: str, paths: list[Path]) -> Dataset:
    builder, options = FILE_FORMATS[paths[0].suffix.lower()]
    try:
        return load_dataset(builder, data_files=[str(p) for p in paths], split="train", **options)
    except Exception as err:  # datasets raises many kinds for a malformed file
        raise ValueError(
            f"task {task!r}: cannot read {[str(p) for p in paths]} as {builder} ({type(err).__name__}: {err})"
        ) from err


@dataclass
class OpenedDataset:
    """A dataset source located and looked at (splits, columns) without reading its rows."""

    spec: DatasetSource
    columns: list[str] | None
    saved: Dataset | None = None  # a save_to_disk folder, memory-mapped (reading it is free)
    path: str | None = None  # what load_dataset takes: a local folder or a Hub id
    revision: str | None = None

    def read(self, task: str, source: str) -> Dataset:
        if self.saved is not None:
            return self.saved
        try:
            return load_dataset(self.path, self.spec.name, split=self.spec.split, revision=self.revision)
        except Exception as err:  # datasets raises many kinds for a bad split or file
            raise ValueError(
                f"task {task!r}: cannot read {self.spec.describe()} ({source}) ({type(err).__name__}: {err})"
            ) from err


def open_dataset(task: str, spec: DatasetSource, source: str) -> OpenedDataset:
    """Find the dataset and its splits and columns from its metadata; the error names the task,
    the dataset and what to do."""
    where = f"{spec.describe()} ({source})"
    folder = Path(spec.path).expanduser()
    if folder.is_dir() and is_saved_dataset(folder):
        return _open_saved(task, spec, where, load_from_disk(str(folder)))
    path, revision = _dataset_path(task, spec, source, folder)
    try:
        builder = load_dataset_builder(path, spec.name, revision=revision)
    except Exception as err:  # datasets raises many kinds for an unknown dataset or config
        raise ValueError(f"task {task!r}: cannot open {where} ({type(err).__name__}: {err})") from err
    splits = list(builder.info.splits or {}) or list(builder.config.data_files or {})
    if spec.split is None:
        raise ValueError(f"task {task!r}: {where} needs a split; splits there: {splits}")
    base_split = spec.split.split("[")[0]  # "train[:100]" slices the split "train"
    if splits and base_split not in splits:
        raise ValueError(f"task {task!r}: {where}: no split {base_split!r}; splits there: {splits}")
    columns = list(builder.info.features) if builder.info.features else None
    return OpenedDataset(spec, columns, path=path, revision=revision)


def _dataset_path(task: str, spec: DatasetSource, source: str, folder: Path) -> tuple[str, str | None]:
    """(path for load_dataset, revision): a local folder; a Hub id online; offline, the id's
    snapshot in the hub cache (datasets reads HF_HUB_OFFLINE once, at import, and offline knows
    only its own cache of earlier loads)."""
    if folder.is_dir():
        return str(folder), None
    if not is_hub_id(spec.path):
        raise FileNotFoundError(
            f"task {task!r}: {source} {spec.path!r} is neither a data file, a folder nor a Hub dataset id"
        )
    if hub_offline():
        return str(snapshot(spec.path, f"task {task!r} ({source})", "dataset")), None
    return split_revision(spec.path)


def _open_saved(task: str, spec: DatasetSource, where: str, loaded: Dataset | DatasetDict) -> OpenedDataset:
    if isinstance(loaded, DatasetDict):
        if spec.split is None or spec.split not in loaded:
            said = "needs a split" if spec.split is None else f"has no split {spec.split!r}"
            raise ValueError(f"task {task!r}: {where} {said}; splits there: {list(loaded)}")
        rows = loaded[spec.split]
    elif spec.split is not None:
        raise ValueError(f"task {task!r}: {where} is a single saved Dataset, without splits; leave split out")
    else:
        rows = loaded
    return OpenedDataset(spec, rows.column_names, saved=rows)
