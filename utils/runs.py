"""One run's hold on its record folder, so that a folder's files always describe its weights.

- **Lock.** A run holds an exclusive ``flock`` on a lock file beside its folder for its whole life
  (``record/.<name>.lock``; a defense: ``record/<name>/defense/.<save_as>.lock``, plus a shared lock
  on its attack record's, so an attack cannot overwrite a record a defense is reading). A second
  run on the same folder is refused, naming the holder's process id. The operating system releases
  the lock when a process dies, however it dies.
- **Identity.** ``run.json`` holds the options that determine the result (the resolved config without
  paths, device and the flags that only say how to run), the record format version, and, for a
  defense, the SHA-256 of the attack record it defends. ``--resume`` with other options is refused,
  naming them; ``--epochs`` may grow only where the learning-rate schedule does not depend on it.
- **Overwrite.** ``--overwrite`` builds the new run in a staging folder beside the old one and swaps
  it in only when the run has finished, so nothing of the old run survives and a killed overwrite
  leaves the old record whole.
- **Integrity.** Results are hashed when written (``summary.json``: ``sha256``); a defense checks the
  attack record's hash and names a modified or truncated file.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

from . import UserError
from .record import save_json

RECORD_FORMAT = 2
RUN_FILE = 'run.json'
# options that say where or how to run, not what the result is
NOT_IDENTITY = {'resume', 'overwrite', 'device', 'record_root', 'yaml_path', 'dataset_path', 'save_folder_name',
                'eval_each_epoch', 'channel_chunk', 'reference', 'compile'}
# schedules under which more epochs leave the finished epochs' learning rates unchanged
EXTENSIBLE_SCHEDULES = ('none', 'MultiStepLR')


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def same_option_value(stored: Any, expected: Any) -> bool:
    """Whether a recorded option equals this run's: equal values, or two paths of files with the same
    bytes (a trigger image read from another checkout is the same trigger)."""
    if stored == expected:
        return True
    if not (isinstance(stored, str) and isinstance(expected, str) and stored and expected):
        return False
    try:
        return Path(stored).is_file() and Path(expected).is_file() and sha256_file(Path(stored)) == sha256_file(Path(expected))
    except OSError:
        return False


def identity_of(config: dict[str, Any], **extra) -> dict[str, Any]:
    """The options of ``config`` that determine a run's result, with the record format version."""
    return {k: v for k, v in sorted(config.items()) if k not in NOT_IDENTITY} | {'record_format': RECORD_FORMAT} | extra


def check_record_root(root: Path) -> None:
    """``--record_root`` must be a folder, or creatable: a one-line error otherwise, nothing created."""
    root = Path(root)
    if root.exists():
        if not root.is_dir():
            raise UserError(f'record_root {root} is not a folder')
        if not os.access(root, os.W_OK | os.X_OK):
            raise UserError(f'record_root {root} is not writable')
        return
    ancestor = root.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f'record_root {root} cannot be created ({ancestor} is not a writable folder)')


class FolderLock:
    """An ``flock`` on ``lock_path``: exclusive for the run that writes, shared for runs that read."""

    def __init__(self, lock_path: Path, what: str, shared: bool = False):
        self.path, self.what, self.shared = Path(lock_path), what, shared
        self.handle = None

    def __enter__(self) -> 'FolderLock':
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, 'a+')
        try:
            fcntl.flock(self.handle, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self.handle.seek(0)
            holder = self.handle.read().strip() or 'another process'
            self.handle.close()
            raise UserError(f'{self.what} is in use by process {holder}: wait for it to finish or stop it') from None
        if not self.shared:
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.write(str(os.getpid()))
            self.handle.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def writer_lock_path(folder: Path) -> Path:
    """The lock a run holds while it writes ``folder`` (beside it, so an overwrite's staging shares it)."""
    return Path(folder).parent / f'.{Path(folder).name}.lock'


def staging_path(folder: Path) -> Path:
    """Where an ``--overwrite`` run writes before its result is swapped into ``folder``."""
    return Path(folder).parent / f'.{Path(folder).name}.overwrite'


def folder_in_use(folder: Path) -> bool:
    """Whether a run holds ``folder``'s writer lock now (tried without waiting, released at once;
    nothing is created when no run ever took it)."""
    lock_path = writer_lock_path(folder)
    if not lock_path.exists():
        return False
    try:
        with FolderLock(lock_path, str(folder), shared=True):
            return False
    except UserError:
        return True


def remove_stale_temporaries(folder: Path) -> None:
    """Delete ``.*.tmp`` files a killed save left behind (safe: the folder's lock is held)."""
    if folder.is_dir():
        for stale in folder.glob('.*.tmp'):
            stale.unlink(missing_ok=True)


class RunFolder:
    """The folder a run writes (``workdir``: the record itself, or a staging folder under
    ``--overwrite``). The order of a run: :meth:`open` (refuse an existing run without --resume or
    --overwrite), :meth:`check_resume` (refuse other options), :meth:`start` (take the locks, check
    again under them, first write), :meth:`commit` (swap an overwrite in), :meth:`close` (release).
    Refusals before :meth:`start` write nothing, not even a lock file."""

    def __init__(self, folder: Path, *, what: str, results: Iterable[str], resume: bool, overwrite: bool,
                 parent_lock: Optional[Path] = None):
        self.folder = Path(folder)
        self.what, self.results = what, tuple(results)
        self.resume, self.overwrite = resume, overwrite
        self.identity: dict[str, Any] = {}
        self.schedule: Optional[str] = None
        self.held: list[FolderLock] = []
        self.staging = staging_path(self.folder)
        self.workdir = self.staging if overwrite else self.folder
        self.locks = [FolderLock(writer_lock_path(self.folder), what)]
        if parent_lock is not None:
            self.locks.insert(0, FolderLock(parent_lock, f'the record {parent_lock.name[1:-5]}', shared=True))

    def open(self) -> 'RunFolder':
        """Refuse a folder that holds a run unless resuming or overwriting."""
        self.held: list[FolderLock] = []
        self._check()
        return self

    def _check(self) -> None:
        existing = [p.name for p in self._run_files(self.folder)]
        if existing and not (self.resume or self.overwrite):
            raise UserError(f'{self.folder} already holds {", ".join(existing)}: pass --resume to continue it, '
                            '--overwrite to replace it, or choose another --save_folder_name')

    def check_resume(self, identity: dict[str, Any], schedule: Optional[str] = None) -> None:
        """With --resume, refuse options other than those the folder's run was started with."""
        self.identity, self.schedule = identity, schedule
        if self.resume and self.workdir.exists():
            self._check_identity()

    def _run_files(self, folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        names = set(self.results) | {'summary.json'}
        return sorted(p for p in folder.iterdir() if p.name in names or (p.name.startswith('checkpoint') and p.suffix == '.pt'))

    def _check_identity(self) -> None:
        path = self.workdir / RUN_FILE
        if not path.exists():
            if self._run_files(self.workdir):
                warnings.warn(f'{self.workdir} has no {RUN_FILE} (written by an older version): its options cannot be '
                              'compared with these', stacklevel=2)
            return
        try:
            stored = json.loads(path.read_text())['identity']
        except (OSError, ValueError, KeyError):
            raise UserError(f'{path} is unreadable: rerun with --overwrite instead of --resume') from None
        keys = sorted(set(stored) | set(self.identity))
        differ = [k for k in keys if not same_option_value(stored.get(k), self.identity.get(k))]
        if differ == ['epochs']:
            before, now = stored['epochs'], self.identity['epochs']
            if now > before and self.schedule in EXTENSIBLE_SCHEDULES:
                return
            if now > before:
                raise UserError(f'--resume cannot extend epochs from {before} to {now}: the {self.schedule} schedule depends '
                                f'on the number of epochs, so the finished ones would not be the new run\'s (start a new run, '
                                f'or train with lr_scheduler none or MultiStepLR to extend later)')
        if differ:
            shown = ', '.join(f'{k} {stored.get(k)!r} -> {self.identity.get(k)!r}' for k in differ)
            raise UserError(f'--resume with other options than the run in {self.workdir}: {shown} '
                            '(resume with the same options, or --overwrite to start again)')

    def start(self, recheck=None) -> None:
        """Take the locks, repeat the checks under them (and ``recheck()``, e.g. that a parent record
        is unchanged), prepare the workdir and record the run's identity."""
        for lock in self.locks:
            self.held.append(lock.__enter__())
        self._check()
        self.check_resume(self.identity, self.schedule)
        if recheck is not None:
            recheck()
        if self.overwrite and not self.resume and self.staging.exists():
            shutil.rmtree(self.staging)           # a killed overwrite's leftovers
        self.workdir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.workdir)
        save_json({'identity': self.identity, 'pid': os.getpid()}, self.workdir / RUN_FILE)

    def commit(self) -> None:
        """Under ``--overwrite``: swap the finished staging folder in place of the old record."""
        if self.workdir != self.staging:
            return
        retired = self.folder.parent / f'.{self.folder.name}.retired-{os.getpid()}'
        if self.folder.exists():
            os.replace(self.folder, retired)
        os.replace(self.staging, self.folder)
        shutil.rmtree(retired, ignore_errors=True)

    def close(self) -> None:
        for lock in reversed(self.held):
            lock.__exit__(None, None, None)
        self.held = []


def check_record_hash(folder: Path, summary_name: str = 'summary.json', result_name: str = 'attack_result.pt') -> Optional[str]:
    """The SHA-256 of ``folder/result_name``, checked against the one its summary recorded. An
    older record without a recorded hash passes with a warning; a missing summary means the run
    never finished writing."""
    result, summary = Path(folder) / result_name, Path(folder) / summary_name
    if not summary.exists():
        raise UserError(f'{folder} is incomplete ({result_name} without {summary_name}): rerun the attack with --resume')
    try:
        recorded = json.loads(summary.read_text()).get('sha256')
    except ValueError:
        raise UserError(f'{summary} is unreadable: rerun the attack with --overwrite') from None
    actual = sha256_file(result)
    if recorded is None:
        warnings.warn(f'{summary} records no checksum (written by an older version): {result_name} cannot be '
                      'checked for changes', stacklevel=2)
    elif recorded != actual:
        raise UserError(f'{result} was modified or truncated after it was written (its SHA-256 differs from the one '
                        f'in {summary_name}): rerun the attack with --overwrite')
    return actual
