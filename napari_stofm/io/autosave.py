"""Autosave of a slice's annotations: one atomic ``.npz`` beside the slice (or in the user cache).

:class:`CurationStore` writes every annotation of a slice into one file, atomically, so
nothing curated is lost when the application stops unexpectedly; it records a fingerprint
of the cell ids, so an autosave made for other cells is refused on load.

Safety rules (see also :class:`~napari_stofm.review.session.SliceSession`):

* **One writer per autosave.** A session takes a lock file ``<autosave>.lock`` (pid, host,
  start time) with :meth:`CurationStore.acquire_lock`; a second live session on the same
  slice gets :class:`~napari_stofm.errors.AutosaveLocked` and autosaves to its own file
  (:meth:`CurationStore.sibling`). A lock whose process is dead (on this host) is taken over.
* **Nothing curated is overwritten unread.** An autosave that is refused (other cells) or
  unreadable is moved aside with :meth:`CurationStore.set_aside`
  (``<name>.refused-YYYYmmdd-HHMMSS.npz`` / ``.corrupt-...``) before any new autosave.
* **Bounded reading.** :meth:`CurationStore.load` reads the zip directory and the ``.npy``
  headers first: the member names, the metadata size, the fingerprint and the declared
  shape and dtype of every array are checked (each array must hold exactly one value per
  cell of the slice) before any array is inflated, so a crafted file cannot make it
  allocate more than a few bytes per cell.
* **Temporary files are recognisable.** :func:`temp_prefix` names them
  ``.<target>.stofm-<host>-<pid>-XXXXXXXX.tmp``; :func:`remove_stale_temps` deletes those of
  dead writers (or older than :data:`STALE_TEMP_SECONDS`), so a killed writer leaves no
  debris for long.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from napari_stofm.errors import AutosaveLocked, AutosaveRefused, StofmInputError
from napari_stofm.heads.annotation import (
    Annotation,
    as_annotation_dict,
    clean_confidence,
)
from napari_stofm.provenance import now_iso

#: a temporary file (or lock without content) this old is stale even when its writer cannot be checked
STALE_TEMP_SECONDS = 15 * 60
#: a lock file that cannot be read (being written, or damaged) is stale after this long
UNREADABLE_LOCK_SECONDS = 30

# limits of what an autosave may declare (checked before anything is inflated)
MAX_META_BYTES = 16 * 1024 * 1024
MAX_ANNOTATIONS = 64
MAX_CLASSES = 100_000
_ARRAY_KINDS = {"codes": "iu", "predicted": "iu", "confidence": "f", "curated": "biu"}


def obs_fingerprint(obs_names) -> str:
    """sha256 of the cell ids in order: an autosave only fits a slice with the same cells."""
    digest = hashlib.sha256()
    digest.update(str(len(obs_names)).encode())
    # one update with every "\0<id>" (the same bytes as one update per cell, ~10x faster at 1M cells)
    if len(obs_names):
        digest.update(("\0" + "\0".join(map(str, obs_names))).encode("utf-8"))
    return digest.hexdigest()


# ----------------------------------------------------------------------------- processes


def host_name() -> str:
    return socket.gethostname() or "localhost"


def host_tag(host: Optional[str] = None) -> str:
    """6 hex digits naming a host in file names (the full name is in lock files)."""
    return hashlib.sha1((host or host_name()).encode("utf-8")).hexdigest()[:6]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (True when it cannot be told)."""
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        try:
            import ctypes
        except ImportError:  # pragma: no cover - a Python without ctypes: cannot tell
            return True
        try:
            kernel32 = ctypes.windll.kernel32
            handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
            if not handle:
                return False
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            kernel32.CloseHandle(handle)
            return code.value == 259  # STILL_ACTIVE
        except (AttributeError, OSError, ctypes.ArgumentError):  # no kernel32 / a failed call: cannot tell
            return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return True
    return True


def process_start(pid: int) -> Optional[str]:
    """When process ``pid`` started (Linux: /proc start ticks), to tell a reused pid; None elsewhere."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
        return text.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        return None


def _writer_dead(host: str, pid: int, started: Optional[str] = None) -> bool:
    """True when the writer (``host`` tag or name, ``pid``) surely stopped: same host, no such process."""
    if host not in (host_name(), host_tag()):
        return False
    if not pid_alive(pid):
        return True
    # a pid reused by a later process is a dead writer too
    return started is not None and process_start(pid) not in (None, started)


# ----------------------------------------------------------------------------- temporary files

_ACTIVE_TEMPS: set = set()  # temporary files this process is writing now
_ACTIVE_LOCK = threading.Lock()
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.stofm-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[a-z0-9_]+\.tmp(?P<suffix>[^/]*)$")
_LEGACY_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>\.h5ad|\.csv|)$")


def temp_prefix(path: Path) -> str:
    """``mkstemp`` prefix of a temporary file for ``path``: hidden, with this host and pid."""
    return f".{Path(path).name}.stofm-{host_tag()}-{os.getpid()}-"


_UMASK_LOCK = threading.Lock()


def user_umask() -> int:
    """The process's umask, read without changing it where Linux's ``/proc`` tells it (else
    set and put back at once, under a lock)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode a new file of the user's gets: ``0o666`` less the umask."""
    return 0o666 & ~user_umask()


def make_temp(path: Path, suffix: str = ".tmp"):
    """``(fd, tmp_path)`` of a new temporary file beside ``path`` (registered as in use).

    ``mkstemp`` makes it ``0o600``; it gets :func:`new_file_mode` instead, so that a file
    moved into place from it (an export, an autosave) has the permissions the user's umask
    gives any new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
    except (OSError, AttributeError):  # a file system without modes (or no fchmod): mkstemp's mode
        pass
    with _ACTIVE_LOCK:
        _ACTIVE_TEMPS.add(os.path.abspath(tmp))
    return fd, Path(tmp)


def release_temp(tmp) -> None:
    with _ACTIVE_LOCK:
        _ACTIVE_TEMPS.discard(os.path.abspath(str(tmp)))


def temp_is_stale(path: Path, *, now: Optional[float] = None) -> bool:
    """Whether ``path`` is a temporary file of this package whose writer is gone."""
    path = Path(path)
    name = path.name
    now = time.time() if now is None else now
    try:
        st = path.lstat()
    except OSError:
        return False
    if not path.is_file() or path.is_symlink():
        return False
    old = now - st.st_mtime > STALE_TEMP_SECONDS
    match = _TEMP_RE.match(name)
    if match:
        host, pid = match.group("host"), int(match.group("pid"))
        if host == host_tag():
            if pid == os.getpid():
                with _ACTIVE_LOCK:
                    return os.path.abspath(str(path)) not in _ACTIVE_TEMPS
            return not pid_alive(pid)
        return old
    if _LEGACY_TEMP_RE.match(name):  # written by napari-stofm before temp names had a pid
        return old
    return False


def remove_stale_temps(folder: Path) -> list:
    """Delete this package's temporary files in ``folder`` whose writer is gone; returns them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries[:100_000]:
        if not entry.name.startswith(".") or ".tmp" not in entry.name:
            continue
        path = Path(entry.path)
        if temp_is_stale(path, now=now):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    fd, tmp = make_temp(path, ".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        release_temp(tmp)


def cache_dir() -> Path:
    """The per-user cache folder of napari-stofm (``$XDG_CACHE_HOME/napari-stofm``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-stofm"


def file_signature(path: Path):
    """(inode, size, mtime) of a file, None when it does not exist: tells whether it was rewritten."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


# ----------------------------------------------------------------------------- locks

_LIVE_TOKENS: set = set()  # tokens of the locks this process holds


class SessionLock:
    """A lock file held by this process; :meth:`release` deletes it (only if still ours)."""

    def __init__(self, path: Path, info: dict):
        self.path = Path(path)
        self.info = dict(info)
        self.token = info["token"]

    @property
    def held(self) -> bool:
        """Not released, and the lock file still names this holder (nobody broke it)."""
        if self.token not in _LIVE_TOKENS:
            return False
        current = read_lock(self.path)
        return current is not None and current.get("token") == self.token

    def release(self) -> None:
        if self.token not in _LIVE_TOKENS:
            return
        _LIVE_TOKENS.discard(self.token)
        current = read_lock(self.path)
        if current is not None and current.get("token") == self.token:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"SessionLock({str(self.path)!r}, pid={self.info.get('pid')}, held={self.held})"


def read_lock(path: Path) -> Optional[dict]:
    """What a lock file says (None when missing or unreadable)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(64 * 1024)
        info = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def lock_is_stale(path: Path, info: Optional[dict]) -> bool:
    """A lock whose holder surely stopped: its pid is dead on this host, or (same process) it
    was released; an unreadable lock older than :data:`UNREADABLE_LOCK_SECONDS`."""
    if info is None:
        try:
            return time.time() - os.stat(path).st_mtime > UNREADABLE_LOCK_SECONDS
        except OSError:
            return True
    try:
        pid = int(info.get("pid"))
    except (TypeError, ValueError):
        return True
    host = str(info.get("host", ""))
    if host != host_name():
        return False  # another machine: it cannot be checked from here
    if pid == os.getpid():
        return info.get("token") not in _LIVE_TOKENS
    return _writer_dead(host, pid, info.get("process_start"))


def describe_holder(info: Optional[dict]) -> str:
    if not info:
        return "a session whose lock file is being written or is damaged"
    where = ("in this same program" if info.get("host") == host_name() and info.get("pid") == os.getpid()
             else f"on host {info.get('host')!s}")
    owner = f"{info['owner']}, " if info.get("owner") else ""
    return f"{owner}process {info.get('pid')} {where}, since {info.get('started_at')}"


def acquire_lock(path: Path, *, owner: str = "") -> Optional[SessionLock]:
    """Take the lock file ``path`` (O_EXCL create; a stale one is taken over).

    Raises :class:`~napari_stofm.errors.AutosaveLocked` when a live session holds it;
    returns None when no lock can be made there (read-only folder): then nothing can be
    autosaved there either.
    """
    path = Path(path)
    info = {"pid": os.getpid(), "host": host_name(), "started_at": now_iso(), "token": uuid.uuid4().hex,
            "process_start": process_start(os.getpid()), "owner": owner, "package": "napari-stofm"}
    for _attempt in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # less the umask
        except FileExistsError:
            holder = read_lock(path)
            if not lock_is_stale(path, holder):
                raise AutosaveLocked(
                    f"the autosave {path.with_suffix('') if path.suffix == '.lock' else path} is in use by another "
                    f"napari-stofm session ({describe_holder(holder)}). Close that session first; if it is no "
                    f"longer running, delete the lock file {path}.",
                    holder=holder, lock_path=path) from None
            _take_over(path, holder)
            continue
        except OSError:
            return None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(info))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError:
            try:
                os.unlink(path)
            except OSError:
                pass
            return None
        _LIVE_TOKENS.add(info["token"])
        return SessionLock(path, info)
    raise AutosaveLocked(f"could not take the lock {path}: other sessions keep taking it; try again.", lock_path=path)


def _take_over(path: Path, stale: Optional[dict]) -> None:
    """Remove a stale lock, unless another session replaced it meanwhile."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except OSError:
        return
    moved = read_lock(aside)
    if stale is not None and (moved is None or moved.get("token") != stale.get("token")):
        try:  # it was a fresh lock of someone else: put it back
            if not path.exists():
                os.rename(aside, path)
                return
        except OSError:
            pass
    try:
        os.unlink(aside)
    except OSError:
        pass


# ----------------------------------------------------------------------------- the store


class CurationStore:
    """Autosave of every annotation of one slice, in ``<slice>.stofm-curation.npz``.

    The file sits next to the slice; when that folder is not writable (a read-only data
    share) it goes to the user cache (``~/.cache/napari-stofm/curation``) instead.
    It records a fingerprint of the cell ids, so an autosave of other cells is refused.
    ``variant`` names a second autosave of the same slice (``<slice>.stofm-curation.<variant>.npz``,
    see :meth:`sibling`).
    """

    SUFFIX = ".stofm-curation.npz"
    VERSION = 1

    def __init__(self, slice_path, *, directory=None, variant: Optional[str] = None):
        self.slice_path = Path(slice_path).expanduser().absolute()
        self.directory = directory
        self.variant = variant
        name = self.slice_path.name.rstrip("/") + self.SUFFIX
        if variant:
            name = name[: -len(".npz")] + f".{variant}.npz"
        if directory is not None:
            self.candidates = [Path(directory) / name]
        else:
            tag = hashlib.sha256(str(self.slice_path).encode()).hexdigest()[:12]
            self.candidates = [self.slice_path.parent / name, cache_dir() / "curation" / f"{tag}-{name}"]

    def sibling(self, variant: str) -> "CurationStore":
        """Another autosave of the same slice, named ``<slice>.stofm-curation.<variant>.npz``."""
        return CurationStore(self.slice_path, directory=self.directory, variant=variant)

    @property
    def path(self) -> Path:
        """Where the autosave is (or will be written)."""
        for candidate in self.candidates:
            if candidate.is_file():
                return candidate
        for candidate in self.candidates:
            if _writable_dir(candidate.parent):
                return candidate
        return self.candidates[0]

    @property
    def lock_path(self) -> Path:
        path = self.path
        return path.with_name(path.name + ".lock")

    def exists(self) -> bool:
        return any(c.is_file() for c in self.candidates)

    def acquire_lock(self, *, owner: str = "") -> Optional[SessionLock]:
        """Lock this autosave for one session (see :func:`acquire_lock`)."""
        path = self.lock_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        return acquire_lock(path, owner=owner)

    def set_aside(self, kind: str, path: Optional[Path] = None) -> Optional[Path]:
        """Rename the autosave to ``<name>.<kind>-YYYYmmdd-HHMMSS.npz`` (kept, never deleted).

        Returns the new path (None when there was no file)."""
        src = Path(path) if path is not None else self.path
        if not src.is_file():
            return None
        stem = src.name.removesuffix(".npz")
        stamp = _timestamp()
        for i in range(1, 1000):
            dst = src.with_name(f"{stem}.{kind}-{stamp}{'' if i == 1 else f'-{i}'}.npz")
            if not dst.exists():
                break
        os.rename(src, dst)
        return dst

    def save(self, annotations, obs_names, *, fingerprint: Optional[str] = None) -> Path:
        """Write all annotations atomically; returns the file written.

        ``fingerprint``: :func:`obs_fingerprint` of ``obs_names`` when the caller already has it
        (a session computes it once per slice)."""
        annotations = as_annotation_dict(annotations)
        if len(annotations) > MAX_ANNOTATIONS:
            raise StofmInputError(f"an autosave holds at most {MAX_ANNOTATIONS} annotations; "
                                  f"this slice has {len(annotations)}.")
        meta = {"version": self.VERSION, "saved_at": now_iso(), "slice": self.slice_path.name,
                "n_cells": len(obs_names),
                "obs_fingerprint": fingerprint if fingerprint is not None else obs_fingerprint(obs_names),
                "annotations": {}}
        arrays = {}
        for i, (key, ann) in enumerate(annotations.items()):
            if ann.n_cells != len(obs_names):
                raise StofmInputError(f"{key} labels {ann.n_cells} cells but the slice has {len(obs_names)}; "
                                      "it belongs to another slice.")
            meta["annotations"][key] = {"index": i, "categories": ann.categories, "colors": ann.colors,
                                        "provenance": ann.provenance}
            arrays.update({f"a{i}_codes": ann.codes, f"a{i}_predicted": ann.predicted_codes,
                           f"a{i}_confidence": ann.confidence, f"a{i}_curated": ann.curated})
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        target = self.path
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, buffer.getvalue())
        return target

    def load(self, obs_names, *, fingerprint: Optional[str] = None) -> Dict[str, Annotation]:
        """The autosaved annotations ({} when there is none); ``fingerprint`` as in :meth:`save`.

        Raises :class:`~napari_stofm.errors.AutosaveRefused` (a StofmInputError) for an
        autosave made for other cells (``kind='refused'``) or one that cannot be read or is
        inconsistent (``kind='corrupt'``); the file itself is left where it is.
        """
        if not self.exists():
            return {}
        path = self.path
        n_cells = len(obs_names)
        try:
            with zipfile.ZipFile(path) as archive:
                meta, members = _read_meta(archive)
                _check_fingerprint(path, meta, obs_names, fingerprint)
                entries = _check_layout(meta, members, n_cells)
                arrays = {name: _read_member(archive, members[name], (n_cells,),
                                             _ARRAY_KINDS[name[:-4].split("_", 1)[1]])
                          for name in _expected_members(entries)}
        except AutosaveRefused:
            raise
        except Exception as err:  # zip / npy / JSON errors of a damaged or crafted file
            raise _corrupt(path, f"{type(err).__name__}: {err}") from err
        out = {}
        for key, entry in entries.items():
            i = entry["index"]
            try:
                confidence = clean_confidence(arrays[f"a{i}_confidence.npy"], f"the autosave {path.name} ({key})")
                out[key] = Annotation(key, entry["categories"], entry["colors"], arrays[f"a{i}_codes.npy"],
                                      arrays[f"a{i}_predicted.npy"], confidence,
                                      arrays[f"a{i}_curated.npy"].astype(bool), entry["provenance"])
            except StofmInputError as err:
                raise _corrupt(path, f"annotation '{key}': {err}") from err
        return out

    def discard(self) -> None:
        """Delete the autosave (e.g. after a successful export the user asked to clean up)."""
        for candidate in self.candidates:
            if candidate.is_file():
                candidate.unlink()


# ----------------------------------------------------------------------------- bounded reading


def _corrupt(path: Path, detail: str) -> AutosaveRefused:
    return AutosaveRefused(
        f"the autosave {path} cannot be read ({detail}); move it away or delete it to start from the "
        "predictions again.", path=path, kind="corrupt")


def _check_fingerprint(path: Path, meta: dict, obs_names, fingerprint: Optional[str] = None) -> None:
    if meta.get("obs_fingerprint") != (fingerprint if fingerprint is not None else obs_fingerprint(obs_names)):
        raise AutosaveRefused(
            f"the autosave {path} was made for another set of cells ({meta.get('n_cells')} cells "
            f"of '{meta.get('slice')}', saved {meta.get('saved_at')}; this slice has "
            f"{len(obs_names)}): it is not loaded. Delete or rename it to start fresh, or open the "
            "slice it belongs to.", path=path, kind="refused")


def _npy_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo):
    """(shape, dtype, header length) of a ``.npy`` member, read without inflating its data."""
    from numpy.lib import format as npy

    with archive.open(info) as handle:
        version = npy.read_magic(handle)
        if version == (1, 0):
            shape, _fortran, dtype = npy.read_array_header_1_0(handle)
        elif version in ((2, 0), (3, 0)):
            shape, _fortran, dtype = npy.read_array_header_2_0(handle)
        else:
            raise ValueError(f"member {info.filename} has npy format {version}")
        header = handle.tell()
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"member {info.filename} holds {dtype} values (objects are never loaded)")
    return tuple(int(d) for d in shape), dtype, header


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, shape: tuple, kinds: str) -> np.ndarray:
    """One ``.npy`` member whose header declares exactly ``shape`` and a dtype of ``kinds``
    (and whose inflated size is exactly header + values): checked before it is read."""
    from numpy.lib import format as npy

    name = info.filename[:-4]
    declared, dtype, header = _npy_header(archive, info)
    if declared != shape:
        raise ValueError(f"array {name!r} declares shape {declared}; expected {shape}")
    if dtype.kind not in kinds or dtype.itemsize > 8:
        raise ValueError(f"array {name!r} holds {dtype} values")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if info.file_size != header + nbytes:
        raise ValueError(f"array {name!r} declares {info.file_size} bytes for {nbytes} bytes of values")
    with archive.open(info) as handle:
        return npy.read_array(handle, allow_pickle=False)


def _read_meta(archive: zipfile.ZipFile):
    infos = archive.infolist()
    if len(infos) > 1 + 4 * MAX_ANNOTATIONS:
        raise ValueError(f"it holds {len(infos)} arrays; an autosave has at most {1 + 4 * MAX_ANNOTATIONS}")
    members = {}
    for info in infos:
        if info.filename in members:
            raise ValueError(f"member {info.filename} occurs twice")
        members[info.filename] = info
    if "meta.npy" not in members:
        raise ValueError("it has no 'meta' record")
    info = members["meta.npy"]
    if info.file_size > MAX_META_BYTES + 4096:
        raise ValueError(f"its 'meta' record declares {info.file_size} bytes (at most {MAX_META_BYTES})")
    shape, _dtype, _ = _npy_header(archive, info)
    if len(shape) != 1 or shape[0] > MAX_META_BYTES:
        raise ValueError(f"its 'meta' record has shape {shape}, not JSON bytes")
    raw = _read_member(archive, info, shape, "u")
    meta = json.loads(bytes(raw.astype(np.uint8, copy=False)).decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("its 'meta' record is not a JSON object")
    return meta, members


def _check_layout(meta: dict, members: Dict[str, zipfile.ZipInfo], n_cells: int) -> Dict[str, dict]:
    """Check the metadata and the member names against the slice; returns the annotation records."""
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"unknown autosave version {version!r}")
    if version > CurationStore.VERSION:
        raise ValueError(f"it was written by a newer napari-stofm (autosave version {version}); upgrade napari-stofm")
    if meta.get("n_cells") != n_cells:
        raise ValueError(f"it declares {meta.get('n_cells')!r} cells for a slice of {n_cells}")
    annotations = meta.get("annotations")
    if not isinstance(annotations, dict) or len(annotations) > MAX_ANNOTATIONS:
        raise ValueError("its list of annotations is missing or too long")
    entries, seen = {}, set()
    for key, entry in annotations.items():
        if not isinstance(entry, dict):
            raise ValueError(f"annotation '{key}' has no record")
        i = entry.get("index")
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < MAX_ANNOTATIONS or i in seen:
            raise ValueError(f"annotation '{key}' has index {i!r}")
        seen.add(i)
        categories, colors = entry.get("categories"), entry.get("colors")
        if not isinstance(categories, list) or len(categories) > MAX_CLASSES or \
                not all(isinstance(c, str) for c in categories):
            raise ValueError(f"annotation '{key}' has no valid list of classes")
        if colors is not None and (not isinstance(colors, list) or len(colors) != len(categories)):
            raise ValueError(f"annotation '{key}' has {len(colors) if isinstance(colors, list) else 'no'} "
                             f"colours for {len(categories)} classes")
        provenance = entry.get("provenance") or {}
        if not isinstance(provenance, dict):
            raise ValueError(f"annotation '{key}' has a provenance that is not a record")
        entries[str(key)] = {"index": i, "categories": categories, "colors": colors, "provenance": provenance}
    expected = set(_expected_members(entries)) | {"meta.npy"}
    missing = sorted(expected - set(members))
    if missing:
        raise ValueError(f"array {missing[0][:-4]!r} is missing")
    extra = sorted(set(members) - expected)
    if extra:
        raise ValueError(f"it holds arrays this version does not write ({extra[0][:-4]!r})")
    return entries


def _expected_members(entries: Dict[str, dict]) -> list:
    return [f"a{e['index']}_{kind}.npy" for e in entries.values() for kind in _ARRAY_KINDS]


def read_npz_checked(path, expect: Dict[str, tuple], *, max_bytes: int) -> Dict[str, np.ndarray]:
    """The arrays ``expect`` names from an ``.npz`` (``{name: (shape, dtype kinds)}``, a
    ``None`` in a shape = any length), after checking every header and the declared total
    (at most ``max_bytes``) without inflating anything. Raises ValueError / zipfile errors
    for a file that does not fit; other members are ignored."""
    with zipfile.ZipFile(path) as archive:
        infos = {i.filename: i for i in archive.infolist()[: 1 + 4 * MAX_ANNOTATIONS]}
        shapes, total = {}, 0
        for name, (shape, kinds) in expect.items():
            info = infos.get(name + ".npy")
            if info is None:
                raise ValueError(f"array {name!r} is missing")
            declared, dtype, _ = _npy_header(archive, info)
            if len(declared) != len(shape) or any(w is not None and w != d
                                                  for w, d in zip(shape, declared, strict=True)):
                raise ValueError(f"array {name!r} declares shape {declared}; expected {shape}")
            total += int(np.prod(declared, dtype=np.int64)) * dtype.itemsize
            if total > max_bytes:
                raise ValueError(f"its arrays declare more than {max_bytes} bytes")
            shapes[name] = (declared, kinds)
        return {name: _read_member(archive, infos[name + ".npy"], shape, kinds)
                for name, (shape, kinds) in shapes.items()}


def _writable_dir(directory: Path) -> bool:
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.access(probe, os.W_OK | os.X_OK)
