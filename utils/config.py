"""YAML + command-line configuration.

A YAML file sets the parser's defaults, the command line overrides them, and argparse
type-checks both. An unknown YAML key is an error naming the key and the file. A YAML may
layer over another one with ``base_yaml: <path relative to this YAML>`` (attack configs layer
over the training recipe in ``config/attack/prototype/<dataset>.yaml``).

Relative paths (the YAML path and every option whose type is :func:`path_arg`) resolve
against the current directory when they exist there, otherwise against the script's own
folder: that is what lets BackdoorBench-style commands such as
``python ./attack/badnet_attack.py --yaml_path ../config/attack/badnet/cifar10.yaml``
run verbatim from the repository root.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from . import REPO_ROOT, UserError

BASE_KEY = 'base_yaml'


def str2bool(value: str) -> bool:
    """argparse type for booleans written as true/false, yes/no, 1/0."""
    text = str(value).strip().lower()
    if text in ('true', 'yes', '1', 'on'):
        return True
    if text in ('false', 'no', '0', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {value!r}')


def resolve_path(value: str | None, script_dir: Path | None) -> str | None:
    """Absolute path for ``value``: the current directory wins if the path exists there, then the
    script's folder, then the repository root (so ``./config/...`` works from anywhere), else the
    current directory (so errors name a real place)."""
    if value is None or value == '':
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    here = Path.cwd() / path
    if here.exists() or script_dir is None:
        return str(here.resolve())
    for base in (Path(script_dir), REPO_ROOT):
        if (base / path).exists():
            return str((base / path).resolve())
    return str(here.resolve())


def path_arg(value: str) -> str:
    """argparse type marking a path option: resolved by :func:`parse_config` (see the module doc)."""
    return str(value)


def bounded(kind: type, low: float | None = None, high: float | None = None, *,
            low_open: bool = False, high_open: bool = False, name: str | None = None) -> Callable[[str], Any]:
    """argparse type: ``kind`` (int or float) within the given bounds, finite. The same function
    checks the command line and YAML values (see :func:`_check_value`), so a script needs no
    hand-written range check for its options."""
    left = '(' if low_open else '['
    right = ')' if high_open else ']'
    if low is not None and high is not None:
        wanted = f'lie in {left}{low:g}, {high:g}{right}'
    elif low is not None:
        wanted = f'be {">" if low_open else ">="} {low:g}'
    elif high is not None:
        wanted = f'be {"<" if high_open else "<="} {high:g}'
    else:
        wanted = 'be finite'

    def check(text: str):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f'expected {"an integer" if kind is int else "a number"}, got {text!r}') from None
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f'must {wanted}, got {text}')
        return value

    check.__name__ = name or f'{kind.__name__} that must {wanted}'
    return check


# the ranges this toolkit's options use
probability = bounded(float, 0, 1, name='probability')                            # [0, 1]
fraction = bounded(float, 0, 1, low_open=True, name='fraction')                   # (0, 1]
positive_float = bounded(float, 0, low_open=True, name='positive number')         # > 0
nonnegative_float = bounded(float, 0, name='non-negative number')                 # >= 0
positive_int = bounded(int, 1, name='positive integer')                           # >= 1
nonnegative_int = bounded(int, 0, name='non-negative integer')                    # >= 0
pixel_value = bounded(int, 0, 255, name='pixel value')                            # 0..255


class ToolkitParser(argparse.ArgumentParser):
    """ArgumentParser that knows its script's folder and reports errors in one line."""

    def __init__(self, *args, script_file: str | None = None, **kwargs):
        kwargs.setdefault('formatter_class', argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.script_dir = Path(script_file).resolve().parent if script_file else None

    def error(self, message):  # one line, exit code 2 (argparse's code for usage errors)
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, tuple[Any, Path]]:
    """Flattened {key: (value, file it came from)}, following ``base_yaml`` includes."""
    if path in seen:
        raise UserError(f'{path}: base_yaml includes itself')
    if not path.is_file():
        raise UserError(f'config file not found: {path}')
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(f'{path}: malformed YAML ({" ".join(line.strip() for line in first[:3])})') from None
    if content is None:
        content = {}
    if not isinstance(content, dict):
        raise UserError(f'{path}: expected a mapping of option: value, got {type(content).__name__}')
    merged: dict[str, tuple[Any, Path]] = {}
    base = content.pop(BASE_KEY, None)
    if base is not None:
        merged.update(_read_yaml((path.parent / str(base)).resolve(), seen + (path,)))
    merged.update({str(k): (v, path) for k, v in content.items()})
    return merged


def _check_value(action: argparse.Action, key: str, value: Any, source: Path | str) -> Any:
    """Run a YAML value through the same type and choices checks as the command line."""
    if value is None and action.default is not None:
        raise UserError(f'{source}: {key} needs a value (got an empty value)')
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if action.nargs in (None, '?') and isinstance(value, list):
        raise UserError(f'{source}: {key} expects a single value, got a list')
    checked = []
    for item in values:
        if action.type is not None and not (action.type is str and isinstance(item, str)):
            text = str(item).lower() if isinstance(item, bool) else str(item)
            try:
                item = action.type(text)
            except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
                raise UserError(f'{source}: invalid value for {key}: {value!r} ({exc})') from None
        elif action.type is None and not isinstance(item, (str, bool)) and action.const is None:
            item = str(item)
        if action.choices is not None and item not in action.choices:
            raise UserError(f'{source}: invalid value for {key}: {item!r} '
                            f'(choose from {", ".join(map(str, action.choices))})')
        checked.append(item)
    return checked if isinstance(value, list) or action.nargs in ('*', '+') else checked[0]


def parse_config(parser: ToolkitParser, argv: Sequence[str] | None = None,
                 config: dict[str, Any] | None = None) -> argparse.Namespace:
    """Parse ``--yaml_path`` first, make its keys the parser's defaults, then parse the rest.

    ``config`` (the Python entry points' dict of option: value) layers over the YAML and under the
    command line; its values go through the same checks as YAML values. Its ``yaml_path`` is used
    when the command line gives none."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = dict(config or {})
    pre = ToolkitParser(add_help=False, prog=parser.prog)
    pre.add_argument('--yaml_path')
    known, _ = pre.parse_known_args(argv)
    yaml_path = known.yaml_path or config.get('yaml_path')
    actions = {a.dest: a for a in parser._actions if a.dest != 'help'}
    layers: list[tuple[str, Any, Any]] = []
    if yaml_path:
        yaml_file = Path(resolve_path(str(yaml_path), parser.script_dir))
        layers += [(key, value, source) for key, (value, source) in _read_yaml(yaml_file).items()]
    layers += [(key, value, 'config') for key, value in config.items() if key != 'yaml_path']
    defaults = {}
    for key, value, source in layers:
        if key not in actions or key == 'yaml_path':
            valid = ', '.join(sorted(k for k in actions if k != 'yaml_path'))
            raise UserError(f'{source}: unknown key {key!r} (valid keys: {valid})')
        defaults[key] = _check_value(actions[key], key, value, source)
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if yaml_path and not known.yaml_path:
        args.yaml_path = str(yaml_path)
    for action in parser._actions:
        if action.type is path_arg:
            setattr(args, action.dest, resolve_path(getattr(args, action.dest), parser.script_dir))
    return args


COMPILE_MODES = ('none', 'default', 'reduce-overhead')


def add_common_arguments(parser: ToolkitParser) -> None:
    """Options every attack and defense script shares."""
    parser.add_argument('--yaml_path', type=path_arg, help='YAML file whose keys set the defaults of these options')
    parser.add_argument('--device', default='auto', help='auto (CUDA when present, else CPU), cpu, cuda or cuda:N')
    parser.add_argument('--random_seed', type=nonnegative_int, default=0, help='seeds Python, NumPy and torch; subsets and poison indices derive from it')
    parser.add_argument('--amp', type=str2bool, default=True, help='mixed precision (used on CUDA only)')
    parser.add_argument('--compile', default='none', choices=COMPILE_MODES,
                        help="torch.compile the training step: 'reduce-overhead' replays it as CUDA graphs (2.3x and 2.9x "
                             "the eager loop's images/s in two runs, PreAct-ResNet18 at batch 128 on an H200; "
                             'bench/throughput.py), after about 20 s of compilation per training phase; its kernels round '
                             "differently from the eager loop's (README, 'Measured on a GPU')")
    parser.add_argument('--record_root', default=str(REPO_ROOT / 'record'), type=path_arg,
                        help='folder holding one sub-folder per record')


def resolve_device(name: str):
    """``auto`` -> CUDA when present, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` as given."""
    import re

    import torch
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if not re.fullmatch(r'cpu|cuda(:\d+)?', str(name)):
        raise UserError(f'unsupported device {name!r} (use auto, cpu, cuda or cuda:N)')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'device {name!r} requested but CUDA is not available (use --device auto or cpu)')
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f'device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are visible')
    return device



def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a timer read after it is true."""
    import torch
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def config_to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """Plain-value dict of the resolved config (what goes into config.yaml and the record)."""
    return {k: v for k, v in sorted(vars(args).items()) if isinstance(v, (str, int, float, bool, list, type(None)))}


def run_main(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Call a script's main; a UserError becomes one line on stderr and exit code 2."""
    import warnings
    warnings.formatwarning = lambda message, category, *rest, **kw: f'warning: {message}\n'
    try:
        code = main(argv)
    except UserError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted: the last completed epoch is checkpointed; rerun with --resume to continue', file=sys.stderr)
        return 130
    return code if type(code) is int else 0   # a main's own exit code (e.g. a sweep with failed steps)
