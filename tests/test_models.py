"""Every model of the registry: forward, backward, the feature API, normalisation set in one
place, and FMP's conv->BN pairing through the graph."""
import pytest
import torch
import torch.nn as nn

from models import MODELS, build_model
from utils.data import dataset_spec
from utils.hooks import output_of, stage_outputs
from utils.pruning import conv_layers, prune_channels

SHAPE = (3, 32, 32)
SPEC = dataset_spec('cifar10')


def model_and_batch(name, seed=0):
    torch.manual_seed(seed)
    return build_model(name, 10, SHAPE, dataset='cifar10'), torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('name', sorted(MODELS))
def test_forward_and_backward(name):
    model, x = model_and_batch(name)
    logits = model(x)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize('name', sorted(MODELS))
def test_feature_api(name):
    model, x = model_and_batch(name)
    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.allclose(model.forward_head(features), model(x), atol=1e-5)
        penultimate = model.forward_head(features, pre_logits=True)
        assert penultimate.shape == (4, model.linear.in_features)
        assert torch.allclose(model.linear(penultimate), model(x), atol=1e-5)
        stages = stage_outputs(model, x)
    assert list(stages) == list(model.feature_stages) and stages
    assert all(out.shape[0] == 4 for out in stages.values())


@pytest.mark.parametrize('name', sorted(MODELS))
def test_normalisation_is_the_datasets_and_set_in_one_place(name):
    model, x = model_and_batch(name)
    plain, _ = model_and_batch(name)          # same weights, identity normalisation
    plain.normalize.set((0.0,) * 3, (1.0,) * 3)
    mean, std = torch.tensor(SPEC.mean).view(1, 3, 1, 1), torch.tensor(SPEC.std).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize.mean, mean) and torch.allclose(model.normalize.std, std)
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), plain((x - mean) / std), atol=1e-5)
    # without a dataset the layer is the identity until a state_dict restores it
    bare = build_model(name, 10, SHAPE)
    assert torch.equal(bare.normalize.mean, torch.zeros(1, 3, 1, 1))
    bare.load_state_dict(model.state_dict())
    assert torch.equal(bare.normalize.std, model.normalize.std)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_conv_bn_pairing_zeroes_the_channel_where_it_leaves_the_pair(name):
    """For every conv: pruning channel k silences channel k of its paired BatchNorm's output, or,
    when no BatchNorm consumes the conv (its output feeds an addition), of the conv's own output."""
    model, x = model_and_batch(name)
    layers = conv_layers(model, SHAPE)
    if name == 'mlp':
        assert layers == []
        return
    assert len(layers) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    for layer in layers:
        assert layer.bn is None or layer.bn.num_features == layer.channels
    model.eval()
    for layer in layers:
        for bn in (l.bn for l in layers if l.bn is not None):      # no BN may pass a constant through
            nn.init.uniform_(bn.bias, 0.5, 1.0)
        prune_channels([layer], {layer.name: torch.tensor([1])})
        with torch.no_grad():
            out = output_of(model, layer.bn if layer.bn is not None else layer.conv, x)
        assert out[:, 1].abs().max() == 0, layer.name
        assert out[:, 0].abs().max() > 0, layer.name
