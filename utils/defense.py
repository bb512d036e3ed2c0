"""The base defense and the one defense pipeline: record -> clean data -> defend -> evaluate -> save.

A concrete defense subclasses :class:`Defense`, declares its options and implements
:meth:`Defense.defend`; loading the record, the checks, the before/after table, DER and the
defense record (``record/<name>/defense/<defense>/``) are shared here."""
from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from . import UserError
from .config import (ToolkitParser, add_common_arguments, config_to_dict, parse_config, path_arg,
                     resolve_device, seed_everything)
from .data import DATASETS, Split, class_balanced_subset, dataset_spec, load_splits
from .evaluate import defense_effectiveness_rating, evaluate
from .poison import PoisonedSet
from .record import DEFENSE_RESULT, Log, load_attack_record, metrics_table, record_folder, save_json, save_torch, save_yaml
from .train import TrainSettings, add_training_arguments


class DefenseContext:
    """What a defense works with: the backdoored model, the record, the clean subset it may use,
    the test splits, the device, the resolved options and the log."""

    def __init__(self, model, record, clean_subset, test, bd_test, device, args, log, folder):
        self.model: nn.Module = model
        self.record: dict = record
        self.clean_subset: Split = clean_subset
        self.test: Split = test
        self.bd_test: PoisonedSet = bd_test
        self.device: torch.device = device
        self.args = args
        self.log: Log = log
        self.folder: Path = folder   # record/<name>/defense/<save_folder_name, default the defense's name>/
        self.spec = dataset_spec(record['dataset'])

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        return evaluate(self.model if model is None else model, self.test, self.bd_test, self.device)


class Defense:
    """Shared behaviour of every defense. Subclasses set ``name``, add options in
    :meth:`add_arguments`, check them in :meth:`check`, and implement :meth:`defend`."""
    name: str = ''
    default_ratio: float = 0.05

    def add_arguments(self, parser) -> None:
        """Defense-specific options."""

    def check(self, args, model: nn.Module, clean_subset: Split) -> None:
        """Validate options against the record's model and the clean data (raise UserError);
        runs after everything is loaded and before anything is written."""

    def defend(self, ctx: DefenseContext) -> tuple[nn.Module | None, dict[str, Any]]:
        """Return the defended model and extra entries for defense_result.pt (and ``summary``
        for summary.json). A model of None means the defense produced no model (a ranking-only
        run): nothing is evaluated and no defense_result.pt is written."""
        raise NotImplementedError(f'{type(self).__name__} must implement defend')

    def build_parser(self, script_file: str) -> ToolkitParser:
        parser = ToolkitParser(prog=Path(script_file).name, description=inspect.getdoc(self), script_file=script_file)
        add_common_arguments(parser)
        group = parser.add_argument_group('record and data')
        group.add_argument('--result_file', required=True, help='name of the attack record: record/<result_file>/')
        group.add_argument('--dataset', default=None, choices=sorted(DATASETS),
                           help='dataset the record must have been trained on')
        group.add_argument('--model', default=None, help='model the record must hold (default: whatever it holds)')
        group.add_argument('--dataset_path', default=None, type=path_arg,
                           help="where the clean data lives (default: the attack's dataset_path)")
        group.add_argument('--ratio', type=float, default=self.default_ratio,
                           help='fraction of the clean training set the defense may use (class-balanced, seeded)')
        group.add_argument('--save_folder_name', default=None,
                           help="record/<result_file>/defense/<save_folder_name>/ receives the result (default: the "
                                "defense's name); give each run of a sweep its own")
        group.add_argument('--resume', action='store_true', help='continue interrupted fine-tuning from its checkpoint')
        add_training_arguments(parser)
        self.add_arguments(parser.add_argument_group(f'{self.name} defense'))
        return parser

    def run(self, script_file: str, argv: Sequence[str] | None = None) -> dict:
        """The whole defense: every check happens before anything is written."""
        args = parse_config(self.build_parser(script_file), argv)
        if not 0 < args.ratio <= 1:
            raise UserError(f'ratio must lie in (0, 1], got {args.ratio}')
        source = record_folder(args.record_root, args.result_file)
        args.save_folder_name = args.save_folder_name or self.name
        folder = record_folder(source / 'defense', args.save_folder_name)
        record = load_attack_record(source)
        if args.dataset is not None and args.dataset != record['dataset']:
            raise UserError(f"{source} was trained on {record['dataset']}, but --dataset/YAML asks for {args.dataset}")
        if args.model is not None and args.model != record['model_name']:
            raise UserError(f"{source} holds a {record['model_name']} model, but --model/YAML asks for {args.model}")
        args.dataset, args.model = record['dataset'], record['model_name']
        TrainSettings.from_args(args)  # checks the fine-tuning options
        device = resolve_device(args.device)
        model = load_record_model(record)

        attack_config = record['attack_config']
        data_path = args.dataset_path or attack_config['dataset_path']
        train, test = load_splits(record['dataset'], data_path, attack_config.get('train_fraction', 1.0),
                                  attack_config.get('test_fraction', 1.0), attack_config['random_seed'])
        bd_test = PoisonedSet.from_record(record['bd_test'])
        seed_everything(args.random_seed)
        clean_subset = train.subset(class_balanced_subset(train.labels, args.ratio, args.random_seed))
        self.check(args, model, clean_subset)

        log = Log(folder / 'log.txt')
        config = config_to_dict(args) | {'defense': self.name}
        save_yaml(config, folder / 'config.yaml')
        log(f'{self.name} on {source.name} ({record["attack"]}, {record["model_name"]}, {record["dataset"]}): '
            f'{len(clean_subset)} clean training samples, device {device}')
        started = time.time()
        ctx = DefenseContext(model.to(device), record, clean_subset, test, bd_test, device, args, log, folder)
        before = ctx.evaluate()
        defended, extras = self.defend(ctx)
        summary = {'defense': self.name, 'record': source.name, 'before': before} | extras.pop('summary', {})
        if defended is None:
            save_json(summary | {'seconds': round(time.time() - started, 2)}, folder / 'summary.json')
            log(f'{self.name}: no model produced; wrote {folder}')
            return {'metrics_before': before} | extras
        after = ctx.evaluate(defended)
        after['der'] = defense_effectiveness_rating(before, after)
        seconds = round(time.time() - started, 2)

        result = {'model_name': record['model_name'], 'num_classes': record['num_classes'],
                  'input_shape': record['input_shape'], 'dataset': record['dataset'], 'attack': record['attack'],
                  'defense': self.name, 'defense_config': config, 'model': defended.cpu().state_dict(),
                  'metrics_before': before, 'metrics': after} | extras
        save_torch(result, folder / DEFENSE_RESULT)
        save_json(summary | {'after': after, 'seconds': seconds}, folder / 'summary.json')
        table = metrics_table({'before (record)': before, f'after {self.name}': after})
        log(f'saved {folder / DEFENSE_RESULT} ({seconds:.1f} s)\n{table}')
        return result


def load_record_model(record: dict) -> nn.Module:
    """Rebuild a record's model from the registry and load its weights."""
    from models import build_model
    model = build_model(record['model_name'], record['num_classes'], tuple(record['input_shape']))
    try:
        model.load_state_dict(record['model'])
    except RuntimeError as exc:
        raise UserError(f"the record's weights do not fit a {record['model_name']}: {str(exc).splitlines()[0]}") from None
    return model
