"""Property-based: random and malformed command lines and YAML files thrown at every attack's and
every defense's configuration. Each run must end with a configuration the script accepts (it
reaches the data loading) or a one-line error with exit code 2: never a traceback, and never a
write into the record folder."""
from __future__ import annotations

import contextlib
import io
import shutil
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import utils.attack
import utils.defense
from conftest import snapshot
from utils.config import run_main
from utils.registry import ATTACKS, DEFENSES

EXAMPLES = 40          # per script: 17 scripts, so about 680 command lines and YAML files in all


class Accepted(Exception):
    """Raised in place of loading the dataset: the configuration got through every check."""


def refuse_to_load(*args, **kwargs):
    raise Accepted


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(['', '0', '1', '-1', '0.5', '1e9', 'nan', 'inf', 'true', 'cifar10', 'mlp', 'resnet20', '..', '/',
                     'all2one', 'CosineAnnealingLR', 'threshold', 'graph', 'oracle_trigger', '3', '2.5']),
    st.text(string.printable, max_size=12))
YAML_VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))


def option_names(cls):
    parser = cls().build_parser(str(Path(__file__)))
    return sorted(a.dest for a in parser._actions if a.dest not in ('help', 'yaml_path', 'record_root'))


def as_text(value) -> str:
    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()


def command_lines(names):
    flag = st.sampled_from([f'--{n}' for n in names] + ['--bogus', '--', '-x'])
    value = SCALARS.map(as_text)
    return st.lists(st.one_of(st.tuples(flag, value), st.tuples(flag)), max_size=4).map(
        lambda pairs: [part for pair in pairs for part in pair])


def yaml_files(names):
    keys = st.one_of(st.sampled_from(names), st.text(string.ascii_lowercase + '_', min_size=1, max_size=10))
    mapping = st.dictionaries(keys, YAML_VALUES, max_size=4).map(lambda d: yaml.safe_dump(d))
    return st.one_of(mapping, st.sampled_from(['', '[1, 2', 'just text', '- a\n- b', 'a: [1,', '{a: 1}: 2',
                                              'base_yaml: missing.yaml', 'epochs: !!python/object:os.system x']))


def run(main, argv):
    """(outcome, stderr lines) of one script run in-process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = run_main(main, argv)
            outcome = 'finished' if code == 0 else code
        except Accepted:
            outcome = 'accepted'
        except SystemExit as exc:
            outcome = exc.code
    return outcome, [line for line in err.getvalue().splitlines() if line and not line.startswith('warning:')]


def check_property(main, argv, root: Path):
    before = snapshot(root)
    outcome, lines = run(main, argv)
    assert outcome in ('accepted', 2), (argv, outcome, lines)
    if outcome == 2:
        assert len(lines) == 1 and 'error' in lines[0] and 'Traceback' not in lines[0], (argv, lines)
    assert snapshot(root) == before, argv


@pytest.fixture(scope='module')
def record_root(badnet_record, tmp_path_factory):
    """A copy of the small ResNet-20 record for the defenses to read."""
    root = tmp_path_factory.mktemp('fuzz_records')
    shutil.copytree(badnet_record / 'badnet_small', root / 'badnet_small',
                    ignore=shutil.ignore_patterns('defense'))
    return root


FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
TRIED = {'inputs': 0}


def fuzz(cls, script: str, base_argv: list[str], root: Path) -> None:
    """Throw ``EXAMPLES`` command lines (each with or without a random YAML file) at ``cls``."""
    names = option_names(cls)

    @FUZZ
    @given(argv=command_lines(names), text=st.one_of(st.none(), yaml_files(names)))
    def check(argv, text):
        TRIED['inputs'] += 1
        with tempfile.TemporaryDirectory() as folder:
            extra = []
            if text is not None:
                (Path(folder) / 'c.yaml').write_text(text)
                extra = ['--yaml_path', str(Path(folder) / 'c.yaml')]
            check_property(lambda a: cls().run(script, a), [*base_argv, *extra, *argv], root)

    check()


@pytest.mark.parametrize('name', sorted(ATTACKS.names()))
def test_attack_configuration_is_accepted_or_refused_in_one_line(name, monkeypatch, tmp_path):
    monkeypatch.setattr(utils.attack, 'load_splits', refuse_to_load)
    root = tmp_path / 'record'
    root.mkdir()
    fuzz(ATTACKS.get(name), str(ATTACKS.script(name)), ['--record_root', str(root)], root)


@pytest.mark.parametrize('name', sorted(DEFENSES.names()))
def test_defense_configuration_is_accepted_or_refused_in_one_line(name, monkeypatch, record_root):
    monkeypatch.setattr(utils.defense, 'load_splits', refuse_to_load)
    fuzz(DEFENSES.get(name), str(DEFENSES.script(name)),
         ['--record_root', str(record_root), '--result_file', 'badnet_small'], record_root)


def test_report_how_many_inputs_were_tried():
    """Runs last in this module: the count goes to the test log (-rA shows it)."""
    print(f'property-based configuration inputs tried: {TRIED["inputs"]}')
    assert TRIED['inputs'] >= EXAMPLES or TRIED['inputs'] == 0
