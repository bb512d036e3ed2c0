"""A sweep's results kept without its weights: an archive that outlives the records.

A long sweep may outlive the disk it started on (a cluster's scratch space, a machine that is
replaced). Its archive (the sweep YAML's ``archive:`` folder, e.g. ``bench/results/cifar10_cpu``)
keeps, for every step that finished and verified, the run's text files (``summary.json``,
``config.yaml``, ``metrics*.csv``, FMP's ``channel_scores.csv`` ...) but no ``.pt`` file, under
``records/<record>/[defense/<folder>/]``, each with an ``archived.json`` stamp written last. The
stamp names the attack record by the digest of its tensors (weights and poisoned data), which,
unlike the file's SHA-256, does not change with the folder a record was written to: a defense
counts only beside the very attack record it ran on, and an attack trained again from the same
seed on the same machine is recognised as the same record.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .record import load_torch, save_json, save_text, tensor_digest

STAMP = 'archived.json'
RECORDS = 'records'
KEPT_SUFFIXES = {'.json', '.yaml', '.csv'}
MAX_FILE_BYTES = 2 * 1024 * 1024
_digests: dict[tuple[str, int, int], str] = {}


def archive_folder(archive: Path, record: str, folder: str = '') -> Path:
    """Where a record (``folder`` empty) or one of its defense runs lives in the archive."""
    base = Path(archive) / RECORDS / record
    return base / 'defense' / folder if folder else base


def _tensors(value: Any, path: str = ''):
    if torch.is_tensor(value):
        yield path, value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _tensors(value[key], f'{path}/{key}')
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f'{path}/{index}')


def record_digest(result_file: Path) -> str:
    """SHA-256 over every tensor of an attack record (names, dtypes, shapes, bytes): what the
    record computed, not where it was written (its config's paths are left out)."""
    stat = Path(result_file).stat()
    key = (str(result_file), stat.st_mtime_ns, stat.st_size)
    if key not in _digests:
        hasher = hashlib.sha256()
        for name, tensor in _tensors(load_torch(result_file, 'attack record')):
            hasher.update(f'{name}:{tensor_digest(tensor)};'.encode())
        _digests[key] = hasher.hexdigest()
    return _digests[key]


def archive_run(source: Path, target: Path, step_key: str, stamp: dict[str, Any]) -> None:
    """Copy a finished run's text files from ``source`` to ``target``: the stamp goes first and comes
    back last, so an interrupted copy is never taken for a finished one."""
    target = Path(target)
    (target / STAMP).unlink(missing_ok=True)
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and path.suffix in KEPT_SUFFIXES and path.name not in (STAMP, 'run.json') \
                and path.stat().st_size <= MAX_FILE_BYTES:
            save_text(path.read_text(), target / path.name)
    save_json({'step': step_key, 'archived_at': time.strftime('%Y-%m-%d %H:%M:%S %Z')} | stamp, target / STAMP)


def read_stamp(folder: Path) -> Optional[dict[str, Any]]:
    """The archive stamp of a run, or None when it is not (completely) archived."""
    folder = Path(folder)
    if not (folder / 'summary.json').exists():
        return None
    try:
        return json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return None


def ran_on(run: Path, record: Path) -> bool:
    """Whether the archived defense run ``run`` ran on the archived attack record ``record``."""
    run_stamp, record_stamp = read_stamp(run), read_stamp(record)
    return bool(run_stamp and record_stamp and run_stamp.get('attack_record_digest')
                and run_stamp['attack_record_digest'] == record_stamp.get('record_digest'))


def summary_sha256(folder: Path) -> Optional[str]:
    """The SHA-256 of the result file a run recorded in its summary, or None."""
    try:
        return json.loads((Path(folder) / 'summary.json').read_text()).get('sha256')
    except (OSError, ValueError):
        return None
