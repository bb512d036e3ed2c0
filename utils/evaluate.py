"""The one evaluation function: ACC, ASR and RA (and DER when comparing a defended model)."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from .data import Split, to_float
from .poison import PoisonedSet


@contextmanager
def eval_mode(model: nn.Module):
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Top-1 predictions (int64, on the CPU) for ``images`` (uint8 pixels or floats in [0, 1]);
    the model is put in eval mode for the call and its previous mode restored."""
    preds = []
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device, non_blocking=True)
            batch = to_float(batch) if batch.dtype == torch.uint8 else batch
            preds.append(model(batch).argmax(1).cpu())
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)


def evaluate(model: nn.Module, clean: Split, backdoor: PoisonedSet | None, device: torch.device,
             batch_size: int = 512) -> dict[str, float]:
    """ACC on ``clean``; ASR (prediction == backdoor label) and RA (prediction == original label)
    on the poisoned test inputs ``backdoor``. Fractions in [0, 1]; ASR/RA are NaN without a backdoor set."""
    metrics = {'acc': (predict(model, clean.images, device, batch_size) == clean.labels).float().mean().item()}
    if backdoor is not None and len(backdoor):
        preds = predict(model, backdoor.images, device, batch_size)
        metrics['asr'] = (preds == backdoor.backdoor_labels).float().mean().item()
        metrics['ra'] = (preds == backdoor.original_labels).float().mean().item()
    else:
        metrics['asr'] = metrics['ra'] = float('nan')
    return metrics


def defense_effectiveness_rating(before: dict[str, float], after: dict[str, float]) -> float:
    """DER (BackdoorBench, Wu et al. 2022): [max(0, dASR) - max(0, dACC) + 1] / 2, in [0, 1]."""
    asr_drop = max(0.0, before['asr'] - after['asr'])
    acc_drop = max(0.0, before['acc'] - after['acc'])
    return (asr_drop - acc_drop + 1) / 2


def detection_metrics(flagged: torch.Tensor, poison_index: torch.Tensor, total: int) -> dict[str, float]:
    """How well ``flagged`` (indices a detection defense calls poisoned) finds ``poison_index``
    (the truly poisoned ones) among ``total`` samples: counts, precision, recall, F1 and the
    false-positive rate (as TrojanZoo's training-filtering defenses report them)."""
    flagged = torch.unique(torch.as_tensor(flagged, dtype=torch.int64))
    truth = torch.unique(torch.as_tensor(poison_index, dtype=torch.int64))
    true_positives = int(torch.isin(flagged, truth).sum())
    precision = true_positives / len(flagged) if len(flagged) else float('nan')
    recall = true_positives / len(truth) if len(truth) else float('nan')
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else (
        float('nan') if math.isnan(precision) or math.isnan(recall) else 0.0)
    clean = total - len(truth)
    return {'flagged': len(flagged), 'poisoned': len(truth), 'true_positives': true_positives,
            'precision': precision, 'recall': recall, 'f1': f1,
            'fpr': (len(flagged) - true_positives) / clean if clean else float('nan')}
