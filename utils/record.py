"""The record writer and reader (layout in DESIGN.md §3). Every file is written to a temporary
name and renamed into place, so a crash never leaves half a record."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

from . import UserError

ATTACK_RESULT = 'attack_result.pt'
DEFENSE_RESULT = 'defense_result.pt'
REQUIRED_ATTACK_KEYS = ('model_name', 'num_classes', 'input_shape', 'model', 'dataset', 'attack',
                        'attack_config', 'bd_test', 'metrics')


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj: Any, path: Path) -> None:
    atomic_write(path, lambda handle: torch.save(obj, handle))


def save_text(text: str, path: Path) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


def save_yaml(data: dict, path: Path) -> None:
    save_text(yaml.safe_dump(data, sort_keys=True), path)


def save_json(data: dict, path: Path) -> None:
    save_text(json.dumps(data, indent=2, sort_keys=True) + '\n', path)


def save_csv(rows: Iterable[dict], path: Path) -> None:
    rows = list(rows)
    buffer = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator='\n')
        writer.writeheader()
        writer.writerows(rows)
    save_text(buffer.getvalue(), path)


def load_torch(path: Path, what: str) -> dict:
    """``torch.load(weights_only=True)`` with a one-line error for a truncated or corrupted file."""
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise UserError(f'{what} not found: {path}') from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f'{path} is unreadable (truncated or corrupted?): {reason}') from None
    if not isinstance(data, dict):
        raise UserError(f'{path} is not a {what} (expected a dict, got {type(data).__name__})')
    return data


class Log:
    """Prints a line and appends it to the record's log.txt."""

    def __init__(self, path: Path | None = None, quiet: bool = False):
        self.path, self.quiet = (Path(path) if path else None), quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, 'a') as handle:
                handle.write(f'{time.strftime("%Y-%m-%d %H:%M:%S")} {message}\n')


def record_folder(record_root: str | Path, name: str) -> Path:
    if not name or Path(name).name != name or name in ('.', '..'):
        raise UserError(f'invalid record name {name!r}: use a plain folder name such as badnet_cifar10')
    return Path(record_root) / name


def load_attack_record(folder: Path) -> dict:
    """The attack record in ``folder``, checked for the keys every defense relies on."""
    path = Path(folder) / ATTACK_RESULT
    if not path.exists():
        hint = 'an unfinished attack (rerun it with --resume)' if (Path(folder) / 'checkpoint.pt').exists() else 'no record'
        raise UserError(f'{folder} holds {hint}: {ATTACK_RESULT} not found (run an attack with --save_folder_name {Path(folder).name} first)')
    record = load_torch(path, 'attack record')
    missing = [key for key in REQUIRED_ATTACK_KEYS if key not in record]
    if missing:
        raise UserError(f'{path} is not an attack record (missing {", ".join(missing)})')
    return record


def load_record_model(record: dict):
    """Rebuild a record's model from the registry, normalised for its dataset, with its weights."""
    from models import build_model
    model = build_model(record['model_name'], record['num_classes'], tuple(record['input_shape']),
                        dataset=record.get('dataset'))
    try:
        model.load_state_dict(record['model'])
    except (RuntimeError, TypeError, AttributeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the record's weights do not fit this toolkit's {record['model_name']} ({reason}); "
                        'a record written by an older version is rebuilt by rerunning its attack') from None
    return model


def metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """A small fixed-width table: one row per stage, columns ACC, ASR, RA (and DER), in percent."""
    columns = [c for c in ('acc', 'asr', 'ra', 'der') if any(c in r for r in rows.values())]
    width = max(len(name) for name in rows) + 2
    lines = [''.ljust(width) + ''.join(c.upper().rjust(8) for c in columns)]
    for name, values in rows.items():
        cells = ''.join((f'{100 * values[c]:8.2f}' if c in values else ''.rjust(8)) for c in columns)
        lines.append(name.ljust(width) + cells)
    return '\n'.join(lines)
