"""SSBA: a tiny StegaStamp encoder trained on real CIFAR-10 images hides the secret so that its
decoder reads it back, with a faint residual that differs between images; seeds, the record (the
poisoned inputs rebuild from it), the encoder reused from the artefact cache, and bad input.
In-process on the 1,000 training images of train_fraction 0.02, with an 8-bit encoder."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import attack.ssba_attack as ssba
import utils.data
from attack.ssba_attack import SSBA, bit_accuracy, embed_secret, load_stegastamp, psnr, train_stegastamp
from conftest import CIFAR10_DIR, ONE_LINE_ERROR, REPO_ROOT, rejection, run_script
from utils.attack import run_attack
from utils.config import parse_config
from utils.data import dataset_spec
from utils.record import load_attack_record
from utils.registry import ATTACKS

YAML = REPO_ROOT / 'config' / 'attack' / 'ssba' / 'cifar10.yaml'
SCRIPT = REPO_ROOT / 'attack' / 'ssba_attack.py'
# 8 bits, width 8: 12 epochs of batches of 32 over 1,000 images (384 steps, about 20 s on one busy core)
# read the bits at about 0.999 with a PSNR near 30 dB (28 dB for encoder seed 3, the slowest of 0..6 to start)
TINY_ENCODER = {'bits': 8, 'encoder_width': 8, 'encoder_epochs': 12, 'encoder_batch_size': 32, 'encoder_lr': 1e-3,
                'fidelity_ramp': 50}
MIN_BIT_ACCURACY = 0.9
MIN_PSNR = 25.0   # dB: a root-mean-square residual under 15 grey levels


def tiny_config(root, save_as, **options):
    return {'yaml_path': str(YAML), 'dataset_path': str(CIFAR10_DIR), 'model': 'mlp', 'epochs': 1,
            'train_fraction': 0.02, 'test_fraction': 0.02, 'batch_size': 64, 'record_root': str(root),
            'device': 'cpu', 'save_folder_name': save_as} | TINY_ENCODER | options


@pytest.fixture(scope='module')
def ssba_run(tmp_path_factory, cifar10):
    """One tiny SSBA record (its encoder trained and cached in the record root), read back from disk."""
    root = tmp_path_factory.mktemp('ssba_records')
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils.data, 'load_dataset', lambda name, path: cifar10)
        returned = run_attack('ssba', tiny_config(root, 'ssba'))
    record = load_attack_record(root / 'ssba')
    return SimpleNamespace(root=root, record=record, returned=returned, trigger=record['trigger'])


def configured(*argv):
    """An SSBA attack with its options parsed from its YAML plus ``argv``, and set up."""
    attack = SSBA()
    args = parse_config(attack.build_parser(str(SCRIPT)), ['--yaml_path', str(YAML), *map(str, argv)])
    attack.setup(args, dataset_spec('cifar10'))
    return attack, args


def residuals(clean, poisoned):
    return poisoned.to(torch.int16) - clean.to(torch.int16)


# --------------------------------------------------------------------------- the trigger
def test_the_decoder_reads_the_secret_from_poisoned_cifar_images(ssba_run, cifar10):
    trigger = ssba_run.trigger
    assert trigger['bit_accuracy'] >= MIN_BIT_ACCURACY
    encoder, decoder = load_stegastamp(trigger)
    images = cifar10[1].images[5000:5400]                  # test images the encoder never trained on
    for secret in (trigger['secret'], 1 - trigger['secret']):   # the encoder hides any bit string
        poisoned = embed_secret(encoder, images, secret)
        assert poisoned.dtype == torch.uint8 and poisoned.shape == images.shape
        assert bit_accuracy(decoder, poisoned, secret) >= MIN_BIT_ACCURACY
    assert 0 < trigger['clean_bit_accuracy'] < trigger['bit_accuracy']


def test_the_residual_is_faint_and_differs_between_images(ssba_run, cifar10):
    assert ssba_run.trigger['psnr'] >= MIN_PSNR
    encoder, _ = load_stegastamp(ssba_run.trigger)
    images = cifar10[1].images[6000:6064]
    poisoned = embed_secret(encoder, images, ssba_run.trigger['secret'])
    assert psnr(images, poisoned) >= MIN_PSNR
    residual = residuals(images, poisoned).float()
    assert residual.abs().mean() > 0.5                     # there is a trigger
    flat = residual.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(len(flat)) * 1e9).min() > 0   # no two residuals alike
    # a sample-specific trigger: much of each residual is not the residual common to all images
    specific = (residual - residual.median(0).values).abs().mean()
    assert specific > 0.25 * residual.abs().mean()


def test_seeds_determine_encoder_and_secret(cifar10):
    images = cifar10[0].images[:64]
    settings = dict(bits=4, width=4, epochs=1, batch_size=32, lr=1e-3, fidelity_weight=10.0, bit_weight=1.0,
                    fidelity_ramp=10, device=torch.device('cpu'), log=lambda message: None)
    first, again, other = (train_stegastamp(images, seed=seed, **settings) for seed in (0, 0, 1))
    for part in ('encoder', 'decoder'):
        assert all(torch.equal(first[part][key], again[part][key]) for key in first[part])
        assert not all(torch.equal(first[part][key], other[part][key]) for key in first[part])
    attack, _ = configured('--secret_seed', 3)
    same, _ = configured('--secret_seed', 3, '--random_seed', 9)
    different, _ = configured('--secret_seed', 4)
    assert attack.secret.dtype == torch.uint8 and len(attack.secret) == 32 and set(attack.secret.tolist()) == {0, 1}
    assert torch.equal(attack.secret, same.secret) and not torch.equal(attack.secret, different.secret)


# --------------------------------------------------------------------------- the record and the cache
def test_the_record_rebuilds_the_poisoned_inputs(ssba_run, reload_splits):
    record, trigger = ssba_run.record, ssba_run.trigger
    assert ATTACKS.get('ssba') is SSBA and ATTACKS.script('ssba') == SCRIPT
    assert record['attack'] == 'ssba' and set(record['metrics']) == {'acc', 'asr', 'ra'}
    assert record['metrics'] == ssba_run.returned['metrics'] and trigger['psnr'] == ssba_run.returned['trigger']['psnr']
    assert trigger['settings'] == {'bits': 8, 'width': 8, 'epochs': 12, 'batch_size': 32, 'lr': 1e-3,
                                   'fidelity_weight': 10.0, 'bit_weight': 1.0, 'fidelity_ramp': 50, 'seed': 0}
    assert trigger['encoder_training']['images'] == 1000 and trigger['encoder_training']['steps'] == 384
    assert all(isinstance(value, torch.Tensor) for value in trigger['encoder'].values())
    assert trigger['secret'].tolist() == configured('--bits', 8)[0].secret.tolist()
    train, test = reload_splits(record['attack_config'])
    encoder, _ = load_stegastamp(trigger)
    for part, index_key, split in (('bd_test', 'index', test), ('bd_train', 'poison_index', train)):
        entry = record[part]
        assert torch.equal(embed_secret(encoder, split.images[entry[index_key]], trigger['secret']), entry['images'])
        assert bool((entry['backdoor_labels'] == 0).all()) and bool((entry['original_labels'] != 0).all())
    assert len(record['bd_train']['poison_index']) == 100
    folder = ssba_run.root / 'ssba'
    assert (folder / 'preview.png').is_file()
    assert 'secret bits from the poisoned test images' in (folder / 'log.txt').read_text()


def test_a_second_run_reuses_the_cached_encoder(ssba_run, cached_cifar, monkeypatch):
    def retrain(*args, **kwargs):
        raise AssertionError('the encoder was trained again')

    monkeypatch.setattr(ssba, 'train_stegastamp', retrain)
    run_attack('ssba', tiny_config(ssba_run.root, 'again'))
    again = load_attack_record(ssba_run.root / 'again')
    assert len(list((ssba_run.root / '.artefacts').glob('ssba_stegastamp-*.pt'))) == 1
    assert 'reusing ssba_stegastamp' in (ssba_run.root / 'again' / 'log.txt').read_text()
    for key, value in ssba_run.trigger['encoder'].items():
        assert torch.equal(again['trigger']['encoder'][key], value)
    assert torch.equal(again['bd_test']['images'], ssba_run.record['bd_test']['images'])   # the same poisoned inputs
    assert torch.equal(again['bd_train']['images'], ssba_run.record['bd_train']['images'])


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('option, value, message', [
    ('bits', 0, 'invalid value for bits: 0'),
    ('fidelity_weight', -1, 'invalid value for fidelity_weight: -1'),
    ('bit_weight', 0, 'invalid value for bit_weight: 0'),
    ('encoder_lr', 0, 'invalid value for encoder_lr: 0'),
    ('encoder_epochs', 0, 'invalid value for encoder_epochs: 0'),
])
def test_bad_options_are_refused_in_one_line(tmp_path, capsys, option, value, message):
    line = rejection(lambda: run_attack('ssba', tiny_config(tmp_path, 'bad', **{option: value})), capsys)
    assert message in line
    assert not any(tmp_path.iterdir())


def test_the_script_refuses_bad_bits_with_exit_code_2(tmp_path):
    proc = run_script([SCRIPT, '--yaml_path', YAML, '--bits', '-3', '--record_root', tmp_path], timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and ONE_LINE_ERROR.match(lines[0]) and 'bits' in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())
