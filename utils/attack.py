"""The base attack and the one attack pipeline: config -> dataset -> poison -> train -> record.

A concrete attack (``attack/<name>_attack.py``) subclasses :class:`Attack`, declares its options
and implements :meth:`Attack.apply_trigger`; everything else is shared here."""
from __future__ import annotations

import importlib
import inspect
import io
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import REPO_ROOT, UserError
from .config import (ToolkitParser, add_common_arguments, config_to_dict, parse_config, path_arg,
                     resolve_device, seed_everything)
from .data import DATASETS, DatasetSpec, Split, dataset_spec, load_splits
from .evaluate import evaluate
from .poison import (LABEL_TRANSFORMS, PoisonedSet, backdoor_labels, candidate_index, check_attack_labels,
                     choose_poison_index, poisoned_training_split)
from .record import ATTACK_RESULT, Log, record_folder, save_json, save_torch, save_yaml, metrics_table, atomic_write
from .train import CHECKPOINT, BatchHook, TrainSettings, add_training_arguments, train


def get_attack(name: str) -> 'Attack':
    """The attack registered as ``name`` (its class lives in ``attack/<name>_attack.py``)."""
    try:
        module = importlib.import_module(f'attack.{name}_attack')
    except ModuleNotFoundError:
        known = sorted(p.stem[:-len('_attack')] for p in (REPO_ROOT / 'attack').glob('*_attack.py'))
        raise UserError(f'unknown attack {name!r} (known: {", ".join(known)})') from None
    return module.ATTACK()


class Attack:
    """Shared behaviour of every attack. Subclasses set ``name``, add their options in
    :meth:`add_arguments`, check and build their trigger in :meth:`setup`, and implement
    :meth:`apply_trigger`. Clean-label attacks set ``clean_label = True``."""
    name: str = ''
    clean_label: bool = False

    # ---- what a concrete attack provides
    def add_arguments(self, parser: ToolkitParser) -> None:
        """Attack-specific options."""

    def setup(self, args, spec: DatasetSpec) -> None:
        """Check the attack's options (raise UserError) and build its trigger."""

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) clean images -> uint8 poisoned images."""
        raise NotImplementedError(f'{type(self).__name__} must implement apply_trigger')

    def batch_hook(self, args, spec: DatasetSpec) -> Optional[BatchHook]:
        """Per-batch poisoning during training (WaNet); None when the poisoned set is fixed."""
        return None

    def describe_training_poison(self, bd_train: PoisonedSet, args) -> str:
        """One phrase for the run's first log line: how the training set is poisoned."""
        if self.clean_label:
            return (f'{len(bd_train)} clean-label poisoned training samples '
                    f'(pratio {args.pratio:g} of the target class)')
        return f'{len(bd_train)} poisoned training samples (pratio {args.pratio:g})'

    def record_extras(self) -> dict[str, Any]:
        """Tensors and plain values needed to rebuild the trigger (saved in attack_result.pt)."""
        return {}

    # ---- shared behaviour
    def poison_train(self, train: Split, args, spec: DatasetSpec) -> PoisonedSet:
        """Seeded choice of ``pratio`` of the training set, triggered and relabelled (clean-label
        attacks: ``pratio`` of the target class, labels kept)."""
        if self.clean_label:
            candidates = torch.nonzero(train.labels == args.attack_target).flatten()
            count_base = candidates
        else:
            candidates = candidate_index(train.labels, args.attack_target, args.attack_label_trans)
            count_base = train.labels
        index = choose_poison_index(count_base, args.pratio, candidates, args.random_seed)
        original = train.labels[index]
        target = original.clone() if self.clean_label else backdoor_labels(
            original, args.attack_target, args.attack_label_trans, spec.num_classes)
        return PoisonedSet(index, self.apply_trigger(train.images[index]), original, target)

    def poison_test(self, test: Split, args, spec: DatasetSpec) -> PoisonedSet:
        """Every test image that can show the backdoor (for all2one and clean-label attacks,
        images already of the target class are excluded)."""
        trans = 'all2one' if self.clean_label else args.attack_label_trans
        index = candidate_index(test.labels, args.attack_target, trans)
        original = test.labels[index]
        target = backdoor_labels(original, args.attack_target, trans, spec.num_classes)
        return PoisonedSet(index, self.apply_trigger(test.images[index]), original, target)

    def build_parser(self, script_file: str) -> ToolkitParser:
        parser = ToolkitParser(prog=Path(script_file).name, description=inspect.getdoc(self),
                               script_file=script_file)
        add_common_arguments(parser)
        group = parser.add_argument_group('data and model')
        group.add_argument('--dataset', default='cifar10', choices=sorted(DATASETS))
        group.add_argument('--dataset_path', default='../data', type=path_arg,
                           help='folder holding the dataset (downloaded there by torchvision when absent)')
        group.add_argument('--model', default='preactresnet18', help='a model of the registry (models/)')
        group.add_argument('--train_fraction', type=float, default=1.0,
                           help='class-balanced fraction of the training set to use (quick runs)')
        group.add_argument('--test_fraction', type=float, default=1.0,
                           help='class-balanced fraction of the test set to use (quick runs)')
        group = parser.add_argument_group('poisoning')
        group.add_argument('--pratio', type=float, default=0.1, help='poisoning ratio (0 trains the clean baseline)')
        group.add_argument('--attack_target', type=int, default=0, help='target class')
        group.add_argument('--attack_label_trans', default='all2one', choices=LABEL_TRANSFORMS)
        group = parser.add_argument_group('record')
        group.add_argument('--save_folder_name', required=False, help='record/<save_folder_name>/ receives the result')
        group.add_argument('--resume', action='store_true', help='continue an interrupted run from its last checkpoint')
        group.add_argument('--overwrite', action='store_true', help='replace an existing record of the same name')
        add_training_arguments(parser)
        self.add_arguments(parser.add_argument_group(f'{self.name} attack'))
        return parser

    def run(self, script_file: str, argv: Sequence[str] | None = None) -> dict:
        """The whole attack: every check happens before anything is written."""
        args = parse_config(self.build_parser(script_file), argv)
        if not args.save_folder_name:
            args.save_folder_name = f'{self.name}_{args.dataset}'
        spec = dataset_spec(args.dataset)
        check_attack_labels(args.attack_target, args.attack_label_trans, args.pratio, spec.num_classes)
        self.setup(args, spec)
        settings = TrainSettings.from_args(args)
        device = resolve_device(args.device)
        from models import build_model
        seed_everything(args.random_seed)
        model = build_model(args.model, spec.num_classes, spec.input_shape, spec.mean, spec.std)
        folder = record_folder(args.record_root, args.save_folder_name)
        existing = [p.name for p in (folder / ATTACK_RESULT, folder / CHECKPOINT) if p.exists()]
        if existing and not (args.resume or args.overwrite):
            raise UserError(f'{folder} already holds {", ".join(existing)}: pass --resume to continue it, '
                            '--overwrite to replace it, or choose another --save_folder_name')
        train_split, test_split = load_splits(args.dataset, args.dataset_path, args.train_fraction,
                                              args.test_fraction, args.random_seed)

        started = time.time()
        bd_train = self.poison_train(train_split, args, spec)
        bd_test = self.poison_test(test_split, args, spec)
        if args.overwrite and not args.resume:
            for stale in (folder / CHECKPOINT, folder / 'log.txt'):
                stale.unlink(missing_ok=True)
        config = config_to_dict(args) | {'attack': self.name}
        log = Log(folder / 'log.txt')
        save_yaml(config, folder / 'config.yaml')
        self.save_preview(test_split, folder / 'preview.png')
        log(f'{self.name} on {args.dataset} with {args.model}: {self.describe_training_poison(bd_train, args)}, '
            f'{len(bd_test)} poisoned test samples, device {device}')

        rows = train(model, poisoned_training_split(train_split, bd_train), settings, device,
                     evaluate_fn=lambda m: evaluate(m, test_split, bd_test, device),
                     workdir=folder, resume=args.resume, hflip=spec.hflip,
                     batch_hook=self.batch_hook(args, spec), log=log, desc=self.name)
        metrics = evaluate(model, test_split, bd_test, device)
        model.cpu()
        result = {'model_name': args.model, 'num_classes': spec.num_classes, 'input_shape': list(spec.input_shape),
                  'model': model.state_dict(), 'dataset': args.dataset, 'attack': self.name,
                  'attack_config': config, 'clean_label': self.clean_label,
                  'bd_train': bd_train.to_record('poison_index'), 'bd_test': bd_test.to_record('index'),
                  'metrics': metrics} | self.record_extras()
        save_torch(result, folder / ATTACK_RESULT)
        summary = {'attack': self.name, 'dataset': args.dataset, 'model': args.model, 'epochs': settings.epochs,
                   'metrics': metrics, 'train_seconds': sum(r['seconds'] for r in rows),
                   'seconds_per_epoch': (sum(r['seconds'] for r in rows) / len(rows)) if rows else None,
                   'wall_seconds': round(time.time() - started, 2)}
        save_json(summary, folder / 'summary.json')
        log(f'saved {folder / ATTACK_RESULT}\n' + metrics_table({f'{self.name} pratio={args.pratio:g} ({args.model})': metrics}))
        return result

    def save_preview(self, test: Split, path: Path, count: int = 8) -> None:
        """A PNG grid: clean test images (top row) above their poisoned versions (bottom row)."""
        from torchvision.utils import save_image
        clean = test.images[:count]
        grid = torch.cat([clean, self.apply_trigger(clean)]).float() / 255
        buffer = io.BytesIO()
        save_image(grid, buffer, nrow=count, padding=2, format='png')
        atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
