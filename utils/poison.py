"""Poisoned splits: the clean tensor stays untouched; a :class:`PoisonedSet` holds the indices,
the poisoned images for exactly those indices, their original and their backdoor labels."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import UserError
from .data import Split

LABEL_TRANSFORMS = ('all2one', 'all2all')


@dataclass
class PoisonedSet:
    index: torch.Tensor            # int64 (P,) indices into the clean split
    images: torch.Tensor           # uint8 (P, C, H, W) poisoned images
    original_labels: torch.Tensor  # int64 (P,)
    backdoor_labels: torch.Tensor  # int64 (P,) what the backdoor makes the model answer

    def __len__(self) -> int:
        return len(self.index)

    def to_record(self, index_key: str = 'index') -> dict[str, torch.Tensor]:
        return {index_key: self.index, 'images': self.images,
                'original_labels': self.original_labels, 'backdoor_labels': self.backdoor_labels}

    @classmethod
    def from_record(cls, entry: dict, index_key: str = 'index') -> 'PoisonedSet':
        return cls(entry[index_key], entry['images'], entry['original_labels'], entry['backdoor_labels'])


def backdoor_labels(labels: torch.Tensor, target: int, label_trans: str, num_classes: int) -> torch.Tensor:
    """all2one: every poisoned input goes to ``target``; all2all: label y goes to (y + 1) mod C."""
    if label_trans == 'all2one':
        return torch.full_like(labels, target)
    if label_trans == 'all2all':
        return (labels + 1) % num_classes
    raise UserError(f'unknown attack_label_trans {label_trans!r} (choose from {", ".join(LABEL_TRANSFORMS)})')


def check_attack_labels(target: int, label_trans: str, pratio: float, num_classes: int) -> None:
    """The checks every attack shares; raises UserError before anything is written."""
    if not 0.0 <= pratio <= 1.0:
        raise UserError(f'pratio must lie in [0, 1], got {pratio}')
    if not 0 <= target < num_classes:
        raise UserError(f'attack_target must be a class in 0..{num_classes - 1}, got {target}')
    if label_trans not in LABEL_TRANSFORMS:
        raise UserError(f'unknown attack_label_trans {label_trans!r} (choose from {", ".join(LABEL_TRANSFORMS)})')


def candidate_index(labels: torch.Tensor, target: int, label_trans: str) -> torch.Tensor:
    """Indices a trigger may go on: for all2one the images not already of the target class."""
    if label_trans == 'all2one':
        return torch.nonzero(labels != target).flatten()
    return torch.arange(len(labels))


def choose_poison_index(labels: torch.Tensor, pratio: float, candidates: torch.Tensor, seed: int) -> torch.Tensor:
    """Sorted, seeded choice of ``round(pratio * len(labels))`` indices among ``candidates``
    (BackdoorBench's convention: the ratio is of the whole training set)."""
    count = int(round(pratio * len(labels)))
    if count > len(candidates):
        raise UserError(f'pratio {pratio} asks for {count} poisoned samples but only {len(candidates)} are eligible')
    generator = torch.Generator().manual_seed(seed)
    picked = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
    return torch.sort(picked).values


def poisoned_training_split(clean: Split, poisoned: PoisonedSet) -> Split:
    """The training split the model sees: clean images with the poisoned ones swapped in."""
    images, labels = clean.images.clone(), clean.labels.clone()
    images[poisoned.index] = poisoned.images
    labels[poisoned.index] = poisoned.backdoor_labels
    return Split(images, labels)


def poisoned_count(pratio: float, batch: int, generator: torch.Generator) -> int:
    """Backdoor samples in a batch: ``int(pratio * batch)``; below one per batch, one with probability
    ``pratio * batch`` (BackdoorBench's extension to low ratios)."""
    expected = pratio * batch
    if expected >= 1:
        return int(expected)
    return int(expected > 0 and torch.rand(1, generator=generator).item() < expected)
