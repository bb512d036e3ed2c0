"""The record writer and reader (layout in DESIGN.md §3). Every file is written to a temporary
name and renamed into place, so a crash never leaves half a record."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml
from tqdm import tqdm

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
        text = str(exc)
        if 'Unsupported global' in text:
            raise UserError(f'{path} holds Python objects other than tensors and plain values: refused, since '
                            'loading them could run code') from None
        if 'Weights only load failed' in text:    # torch's advice to load unsafely is not for our users
            detail = text.split('WeightsUnpickler error:')[-1].strip().splitlines()
            reason = detail[0] if detail and detail[0] else 'not a torch file of tensors'
        else:
            reason = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise UserError(f'{path} is unreadable (truncated or corrupted?): {reason}') from None
    if not isinstance(data, dict):
        raise UserError(f'{path} is not {article(what)} {what} (expected a dict, got {type(data).__name__})')
    return data


def cached_artefact(record_root: str | Path, kind: str, inputs: dict[str, Any], build, log) -> dict[str, Any]:
    """What ``build()`` returns (a dict of tensors and plain values: a perturbation, an encoder's
    weights, FMP's channel scores), built once and reused by every later run whose ``inputs``
    (JSON-serialisable values that determine it) match: ``record/.artefacts/<kind>-<hash>.pt``.
    A cache file that does not load or holds other inputs is rebuilt, never trusted."""
    plain = _plain(inputs)
    path = artefact_path(record_root, kind, inputs)
    if path.exists():
        try:
            cached = load_torch(path, f'{kind} artefact')
        except UserError as error:
            log(f'rebuilding {kind}: {error}')
            cached = {}
        if cached.get('inputs') == plain:
            log(f'reusing {kind} from {path}')
            return cached['artefact']
    log(f'building {kind} (cached as {path} for later runs)')
    artefact = build()
    save_torch({'inputs': plain, 'artefact': artefact}, path)
    partial_path(path).unlink(missing_ok=True)
    return artefact


def artefact_path(record_root: str | Path, kind: str, inputs: dict[str, Any]) -> Path:
    """Where :func:`cached_artefact` keeps the artefact of ``kind`` built from ``inputs``."""
    digest = hashlib.sha256(json.dumps(_plain(inputs), sort_keys=True).encode()).hexdigest()[:16]
    return Path(record_root) / '.artefacts' / f'{kind}-{digest}.pt'


def _plain(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` as they read back from JSON (tuples as lists, other objects as their str)."""
    return json.loads(json.dumps(inputs, sort_keys=True, default=str))


def partial_path(path: Path) -> Path:
    """The progress file of an artefact's unfinished build (removed once the artefact is saved)."""
    return path.with_name(path.stem + '.partial.pt')


def resumable_map(compute, items: list, progress_file: Path, desc: str, save_every: float = 60.0) -> list:
    """``[compute(item) for item in items]`` for long, deterministic builds (LC's PGD on a CPU), with a
    progress bar: the finished results are saved to ``progress_file`` (atomically, at most every
    ``save_every`` seconds), and a killed build resumes after the last saved item."""
    done: list = []
    if progress_file.exists():
        try:
            saved = load_torch(progress_file, 'progress file')
            if saved.get('items') == len(items):
                done = list(saved['done'])
        except UserError:
            done = []
    last_save = time.time()
    for item in tqdm(items[len(done):], desc=desc, initial=len(done), total=len(items), disable=None):
        done.append(compute(item))
        if time.time() - last_save >= save_every and len(done) < len(items):
            save_torch({'items': len(items), 'done': done}, progress_file)
            last_save = time.time()
    return done


def tensor_digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of tensors' dtypes, shapes and bytes: names exact inputs in an artefact's key."""
    hasher = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(f'{tensor.dtype}{tuple(tensor.shape)}'.encode())
        # flattened first: a 0-dim tensor cannot be viewed as bytes (its shape is in the header above)
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b'')
    return hasher.hexdigest()


def article(word: str) -> str:
    return 'an' if word[:1].lower() in 'aeiou' else 'a'


class Log:
    """Prints a line and appends it to the record's log.txt."""

    def __init__(self, path: Path | None = None, quiet: bool = False):
        self.path, self.quiet = (Path(path) if path else None), quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            try:
                print(message, flush=True)
            except BrokenPipeError:   # stdout piped into a reader that left (| head): keep training, log to file
                self.quiet = True
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
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
    problem = malformed(record)
    if problem:
        raise UserError(f'{path} is malformed: {problem} (rerun the attack with --overwrite)')
    return record


POISONED_KEYS = ('images', 'original_labels', 'backdoor_labels')


def malformed(record: dict) -> str | None:
    """What is wrong with a loaded attack record's contents, or None."""
    if not isinstance(record['model'], dict) or not record['model'] or \
            not all(isinstance(v, torch.Tensor) for v in record['model'].values()):
        return 'model is not a state dict of tensors'
    config = record['attack_config']
    if not isinstance(config, dict) or not {'dataset_path', 'random_seed'} <= set(config):
        return 'attack_config lacks dataset_path or random_seed'
    shape = record['input_shape']
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        return f'input_shape {shape!r} is not three positive integers'
    for part, index_key in (('bd_test', 'index'), ('bd_train', 'poison_index')):
        entry = record.get(part)
        if entry is None and part == 'bd_train':
            continue
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), torch.Tensor) for k in (index_key,) + POISONED_KEYS):
            return f'{part} lacks {index_key}/{"/".join(POISONED_KEYS)} tensors'
        lengths = {len(entry[k]) for k in (index_key,) + POISONED_KEYS}
        if len(lengths) != 1:
            return f'{part} holds tensors of different lengths {sorted(lengths)}'
        if part == 'bd_test' and not lengths.pop():
            return 'bd_test is empty (no poisoned test inputs to measure ASR on)'
    return None


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


def code_version() -> str:
    """The repository's commit (with ``+changes`` when the working tree differs); in an exported copy
    without git, the commit ``git archive`` wrote into utils/COMMIT; else 'unknown'."""
    import subprocess
    from . import REPO_ROOT
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = '', ''
    if not commit:   # an exported copy (git archive, a release tarball): the commit git wrote into utils/COMMIT
        archived_file = Path(__file__).with_name('COMMIT')
        archived = archived_file.read_text().strip() if archived_file.exists() else ''
        return archived if archived and not archived.startswith('$') else 'unknown'
    return commit + ('+changes' if dirty else '')


def metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """A small fixed-width table: one row per stage, columns ACC, ASR, RA (and DER), in percent."""
    columns = [c for c in ('acc', 'asr', 'ra', 'der') if any(c in r for r in rows.values())]
    width = max(len(name) for name in rows) + 2
    lines = [''.ljust(width) + ''.join(c.upper().rjust(8) for c in columns)]
    for name, values in rows.items():
        cells = ''.join((f'{100 * values[c]:8.2f}' if c in values else ''.rjust(8)) for c in columns)
        lines.append(name.ljust(width) + cells)
    return '\n'.join(lines)
