"""The benchmark grid: datasets x models x attacks x defenses x seeds from one YAML, run as steps.

A sweep YAML (``config/sweep/<name>.yaml``) names its axes; an option whose value is a list (for an
option that takes one value) is an axis too (``prune_exponent: [6, 4, 3]`` is three runs, each in
its own folder). Every attack record is trained once; every defense runs on it when it exists.
A step is skipped when its outputs exist and verify (intact hashes, and the options they were made
with are the step's), so a killed sweep resumes where it stopped; a step that exists but does not
verify is rerun (``--resume`` when its run has this step's options, else ``--overwrite``). A failed
step never stops the others: it is listed at the end with its log; the defenses of a failed attack
are skipped. Steps run as subprocesses (``--workers N`` at once) or as submitit jobs (``launcher:
slurm``; ``local`` runs submitit's local executor), by one scheduler that honours the dependencies
(a defense waits for its attack; an attack trained on another's record, e.g. ``clean_model``, for it).
With ``archive:`` set, every step that verifies is also kept, without weights, in that folder
(:mod:`utils.archive`), and a step found there with its options counts as done on any disk.
While it runs, the sweep's report (and its archive's) is rebuilt after a finished step, at most every
``REPORT_EVERY_S``: a sweep that is killed leaves tables at most that far behind its steps.

    python sweep.py --yaml_path config/sweep/demo_cpu.yaml
"""
from __future__ import annotations

import ctypes
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from . import REPO_ROOT, UserError
from .config import config_to_dict, parse_config
from .record import ATTACK_RESULT, DEFENSE_RESULT, save_json
from .registry import ATTACKS, DEFENSES
from .archive import archive_folder, archive_run, ran_on, read_stamp, record_digest, summary_sha256
from .runs import FolderLock, NOT_IDENTITY, check_record_hash, folder_in_use, same_option_value, staging_path

SWEEP_KEYS = {'name', 'datasets', 'models', 'seeds', 'attacks', 'defenses', 'recipe', 'defense_recipe', 'record_name',
              'launcher', 'workers', 'slurm', 'archive'}
LAUNCHERS = ('subprocess', 'local', 'slurm')
REPORT_EVERY_S = 600   # a running sweep rebuilds its tables and plots after a step at most this often
DEFAULT_RECORD_NAME = '{attack}_{dataset}_{model}_s{seed}'


@dataclass
class Step:
    """One run: an attack that makes a record, or a defense on one."""
    key: str                      # unique: 'attack:<record>' or 'defense:<record>/<folder>'
    kind: str                     # 'attack' | 'defense'
    method: str                   # the registry name
    config: dict[str, Any]        # the options given to run_attack / run_defense
    record: str
    folder: str                   # the defense folder's name ('' for an attack)
    depends: Optional[str] = None
    labels: dict[str, Any] = field(default_factory=dict)

    def output(self, record_root: Path) -> Path:
        base = Path(record_root) / self.record
        return base if self.kind == 'attack' else base / 'defense' / self.folder


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _parser(kind: str, method: str):
    registry = ATTACKS if kind == 'attack' else DEFENSES
    return registry.get(method)().build_parser(str(registry.script(method)))


def _list_options(parser) -> set[str]:
    return {a.dest for a in parser._actions if a.nargs in ('*', '+')}


def expand(options: dict[str, Any], list_options: set[str]) -> list[dict[str, Any]]:
    """Every combination of the options' axes: a list value is an axis, except for an option that
    itself takes a list, whose axis is a list of lists."""
    axes = {}
    for key, value in options.items():
        is_axis = isinstance(value, list) and (key not in list_options or (value and isinstance(value[0], list)))
        axes[key] = value if is_axis else [value]
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))] if keys else [{}]


def _suffix(setting: dict[str, Any], varying: set[str]) -> str:
    parts = [f'{k}-{v}' for k, v in sorted(setting.items()) if k in varying]
    return ('_' + '_'.join(parts).replace('/', '-').replace(' ', '').replace('.', 'p')) if parts else ''


def load_sweep(path: Path) -> dict[str, Any]:
    """The sweep YAML, checked: unknown keys, attacks, defenses, models, datasets and options are
    refused before anything runs, with the valid names."""
    from models import MODELS
    from .data import DATASETS
    try:
        sweep = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f'sweep file not found: {path}') from None
    except yaml.YAMLError as exc:
        raise UserError(f'{path}: malformed YAML ({str(exc).splitlines()[0]})') from None
    if not isinstance(sweep, dict):
        raise UserError(f'{path}: expected a mapping')
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise UserError(f'{path}: unknown key {sorted(unknown)[0]!r} (valid keys: {", ".join(sorted(SWEEP_KEYS))})')
    sweep.setdefault('name', Path(path).stem)
    for key, known in (('datasets', sorted(DATASETS)), ('models', sorted(MODELS))):
        sweep[key] = _as_list(sweep.get(key, ['cifar10' if key == 'datasets' else 'resnet20']))
        bad = [v for v in sweep[key] if v not in known]
        if bad:
            raise UserError(f'{path}: unknown {key[:-1]} {bad[0]!r} (known: {", ".join(known)})')
    sweep['seeds'] = _as_list(sweep.get('seeds', [0]))
    for key, registry in (('attacks', ATTACKS), ('defenses', DEFENSES)):
        entries = sweep.get(key) or {}
        if isinstance(entries, list):
            entries = {name: {} for name in entries}
        for label, options in entries.items():
            options = dict(options or {})
            method = options.pop(key[:-1], label)
            if method not in registry.names():
                raise UserError(f'{path}: unknown {key[:-1]} {method!r} in {key} (known: {", ".join(registry.names())})')
            entries[label] = {'method': method, 'options': options}
        sweep[key] = entries
    if not sweep['attacks']:
        raise UserError(f'{path}: a sweep needs at least one attack')
    sweep['launcher'] = sweep.get('launcher', 'subprocess')
    if sweep['launcher'] not in LAUNCHERS:
        raise UserError(f'{path}: unknown launcher {sweep["launcher"]!r} (choose from {", ".join(LAUNCHERS)})')
    if sweep.get('archive') is not None:
        sweep['archive'] = REPO_ROOT / sweep['archive']   # relative to the repository, as the YAMLs' other paths
    return sweep


def plan(sweep: dict[str, Any], record_root: Path) -> list[Step]:
    """The sweep's steps (attacks first), every option checked by the script's own parser."""
    steps: list[Step] = []
    recipe, defense_recipe = sweep.get('recipe') or {}, sweep.get('defense_recipe') or {}
    template = sweep.get('record_name', DEFAULT_RECORD_NAME)
    for dataset, model, seed, (label, attack) in itertools.product(sweep['datasets'], sweep['models'], sweep['seeds'],
                                                                    sweep['attacks'].items()):
        parser = _parser('attack', attack['method'])
        settings = expand(attack['options'], _list_options(parser))
        varying = {k for k in attack['options'] if len({json.dumps(s.get(k)) for s in settings}) > 1}
        for setting in settings:
            record = template.format(attack=label, dataset=dataset, model=model, seed=seed) + _suffix(setting, varying)
            config = {'yaml_path': str(REPO_ROOT / 'config' / 'attack' / attack['method'] / f'{dataset}.yaml')} | recipe | setting
            config |= {'dataset': dataset, 'model': model, 'random_seed': seed, 'save_folder_name': record,
                       'record_root': str(record_root)}
            _check_options('attack', attack['method'], config, sweep)
            labels = {'dataset': dataset, 'model': model, 'seed': seed, 'attack': label, 'attack_setting': setting}
            attack_step = Step(f'attack:{record}', 'attack', attack['method'], config, record, '', None, labels)
            steps.append(attack_step)
            for defense_label, defense in sweep['defenses'].items():
                dparser = _parser('defense', defense['method'])
                dsettings = expand(defense['options'], _list_options(dparser))
                dvarying = {k for k in defense['options'] if len({json.dumps(s.get(k)) for s in dsettings}) > 1}
                for dsetting in dsettings:
                    folder = defense_label + _suffix(dsetting, dvarying)
                    dconfig = {'yaml_path': str(REPO_ROOT / 'config' / 'defense' / defense['method'] / f'{dataset}.yaml')}
                    dconfig |= defense_recipe | dsetting | {'result_file': record, 'save_folder_name': folder,
                                                            'record_root': str(record_root)}
                    _check_options('defense', defense['method'], dconfig, sweep)
                    steps.append(Step(f'defense:{record}/{folder}', 'defense', defense['method'], dconfig, record, folder,
                                      attack_step.key, labels | {'defense': defense_label, 'setting': dsetting}))
    records = {s.record: s.key for s in steps if s.kind == 'attack'}
    for step in steps:   # an attack trained on another attack's record (clean_model) waits for it
        if step.kind == 'attack':
            step.depends = next((records[v] for k, v in step.config.items()
                                 if k != 'save_folder_name' and isinstance(v, str) and v in records), None)
    keys = [s.key for s in steps]
    if len(set(keys)) != len(keys):
        raise UserError('two steps of this sweep would write the same folder: give the attacks or defenses distinct labels')
    return steps


def _check_options(kind: str, method: str, config: dict, sweep: dict) -> None:
    if not Path(config['yaml_path']).is_file():
        raise UserError(f'{sweep["name"]}: no {kind} YAML {config["yaml_path"]}')
    try:
        parse_config(_parser(kind, method), [], config)
    except SystemExit:   # argparse has printed why
        raise UserError(f'{sweep["name"]}: invalid options for {kind} {method}') from None


def expected_options(step: Step) -> dict[str, Any]:
    """The resolved options a step's run records in its config.yaml."""
    return config_to_dict(parse_config(_parser(step.kind, step.method), [], step.config))


def _same_run(stored: dict[str, Any], step: Step) -> bool:
    skip = NOT_IDENTITY | ({'dataset', 'model'} if step.kind == 'defense' else set()) | {'record_format', 'attack_record_sha256'}
    expected = expected_options(step)
    return all(same_option_value(stored.get(k), v) for k, v in expected.items() if k not in skip)


def verified(step: Step, record_root: Path) -> bool:
    """Whether the step's outputs exist, are intact and were made with the step's options."""
    folder = step.output(record_root)
    result = ATTACK_RESULT if step.kind == 'attack' else DEFENSE_RESULT
    if not (folder / result).exists() or not (folder / 'config.yaml').exists():
        return False
    try:
        check_record_hash(folder, result_name=result)
        if step.kind == 'defense':
            parent = json.loads((folder / 'summary.json').read_text()).get('attack_record_sha256')
            if parent is not None and parent != check_record_hash(folder.parents[1]):
                return False
        return _same_run(yaml.safe_load((folder / 'config.yaml').read_text()) or {}, step)
    except (UserError, OSError, ValueError):
        return False


def archived(step: Step, archive: Path) -> bool:
    """Whether the archive holds the step's run, made with the step's options (a defense: on the
    attack record archived beside it)."""
    folder = archive_folder(archive, step.record, step.folder)
    if read_stamp(folder) is None:
        return False
    try:
        if not _same_run(yaml.safe_load((folder / 'config.yaml').read_text()) or {}, step):
            return False
    except (OSError, yaml.YAMLError):
        return False
    return step.kind == 'attack' or ran_on(folder, archive_folder(archive, step.record))


def taken_from_archive(steps: list[Step], archive: Optional[Path], done: set[str]) -> set[str]:
    """The steps an archive settles: every archived defense, and every archived attack that no step
    still to run needs (its defenses, or an attack trained on its record)."""
    if archive is None:
        return set()
    taken = {s.key for s in steps if s.key not in done and archived(s, archive)}
    for step in reversed(steps):   # users come after the record they use
        if step.kind == 'attack' and step.key in taken and any(
                other.depends == step.key and other.key not in done | taken for other in steps):
            taken.discard(step.key)
    return taken


def keep_in_archive(step: Step, record_root: Path, archive: Optional[Path]) -> None:
    """Copy a verified step's text files into the archive unless it holds them already."""
    if archive is None:
        return
    source, target = step.output(record_root), archive_folder(archive, step.record, step.folder)
    if read_stamp(target) is not None and summary_sha256(target) == summary_sha256(source) and archived(step, archive):
        return
    parent = Path(record_root) / step.record / ATTACK_RESULT
    stamp = {'record_digest' if step.kind == 'attack' else 'attack_record_digest': record_digest(parent)}
    archive_run(source, target, step.key, stamp)


def launch_options(step: Step, record_root: Path) -> dict[str, Any]:
    """--resume for an interrupted run of this step's options, --overwrite for anything else in the way."""
    folder = step.output(record_root)
    staging = staging_path(folder)
    if not folder.exists():
        return {}
    run_file = folder / 'run.json'
    if run_file.exists():
        try:
            identity = json.loads(run_file.read_text())['identity']
            if _same_run(identity, step) and _same_attack_record(identity, step, record_root):
                return {'resume': True}
        except (OSError, ValueError, KeyError):
            pass
    return {'overwrite': True, 'resume': staging.exists()}


def _same_attack_record(identity: dict[str, Any], step: Step, record_root: Path) -> bool:
    """A defense run resumes only on the attack record it started from (a retrained record starts it again)."""
    if step.kind != 'defense' or identity.get('attack_record_sha256') is None:
        return True
    try:
        return identity['attack_record_sha256'] == check_record_hash(step.output(record_root).parents[1])
    except (UserError, OSError):
        return False


def step_states(sweep_path: Path, record_root: Path) -> list[tuple[Step, str]]:
    """What a run of the sweep would do with each step, without running or writing anything:
    ``running`` (a run holds its folder now), ``done`` (its outputs verify), ``rerun`` (outputs that do
    not verify: changed, made with other options, or from an attack record that has changed since),
    ``resume`` (an interrupted run of its options), ``archived`` (settled by the sweep's archive) or
    ``run`` (nothing there yet)."""
    sweep = load_sweep(sweep_path)
    steps = plan(sweep, Path(record_root))
    done = {s.key for s in steps if verified(s, record_root)}
    taken = taken_from_archive(steps, sweep.get('archive'), done)
    states = []
    for step in steps:
        result = step.output(record_root) / (ATTACK_RESULT if step.kind == 'attack' else DEFENSE_RESULT)
        if folder_in_use(step.output(record_root)):
            state = 'running'
        elif step.key in done:
            state = 'done'
        elif step.key in taken:
            state = 'archived'
        else:
            options = launch_options(step, record_root)
            state = 'rerun' if result.exists() or options.get('overwrite') else 'resume' if options.get('resume') else 'run'
        states.append((step, state))
    return states


def run_step(payload: dict[str, Any]) -> int:
    """Run one step in this process (a subprocess of the sweep, or a submitit job): 0 on success."""
    from .attack import run_attack
    from .config import run_main
    from .defense import run_defense
    entry = run_attack if payload['kind'] == 'attack' else run_defense
    code = run_main(lambda argv: entry(payload['method'], payload['config'], argv), [])
    if code:
        raise RuntimeError(f'{payload["kind"]} {payload["method"]} exited with code {code}')
    return code


def _die_with_parent() -> None:
    """In a child: be killed when the sweep process dies, however it dies (Linux prctl)."""
    try:
        ctypes.CDLL('libc.so.6').prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except OSError:
        pass


class SubprocessLauncher:
    """Each step a ``python sweep.py --run_step`` child process, its output in the step's log."""

    def __init__(self, logs: Path):
        self.logs = logs

    def launch(self, step: Step, payload: dict) -> Any:
        path = self.logs / f'{step.key.replace("/", "__").replace(":", "_")}.json'
        save_json(payload, path)
        log = open(path.with_suffix('.log'), 'a')
        process = subprocess.Popen([sys.executable, str(REPO_ROOT / 'sweep.py'), '--run_step', str(path)], cwd=REPO_ROOT,
                                   stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                   env=dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1')))
        process.log_path = path.with_suffix('.log')
        log.close()
        return process

    def poll(self, handle) -> Optional[bool]:
        """None while running, else whether it succeeded."""
        code = handle.poll()
        return None if code is None else code == 0

    def log_path(self, handle) -> Path:
        return handle.log_path


class SubmititLauncher:
    """Each step a submitit job: ``local`` (submitit's local executor, for tests and single
    machines) or ``slurm`` (partition, GPUs and time from the sweep YAML's ``slurm`` mapping)."""

    def __init__(self, logs: Path, cluster: str, slurm: dict[str, Any]):
        import submitit
        if cluster == 'local':
            self.executor = submitit.LocalExecutor(folder=str(logs / 'submitit'))
            self.executor.update_parameters(timeout_min=int(slurm.get('timeout_min', 24 * 60)))
        else:
            self.executor = submitit.AutoExecutor(folder=str(logs / 'submitit'), cluster='slurm')
            self.executor.update_parameters(**{k: v for k, v in slurm.items()})

    def launch(self, step: Step, payload: dict) -> Any:
        return self.executor.submit(run_step, payload)

    def poll(self, handle) -> Optional[bool]:
        if not handle.done():
            return None
        try:
            handle.result()
            return True
        except Exception:
            return False

    def log_path(self, handle) -> Path:
        return Path(handle.paths.stderr)


def run_sweep(sweep_path: Path, record_root: Path, workers: Optional[int] = None, launcher: Optional[str] = None,
              report: bool = True) -> dict[str, Any]:
    """Plan, skip what verifies, run the rest (dependencies honoured), report. Returns the outcome."""
    from tqdm import tqdm
    sweep = load_sweep(sweep_path)
    record_root = Path(record_root)
    steps = plan(sweep, record_root)
    out = record_root / 'sweeps' / sweep['name']
    logs = out / 'logs'
    logs.mkdir(parents=True, exist_ok=True)
    with FolderLock(out / '.lock', f'the sweep {sweep["name"]}'):
        save_json({'sweep': str(sweep_path), 'steps': [asdict(s) for s in steps]}, out / 'steps.json')
        kind = launcher or sweep['launcher']
        runner = SubprocessLauncher(logs) if kind == 'subprocess' else SubmititLauncher(logs, kind, sweep.get('slurm') or {})
        workers = workers or int(sweep.get('workers', 1))
        archive = sweep.get('archive')
        if archive is not None:   # written first, so the archive of a sweep still running reports what it holds
            save_json({'sweep': str(Path(sweep_path).name),
                       'steps': [{k: v for k, v in asdict(s).items() if k != 'config'} for s in steps]},
                      Path(archive) / 'steps.json')
        done = {s.key for s in steps if verified(s, record_root)}
        not_archived: dict[str, str] = {}

        def archive_step(step: Step) -> None:
            # a step that ran stays done if its copy fails: the sweep goes on and reports it at the end
            try:
                keep_in_archive(step, record_root, archive)
            except Exception as error:   # noqa: BLE001 -- any failure of the copy, named in the outcome
                not_archived[step.key] = f'{type(error).__name__}: {error}'
                tqdm.write(f'warning: {step.key} is done but not archived ({not_archived[step.key]})')

        for step in steps:
            if step.key in done:
                archive_step(step)
        taken = taken_from_archive(steps, archive, done)
        from_archive: set[str] = set()
        looked_up: set[str] = set()   # steps whose archive entry has been checked (once: when they may run)
        failed: dict[str, Path] = {}
        skipped: list[str] = []
        pending = [s for s in steps if s.key not in done]
        running: dict[str, tuple[Step, Any]] = {}
        started: dict[str, float] = {}
        bar = tqdm(total=len(steps), initial=len(done), desc=f'sweep {sweep["name"]}', disable=None)
        last_report = time.time()
        while pending or running:
            for step in list(pending):
                if step.depends in failed or step.depends in skipped:
                    pending.remove(step)
                    skipped.append(step.key)
                    bar.update(1)
                    continue
                if step.depends is not None and step.depends not in done:
                    continue
                # an archived defense is checked when its attack is done: a retrained record may differ
                if archive is not None and step.key not in looked_up and (
                        step.key in taken if step.kind == 'attack' else archived(step, archive)):
                    pending.remove(step)
                    done.add(step.key)
                    from_archive.add(step.key)
                    bar.update(1)
                    continue
                looked_up.add(step.key)
                if len(running) >= workers:
                    continue
                payload = {'kind': step.kind, 'method': step.method,
                           'config': step.config | launch_options(step, record_root)}
                running[step.key] = (step, runner.launch(step, payload))
                started[step.key] = time.time()
                pending.remove(step)
            for key, (step, handle) in list(running.items()):
                outcome = runner.poll(handle)
                if outcome is None:
                    continue
                del running[key]
                bar.update(1)
                if outcome and verified(step, record_root):
                    done.add(key)
                    archive_step(step)
                else:
                    failed[key] = runner.log_path(handle)
                # one line per finished step, also where the bar is off (a log written by nohup or a job)
                tqdm.write(f'{time.strftime("%Y-%m-%d %H:%M")} [{len(steps) - len(pending) - len(running)}/{len(steps)}] '
                           f'{"done" if key in done else "FAILED"} {key} ({(time.time() - started.pop(key)) / 60:.1f} min)')
                if report and key in done and (pending or running) and time.time() - last_report >= REPORT_EVERY_S:
                    try:   # the running steps go on meanwhile; a report that fails is retried after the next step
                        write_reports(out, record_root, archive)
                        last_report = time.time()
                    except Exception as error:   # noqa: BLE001 -- the steps matter more than their table
                        tqdm.write(f'warning: the report could not be rebuilt ({type(error).__name__}: {error})')
            bar.set_postfix_str(', '.join(running) or 'waiting')
            time.sleep(0.2)
        bar.close()
    outcome = {'steps': len(steps), 'done': len(done), 'from_archive': len(from_archive), 'failed': {k: str(v) for k, v in failed.items()},
               'skipped': skipped, 'not_archived': not_archived, 'folder': str(out)}
    save_json(outcome, out / 'outcome.json')
    if report:
        write_reports(out, record_root, archive)
    return outcome


def write_reports(out: Path, record_root: Path, archive: Optional[Path]) -> None:
    """The sweep's tables and plots, and its archive's own copy (rebuilt from the archive alone)."""
    from .report import write_report
    write_report(out, record_root, archive)
    if archive is not None:
        write_report(archive)
