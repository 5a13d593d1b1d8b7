"""Resumable discovery jobs: one atomic ``.npz`` file per finished batch, plus the job's settings.

A discovery job processes its images in batches (batch ``i`` = images ``[i*bs, (i+1)*bs)``). After
each batch it calls :meth:`JobCheckpoint.save_batch`; an interrupted job (Ctrl-C, ``kill -9``, power
loss) is continued with ``JobCheckpoint.open(..., resume=True)``, skips :meth:`done_batches` and
finally concatenates everything with :meth:`load_all`, which gives exactly what an uninterrupted run
would have produced.

Layout of a checkpoint directory (e.g. ``dirs.h5.partial-smile``)::

    settings.json          the job's settings (JSON), compared on resume
    batch_000000.npz       arrays["arrays/<key>"] and record columns["records/<column>"]
    batch_000001.npz
    .batch_000002.npz.<hex>.tmp   a batch being written (or left by a killed job): never read

Every file is written to a temporary name, fsynced and renamed with ``os.replace`` (then the
directory is fsynced), so a batch file either exists complete or not at all. Files are plain numpy
``.npz`` archives read with ``allow_pickle=False``; string record columns are stored as fixed-width
unicode arrays (``np.str_``). Nothing here imports h5py.

A job is expected to hold the direction store's lock (:meth:`DirectionStore.lock`) throughout, so
that one checkpoint directory belongs to one job at a time; several processes (ranks) of that job
may share it, each saving its own batch indices. Temporary files are therefore never deleted
while the job runs, only by :meth:`JobCheckpoint.remove`.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["JobCheckpoint", "normalize_records", "normalize_settings"]

SETTINGS_FILE = "settings.json"
_ARRAY_PREFIX = "arrays/"
_RECORD_PREFIX = "records/"
_BATCH_RE = re.compile(r"^batch_(\d{6,})\.npz$")
_TEMP_RE = re.compile(r"^\.(batch_\d{6,}\.npz|settings\.json)\.[0-9a-f]{8}\.tmp$")
_MAX_VALUE_CHARS = 40
"""How much of a differing setting's value a resume error quotes."""
_ABSENT = object()

Records = dict[str, np.ndarray]


def normalize_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``settings`` as it reads back from strict JSON.

    Tuples become lists, numpy scalars and arrays become Python numbers and lists, keys become
    str, and NaN / infinity become ``None`` (strict JSON has no such numbers; a NaN statistic
    in the provenance must not abort a finished job).

    Args:
        settings: a mapping of JSON-representable values (str, int, float, bool, None, lists,
            tuples, dicts, numpy scalars and arrays).

    Raises:
        TypeError: ``settings`` is not a mapping or holds a value JSON cannot represent.
    """
    if not isinstance(settings, Mapping):
        raise TypeError(f"settings must be a dict, got {type(settings).__name__}")
    try:
        text = json.dumps(_finite_json(dict(settings)), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"settings must be JSON-serializable: {exc}; convert such values to "
                        "str, int, float, bool, list or dict") from exc
    return json.loads(text)


def _finite_json(value: Any) -> Any:
    """``value`` with numpy converted to Python and non-finite floats replaced by None."""
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(item) for item in value]
    return value


def normalize_records(records: Mapping[str, Any], argument: str = "records") -> Records:
    """Check per-image record columns and return them as 1-D numpy arrays of equal length.

    Args:
        records: column name -> 1-D numpy array (int, uint, float or bool dtype, or unicode
            strings) or a list of str / numbers. Column names are non-empty, without ``/``.
        argument: the argument name that error messages quote.

    Returns:
        A new dict in the same column order; string columns become ``np.str_`` arrays.

    Raises:
        TypeError: a column has an unsupported type (bytes, objects, complex, mixed str/numbers).
        ValueError: a column is not 1-D, a name is invalid, or the columns differ in length.
    """
    if not isinstance(records, Mapping):
        raise TypeError(f"{argument} must be a dict of columns, got {type(records).__name__}")
    out: Records = {}
    for column, values in records.items():
        if not isinstance(column, str) or not column or "/" in column or column == ".":
            raise ValueError(f"{argument} column names must be non-empty str without '/', "
                             f"got {column!r}")
        out[column] = _record_column(values, f"{argument}[{column!r}]")
    lengths = {column: len(values) for column, values in out.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{argument} columns must have equal length, got {lengths}")
    return out


def _record_column(values: Any, where: str) -> np.ndarray:
    if isinstance(values, (list, tuple)):
        n_str = sum(isinstance(v, str) for v in values)
        if 0 < n_str < len(values):
            raise TypeError(f"{where} mixes str and non-str values; use one type per column")
        array = np.array(values, dtype=np.str_) if n_str else np.asarray(values)
    elif isinstance(values, np.ndarray):
        array = values
    else:
        raise TypeError(f"{where} must be a 1-D numpy array or a list, got {type(values).__name__}")
    if array.dtype.kind == "O" and all(isinstance(v, str) for v in array.ravel()):
        array = array.astype(np.str_)
    if array.dtype.kind not in "iufbU":
        raise TypeError(f"{where} has dtype {array.dtype}; expected int, float, bool or str "
                        "(decode bytes to str first)")
    if array.ndim != 1:
        raise ValueError(f"{where} must be 1-D, got shape {array.shape}")
    return array


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """Write ``path`` via ``write(file_object)`` to a temp name, fsync, rename, fsync the dir."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _settings_diff(stored: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-normalized dicts, with both values."""
    diffs = []
    for key in sorted(set(stored) | set(current), key=str):
        name = f"{prefix}{key}"
        old, new = stored.get(key, _ABSENT), current.get(key, _ABSENT)
        if isinstance(old, dict) and isinstance(new, dict):
            diffs += _settings_diff(old, new, prefix=f"{name}.")
        elif old != new:
            diffs.append(f"{name} (stored {_short(old)}, now {_short(new)})")
    return diffs


def _short(value: Any) -> str:
    text = "<absent>" if value is _ABSENT else json.dumps(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


class JobCheckpoint:
    """Finished batches of one discovery job, kept on disk until the final store write.

    Use :meth:`open` (which checks for an unfinished job and compares settings); the constructor
    itself touches nothing on disk.

    Args:
        directory: the checkpoint directory, e.g. ``"<store>.partial-<name>"``.
        settings: every setting that determines the job's result (JSON-serializable).
    """

    def __init__(self, directory: str | os.PathLike, settings: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.settings = normalize_settings(settings)

    @classmethod
    def open(cls, directory: str | os.PathLike, settings: Mapping[str, Any], *,
             resume: bool) -> JobCheckpoint:
        """Open (and create) a job checkpoint, refusing to silently mix or discard work.

        With ``resume=True`` and no checkpoint on disk, a fresh one is started. Temporary files
        of a killed job are ignored here and deleted by :meth:`remove` (deleting them here could
        hit another process's half-written batch: several ranks may share one directory).

        Raises:
            ValueError: ``resume=False`` but finished batches exist; ``resume=True`` but the stored
                settings differ from ``settings`` (the message names the differing keys); or the
                directory has batches without ``settings.json``.
        """
        checkpoint = cls(directory, settings)
        where = checkpoint.directory
        if where.exists() and not where.is_dir():
            raise ValueError(f"checkpoint path {where} exists and is not a directory; "
                             "remove it or choose another store/direction name")
        done = checkpoint.done_batches()
        if done and not resume:
            raise ValueError(f"an unfinished job exists at {where}; pass --resume to continue it "
                             f"or delete {where}")
        stored_path = where / SETTINGS_FILE
        if resume and done:
            if not stored_path.is_file():
                raise ValueError(f"checkpoint {where} has batches but no {SETTINGS_FILE}; "
                                 f"delete {where} to start over")
            stored = json.loads(stored_path.read_text(encoding="utf-8"))
            diffs = _settings_diff(stored, checkpoint.settings)
            if diffs:
                raise ValueError(f"settings differ from the unfinished job at {where} in: "
                                 f"{'; '.join(diffs)}; resume with the original settings or "
                                 f"delete {where} to start over")
        else:
            checkpoint._write_settings()
        return checkpoint

    def done_batches(self) -> list[int]:
        """Indices of the completely written batches, ascending (temporary files are ignored)."""
        if not self.directory.is_dir():
            return []
        found = (_BATCH_RE.match(name) for name in os.listdir(self.directory))
        return sorted(int(match.group(1)) for match in found if match)

    def save_batch(self, index: int, arrays: Mapping[str, np.ndarray],
                   records: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], Records]:
        """Atomically store batch ``index`` (replacing an earlier copy of the same batch).

        Returns what :meth:`load_batch` will read back (arrays as numpy arrays, string record columns
        as ``np.str_`` arrays), so a caller that keeps it need not reload the file.

        Args:
            index: batch number >= 0 (batch i covers images [i*bs, (i+1)*bs)).
            arrays: name -> array with a leading per-image axis, e.g. ``"offsets"``:
                (B, n_steps, C, H, W); any non-object dtype.
            records: per-image record columns (see :func:`normalize_records`).

        Raises:
            TypeError / ValueError: invalid index, arrays or records.
        """
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"index must be an int >= 0, got {index!r}")
        payload = {_ARRAY_PREFIX + key: value for key, value in self._check_arrays(arrays).items()}
        columns = normalize_records(records)
        payload |= {_RECORD_PREFIX + key: value for key, value in columns.items()}
        if not self.directory.is_dir() or not (self.directory / SETTINGS_FILE).is_file():
            self._write_settings()
        _atomic_write(self._batch_path(index), lambda handle: np.savez(handle, **payload))
        return {key[len(_ARRAY_PREFIX):]: payload[key] for key in payload if key.startswith(_ARRAY_PREFIX)}, columns

    def load_batch(self, index: int) -> tuple[dict[str, np.ndarray], Records]:
        """Arrays and record columns of one finished batch (string columns as ``np.str_`` arrays).

        Raises:
            ValueError: the batch is not finished, or its file is unreadable.
        """
        path = self._batch_path(index)
        if not path.is_file():
            raise ValueError(f"batch {index} is not in checkpoint {self.directory} "
                             f"(finished: {self.done_batches()})")
        arrays: dict[str, np.ndarray] = {}
        records: Records = {}
        try:
            with np.load(path, allow_pickle=False) as archive:
                for key in archive.files:
                    if key.startswith(_ARRAY_PREFIX):
                        arrays[key[len(_ARRAY_PREFIX):]] = archive[key]
                    elif key.startswith(_RECORD_PREFIX):
                        records[key[len(_RECORD_PREFIX):]] = archive[key]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"batch file {path} is unreadable ({exc}); delete it to recompute "
                             "that batch") from exc
        return arrays, records

    def drop_batch(self, index: int) -> None:
        """Delete one finished batch (a job that keeps only its latest state; no error if absent)."""
        self._batch_path(index).unlink(missing_ok=True)

    def load_all(self) -> tuple[dict[str, np.ndarray], Records]:
        """All finished batches concatenated along axis 0 in batch order.

        Returns empty dicts when no batch is finished.

        Raises:
            ValueError: batches disagree on their array keys or record columns.
        """
        loaded = [self.load_batch(index) for index in self.done_batches()]
        if not loaded:
            return {}, {}
        return (_concatenate([arrays for arrays, _ in loaded], "arrays"),
                _concatenate([records for _, records in loaded], "record columns"))

    def remove(self) -> None:
        """Delete the checkpoint's files and, if then empty, its directory (after the final write).

        Removes finished batches, settings.json and temporary files left by killed writers; files
        that are not the checkpoint's are left alone, and so is the directory holding them.
        """
        if not self.directory.is_dir():
            return
        for name in os.listdir(self.directory):
            if name == SETTINGS_FILE or _BATCH_RE.match(name) or _TEMP_RE.match(name):
                (self.directory / name).unlink(missing_ok=True)
        if not os.listdir(self.directory):
            self.directory.rmdir()

    def _batch_path(self, index: int) -> Path:
        return self.directory / f"batch_{index:06d}.npz"

    def _write_settings(self) -> None:
        """Write settings.json unless it already holds these settings (other ranks may read it)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / SETTINGS_FILE
        if path.is_file() and json.loads(path.read_text(encoding="utf-8")) == self.settings:
            return
        text = json.dumps(self.settings, indent=1, sort_keys=True).encode("utf-8")
        _atomic_write(path, lambda handle: handle.write(text))

    @staticmethod
    def _check_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(arrays, Mapping):
            raise TypeError(f"arrays must be a dict of numpy arrays, got {type(arrays).__name__}")
        out = {}
        for key, value in arrays.items():
            if not isinstance(key, str) or not key or "/" in key:
                raise ValueError(f"arrays keys must be non-empty str without '/', got {key!r}")
            array = np.asarray(value)
            if array.dtype.kind == "O" or array.ndim < 1:
                raise ValueError(f"arrays[{key!r}] must have a leading per-image axis and a "
                                 f"non-object dtype, got shape {array.shape} dtype {array.dtype}")
            out[key] = array
        return out


def _concatenate(parts: Sequence[dict[str, np.ndarray]], what: str) -> dict[str, np.ndarray]:
    keys = list(parts[0])
    for part in parts[1:]:
        if list(part) != keys:
            raise ValueError(f"checkpoint batches disagree on their {what}: {keys} vs {list(part)}")
    return {key: np.concatenate([part[key] for part in parts], axis=0) for key in keys}
