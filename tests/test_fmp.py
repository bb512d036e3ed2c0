"""FMP: fast ranking equals the reference loop, graph-based conv->BN pairing, pruning modes,
the CLI end to end on real CIFAR-10, and bad input."""
import json

import pytest
import torch
import torch.nn as nn

from models import build_model
from models.preact_resnet import PreActBlock
from models.resnet_cifar import BasicBlock
from utils.data import Split
from utils.evaluate import predict
from utils.fmp import RankSettings, flag_channels, rank_feature_maps, rank_reference, two_means_minor
from utils.pruning import conv_layers, keep_pruned, prune_channels
from utils.train import TrainSettings, train

from conftest import CIFAR10_DIR as CIFAR, ONE_LINE_ERROR, run_script, snapshot

CPU = torch.device('cpu')


def run(script, *args, record_root):
    return run_script([script, *args, '--record_root', record_root, '--device', 'cpu'], timeout=600)


def error_lines(result):
    """stderr without the dataset's checksum warning (a reordered CIFAR-10 copy is expected)."""
    return [line for line in result.stderr.strip().splitlines() if not line.startswith('warning:')]


# --------------------------------------------------------------------------- ranking equivalence
class TinyResNet(nn.Module):
    """A stem and one downsampling ResNet block (shortcut conv) with a spatial head: with random
    weights its predictions still vary from image to image, so rankings have something to rank."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = BasicBlock(8, 16, stride=2)
        self.head = nn.Linear(16 * 16 * 16, 10)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _random_model_inputs(n=16):
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, x, predict(model, x, CPU)  # labels it gets right: accuracy under attack varies


def _assert_same_ranking(model, x, y, only=None, settings=RankSettings()):
    fast = rank_feature_maps(model, x, y, settings, torch.Generator().manual_seed(1), progress=False, only=only)
    ref = rank_reference(model, x, y, settings, torch.Generator().manual_seed(1), progress=False, only=only)
    assert set(fast) == set(ref) == (only or {layer.name for layer in conv_layers(model, tuple(x.shape[1:]))})
    for name in ref:
        assert torch.allclose(fast[name], ref[name], atol=1e-6), name
        for exponent in (1, 2, 3):
            assert torch.equal(flag_channels(fast[name], prune_exponent=exponent),
                               flag_channels(ref[name], prune_exponent=exponent)), name
    # the attack must bite, or equal scores would prove nothing
    assert min(float(s.min()) for s in fast.values()) < 1.0
    return fast


def test_fast_ranking_equals_reference_random_weights():
    model, x, y = _random_model_inputs()
    scores = _assert_same_ranking(model, x, y)
    assert set(scores) == {'conv', 'block.conv1', 'block.conv2', 'block.shortcut.0'}
    assert len({float(v) for s in scores.values() for v in s}) > 2  # scores differ between channels


@pytest.mark.parametrize('settings', [RankSettings(channel_chunk=8), RankSettings(channel_chunk=3, steps=2),
                                      RankSettings(steps=3, eps=0.03)])
def test_chunked_and_multistep_paths_equal_reference(settings):
    model, x, y = _random_model_inputs()
    _assert_same_ranking(model, x, y, settings=settings)


# --------------------------------------------------------------------------- graph pairing
class ShuffledBlock(nn.Module):
    """Module order deliberately differs from data flow: pairing by module order would be wrong."""

    def __init__(self):
        super().__init__()
        self.shortcut_bn = nn.BatchNorm2d(8)
        self.bn = nn.BatchNorm2d(8)
        self.shortcut_conv = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out = self.bn(self.conv(x)) + self.shortcut_bn(self.shortcut_conv(x))
        return self.head(out.mean((2, 3)))


def test_conv_bn_pairing_follows_the_graph():
    pairs = {l.name: l.bn_name for l in conv_layers(BasicBlock(16, 32, stride=2), (16, 8, 8))}
    assert pairs == {'conv1': 'bn1', 'conv2': 'bn2', 'shortcut.0': 'shortcut.1'}
    # pre-activation: conv1 feeds bn2; conv2 and the shortcut conv feed an addition, no BN
    pairs = {l.name: l.bn_name for l in conv_layers(PreActBlock(16, 32, stride=2), (16, 8, 8))}
    assert pairs == {'shortcut.0': None, 'conv1': 'bn2', 'conv2': None}
    layers = conv_layers(ShuffledBlock(), (3, 8, 8))
    assert [(l.name, l.bn_name) for l in layers] == [('conv', 'bn'), ('shortcut_conv', 'shortcut_bn')]


def test_pruning_a_shortcut_conv_zeroes_its_own_bn_only():
    block = BasicBlock(16, 32, stride=2)
    for bn in (block.bn1, block.bn2, block.shortcut[1]):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, 0.1, 0.5)
    layers = conv_layers(block, (16, 8, 8))
    prune_channels(layers, {'shortcut.0': torch.tensor([3, 7])})
    assert block.shortcut[0].weight[[3, 7]].abs().sum() == 0
    assert block.shortcut[0].weight[[0, 1, 2]].abs().sum() > 0
    assert torch.equal(torch.nonzero(block.shortcut[1].weight == 0).flatten(), torch.tensor([3, 7]))
    assert torch.equal(torch.nonzero(block.shortcut[1].bias == 0).flatten(), torch.tensor([3, 7]))
    for bn in (block.bn1, block.bn2):  # module order would have picked one of these
        assert (bn.weight != 0).all() and (bn.bias != 0).all()
    # the pruned channels contribute nothing to the block's shortcut branch
    block.eval()
    with torch.no_grad():
        assert block.shortcut(torch.rand(2, 16, 8, 8))[:, [3, 7]].abs().max() == 0


# --------------------------------------------------------------------------- selection
def test_flag_fraction_rounds_down_with_floor_and_ties_by_index():
    scores = torch.tensor([0.5] * 64)
    assert flag_channels(scores, prune_exponent=6).tolist() == [0]
    assert len(flag_channels(torch.rand(63), prune_exponent=6)) == 0
    assert flag_channels(torch.rand(63), prune_exponent=6, min_prune=2).numel() == 2
    scores = torch.linspace(1, 0, 128)
    assert flag_channels(scores, prune_exponent=6).tolist() == [126, 127]


def test_two_means_takes_the_smaller_cluster():
    assert two_means_minor(torch.tensor([0.9, 0.9, 0.1, 0.85, 0.2, 0.95])).tolist() == [2, 4]
    assert two_means_minor(torch.tensor([0.1, 0.1, 0.15, 0.9])).tolist() == [3]
    assert two_means_minor(torch.tensor([0.5, 0.5, 0.5])).numel() == 0


# --------------------------------------------------------------------------- prune modes
@pytest.mark.parametrize('mode', ['mask', 'zero'])
def test_prune_mode_mask_keeps_channels_zero_and_zero_lets_them_regrow(mode):
    torch.manual_seed(0)
    model = build_model('resnet20', 10, (3, 32, 32))
    layers = conv_layers(model, (3, 32, 32))
    flagged = {'conv1': torch.tensor([1, 5]), 'layer3.2.conv2': torch.tensor([0])}
    prune_channels(layers, flagged)
    data = Split(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (64,)))
    settings = TrainSettings(epochs=1, batch_size=16, lr=0.05)
    train(model, data, settings, CPU, after_step=keep_pruned(layers, flagged) if mode == 'mask' else None,
          log=lambda message: None)
    pruned = [model.conv1.weight[[1, 5]], model.bn1.weight[[1, 5]], model.bn1.bias[[1, 5]],
              model.layer3[2].conv2.weight[0], model.layer3[2].bn2.weight[0], model.layer3[2].bn2.bias[0]]
    magnitude = sum(float(t.detach().abs().sum()) for t in pruned)
    if mode == 'mask':
        assert magnitude == 0
    else:  # a BN before a residual addition still receives gradient, so its bias regrows
        assert magnitude > 0
    assert model.conv1.weight[[0, 2]].abs().sum() > 0


# --------------------------------------------------------------------------- CLI on real CIFAR-10
@pytest.fixture(scope='module')
def badnet_record(tmp_path_factory):
    """A small ResNet-20 BadNets record trained on a CIFAR-10 subset (shared by the CLI tests). A 6x6 patch
    without augmentation: ResNet-20 learns it in 3 epochs on 3,000 images (ASR about 0.99), a 3x3 one not."""
    root = tmp_path_factory.mktemp('fmp_records')
    result = run('./attack/badnet_attack.py', '--yaml_path', '../config/attack/badnet/cifar10.yaml',
                 '--dataset', 'cifar10', '--dataset_path', CIFAR, '--save_folder_name', 'badnet_small',
                 '--model', 'resnet20', '--epochs', 3, '--lr', 0.05, '--batch_size', 64, '--augment', 'false',
                 '--train_fraction', 0.06, '--test_fraction', 0.05, '--pratio', 0.2, '--patch_size', 6,
                 record_root=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_fast_ranking_equals_reference_trained_model(badnet_record):
    from utils.data import load_splits
    from utils.record import load_record_model
    record = _load(badnet_record / 'badnet_small' / 'attack_result.pt')
    model = load_record_model(record).eval()
    train_split, _ = load_splits('cifar10', CIFAR, 0.06, 0.05, 0)
    x, y = train_split.images[:16].float() / 255, train_split.labels[:16]
    names = [layer.name for layer in conv_layers(model, (3, 32, 32))]
    _assert_same_ranking(model, x, y, {names[1], 'layer3.0.shortcut.0', names[-1]})


def test_fmp_cli_lowers_asr_and_keeps_acc(badnet_record):
    record = _load(badnet_record / 'badnet_small' / 'attack_result.pt')
    assert record['metrics']['asr'] > 0.8, record['metrics']  # the attack took hold
    result = run('./defense/feature.py', '--yaml_path', './config/defense/feature/cifar10.yaml', '--dataset', 'cifar10',
                 '--result_file', 'badnet_small', '--dataset_path', CIFAR, '--epochs', 3, '--ratio', 0.5,
                 '--n_rank', 8, '--prune_exponent', 3, '--prune_mode', 'mask', record_root=badnet_record)
    assert result.returncode == 0, result.stderr[-2000:]
    out = badnet_record / 'badnet_small' / 'defense' / 'feature'
    defended = _load(out / 'defense_result.pt')
    before, after = defended['metrics_before'], defended['metrics']
    assert defended['metrics_after_pruning']['asr'] < 0.5, defended['metrics_after_pruning']  # pruning alone bites
    assert after['asr'] < before['asr'] - 0.5, (before, after)   # ASR far below the undefended model
    assert after['acc'] > before['acc'] - 0.10, (before, after)  # ACC within 10 points (tiny training budget)
    assert 'ACC' in result.stdout and 'after feature' in result.stdout
    scores = (out / 'channel_scores.csv').read_text().splitlines()
    assert scores[0] == 'layer,channel,score,pruned'
    assert len(scores) - 1 == sum(layer.channels for layer in conv_layers(build_model('resnet20', 10, (3, 32, 32)), (3, 32, 32)))
    pruned = json.loads((out / 'pruned_channels.json').read_text())
    assert sum(len(v['channels']) for v in pruned.values()) == sum(int(line.rsplit(',', 1)[1]) for line in scores[1:])
    model = build_model('resnet20', 10, (3, 32, 32))
    model.load_state_dict(defended['model'])
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['rank_seconds'] > 0 and summary['finetune_seconds'] > 0


def test_rank_only_writes_scores_without_a_model_into_its_own_folder(badnet_record, tmp_path):
    defenses = badnet_record / 'badnet_small' / 'defense'
    before = snapshot(defenses) if defenses.exists() else {}
    result = run('./defense/feature.py', '--yaml_path', './config/defense/feature/cifar10.yaml', '--result_file',
                 'badnet_small', '--dataset_path', CIFAR, '--rank_only', '--n_rank', 4,
                 '--save_folder_name', 'rank_sweep', record_root=badnet_record)
    assert result.returncode == 0, result.stderr[-2000:]
    out = defenses / 'rank_sweep'
    assert (out / 'channel_scores.csv').exists() and (out / 'summary.json').exists()
    assert not (out / 'defense_result.pt').exists()
    after = snapshot(defenses)
    assert {k: v for k, v in after.items() if not k.startswith('rank_sweep')} == before  # other runs untouched


@pytest.fixture(scope='module')
def mlp_record(tmp_path_factory):
    root = tmp_path_factory.mktemp('mlp_records')
    result = run('./attack/badnet_attack.py', '--yaml_path', '../config/attack/badnet/cifar10.yaml',
                 '--dataset_path', CIFAR, '--save_folder_name', 'mlp_small', '--model', 'mlp', '--epochs', 1,
                 '--train_fraction', 0.02, '--test_fraction', 0.02, record_root=root)
    assert result.returncode == 0, result.stderr[-2000:]
    return root


@pytest.mark.parametrize('extra, message', [
    (['--prune_exponent', -1], 'prune_exponent'),
    (['--n_rank', 100000], 'n_rank'),
    (['--ratio', 0], 'ratio'),
    (['--ratio', 1.5], 'ratio'),
])
def test_bad_fmp_options_fail_cleanly(badnet_record, extra, message):
    folder = badnet_record / 'badnet_small'
    before = snapshot(folder)
    result = run('./defense/feature.py', '--yaml_path', './config/defense/feature/cifar10.yaml', '--result_file',
                 'badnet_small', '--dataset_path', CIFAR, *extra, record_root=badnet_record)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and ONE_LINE_ERROR.match(lines[0]) and message in lines[0], result.stderr
    assert snapshot(folder) == before


def test_model_without_conv_layers_fails_cleanly(mlp_record):
    folder = mlp_record / 'mlp_small'
    before = snapshot(folder)
    result = run('./defense/feature.py', '--yaml_path', './config/defense/feature/cifar10.yaml', '--result_file',
                 'mlp_small', '--dataset_path', CIFAR, record_root=mlp_record)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and 'no Conv2d layers' in lines[0], result.stderr
    assert snapshot(folder) == before
