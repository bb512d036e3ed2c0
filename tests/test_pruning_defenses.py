"""The pruning and masking defenses (FP, ANP, CLP, BNP, RNP) on one masking core: each one's
distinctive step on a tiny model where the answer is known, one CLI run each on a small ResNet-20
record, and bad input."""
import copy
import csv
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import CIFAR10_DIR as CIFAR, ONE_LINE_ERROR, load_bench, run_script, snapshot
from defense.anp.anp import anp_loss
from defense.bnp.bnp import gaussian_kl, input_moments
from defense.clp.clp import channel_lipschitz_bounds
from defense.fp.fp import mean_feature_activation
from defense.rnp.rnp import unlearning_loss
from utils.data import Split
from utils.masking import ChannelMasks, frozen_copy
from utils.pruning import above_mean_plus, bn_units, conv_layers
from utils.train import TrainSettings, train

CPU = torch.device('cpu')


def quiet(message):
    pass


# --------------------------------------------------------------------------- CLP
def test_clp_flags_the_channel_whose_weights_were_scaled_up():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, bias=False))
    with torch.no_grad():
        block[0].weight[11] *= 8
    layers = conv_layers(block, (8, 8, 8))
    bounds = channel_lipschitz_bounds(layers[0])
    assert above_mean_plus(bounds, 3.0).tolist() == [11]
    # the bound is the spectral norm of the kernel times |gamma / sigma|: doubling gamma doubles it
    with torch.no_grad():
        block[1].weight[3] = 2.0
    assert channel_lipschitz_bounds(layers[0])[3] == pytest.approx(2 * bounds[3], rel=1e-5)
    # a conv feeding no BatchNorm is bounded by its kernel alone
    assert layers[1].bn is None and channel_lipschitz_bounds(layers[1]).shape == (16,)


# --------------------------------------------------------------------------- BNP
def test_bnp_flags_the_channel_whose_statistics_were_shifted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 2))
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    units = bn_units(model, (3, 8, 8))
    moments = input_moments(model, units, images, CPU)
    mean, var = moments['1']
    with torch.no_grad():            # running statistics equal to the clean ones, except channel 6's
        units[0].bn.running_mean.copy_(mean.float())
        units[0].bn.running_var.copy_(var.float())
        units[0].bn.running_mean[6] += 4 * var[6].sqrt().float()
    kl = gaussian_kl(mean, var, units[0].bn.running_mean.double(), units[0].bn.running_var.double())
    assert above_mean_plus(kl.float(), 3.0).tolist() == [6]
    assert kl[6] == pytest.approx(8.0, rel=1e-3)       # (4 sigma)^2 / (2 sigma^2)
    assert kl[torch.arange(16) != 6].abs().max() < 1e-6


# --------------------------------------------------------------------------- ANP and RNP: a planted harmful neuron
class PlantedNeuron(nn.Module):
    """1x1 conv -> BN -> ReLU -> mean -> linear. Neuron 0 reads red, neuron 1 minus red (the label is
    'red above 0.5'), neuron 2 reads green and feeds nothing; neuron 3 reads blue noise and feeds the
    logits with a large weight: it only hurts, so a mask learned on clean data should drop it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.linear = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1., 0, 0], [-1., 0, 0], [0, 1., 0], [0, 0, 1.]]).view(4, 3, 1, 1))
            self.linear.weight.copy_(torch.tensor([[0., 3, 0, 4], [3., 0, 0, -4]]))
            self.linear.bias.zero_()

    def forward(self, x):
        return self.linear(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def red_task(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    red = torch.rand(n, generator=g)
    images = torch.rand(n, 3, 4, 4, generator=g)
    images[:, 0] = red.view(-1, 1, 1) + 0.05 * torch.randn(n, 4, 4, generator=g)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return Split(images, (red > 0.5).long())


def calibrated_planted_model(data):
    model = PlantedNeuron()
    model.bn.momentum = None              # cumulative average: running stats of the whole set
    with torch.no_grad():
        model.train()
        model(data.images.float() / 255)
    return model.eval()


def learned_masks(model, data, loss_fn, epochs, lr):
    twin = frozen_copy(model)
    masks = ChannelMasks(bn_units(twin, (3, 4, 4)))
    settings = TrainSettings(epochs=epochs, batch_size=64, lr=lr, lr_scheduler='none', wd=0.0, augment=False)
    with masks.attached():
        train(twin, data, settings, CPU, optimizer=torch.optim.SGD(masks.parameters(), lr=lr, momentum=0.9),
              loss_fn=loss_fn(masks), state_modules={'masks': masks}, after_step=lambda m: masks.clamp_(), log=quiet)
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), model.parameters()))   # only the masks learn
    return masks.values()['bn']


def test_anp_mask_is_lowest_on_the_planted_neuron():
    data = red_task()
    model = calibrated_planted_model(data)
    values = learned_masks(model, data, lambda masks: anp_loss(masks, 0.4, 1, 0.2, torch.Generator().manual_seed(0)),
                           epochs=6, lr=0.2)
    assert int(values.argmin()) == 3 and values[3] < 0.2, values
    assert values[0] > 0.5 and values[1] > 0.5 and (values >= 0).all() and (values <= 1).all()


def test_masks_scale_the_batchnorm_weight_and_perturb_weight_and_bias():
    """(y - beta) * (m + delta) + beta * (1 + xi), written out on one BatchNorm."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, 0.2, 0.4)
    x = torch.randn(2, 3, 4, 4)
    masks = ChannelMasks(bn_units(bn, (3, 4, 4)))
    with torch.no_grad():
        masks.masks[0].copy_(torch.tensor([1.0, 0.5, 0.0]))
    normalised = (x - bn.running_mean.view(1, -1, 1, 1)) / (bn.running_var.view(1, -1, 1, 1) + bn.eps).sqrt()
    with masks.attached(), torch.no_grad():
        expected = normalised * (bn.weight * masks.masks[0]).view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        assert torch.allclose(bn(x), expected, atol=1e-6)
        masks.reset_noise(0.4, torch.Generator().manual_seed(0))
        masks.perturbed = True
        delta, xi = masks.noise()
        expected = (normalised * (bn.weight * (masks.masks[0] + delta)).view(1, -1, 1, 1)
                    + (bn.bias * (1 + xi)).view(1, -1, 1, 1))
        assert torch.allclose(bn(x), expected, atol=1e-6) and delta.abs().max() <= 0.4
    assert torch.allclose(bn(x), normalised * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1), atol=1e-6)  # detached


def test_rnp_unlearning_stops_at_the_threshold_and_recovery_masks_out_the_planted_neuron(tmp_path):
    data = red_task()
    model = calibrated_planted_model(data)
    unlearned = copy.deepcopy(model)
    with torch.no_grad():                 # the harmful neuron off for the clean accuracy the model starts from
        before = (model(data.images.float() / 255).argmax(1) == data.labels).float().mean()
    settings = TrainSettings(epochs=20, batch_size=64, lr=0.05, lr_scheduler='none', augment=False)
    threshold = 0.5                      # two classes: chance
    rows = train(unlearned, data, settings, CPU, loss_fn=unlearning_loss, phase='unlearn', workdir=tmp_path,
                 stop_when=lambda row: row['train_acc'] <= threshold, log=quiet)
    assert len(rows) < 20 and rows[-1]['train_acc'] <= threshold < before
    assert all(row['train_acc'] > threshold for row in rows[:-1])
    again = train(copy.deepcopy(model), data, settings, CPU, loss_fn=unlearning_loss, phase='unlearn',
                  workdir=tmp_path, resume=True, log=quiet)
    assert len(again) == len(rows)       # a stopped phase stays stopped on resume
    values = learned_masks(model, data, lambda masks: (lambda m, x, y: 0.2 * F.cross_entropy(m(x), y)),
                           epochs=20, lr=0.2)
    assert int(values.argmin()) == 3 and values[3] < 0.2, values


# --------------------------------------------------------------------------- FP
def test_fp_activation_ranks_the_least_active_channel_first():
    model = PlantedNeuron()
    with torch.no_grad():
        model.bn.bias.copy_(torch.tensor([0.3, 2.0, 1.0, -5.0]))   # neuron 3 almost never fires
    model.forward_features = lambda x: F.relu(model.bn(model.conv(x)))
    activation = mean_feature_activation(model.eval(), red_task(64).images, CPU)
    assert torch.sort(activation, stable=True).indices.tolist()[:2] == [3, 0]


# --------------------------------------------------------------------------- the scripts on a small ResNet-20 record
def run_defense_script(name, root, *extra):
    return run_script([f'./defense/{name}/{name}.py', '--yaml_path', f'./config/defense/{name}/cifar10.yaml',
                       '--result_file', 'badnet_small', '--dataset_path', CIFAR, '--record_root', root, '--device', 'cpu',
                       *map(str, extra)], timeout=600)


QUICK = {'clp': (), 'bnp': (), 'fp': ('--epochs', 1, '--ratio', 0.2), 'anp': ('--nb_iter', 6, '--ratio', 0.1),
         'rnp': ('--unlearning_epochs', 2, '--recovering_epochs', 1, '--ratio', 0.1)}


@pytest.mark.parametrize('name', sorted(QUICK))
def test_each_defense_runs_and_writes_the_shared_record(badnet_record, name):
    result = run_defense_script(name, badnet_record, *QUICK[name])
    assert result.returncode == 0, result.stderr[-3000:]
    out = badnet_record / 'badnet_small' / 'defense' / name
    for file in ('config.yaml', 'summary.json', 'log.txt', 'channel_scores.csv', 'defense_result.pt'):
        assert (out / file).is_file(), file
    assert f'after {name}' in result.stdout and 'DER' in result.stdout
    record = torch.load(out / 'defense_result.pt', weights_only=True)
    assert set(record['metrics']) == {'acc', 'asr', 'ra', 'der'} and 'metrics_after_pruning' in record
    summary = json.loads((out / 'summary.json').read_text())
    overlap = summary['overlap']
    assert overlap['total'] == sum(len(c) for c in record['pruned_channels'].values())
    assert 0 <= overlap['with_oracle'] <= overlap['total'] and 'random_expected_with_oracle' in overlap
    with open(out / 'channel_scores.csv') as handle:
        rows = list(csv.DictReader(handle))
    assert sum(int(r['pruned']) for r in rows) == overlap['total'] and 'trigger_lift' in rows[0]
    if name == 'fp':   # the pruned channels are the least active ones, as many as the held-out check allowed
        ranked = sorted(rows, key=lambda r: float(r['mean_activation']))
        count = overlap['total']
        assert all(r['pruned'] == '1' for r in ranked[:count]) and all(r['pruned'] == '0' for r in ranked[count:])
        trace = summary['prune_trace']
        assert count == max([0] + [t['pruned'] for t in trace[:-1]]) or count == trace[-1]['pruned']
    if name in ('anp', 'rnp'):
        assert (out / 'checkpoint_mask.pt').exists() if name == 'anp' else (out / 'checkpoint_recover.pt').exists()


@pytest.mark.parametrize('name, extra, message', [
    ('clp', ('--u', 0), '--u'), ('bnp', ('--u', -1), '--u'), ('anp', ('--ratio', 0), 'ratio'),
    ('fp', ('--holdout', 1.0), 'holdout'), ('rnp', ('--clean_threshold', 1.5), 'clean_threshold'),
])
def test_bad_input_is_one_line_and_writes_nothing(badnet_record, name, extra, message):
    before = snapshot(badnet_record / 'badnet_small')
    result = run_defense_script(name, badnet_record, '--save_folder_name', 'bad_input', *extra)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith('warning:')]
    assert result.returncode == 2 and len(lines) == 1 and ONE_LINE_ERROR.match(lines[0]) and message in lines[0], result.stderr
    assert snapshot(badnet_record / 'badnet_small') == before


@pytest.mark.parametrize('name', ['anp', 'bnp', 'rnp'])
def test_a_model_without_batchnorm_is_refused(mlp_record, name):
    result = run_script([f'./defense/{name}/{name}.py', '--yaml_path', f'./config/defense/{name}/cifar10.yaml',
                         '--result_file', 'mlp_small', '--dataset_path', CIFAR, '--record_root', mlp_record, '--device', 'cpu'],
                        timeout=300)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith('warning:')]
    assert result.returncode == 2 and len(lines) == 1 and 'no BatchNorm2d layers' in lines[0], result.stderr


def test_the_defense_table_reads_a_finished_run_with_the_same_options_instead_of_rerunning(badnet_record, monkeypatch):
    from utils import REPO_ROOT
    from utils.defense import run_defense
    table = load_bench('defense_table')
    common = {'ratio': 0.1, 'device': 'cpu', 'epochs': 1}
    earlier = run_defense('ft', {'yaml_path': str(REPO_ROOT / 'config' / 'defense' / 'ft' / 'cifar10.yaml'),
                                 'result_file': 'badnet_small', 'record_root': str(badnet_record),
                                 'save_folder_name': 'earlier_ft'} | common)

    def must_not_run(*args, **kwargs):
        raise AssertionError('ran again')
    monkeypatch.setattr(table, 'run_defense', must_not_run)
    rows = table.run_table('badnet_small', str(badnet_record), [('ft', 'ft', {})], common, prefix='reuse_')
    assert rows[1]['acc'] == earlier['metrics']['acc'] and rows[1]['asr'] == earlier['metrics']['asr']
    assert not (badnet_record / 'badnet_small' / 'defense' / 'reuse_ft').exists()
    with pytest.raises(AssertionError, match='ran again'):   # one option apart is another run
        table.run_table('badnet_small', str(badnet_record), [('ft', 'ft', {'lr': 0.02})], common, prefix='reuse_')


# QUICK's options, so that the table reads the runs test_each_defense_runs_and_writes_the_shared_record made:
# BatchNorm units (BNP) and the classifier columns of FP's own prune (FMP's and CLP's conv units prune alike)
CONTROL_RUNS = {'bnp': {}, 'fp': {'epochs': 1, 'ratio': 0.2}}


@pytest.mark.parametrize('name', sorted(CONTROL_RUNS))
def test_the_random_control_prunes_like_the_defense_at_its_counts_and_is_kept(badnet_record, name, monkeypatch):
    import argparse

    from utils.defense import record_splits
    from utils.evaluate import evaluate
    from utils.fmp import random_channels
    from utils.record import load_attack_record, load_record_model, load_torch
    from utils.registry import DEFENSES
    table = load_bench('defense_table')
    rows = table.run_table('badnet_small', str(badnet_record), [(name, name, CONTROL_RUNS[name])],
                           {'ratio': 0.1, 'device': 'cpu'}, prefix='', random_draws=2)
    control = rows[1]['random_pruning_alone']
    assert all(len(control[key]) == 2 for key in ('acc', 'asr', 'ra'))
    # the defense's own channels through the control's pruning give the defense's own pruning-alone result
    record = load_attack_record(badnet_record / 'badnet_small')
    result = load_torch(badnet_record / 'badnet_small' / 'defense' / name / 'defense_result.pt', 'defense record')
    args, shape = argparse.Namespace(**result['defense_config']), tuple(record['input_shape'])
    defense = DEFENSES.get(name)()
    model = load_record_model(record)
    defense.prune_at(model, args, shape, result['pruned_channels'])
    assert evaluate(model, *record_splits(record)[1:], CPU) == pytest.approx(result['metrics_after_pruning'])
    # a draw prunes exactly the defense's per-unit counts
    counts = {unit: len(c) for unit, c in result['pruned_channels'].items() if len(c)}
    widths = {unit: len(s) for unit, s in result['channel_scores'].items()}
    draw = random_channels(counts, widths, torch.Generator().manual_seed(0))
    model = load_record_model(record)
    defense.prune_at(model, args, shape, draw)
    modules = dict(model.named_modules())
    for unit, channels in draw.items():
        weight = modules[unit].weight
        zeroed = (weight == 0).all(dim=0) if name == 'fp' else (weight.flatten(1) == 0).all(dim=1) if weight.dim() > 1 else weight == 0
        assert sorted(zeroed.nonzero().flatten().tolist()) == channels.tolist(), unit
    # kept: a second table neither reruns the defense nor redraws
    monkeypatch.setattr(table, 'random_control', lambda *a, **k: pytest.fail('drew again'))
    monkeypatch.setattr(table, 'run_defense', lambda *a, **k: pytest.fail('ran again'))
    again = table.run_table('badnet_small', str(badnet_record), [(name, name, CONTROL_RUNS[name])],
                            {'ratio': 0.1, 'device': 'cpu'}, prefix='', random_draws=2)
    assert again[1]['random_pruning_alone'] == control
    assert '±' in table.markdown('badnet_small', 'badnet', again)
