"""FMP: fast ranking equals the reference loop, graph-based conv->BN pairing, pruning modes,
the CLI end to end on real CIFAR-10, and bad input."""
import argparse
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

from conftest import CIFAR10_DIR as CIFAR, ONE_LINE_ERROR, load_bench, run_script, snapshot

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
                                      RankSettings(steps=3, eps=0.03),
                                      RankSettings(channel_chunk=8, channels_last=True),
                                      RankSettings(channel_chunk=5, objective='excite'),
                                      RankSettings(channel_chunk=3, steps=2, objective='excite')])
def test_chunked_and_multistep_paths_equal_reference(settings):
    model, x, y = _random_model_inputs()
    _assert_same_ranking(model, x, y, settings=settings)
    # an NHWC ranking hands the model back in the usual layout
    assert all(p.is_contiguous() for p in model.parameters())


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
                 '--n_rank', 4, '--prune_exponent', 3, '--prune_mode', 'mask', record_root=badnet_record)
    assert result.returncode == 0, result.stderr[-2000:]
    out = badnet_record / 'badnet_small' / 'defense' / 'feature'
    defended = _load(out / 'defense_result.pt')
    before, after = defended['metrics_before'], defended['metrics']
    assert defended['metrics_after_pruning']['asr'] < 0.5, defended['metrics_after_pruning']  # pruning alone bites
    assert after['asr'] < before['asr'] - 0.5, (before, after)   # ASR far below the undefended model
    assert after['acc'] > before['acc'] - 0.10, (before, after)  # ACC within 10 points (tiny training budget)
    assert 'ACC' in result.stdout and 'after feature' in result.stdout
    scores = (out / 'channel_scores.csv').read_text().splitlines()
    assert scores[0] == 'layer,channel,score,trigger_lift,fmp,pruned'
    assert len(scores) - 1 == sum(layer.channels for layer in conv_layers(build_model('resnet20', 10, (3, 32, 32)), (3, 32, 32)))
    pruned = json.loads((out / 'pruned_channels.json').read_text())
    assert sum(len(v['channels']) for v in pruned.values()) == sum(int(line.rsplit(',', 1)[1]) for line in scores[1:])
    model = build_model('resnet20', 10, (3, 32, 32))
    model.load_state_dict(defended['model'])
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['rank_seconds'] > 0 and summary['finetune_seconds'] > 0
    # what utils/report.py reads to set FMP beside its random control
    assert summary['defense'] == 'feature' and summary['select'] == 'fraction' and summary['pruned_total'] > 0
    assert {'acc', 'asr'} <= set(summary['after_pruning']) and summary['amount']


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
                 'badnet_small', '--dataset_path', CIFAR, '--save_folder_name', 'bad_input', *extra, record_root=badnet_record)
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


# --------------------------------------------------------------------------- controls, amount rules, the release's choices
from utils.fmp import PruneAmount, fmp_flags, lowest_channels, random_channels, score_predictions  # noqa: E402
from utils.pruning import highest_channels, module_order_targets, trigger_lift  # noqa: E402


def synthetic_scores(seed=0, widths=(16, 32, 64, 64)):
    g = torch.Generator().manual_seed(seed)
    return {f'layer{i}': torch.rand(c, generator=g) for i, c in enumerate(widths)}


def test_random_selection_has_fmps_per_layer_counts_and_is_seeded():
    scores = synthetic_scores()
    fmp = fmp_flags(scores, PruneAmount(prune_exponent=4, min_prune=1))
    counts = {name: len(f) for name, f in fmp.items()}
    assert counts == {'layer0': 1, 'layer1': 2, 'layer2': 4, 'layer3': 4}
    widths = {name: len(s) for name, s in scores.items()}
    first = random_channels(counts, widths, torch.Generator().manual_seed(3))
    again = random_channels(counts, widths, torch.Generator().manual_seed(3))
    other = random_channels(counts, widths, torch.Generator().manual_seed(4))
    assert {name: len(f) for name, f in first.items()} == counts
    for name, f in first.items():
        assert len(set(f.tolist())) == len(f) and 0 <= int(f.min()) and int(f.max()) < widths[name]
        assert torch.equal(f, again[name])
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_prune_ratio_rounding_and_min_prune_count_as_documented():
    widths = (16, 32, 64)
    for rounding, expected in (('floor', [1, 3, 6]), ('round', [2, 3, 6]), ('ceil', [2, 4, 7])):
        assert [PruneAmount(prune_ratio=0.1, prune_round=rounding).per_layer(c) for c in widths] == expected
    assert [PruneAmount(prune_exponent=6).per_layer(c) for c in widths] == [0, 0, 1]          # the release's 1/64
    assert [PruneAmount(prune_exponent=6, min_prune=1).per_layer(c) for c in widths] == [1, 1, 1]
    assert [PruneAmount(prune_ratio=1.0).per_layer(c) for c in widths] == [16, 32, 64]
    assert PruneAmount(prune_ratio=0.01, min_prune=2).per_layer(16) == 2


def test_global_scope_prunes_the_same_total_at_the_lowest_normalised_scores():
    # layer a: one far outlier (z about -3.9); layer b: evenly spread (lowest z about -1.7)
    scores = {'a': torch.tensor([0.9] * 15 + [0.1]), 'b': torch.linspace(0, 1, 32)}
    amount = PruneAmount(prune_ratio=0.1, prune_scope='global')
    flags = fmp_flags(scores, amount)
    assert sum(len(f) for f in flags.values()) == amount.per_layer(16) + amount.per_layer(32) == 1 + 3
    assert flags['a'].tolist() == [15] and flags['b'].tolist() == [0, 1, 2]
    # two outliers in a: both go before b's spread tail, b gives up one
    scores['a'][3] = 0.1
    flags = fmp_flags(scores, amount)
    assert flags['a'].tolist() == [3, 15] and flags['b'].tolist() == [0, 1]
    # a layer of equal scores has nothing to offer
    flags = fmp_flags({'a': torch.full((16,), 0.5), 'b': torch.linspace(0, 1, 32)}, amount)
    assert flags['a'].tolist() == [] and len(flags['b']) == 4


def test_argsort_tie_break_is_numpys():
    import numpy as np
    scores = torch.tensor([0.5, 0.25, 0.5, 0.25, 0.25, 0.75, 0.25] * 10)
    expected = np.sort(np.argsort(scores.double().numpy())[:7])
    assert lowest_channels(scores, 7, 'argsort').tolist() == expected.tolist()
    assert lowest_channels(scores, 3, 'index').tolist() == [1, 3, 4]


def test_collapse_score_is_low_when_predictions_pile_on_one_class():
    preds = torch.tensor([[0, 0, 0, 0], [0, 1, 2, 3], [1, 1, 2, 2]])
    assert score_predictions(preds, torch.tensor([0, 1, 2, 3]), 'collapse').tolist() == [0.0, 0.75, 0.5]
    assert score_predictions(preds, torch.tensor([0, 1, 2, 3]), 'accuracy').tolist() == [0.25, 1.0, 0.5]


class PlantedTrigger(nn.Module):
    """conv -> BN -> conv: channel 5 of the first conv sums its 3x3 window (it fires on a white
    patch), channel 2 subtracts it (the trigger suppresses it); the rest are small random filters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.uniform_(-0.05, 0.05)
            self.conv.weight[5] = 1.0
            self.conv.weight[2] = -1.0
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv2(torch.relu(self.bn(self.conv(x)))).mean((2, 3)))


def test_oracle_picks_the_channel_planted_to_fire_on_the_trigger():
    model = PlantedTrigger().eval()
    layers = conv_layers(model, (3, 16, 16))
    clean = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.3
    poisoned = clean.clone()
    poisoned[:, :, -4:, -4:] = 1.0
    lift = trigger_lift(model, {layer.name: layer.output_module for layer in layers}, clean, poisoned, CPU, batch=8)
    assert set(lift) == {'conv', 'conv2'} and lift['conv'].shape == (8,)
    assert int(lift['conv'].argmax()) == 5 and int(lift['conv'].argmin()) == 2
    picked = highest_channels(lift, {'conv': 1, 'conv2': 0})
    assert picked['conv'].tolist() == [5] and picked['conv2'].tolist() == []
    assert 2 not in highest_channels(lift, {'conv': 7, 'conv2': 0})['conv'].tolist()   # suppressed, never excited


def released_initialize(model, rank_list):
    """The release's pruning step, written from its description: walk the modules in module
    order; the k-th Conv2d met zeroes the output channels of rank_list[k - 1]; every BatchNorm2d
    zeroes the weight (not the bias) of the channels of the conv met last (rank_list is in forward order)."""
    start = 0
    with torch.no_grad():
        for _, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d):
                for channel in rank_list[start - 1]:
                    module.weight[channel] = 0
            elif isinstance(module, nn.Conv2d):
                start += 1
                for channel in rank_list[start - 1]:
                    module.weight[channel] = 0


def test_module_order_pairing_reproduces_the_release_on_preactresnet18():
    torch.manual_seed(0)
    released = build_model('preactresnet18', 10, (3, 32, 32))
    for bn in (m for m in released.modules() if isinstance(m, nn.BatchNorm2d)):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, 0.1, 0.5)
    ours = build_model('preactresnet18', 10, (3, 32, 32))
    ours.load_state_dict(released.state_dict())
    layers = conv_layers(ours, (3, 32, 32))
    g = torch.Generator().manual_seed(1)
    flagged = {layer.name: torch.sort(torch.randperm(layer.channels, generator=g)[:3]).values for layer in layers}
    released_initialize(released, [flagged[layer.name].tolist() for layer in layers])
    prune_channels(module_order_targets(ours, layers), flagged, zero_bn_bias=False)
    mine, theirs = ours.state_dict(), released.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs), [k for k in theirs if not torch.equal(mine[k], theirs[k])]
    # in a downsampling block the shortcut is ranked first: its flags land on conv1 (and bn2), conv2's on the
    # shortcut, and a block's bn1 takes the previous block's conv2 flags; graph pairing gives neither
    targets = {(t.name, names) for t in module_order_targets(ours, layers)
               for names in [next(n for n, m in ours.named_modules() if m is t.conv) + '|' + str(t.bn_name)]}
    assert ('layer2.0.shortcut.0', 'layer2.0.conv1|None') in targets
    assert ('layer2.0.shortcut.0', 'layer2.0.conv1|layer2.0.bn2') in targets
    assert ('layer2.0.conv2', 'layer2.0.shortcut.0|layer2.1.bn1') in targets
    assert ('layer1.1.conv2', 'layer1.1.conv2|layer2.0.bn1') in targets
    graph = {layer.name: layer.bn_name for layer in layers}
    assert graph['layer2.0.shortcut.0'] is None and graph['layer2.0.conv1'] == 'layer2.0.bn2'


def test_module_order_equals_graph_pairing_where_the_orders_agree():
    """ResNet-20 runs its convs in module order and follows each by its BN: both pairings zero the same weights."""
    model = build_model('resnet20', 10, (3, 32, 32))
    layers = conv_layers(model, (3, 32, 32))
    flagged = {layer.name: torch.tensor([0, 2]) for layer in layers}
    a, b = build_model('resnet20', 10, (3, 32, 32)), build_model('resnet20', 10, (3, 32, 32))
    b.load_state_dict(a.state_dict())
    prune_channels(conv_layers(a, (3, 32, 32)), flagged)
    prune_channels(module_order_targets(b, conv_layers(b, (3, 32, 32))), flagged)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_random_and_oracle_selection_through_the_cli(badnet_record):
    """rank_only runs write scores without a model, into their own folder only; the random control
    keeps FMP's per-layer counts and follows --selection_seed; the oracle keeps them too, and its maps
    are the trigger-excited set that FMP's are compared with."""
    defenses = badnet_record / 'badnet_small' / 'defense'

    def selection(*extra, folder):
        before = snapshot(defenses) if defenses.exists() else {}
        result = run('./defense/feature.py', '--yaml_path', './config/defense/feature/cifar10.yaml', '--result_file',
                     'badnet_small', '--dataset_path', CIFAR, '--rank_only', '--n_rank', 2, '--prune_exponent', 4,
                     '--min_prune', 1, '--save_folder_name', folder, *extra, record_root=badnet_record)
        assert result.returncode == 0, result.stderr[-2000:]
        out = defenses / folder
        assert not (out / 'defense_result.pt').exists()
        after = snapshot(defenses)
        assert {k: v for k, v in after.items() if not k.lstrip('.').startswith(folder)} == before  # other runs untouched
        table = [line.split(',') for line in (out / 'channel_scores.csv').read_text().splitlines()[1:]]
        widths, counts = {}, {}
        for layer, _, _, _, fmp_flag, _ in table:
            widths[layer] = widths.get(layer, 0) + 1
            counts[layer] = counts.get(layer, 0) + int(fmp_flag)
        pruned = {(r[0], int(r[1])) for r in table if r[5] == '1'}
        fmp = {(r[0], int(r[1])) for r in table if r[4] == '1'}
        scores = [(r[0], r[1], r[2]) for r in table]
        return pruned, fmp, json.loads((out / 'summary.json').read_text()), counts, widths, scores

    chosen, fmp, summary, counts, widths, scores = selection('--select', 'random', '--selection_seed', 7,
                                                             folder='random7')
    drawn = random_channels(counts, widths, torch.Generator().manual_seed(7))
    assert chosen == {(layer, int(c)) for layer, channels in drawn.items() for c in channels} and chosen != fmp
    assert summary['select'] == 'random' and summary['overlap']['total'] == len(fmp)
    assert not summary['ranking_reused']
    # the same ranking inputs: the second run reads the first one's scores instead of ranking again
    oracle, fmp_again, summary, oracle_counts, _, scores_again = selection('--select', 'oracle_trigger', folder='oracle')
    assert summary['ranking_reused'] and scores_again == scores and fmp_again == fmp
    assert 'scores reused' in (defenses / 'oracle' / 'log.txt').read_text()
    assert oracle_counts == counts and len(oracle) == len(fmp)
    per_layer = {layer: sum(1 for l, _ in oracle if l == layer) for layer in counts}
    assert per_layer == counts
    assert summary['overlap']['with_oracle'] == len(oracle) and summary['overlap']['fmp_with_oracle'] <= len(oracle)


def test_ranking_variants_live_in_the_ablation_not_in_the_defense(badnet_record):
    """The toolkit's ranking variants have not beaten random, so defense/feature.py does not offer them;
    the ablation's subclass does, and a variant changes the scores."""
    result = run('./defense/feature.py', '--yaml_path', './config/defense/feature/cifar10.yaml', '--result_file',
                 'badnet_small', '--rank_objective', 'excite', record_root=badnet_record)
    assert result.returncode == 2 and len(error_lines(result)) == 1 and 'rank_objective' in result.stderr
    ablation = load_bench('fmp_ablation')
    args = argparse.Namespace(record_root=str(badnet_record), device='cpu')
    common = {'dataset_path': CIFAR, 'n_rank': 2}
    fmp = ablation.ranking('badnet_small', args, **common)['channel_scores']
    collapse = ablation.ranking('badnet_small', args, **common, rank_score='collapse', rank_labels='predicted')['channel_scores']
    assert fmp.keys() == collapse.keys() and any(not torch.equal(fmp[n], collapse[n]) for n in fmp)


def test_ablation_report_says_when_fmp_is_no_better_than_random(tmp_path):
    """bench/fmp_ablation.py --stage report: FMP is 'better' only below every random seed's ASR without
    losing ACC to all of them; the verdicts and the variants' table come from the rows alone."""
    ablation = load_bench('fmp_ablation')
    header = ','.join(ablation.FIELDS)
    rows = [  # record,attack,train_seed,stage,select,selection_seed,amount,pairing,variant,maps,with_oracle,acc,asr,ra,s
        'r,badnet,0,prune,fmp,,1/16,graph,,49,0,68.00,80.00,10.00,1',
        'r,badnet,0,prune,random,0,1/16,graph,,49,1,70.00,60.00,30.00,1',
        'r,badnet,0,prune,random,1,1/16,graph,,49,0,65.00,90.00,5.00,1',
        'r,badnet,0,prune,fmp,,1/8,graph,,98,2,60.00,1.00,50.00,1',
        'r,badnet,0,prune,random,0,1/8,graph,,98,3,55.00,10.00,40.00,1',
        'r,badnet,0,prune,random,1,1/8,graph,,98,1,58.00,20.00,30.00,1',
        'r,badnet,0,prune,fmp,,1/16,graph,steps 5,49,3,40.00,5.00,30.00,1']
    (tmp_path / 'results.csv').write_text('\n'.join([header, *rows]) + '\n')
    ablation.main(['--stage', 'report', '--out', str(tmp_path)])
    text = (tmp_path / 'results.md').read_text()
    verdicts = [line.rsplit('|', 2)[-2].strip() for line in text.splitlines() if line.startswith('| r | pruning alone')]
    assert verdicts == ['no better', 'better']
    assert '| steps 5 | 40.00 / 5.00 (lower ASR, lower ACC) |' in text
    assert ablation.verdict({'acc': '71', 'asr': '95'}, [{'acc': '70', 'asr': '60'}]) == 'worse (one random draw)'
