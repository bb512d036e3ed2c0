"""ACC / ASR / RA on a model whose answers are known, and DER."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.data import Split
from utils.evaluate import defense_effectiveness_rating, evaluate, predict
from utils.poison import PoisonedSet

CLASSES = 10
CPU = torch.device('cpu')


class PixelOracle(nn.Module):
    """Answers the class written in pixel (0, 0) of channel 0 (as a uint8 value), one-hot.
    In training mode it answers the next class instead, so evaluating in the wrong mode shows."""

    def forward(self, x):
        cls = torch.round(x[:, 0, 0, 0] * 255).long() % CLASSES
        if self.training:
            cls = (cls + 1) % CLASSES
        return F.one_hot(cls, CLASSES).float()


def images_answering(answers):
    images = torch.randint(0, 256, (len(answers), 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor(answers, dtype=torch.uint8)
    return images


def test_acc_asr_ra_exact():
    answers = [0, 1, 2, 3, 4, 5, 6, 7]
    clean = Split(images_answering(answers), torch.tensor([0, 1, 2, 3, 4, 5, 9, 9]))          # 6 / 8 right
    bd_answers = [0, 0, 0, 0, 0, 3, 7, 8]
    backdoor = PoisonedSet(torch.arange(8), images_answering(bd_answers),
                           original_labels=torch.tensor([1, 2, 3, 4, 5, 3, 7, 9]),           # RA: 2 / 8
                           backdoor_labels=torch.zeros(8, dtype=torch.int64))                # ASR: 5 / 8
    model = PixelOracle().train()
    metrics = evaluate(model, clean, backdoor, CPU, batch_size=3)
    assert metrics == {'acc': 0.75, 'asr': 0.625, 'ra': 0.25}
    assert model.training                      # the caller's mode is restored


def test_metrics_do_not_depend_on_batch_size():
    answers = list(range(10)) * 3
    clean = Split(images_answering(answers), torch.tensor(answers[:20] + [0] * 10))
    backdoor = PoisonedSet(torch.arange(30), images_answering(answers), torch.tensor(answers), torch.full((30,), 3))
    reference = evaluate(PixelOracle(), clean, backdoor, CPU, batch_size=512)
    assert reference['acc'] == pytest.approx(21 / 30)
    assert reference['asr'] == pytest.approx(3 / 30) and reference['ra'] == pytest.approx(1.0)
    for batch_size in (1, 7, 30):
        assert evaluate(PixelOracle(), clean, backdoor, CPU, batch_size=batch_size) == reference


def test_without_backdoor_set_asr_and_ra_are_nan():
    clean = Split(images_answering([1, 2]), torch.tensor([1, 0]))
    empty = PoisonedSet(torch.empty(0, dtype=torch.int64), torch.empty(0, 3, 4, 4, dtype=torch.uint8),
                        torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    for backdoor in (None, empty):
        metrics = evaluate(PixelOracle(), clean, backdoor, CPU)
        assert metrics['acc'] == 0.5 and math.isnan(metrics['asr']) and math.isnan(metrics['ra'])


def test_predict_uses_eval_mode_and_pixel_space():
    seen = {}

    class Spy(nn.Module):
        def forward(self, x):
            seen.update(dtype=x.dtype, low=x.min().item(), high=x.max().item(), training=self.training,
                        grad=torch.is_grad_enabled())
            return torch.zeros(len(x), CLASSES)

    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    model = Spy().train()
    preds = predict(model, images, CPU)
    assert preds.dtype == torch.int64 and preds.tolist() == [0, 0]
    assert seen == {'dtype': torch.float32, 'low': 0.0, 'high': 1.0, 'training': False, 'grad': False}
    assert model.training
    assert predict(model, images[:0], CPU).shape == (0,)


@pytest.mark.parametrize('before, after, der', [
    ({'acc': 0.9, 'asr': 1.0}, {'acc': 0.85, 'asr': 0.1}, (0.9 - 0.05 + 1) / 2),
    ({'acc': 0.9, 'asr': 1.0}, {'acc': 0.9, 'asr': 0.0}, 1.0),        # perfect defense
    ({'acc': 1.0, 'asr': 1.0}, {'acc': 0.0, 'asr': 1.0}, 0.0),        # worst possible
    ({'acc': 0.8, 'asr': 0.5}, {'acc': 0.9, 'asr': 0.7}, 0.5),        # ASR and ACC rose: both clipped at 0
    ({'acc': 0.8, 'asr': 0.9}, {'acc': 0.95, 'asr': 0.3}, 0.8),       # an ACC gain is not a bonus
    ({'acc': 0.9, 'asr': 0.9}, {'acc': 0.7, 'asr': 0.9}, 0.4),
])
def test_der(before, after, der):
    assert defense_effectiveness_rating(before, after) == pytest.approx(der, abs=1e-12)
