"""The HDF5 direction store: semantic directions in a self-describing file readable with h5py alone.

File contract (format ``flowgrad-directions``, ``format_version`` 1; the README documents it)::

    /                           attrs: format="flowgrad-directions", format_version=1
    /directions/<name>          attrs: prompt, negative_prompt, method, n_images, n_steps,
                                       scale, model_fingerprint, created_at, flowgrad_version,
                                       settings (JSON), split_half_cosine, image_shape (C,H,W),
                                       time_window (t_start, t_end), eps, model, clip
    /directions/<name>/vector   float32 (n_steps, C, H, W): additive control per Euler step
    /directions/<name>/records  group, attr columns=[...]: one 1-D dataset per column (a table)
    /directions/<name>/offsets  optional float32 (n_rows, n_steps, C, H, W), gzip, 1 image/chunk

Every write rewrites the whole file under a temporary name in the same directory (unchanged
directions are copied with ``h5py``'s ``copy``, which keeps their compression), fsyncs it and
renames it over the store with ``os.replace``: a reader sees the old file or the new one, never a
mix, and a writer killed at any point leaves the old file intact. Writers take an advisory
``flock`` on the sidecar ``<file>.lock`` and refuse to run while another process holds it.

This is the only module of flowgrad that imports h5py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .checkpoint import normalize_records, normalize_settings

__all__ = ["Direction", "DirectionStore", "FORMAT", "FORMAT_VERSION", "StoreError", "check_name",
           "StoreLockedError"]

FORMAT = "flowgrad-directions"
"""Value of the root attribute ``format``."""
FORMAT_VERSION = 1
"""Value of the root attribute ``format_version`` written (and the newest one read) by this code."""
OFFSETS_GZIP_LEVEL = 4
"""gzip level of the optional per-image ``offsets`` dataset (1 = fastest, 9 = smallest)."""

_GROUP = "directions"
_STR = h5py.string_dtype("utf-8")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TEMP_HEX = 8
_MAX_REASON_CHARS = 160
"""How much of an h5py error message a StoreError quotes."""
_STR_ATTRS = ("prompt", "negative_prompt", "method", "model_fingerprint", "model", "clip",
              "created_at", "flowgrad_version")
_REQUIRED_ATTRS = ("prompt", "negative_prompt", "method", "n_images", "n_steps", "scale",
                   "model_fingerprint", "created_at", "flowgrad_version", "settings",
                   "split_half_cosine", "image_shape", "time_window", "eps", "model", "clip")


class StoreError(ValueError):
    """A direction store cannot be read or written; the message is one line and names the file."""


class StoreLockedError(StoreError):
    """Another writer holds the store (its ``.lock`` file or HDF5's own file lock)."""


@dataclass(frozen=True, eq=False)
class Direction:
    """One semantic direction: a per-step additive control plus its provenance.

    Fields are validated (and arrays converted to float32, records to 1-D numpy columns) on
    construction. ``eq=False``: directions compare by identity (their arrays have no single truth
    value); compare fields explicitly.

    Attributes:
        name: the direction's name in the store (non-empty, no ``/``).
        vector: (n_steps, C, H, W) float32 control added at each Euler step at strength 1.
        scale: ``||vector||_2`` over all elements, the direction's natural scale (> 0).
        prompt: the attribute prompt the images were optimized towards.
        negative_prompt: the prompt optimized away from ("" if none).
        method: the aggregator that combined the per-image controls (e.g. "mean", "pca").
        n_images: number of images that contributed.
        model_fingerprint: sha256 hex of the velocity network's weights ("" if unknown).
        model: the model spec it was discovered with.
        clip: the CLIP spec of the guidance loss.
        time_window: (t_start, t_end) in [0, 1] where the control applies.
        eps: the Euler grid's start time.
        settings: every setting that produced the direction (JSON-normalized: tuples -> lists,
            NaN/inf -> None; see :func:`~directions.checkpoint.normalize_settings`).
        split_half_cosine: cosine between directions aggregated from two halves of the images
            (NaN if not computed).
        created_at: ISO 8601 UTC time; filled on write when empty.
        flowgrad_version: package version; filled on write when empty.
        records: per-image table, column -> 1-D array (strings as ``np.str_`` arrays).
        offsets: optional (n, n_steps, C, H, W) float32 raw per-image controls.
    """

    name: str
    vector: np.ndarray
    scale: float
    prompt: str
    negative_prompt: str = ""
    method: str = "mean"
    n_images: int = 0
    model_fingerprint: str = ""
    model: str = ""
    clip: str = ""
    time_window: tuple[float, float] = (0.0, 1.0)
    eps: float = 1e-3
    settings: dict = field(default_factory=dict)
    split_half_cosine: float = float("nan")
    created_at: str = ""
    flowgrad_version: str = ""
    records: dict[str, np.ndarray | list] = field(default_factory=dict)
    offsets: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        vector = _float32(self.vector, "vector")
        if vector.ndim != 4:
            raise ValueError(f"vector must be 4-D (n_steps, C, H, W), got shape {vector.shape}")
        _check_finite(vector)
        set_ = functools.partial(object.__setattr__, self)  # frozen: normalize fields in place
        set_("vector", vector)
        set_("scale", _real(self.scale, "scale"))
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {self.scale}; use "
                             "Direction.from_vector to compute it as ||vector||_2")
        for key in _STR_ATTRS:
            if not isinstance(getattr(self, key), str):
                raise TypeError(f"{key} must be a str, got {type(getattr(self, key)).__name__}")
        if not self.method:
            raise ValueError("method must name the aggregator (e.g. 'mean'), got ''")
        if self.model_fingerprint and not _SHA256_RE.match(self.model_fingerprint):
            raise ValueError(f"model_fingerprint must be a lowercase sha256 hex digest (64 chars) "
                             f"or '', got {self.model_fingerprint!r}")
        if isinstance(self.n_images, bool) or not isinstance(self.n_images, (int, np.integer)) \
                or self.n_images < 0:
            raise ValueError(f"n_images must be an int >= 0, got {self.n_images!r}")
        set_("n_images", int(self.n_images))
        set_("time_window", _time_window(self.time_window))
        set_("eps", _real(self.eps, "eps"))
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {self.eps}")
        set_("settings", normalize_settings(self.settings))
        set_("split_half_cosine", _real(self.split_half_cosine, "split_half_cosine"))
        if math.isinf(self.split_half_cosine):
            raise ValueError("split_half_cosine must be finite or NaN, got inf")
        set_("records", normalize_records(self.records))
        if self.offsets is not None:
            offsets = _float32(self.offsets, "offsets")
            if offsets.ndim != 5 or offsets.shape[1:] != vector.shape or offsets.shape[0] < 1:
                raise ValueError(f"offsets must have shape (n >= 1, *vector.shape) = "
                                 f"(n, {', '.join(map(str, vector.shape))}), got {offsets.shape}; "
                                 "pass offsets=None to store none")
            set_("offsets", offsets)

    @classmethod
    def from_vector(cls, name: str, vector: np.ndarray, prompt: str, **fields: Any) -> Direction:
        """A direction whose ``scale`` is ``||vector||_2`` (the natural scale).

        Args:
            name, prompt, **fields: as for the constructor.
            vector: (n_steps, C, H, W) float control per step at strength 1.
        """
        as_stored = np.asarray(vector, dtype=np.float32)
        scale = float(np.linalg.norm(as_stored.astype(np.float64).ravel()))
        return cls(name=name, vector=vector, scale=scale, prompt=prompt, **fields)

    @property
    def n_steps(self) -> int:
        """Number of Euler steps the vector covers."""
        return int(self.vector.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one step's control."""
        c, h, w = self.vector.shape[1:]
        return int(c), int(h), int(w)

    @property
    def unit(self) -> np.ndarray:
        """(n_steps, C, H, W) float32 ``vector / scale``: unit L2 norm over all elements."""
        return (self.vector / np.float32(self.scale)).astype(np.float32)


def check_name(name: Any) -> None:
    """Refuse a direction name the store cannot hold (empty, ``"."``, containing ``/`` or NUL)."""
    if not isinstance(name, str) or not name or "/" in name or name == "." or "\0" in name:
        raise ValueError(f"name must be a non-empty str without '/' (a direction name such as "
                         f"'smile'), got {name!r}")


def _float32(array: Any, argument: str) -> np.ndarray:
    values = np.asarray(array)
    if values.dtype.kind != "f":
        raise TypeError(f"{argument} must be a floating-point array, got dtype {values.dtype}")
    return np.ascontiguousarray(values, dtype=np.float32)


def _check_finite(vector: np.ndarray) -> None:
    bad = int(vector.size - np.count_nonzero(np.isfinite(vector)))
    if bad:
        raise ValueError(f"vector must be finite, got {bad} NaN/inf entries (in float32); "
                         "drop the failed images before aggregating")


def _real(value: Any, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{argument} must be a real number, got {value!r}")
    return float(value)


def _time_window(window: Any) -> tuple[float, float]:
    try:
        start, end = (_real(t, "time_window") for t in window)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"time_window must be a pair (t_start, t_end) of floats, got {window!r}") \
            from exc
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"time_window must satisfy 0 <= t_start < t_end <= 1, got {window!r}")
    return start, end


def _package_version() -> str:
    from flowgrad import __version__  # lazy: flowgrad pulls in torch, which reading never needs

    return __version__


def _stamped(direction: Direction) -> Direction:
    """``direction`` with an empty created_at / flowgrad_version filled in."""
    return dataclasses.replace(
        direction,
        created_at=direction.created_at
        or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        flowgrad_version=direction.flowgrad_version or _package_version(),
    )


# --- locking -------------------------------------------------------------------------------------

@dataclass
class _HeldLock:
    fd: int
    thread: int
    depth: int


_HELD: dict[tuple[int, str], _HeldLock] = {}
_HELD_GUARD = threading.Lock()


def _locked_message(path: Path, detail: str) -> str:
    return (f"direction store {path} is locked by another writer ({detail}); wait for that "
            "job to finish and retry")


def _acquire_flock(path: Path, lock_path: Path) -> int:
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise StoreError(f"cannot create lock file {lock_path} for {path}: {exc.strerror}; "
                         "check that the directory exists and is writable") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreLockedError(_locked_message(path, f"pid {holder} holds {lock_path}")) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# --- HDF5 helpers --------------------------------------------------------------------------------

def _short_reason(exc: BaseException) -> str:
    raw = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError quotes str()
    text = " ".join(str(raw).split())
    inner = re.match(r"^(?:Unable to|Can't) [^()]*\((.*)\)$", text)  # h5py: "Unable to ... (why)"
    reason = (inner.group(1) if inner else text) or type(exc).__name__
    return reason if len(reason) <= _MAX_REASON_CHARS else reason[: _MAX_REASON_CHARS - 3] + "..."


def _is_lock_error(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) == 11 or "unable to lock file" in str(exc).lower()


def _attr(group: h5py.Group, key: str) -> Any:
    value = group.attrs[key]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind == "O":
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in value.ravel()])
    return value


def _attr_str(group: h5py.Group, key: str, where: str) -> str:
    value = _attr(group, key)
    if not isinstance(value, str):
        raise StoreError(f"{where}: attribute {key!r} must be a string, got {value!r}")
    return value


def _attr_number(group: h5py.Group, key: str, where: str, kind: type) -> Any:
    value = _attr(group, key)
    if isinstance(value, np.ndarray) and value.shape in ((), (1,)):
        value = value.reshape(()).item()
    ok = (np.integer, int) if kind is int else (np.integer, np.floating, int, float)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, ok):
        expected = "an int" if kind is int else "a float"
        raise StoreError(f"{where}: attribute {key!r} must be {expected}, got {value!r}")
    return kind(value)


def _attr_vector(group: h5py.Group, key: str, where: str, length: int) -> np.ndarray:
    value = np.asarray(_attr(group, key))
    if value.shape != (length,) or value.dtype.kind not in "iuf":
        raise StoreError(f"{where}: attribute {key!r} must be {length} numbers, got {value!r}")
    return value


def _write_direction(parent: h5py.Group, direction: Direction) -> None:
    group = parent.create_group(direction.name)
    group.create_dataset("vector", data=direction.vector)
    attrs = group.attrs
    for key in _STR_ATTRS:
        attrs.create(key, getattr(direction, key), dtype=_STR)
    attrs.create("settings", json.dumps(direction.settings), dtype=_STR)
    attrs["n_images"] = np.int64(direction.n_images)
    attrs["n_steps"] = np.int64(direction.n_steps)
    attrs["scale"] = np.float64(direction.scale)
    attrs["split_half_cosine"] = np.float64(direction.split_half_cosine)
    attrs["eps"] = np.float64(direction.eps)
    attrs["image_shape"] = np.array(direction.image_shape, dtype=np.int64)
    attrs["time_window"] = np.array(direction.time_window, dtype=np.float64)
    table = group.create_group("records")
    table.attrs["columns"] = np.array(list(direction.records), dtype=_STR)
    for column, values in direction.records.items():
        if values.dtype.kind == "U":
            table.create_dataset(column, data=values.astype(object), dtype=_STR)
        else:
            table.create_dataset(column, data=values)
    if direction.offsets is not None:
        group.create_dataset("offsets", data=direction.offsets,
                             chunks=(1, *direction.vector.shape), compression="gzip",
                             compression_opts=OFFSETS_GZIP_LEVEL)


def _read_records(group: h5py.Group, where: str) -> dict[str, np.ndarray]:
    if "records" not in group:
        return {}
    table = group["records"]
    if not isinstance(table, h5py.Group) or "columns" not in table.attrs:
        raise StoreError(f"{where}: 'records' must be a group with a 'columns' attribute")
    columns = [str(c) for c in np.atleast_1d(_attr(table, "columns"))]
    records = {}
    for column in columns:
        dataset = table.get(column)
        if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 1:
            raise StoreError(f"{where}: records column {column!r} is missing or not 1-D")
        if h5py.check_string_dtype(dataset.dtype):
            records[column] = np.array(dataset.asstr()[()], dtype=np.str_).reshape(-1)
        else:
            records[column] = dataset[()]
    return records


def _read_direction(group: h5py.Group, name: str, where: str, *, offsets: bool) -> Direction:
    missing = [key for key in _REQUIRED_ATTRS if key not in group.attrs]
    if missing:
        raise StoreError(f"{where}: missing required attribute(s) {', '.join(missing)}; the "
                         "direction was not written by flowgrad's DirectionStore")
    dataset = group.get("vector")
    if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 4:
        raise StoreError(f"{where}: dataset 'vector' is missing or not 4-D (n_steps, C, H, W)")
    n_steps = _attr_number(group, "n_steps", where, int)
    image_shape = tuple(int(v) for v in _attr_vector(group, "image_shape", where, 3))
    if (n_steps, *image_shape) != dataset.shape:  # checked before reading: shapes may be corrupt
        raise StoreError(f"{where}: attributes n_steps={n_steps}, image_shape={image_shape} "
                         f"disagree with vector shape {dataset.shape}")
    vector = dataset[()]
    raw_offsets = None
    if offsets and "offsets" in group:
        stored = group["offsets"]
        if not isinstance(stored, h5py.Dataset) or stored.shape[1:] != dataset.shape:
            raise StoreError(f"{where}: dataset 'offsets' must have shape (n, *vector.shape)")
        raw_offsets = stored[()]
    try:
        settings = json.loads(_attr_str(group, "settings", where))
    except json.JSONDecodeError as exc:
        raise StoreError(f"{where}: attribute 'settings' is not valid JSON ({exc})") from exc
    try:
        return Direction(
            name=name, vector=vector, scale=_attr_number(group, "scale", where, float),
            **{key: _attr_str(group, key, where) for key in _STR_ATTRS},
            n_images=_attr_number(group, "n_images", where, int),
            time_window=tuple(_attr_vector(group, "time_window", where, 2)),
            eps=_attr_number(group, "eps", where, float),
            settings=settings,
            split_half_cosine=_attr_number(group, "split_half_cosine", where, float),
            records=_read_records(group, where),
            offsets=raw_offsets,
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, StoreError):
            raise
        raise StoreError(f"{where}: invalid direction ({exc})") from exc


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the store -----------------------------------------------------------------------------------

class DirectionStore:
    """A file of named directions (see the module docstring for the layout).

    Reading needs no lock (writes replace the file atomically). :meth:`write` and :meth:`delete`
    take the writer lock; a job can hold it throughout with ``with store.lock(): ...`` (re-entrant
    in the same thread).

    Args:
        path: the ``.h5`` file; it need not exist until the first write.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"DirectionStore({str(self.path)!r})"

    @property
    def _target(self) -> Path:
        """The file writes replace: the store path with symbolic links resolved (a store reached through a
        link is updated where it lives, and every link to it shares one lock)."""
        return Path(os.path.realpath(self.path))

    @property
    def lock_path(self) -> Path:
        """The sidecar lock file ``<file>.lock`` (next to the file a link points to)."""
        return self._target.with_name(self._target.name + ".lock")

    def exists(self) -> bool:
        """Whether the store file exists (it is not opened or validated)."""
        return self.path.is_file()

    def names(self) -> list[str]:
        """Names of the stored directions, sorted.

        Raises:
            StoreError: no such file, not a readable store, or a newer format_version.
        """
        with self._open() as directions:
            return self._names(directions)

    def read(self, name: str, *, offsets: bool = False) -> Direction:
        """One direction; with ``offsets=True`` also its raw per-image controls (if stored).

        Raises:
            StoreError: unknown name (the message lists the stored ones), unreadable store, or a
                direction lacking required attributes.
        """
        with self._open() as directions:
            stored = self._names(directions)
            if name not in stored:
                held = ", ".join(stored) if stored else "no directions"
                raise StoreError(f"no direction {name!r} in {self.path}; it holds: {held}")
            return _read_direction(directions[name], name, self._where(name), offsets=offsets)

    def read_all(self) -> list[Direction]:
        """Every direction (without offsets), sorted by name."""
        with self._open() as directions:
            return [_read_direction(directions[name], name, self._where(name), offsets=False)
                    for name in self._names(directions)]

    def write(self, direction: Direction, *, overwrite: bool = True) -> None:
        """Add or replace one direction atomically; the other directions stay bitwise intact.

        Empty ``created_at`` / ``flowgrad_version`` are filled with now (UTC) / the package version.

        Raises:
            TypeError / ValueError: ``direction`` is not a valid :class:`Direction`.
            StoreLockedError: another writer holds the store.
            StoreError: the existing file is not a readable store (it is left untouched), or the
                name exists and ``overwrite`` is False.
        """
        if not isinstance(direction, Direction):
            raise TypeError(f"direction must be a Direction, got {type(direction).__name__}")
        direction = _stamped(direction)  # dataclasses.replace re-validates (arrays are mutable)
        with self.lock():
            if not overwrite and self.exists() and direction.name in self.names():
                raise StoreError(f"direction {direction.name!r} already exists in {self.path}; "
                                 "pass overwrite=True (--overwrite) to replace it")
            self._rewrite(drop=direction.name, add=direction)

    def delete(self, name: str) -> None:
        """Remove one direction atomically (the file stays, possibly with no directions).

        Raises:
            StoreError: no such store or no such direction; StoreLockedError: see :meth:`write`.
        """
        with self.lock():
            if name not in self.names():
                raise StoreError(f"no direction {name!r} in {self.path}; it holds: "
                                 f"{', '.join(self.names()) or 'no directions'}")
            self._rewrite(drop=name, add=None)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the writer lock (``flock`` on ``<file>.lock``) for a whole job.

        Re-entrant in the holding thread, so :meth:`write` / :meth:`delete` work inside it. The OS
        drops the lock when the process dies, so a killed job never leaves a stale lock.

        Raises:
            StoreLockedError: another process (or another thread of this one) holds it.
        """
        key = (os.getpid(), os.path.realpath(self.lock_path))
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is None:
                held = _HELD[key] = _HeldLock(_acquire_flock(self.path, self.lock_path),
                                              threading.get_ident(), 0)
            elif held.thread != threading.get_ident():
                raise StoreLockedError(_locked_message(self.path, "another thread of this process"))
            held.depth += 1
        try:
            yield
        finally:
            with _HELD_GUARD:
                held.depth -= 1
                if held.depth == 0:
                    del _HELD[key]
                    os.close(held.fd)  # closing the only descriptor releases the flock

    # --- internals ---

    def _where(self, name: str) -> str:
        return f"{self.path}: direction {name!r}"

    def _names(self, directions: h5py.Group | None) -> list[str]:
        if directions is None:
            return []
        names = [key for key, item in directions.items() if isinstance(item, h5py.Group)]
        for name in names:
            if not isinstance(name, str):  # h5py returns undecodable (corrupt) names as bytes
                raise StoreError(f"{self.path} is not a readable flowgrad direction store "
                                 f"(corrupt or truncated HDF5: direction name {name!r} is not "
                                 "UTF-8)")
        return sorted(names)

    def _store_error(self, exc: BaseException) -> StoreError:
        if _is_lock_error(exc):
            return StoreLockedError(_locked_message(self.path, "HDF5 file lock held by another "
                                                               "process"))
        return StoreError(f"{self.path} is not a readable flowgrad direction store (corrupt or "
                          f"truncated HDF5: {_short_reason(exc)})")

    @contextlib.contextmanager
    def _open(self) -> Iterator[h5py.Group | None]:
        """Open read-only, check the header, yield ``/directions`` (None if absent).

        Every h5py failure inside (open or body) becomes a one-line :class:`StoreError`.
        """
        if not self.path.exists():
            raise StoreError(f"no such store: {self.path}")
        if not self.path.is_file():
            raise StoreError(f"{self.path} is not a file; a direction store is one .h5 file")
        try:
            with h5py.File(self.path, "r") as handle:
                self._check_header(handle)
                directions = handle.get(_GROUP)
                if directions is not None and not isinstance(directions, h5py.Group):
                    raise StoreError(f"{self.path}: '/{_GROUP}' is not a group")
                yield directions
        except StoreError:
            raise
        except (OSError, KeyError, RuntimeError, ValueError) as exc:
            raise self._store_error(exc) from exc

    def _check_header(self, handle: h5py.File) -> None:
        if "format" not in handle.attrs:
            raise StoreError(f"{self.path} is not a flowgrad direction store (root attribute "
                             "'format' is missing)")
        fmt = _attr(handle, "format")
        if not isinstance(fmt, str) or fmt != FORMAT:
            raise StoreError(f"{self.path} is not a flowgrad direction store (format is {fmt!r}, "
                             f"expected {FORMAT!r})")
        version = handle.attrs.get("format_version")
        if isinstance(version, (np.integer, int)) and not isinstance(version, (bool, np.bool_)) \
                and version > FORMAT_VERSION:
            raise StoreError(f"{self.path} was written by a newer flowgrad (format_version "
                             f"{int(version)}); upgrade: pip install -U flowgrad")
        if not isinstance(version, (np.integer, int)) or version != FORMAT_VERSION:
            raise StoreError(f"{self.path} has an unsupported format_version {version!r} "
                             f"(this flowgrad reads {FORMAT_VERSION})")

    def _new_temp(self) -> Path:
        while True:
            token = secrets.token_hex(_TEMP_HEX // 2)
            temp = self._target.with_name(f".{self._target.name}.writing-{token}.tmp")
            try:
                os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                return temp
            except FileExistsError:
                continue

    def _remove_stale_temps(self) -> None:
        """Delete temp files of killed writers (safe: the caller holds the lock)."""
        name = re.escape(self._target.name)
        pattern = re.compile(rf"^\.{name}\.writing-[0-9a-f]{{{_TEMP_HEX}}}\.tmp$")
        for entry in os.scandir(self._target.parent):
            if pattern.match(entry.name):
                Path(entry.path).unlink(missing_ok=True)

    def _rewrite(self, *, drop: str | None, add: Direction | None) -> None:
        """Write the store minus ``drop`` plus ``add`` to a temp file, rename it over the store."""
        target = self._target
        if not target.parent.is_dir():
            raise StoreError(f"cannot write {self.path}: directory {target.parent} does not "
                             "exist; create it first")
        self._remove_stale_temps()
        old = target.exists()
        temp = self._new_temp()
        try:
            with h5py.File(temp, "w") as out:
                out.attrs.create("format", FORMAT, dtype=_STR)
                out.attrs["format_version"] = np.int64(FORMAT_VERSION)
                directions = out.create_group(_GROUP)
                if old:
                    self._copy_directions(directions, skip=drop)
                if add is not None:
                    _write_direction(directions, add)
            _fsync(temp)
            if old:
                os.chmod(temp, target.stat().st_mode & 0o7777)
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync(target.parent)

    def _copy_directions(self, target: h5py.Group, skip: str | None) -> None:
        with self._open() as directions:
            for name in self._names(directions):
                if name == skip:
                    continue
                try:
                    directions.copy(directions[name], target, name=name)
                except (OSError, KeyError, RuntimeError, ValueError) as exc:
                    raise StoreError(f"cannot copy direction {name!r} into the rewritten "
                                     f"{self.path} ({_short_reason(exc)}); the store is "
                                     "unchanged") from exc
