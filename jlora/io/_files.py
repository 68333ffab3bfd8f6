"""File safety shared by adapter and training checkpoints: one writer, manifests, atomic replace.

A writer holds ``fcntl.flock`` on a lock file while it writes; the kernel drops it when the
file is closed or the process dies (SIGKILL included), so a lock file a crashed writer left
means nothing. A second writer is refused at once, never made to wait, so nothing hangs on it.
In a multi-process JAX run only process 0 locks, and every process gets its answer.

A manifest (``jlora_manifest.json``) lists the sha256 and size of every file of an adapter
checkpoint; it is written last, so it is also the commit marker. A save writes a hidden
sibling (:func:`staging_path`) and :func:`commit` renames it into place; replacing an existing
directory takes two renames, and :func:`resolve` finds the last complete copy whichever of
them a kill interrupted. :func:`recover` (under the lock) finishes such a swap and removes
the leftovers.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

FORMAT = "jlora-adapter"
VERSION = 1
MANIFEST = "jlora_manifest.json"
_PAUSE_ENV = "_JLORA_CHECKPOINT_PAUSE"

__all__ = ["WriterLock", "pause_point", "is_primary", "sync", "broadcast_text", "fsync_dir", "files", "sha256",
           "write_manifest", "check_manifest", "short", "leftovers", "resolve", "recover", "missing_error",
           "read_resolved", "staging_path", "commit"]
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def pause_point(name: str) -> None:
    """Test hook: sleeps at the named point of a save when ``$_JLORA_CHECKPOINT_PAUSE`` is ``name``.

    The crash tests use it to SIGKILL a writer at an exact point; without the variable it does
    nothing.

    >>> pause_point("anything")
    """
    if os.environ.get(_PAUSE_ENV) == name:
        print(f"JLORA-PAUSED {name}", flush=True)
        time.sleep(3600)


def is_primary() -> bool:
    """True on the process that renames, deletes and locks (process 0).

    >>> is_primary()
    True
    """
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (nothing in a single-process run).

    >>> sync("jlora_doctest")
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def broadcast_text(text: str, size: int = 256) -> str:
    """Process 0's ``text`` on every process (itself in a single-process run).

    >>> broadcast_text("ok")
    'ok'
    """
    if jax.process_count() == 1:
        return text
    data = np.frombuffer(text.encode()[:size].ljust(size, b"\0"), np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(data))).rstrip(b"\0").decode()


def fsync_dir(path: Path) -> None:
    """Makes a rename or unlink in directory ``path`` durable.

    >>> import tempfile
    >>> fsync_dir(Path(tempfile.mkdtemp()))
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriterLock:
    """An exclusive, non-blocking ``flock`` on ``path``; ``release`` removes the file.

    Args:
      path: the lock file (created if absent).
      who: the caller, for the error message (``'save_adapter'``).
      what: the directory the lock guards, for the error message.
      fix: what the refused caller can do.

    Raises:
      RuntimeError: another writer (a process, or another object in this one) holds the lock.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / ".lock"
    >>> with WriterLock(p, "me", "d", "wait") as lock:
    ...   WriterLock(p, "you", "d", "wait for me")
    Traceback (most recent call last):
    ...
    RuntimeError: you: another writer is using 'd' (pid ...); ... fix: wait for me.
    >>> p.exists()
    False
    """

    def __init__(self, path: Path, who: str, what: str | Path, fix: str) -> None:
        self.path, self._fd = Path(path), None
        holder = ""
        if is_primary():
            holder = self._acquire()
        holder = broadcast_text(holder)
        if holder:
            self.release()
            raise RuntimeError(
                f"{who}: another writer is using '{what}' ({holder}); two writers on one checkpoint "
                f"would overwrite each other's files, so this one stops before writing anything. "
                f"The lock is '{self.path}' (released when its holder finishes or dies; a file left "
                f"by a killed process does not block anyone); fix: {fix}.")

    def _acquire(self) -> str:
        """Takes the lock; returns '' or a description of the holder."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
                os.close(fd)
                return holder
            except OSError as e:  # a filesystem without flock: write unguarded, as orbax does
                os.close(fd)
                if e.errno in _UNSUPPORTED:
                    return ""
                raise
            try:  # a holder unlinks the file on release: retry if we locked an unlinked one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
                self._fd = fd
                return ""
            os.close(fd)

    def release(self) -> None:
        """Removes the lock file and drops the lock (idempotent)."""
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def files(root: Path) -> list[Path]:
    """Every file below ``root``, sorted.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "x").write_text("1"); [p.name for p in files(d)]
    ['x']
    """
    return sorted(p for p in root.rglob("*") if p.is_file())


def sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b""); sha256(p)[:16]
    'e3b0c44298fc1c14'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(root: Path) -> None:
    """Writes ``root/jlora_manifest.json`` (sha256 and size of every file) durably, last.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "x").write_text("1"); write_manifest(d)
    >>> check_manifest(d, "doctest", verify=True)
    >>> _ = (d / "x").write_text("2"); check_manifest(d, "doctest", verify=True)
    Traceback (most recent call last):
    ...
    ValueError: doctest: checkpoint '...' is corrupted: 'x' does not match its sha256 in the manifest; fix: restore from another copy.
    """
    listing = {str(p.relative_to(root)): {"sha256": sha256(p), "bytes": p.stat().st_size}
               for p in files(root)}
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "files": listing}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)
    fsync_dir(root)


def check_manifest(directory: Path, who: str, verify: bool) -> None:
    """Raises ValueError unless ``directory`` has a manifest and (``verify``) matches it (see write_manifest)."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise ValueError(
            f"{who}: '{directory}' has no {MANIFEST} (the commit marker written last by "
            "save_adapter): it is an incomplete save or not a jlora adapter checkpoint; fix: save it "
            "again with jlora.checkpoint.save_adapter.")
    try:
        info = json.loads(manifest.read_bytes().decode("utf-8"))
        listing = info["files"]
        wants = {name: (int(w["bytes"]), str(w["sha256"])) for name, w in listing.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{who}: '{manifest}' is corrupted ({type(e).__name__}: {e}); the checkpoint "
                         "cannot be trusted; fix: restore from another copy.") from e
    if info.get("format") != FORMAT:
        raise ValueError(f"{who}: '{directory}' is not a jlora adapter checkpoint (format "
                         f"{info.get('format')!r}, expected {FORMAT!r}); fix: pass a directory written "
                         "by save_adapter.")
    if not verify:
        return
    have = {str(p.relative_to(directory)) for p in files(directory)} - {MANIFEST}
    missing = sorted(set(wants) - have)
    if missing:
        raise ValueError(f"{who}: checkpoint '{directory}' is corrupted: missing file(s) "
                         f"{', '.join(missing[:5])}; fix: restore from another copy.")
    for name, (size, digest) in wants.items():
        got = (directory / name).stat().st_size
        if got != size:
            raise ValueError(f"{who}: checkpoint '{directory}' is corrupted or truncated: '{name}' has "
                             f"{got} bytes, expected {size}; fix: restore from another copy.")
        if sha256(directory / name) != digest:
            raise ValueError(f"{who}: checkpoint '{directory}' is corrupted: '{name}' does not match its "
                             "sha256 in the manifest; fix: restore from another copy.")


def short(e: BaseException, limit: int = 300) -> str:
    """``'Type: first line of the message'``, cut to ``limit`` characters (tensorstore errors are long).

    >>> short(ValueError("bad\\nspec dump"))
    'ValueError: bad'
    """
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(e).__name__}: {text}"


# --------------------------------------------------------------------------- replacing a directory


def leftovers(directory: Path) -> dict[str, dict[str, Path]]:
    """Hidden folders of unfinished saves of ``directory``: ``{id: {"partial"|"old"|"tmp": path}}``.

    ``tmp`` is orbax's own temporary folder of a staging save (killed before orbax finished).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); staging_path(d / "a", "12ab").mkdir(); leftovers(d / "a")
    {'12ab': {'partial': PosixPath('.../.a.jlora-partial-12ab')}}
    """
    pattern = re.compile(rf"\.{re.escape(directory.name)}\.jlora-(partial|old)-([0-9a-f]+)(\..+)?")
    found: dict[str, dict[str, Path]] = {}
    if directory.parent.is_dir():
        for p in directory.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and p.is_dir():
                found.setdefault(m[2], {})["tmp" if m[3] else m[1]] = p
    return found


def resolve(directory: Path) -> Path | None:
    """The last complete adapter saved under ``directory``: itself, or the one of a killed swap.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); staging_path(d / "a", "12ab").mkdir(); resolve(d / "a") is None
    True
    """
    if directory.exists():
        return directory
    for parts in leftovers(directory).values():
        if "old" in parts:  # killed between the two renames of an overwrite
            new = parts.get("partial")
            return new if new is not None and (new / MANIFEST).is_file() else parts["old"]
    return None


def recover(directory: Path) -> None:
    """Finishes a swap a killed writer left and removes its leftovers (the caller holds the lock).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); staging_path(d / "a", "12ab").mkdir(); recover(d / "a"); list(d.iterdir())
    []
    """
    found = resolve(directory)
    if found is not None and found != directory:
        os.rename(found, directory)
        fsync_dir(directory.parent)
    for parts in leftovers(directory).values():
        for p in parts.values():
            shutil.rmtree(p, ignore_errors=True)


def missing_error(directory: Path, who: str) -> ValueError:
    """The error for "no adapter at ``directory``": leftovers found, the adapters beside it, the fix.

    >>> import tempfile
    >>> print(missing_error(Path(tempfile.mkdtemp()) / "a", "doctest"))
    doctest: no adapter checkpoint at '.../a'; fix: pass the directory given to save_adapter ('...' holds no adapter checkpoint).
    """
    partial = [p for parts in leftovers(directory).values() for p in parts.values()]
    hint = (f"; found incomplete save(s) {', '.join(str(p) for p in partial)} (a save that did not "
            "finish, e.g. a killed process): they are never loaded, and the next save_adapter to "
            "this name removes them" if partial else "")
    parent = directory.parent
    if parent.is_dir():
        names = sorted(p.name for p in parent.iterdir()
                       if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())
        there = (f"adapter checkpoints in '{parent}': {', '.join(names[:10])}" if names
                 else f"'{parent}' holds no adapter checkpoint")
    else:
        there = f"'{parent}' does not exist"
    return ValueError(f"{who}: no adapter checkpoint at '{directory}'{hint}; fix: pass the directory "
                      f"given to save_adapter ({there}).")


def read_resolved(directory: Path, who: str, read: Callable[[Path], Any]) -> Any:
    """``read(path)`` of the last complete adapter under ``directory`` (:func:`resolve`).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); read_resolved(d, "doctest", lambda p: p == d)
    True
    """
    where = resolve(directory)
    if where is None:
        raise missing_error(directory, who)
    try:
        return read(where)
    except (ValueError, OSError):
        if where == directory or not directory.is_dir():
            raise
        return read(directory)  # a writer finished its swap while we read: read the result


def staging_path(directory: Path, token: str) -> Path:
    """The hidden sibling a save of ``directory`` writes to before :func:`commit`.

    >>> staging_path(Path("/x/adapter"), "ab12")
    PosixPath('/x/.adapter.jlora-partial-ab12')
    """
    return directory.parent / f".{directory.name}.jlora-partial-{token}"


def commit(staging: Path, directory: Path, replace: bool) -> None:
    """Renames a complete ``staging`` (manifest written) to ``directory``, durably.

    With ``replace``: the old one goes to ``.<name>.jlora-old-<id>`` first and is deleted last;
    a kill between the two renames leaves both, and :func:`resolve` then finds the new one.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); s = staging_path(d / "a", "12ab"); s.mkdir(); commit(s, d / "a", False)
    >>> [p.name for p in d.iterdir()]
    ['a']
    """
    if replace:
        old = directory.parent / staging.name.replace(".jlora-partial-", ".jlora-old-")
        os.rename(directory, old)
        pause_point("adapter-swapping")
        os.rename(staging, directory)
        fsync_dir(directory.parent)
        pause_point("adapter-swapped")
        shutil.rmtree(old)
    else:
        os.rename(staging, directory)
    fsync_dir(directory.parent)
