"""The base defense and the one defense pipeline: record -> clean data -> defend -> evaluate -> save.

A concrete defense subclasses :class:`Defense`, registers itself with ``@register_defense``,
declares its options and implements :meth:`Defense.defend`, which returns a
:class:`DefenseResult`: a repaired model, samples flagged as poisoned, or both. Loading the
record, the checks, the before/after table, DER, detection precision/recall and the defense
record (``record/<name>/defense/<defense>/``) are shared here. :func:`run_defense` is the Python
entry point the command-line scripts are thin wrappers of."""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from . import UserError
from .config import (ToolkitParser, add_common_arguments, config_to_dict, fraction, parse_config, path_arg,
                     positive_float, positive_int, resolve_device, seed_everything, str2bool)
from .data import DATASETS, Split, class_balanced_subset, dataset_spec, load_splits, to_float
from .evaluate import defense_effectiveness_rating, detection_metrics, evaluate
from .poison import PoisonedSet, poisoned_training_split
from .pruning import above_mean_plus, bn_units, conv_layers, highest_channels, prune_channels, trigger_lift
from .record import (DEFENSE_RESULT, Log, cached_artefact, code_version, load_attack_record, load_record_model,
                     metrics_table, record_folder, save_csv, save_json, save_torch, save_yaml)
from .registry import DEFENSES, register_defense  # noqa: F401  (register_defense: for defense modules)
from .runs import RunFolder, check_record_hash, check_record_root, identity_of, sha256_file, writer_lock_path
from .train import TrainSettings, add_training_arguments, train


def defense_identity(name: str, config: dict[str, Any] | None = None, argv: Sequence[str] = ()) -> dict:
    """The identity (run.json) that ``run_defense(name, config)`` would record, found without running
    it: two runs with the same identity give the same result, so a finished one can stand for the other."""
    defense = DEFENSES.get(name)()
    *_, parent_sha256, config = defense.resolve(str(DEFENSES.script(name)), list(argv), config)
    return identity_of(config, attack_record_sha256=parent_sha256)


def record_splits(record: dict, dataset_path: str | Path | None = None) -> tuple[Split, Split, PoisonedSet]:
    """The training and clean test splits an attack record was made from (its dataset, fractions and
    seed; ``dataset_path`` overrides where the data lies) and its poisoned test inputs."""
    config = record['attack_config']
    train_split, test = load_splits(record['dataset'], dataset_path or config['dataset_path'],
                                    config.get('train_fraction', 1.0), config.get('test_fraction', 1.0),
                                    config['random_seed'])
    return train_split, test, PoisonedSet.from_record(record['bd_test'])


def run_defense(name: str, config: dict[str, Any] | None = None, argv: Sequence[str] = ()) -> dict:
    """Run defense ``name`` from Python: ``config`` holds option: value pairs (``result_file``,
    ``yaml_path``, ...), checked exactly as YAML values are; returns what defense_result.pt holds.
    Bad input raises :class:`utils.UserError`."""
    defense = DEFENSES.get(name)()
    return defense.run(str(DEFENSES.script(name)), list(argv), config)


@dataclass
class DefenseResult:
    """What :meth:`Defense.defend` returns. ``model``: the defended model (None when the defense
    only ranks or detects). ``flagged``: indices into the training set that the defense calls
    poisoned (detection defenses); the base scores them against the record's true poison indices.
    ``data``: entries for defense_result.pt (tensors and plain values). ``summary``: entries for
    summary.json."""
    model: Optional[nn.Module] = None
    flagged: Optional[torch.Tensor] = None
    data: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


class DefenseContext:
    """What a defense works with: the backdoored model, the record, the clean training split the
    attack started from, the clean subset the defense may use, the test splits, the device, the
    resolved options, the log and the output folder; built lazily on first use, the poisoned
    training set the model was trained on and its true poison indices."""

    def __init__(self, model, record, train, clean_subset, test, bd_test, device, args, log, folder, name='defense',
                 record_sha256: Optional[str] = None):
        self.name = name
        self.record_sha256 = record_sha256   # of the attack record: names its model in artefact keys
        self.model: nn.Module = model
        self.record: dict = record
        self.train: Split = train
        self.clean_subset: Split = clean_subset
        self.test: Split = test
        self.bd_test: PoisonedSet = bd_test
        self.device: torch.device = device
        self.args = args
        self.log: Log = log
        self.folder: Path = folder   # record/<name>/defense/<save_folder_name, default the defense's name>/
        self.spec = dataset_spec(record['dataset'])

    @cached_property
    def bd_train(self) -> PoisonedSet:
        """The record's poisoned training samples: indices into :attr:`train`, images, labels."""
        entry = self.record.get('bd_train')
        per_batch = bool(self.record.get('trigger', {}).get('per_batch'))
        if entry is None or (per_batch and len(entry['poison_index']) == 0 and self.record['attack_config'].get('pratio')):
            raise UserError(f"the record of {self.record['attack']} was written before per-batch attacks recorded their "
                            'poisoned training set: rerun the attack (--overwrite) to rebuild it')
        return PoisonedSet.from_record(entry, 'poison_index')

    @property
    def poison_index(self) -> torch.Tensor:
        """The true indices of the poisoned training samples (what a detection defense should flag)."""
        return self.bd_train.index

    @cached_property
    def poisoned_train(self) -> Split:
        """The training set the model was trained on: the clean split with the poisoned samples swapped in."""
        return poisoned_training_split(self.train, self.bd_train)

    def new_model(self) -> nn.Module:
        """A freshly initialised model of the record's architecture, normalised for its dataset, on the device."""
        from models import build_model
        model = build_model(self.record['model_name'], self.record['num_classes'], tuple(self.record['input_shape']),
                            dataset=self.record['dataset'])
        return model.to(self.device)

    def artefact(self, kind: str, inputs: dict[str, Any], build) -> dict[str, Any]:
        """What ``build()`` computes from the record's model and ``inputs``, shared by every defense run
        on this record whose inputs match (:func:`utils.record.cached_artefact`): FMP and its random
        control at equal counts rank once, and so does a sweep over FMP's pruning amount. A record
        written without a checksum cannot name its model, so nothing is cached for it."""
        if self.record_sha256 is None:
            return build()
        return cached_artefact(self.args.record_root, kind, inputs | {'attack_record_sha256': self.record_sha256},
                               build, self.log)

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        return evaluate(self.model if model is None else model, self.test, self.bd_test, self.device)

    def trigger_lift(self, modules: dict[str, nn.Module], model: nn.Module | None = None,
                     where: str = 'output') -> dict[str, torch.Tensor]:
        """Each channel's mean activation (at the output of ``modules``) on ``n_oracle`` of the
        record's poisoned test inputs minus on their clean versions: it looks at the trigger, so
        it serves the ``oracle_trigger`` comparison every pruning defense reports, never a defense."""
        generator = torch.Generator().manual_seed(self.args.random_seed)
        pick = torch.randperm(len(self.bd_test), generator=generator)[:self.args.n_oracle]
        poisoned = to_float(self.bd_test.images[pick])
        clean = to_float(self.test.images[self.bd_test.index[pick]])
        return trigger_lift(self.model if model is None else model, modules, clean, poisoned, self.device, where=where)

    def channel_report(self, scores: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor],
                       lift: dict[str, torch.Tensor], columns: dict[str, dict[str, torch.Tensor]] | None = None,
                       score_name: str = 'score') -> dict[str, Any]:
        """Write channel_scores.csv (unit, channel, the defense's score, trigger lift, pruned, and
        any ``columns`` of channel sets) and return how many pruned channels are among the
        trigger-excited ones at the same per-unit counts, beside what random choice would give."""
        sets = {key: {name: set(torch.as_tensor(c).tolist()) for name, c in chosen.items()}
                for key, chosen in ({'pruned': pruned} | (columns or {})).items()}
        rows = [{'layer': name, 'channel': k, score_name: float(s[k]), 'trigger_lift': float(lift[name][k])}
                | {key: int(k in chosen.get(name, ())) for key, chosen in reversed(list(sets.items()))}
                for name, s in scores.items() for k in range(len(s))]
        save_csv(rows, self.folder / 'channel_scores.csv')
        counts = {name: len(sets['pruned'].get(name, ())) for name in scores}
        oracle = highest_channels(lift, counts)
        return {'total': sum(counts.values()),
                'with_oracle': sum(len(sets['pruned'].get(n, set()) & set(oracle[n].tolist())) for n in counts),
                'random_expected_with_oracle': round(sum(c * c / len(scores[n]) for n, c in counts.items()), 2)}

    def finetune(self, model: nn.Module | None = None, data: Split | None = None, **kwargs) -> list[dict]:
        """Fine-tune ``model`` (default: the record's) on ``data`` (default: the clean subset) with the
        defense's training options, evaluating every epoch into the defense folder; ``kwargs`` go to
        :func:`utils.train.train` (``phase``, ``after_step``, ``loss_fn``, ``optimizer``, ...)."""
        kwargs.setdefault('desc', f'{self.name} finetune')
        evaluate_fn = self.evaluate if self.args.eval_each_epoch else None
        return train(self.model if model is None else model, self.clean_subset if data is None else data,
                     TrainSettings.from_args(self.args), self.device, evaluate_fn=evaluate_fn,
                     workdir=self.folder, resume=self.args.resume, hflip=self.spec.hflip, log=self.log, **kwargs)


class Defense:
    """Shared behaviour of every defense. Subclasses set ``name``, add options in
    :meth:`add_arguments`, check them in :meth:`check`, and implement :meth:`defend`."""
    name: str = ''
    default_ratio: float = 0.05

    def add_arguments(self, parser) -> None:
        """Defense-specific options (in argument groups of their own, e.g. ``parser.add_argument_group('ft defense')``)."""

    def check(self, args, model: nn.Module, clean_subset: Split) -> None:
        """Validate options against the record's model and the clean data (raise UserError);
        runs after everything is loaded and before anything is written."""

    def defend(self, ctx: DefenseContext) -> DefenseResult:
        """Repair the model and/or flag poisoned training samples (see :class:`DefenseResult`)."""
        raise NotImplementedError(f'{type(self).__name__} must implement defend')

    def build_parser(self, script_file: str) -> ToolkitParser:
        parser = ToolkitParser(prog=Path(script_file).name, description=inspect.getdoc(self), script_file=script_file)
        add_common_arguments(parser)
        group = parser.add_argument_group('record and data')
        group.add_argument('--result_file', default=None, help='name of the attack record: record/<result_file>/ (required)')
        group.add_argument('--dataset', default=None, choices=sorted(DATASETS),
                           help='dataset the record must have been trained on')
        group.add_argument('--model', default=None, help='model the record must hold (default: whatever it holds)')
        group.add_argument('--dataset_path', default=None, type=path_arg,
                           help="where the clean data lives (default: the attack's dataset_path)")
        group.add_argument('--ratio', type=fraction, default=self.default_ratio,
                           help='fraction of the clean training set the defense may use (class-balanced, seeded)')
        group.add_argument('--save_folder_name', default=None,
                           help="record/<result_file>/defense/<save_folder_name>/ receives the result (default: the "
                                "defense's name); give each run of a sweep its own")
        group.add_argument('--resume', action='store_true', help='continue an interrupted run from its checkpoint')
        group.add_argument('--overwrite', action='store_true',
                           help='replace an existing defense folder of the same name (swapped in once the new run has finished)')
        group.add_argument('--n_oracle', type=positive_int, default=256,
                           help='poisoned test inputs (and their clean versions) measuring how much the trigger excites each '
                                'channel, for the oracle_trigger comparison pruning defenses report (analysis only)')
        group.add_argument('--eval_each_epoch', type=str2bool, default=True,
                           help='evaluate ACC/ASR/RA after every fine-tuning epoch (false: only the final model, for sweeps)')
        add_training_arguments(parser)
        self.add_arguments(parser)
        return parser

    def resolve(self, script_file: str, argv: Sequence[str] | None = None, config: dict[str, Any] | None = None):
        """Parse and check the options and read the record, writing nothing: ``(args, source folder,
        defense folder, record, the record's sha256, the run's config)``."""
        parser = self.build_parser(script_file)
        args = parse_config(parser, argv, config)
        if not args.result_file:
            raise UserError('--result_file is required: the name of the attack record to defend (record/<result_file>/)')
        if args.save_folder_name == '':
            raise UserError("save_folder_name must not be empty (leave it out for the defense's name)")
        check_record_root(args.record_root)
        source = record_folder(args.record_root, args.result_file)
        args.save_folder_name = args.save_folder_name or self.name
        folder = record_folder(source / 'defense', args.save_folder_name)
        resolve_device(args.device)
        TrainSettings.from_args(args)  # checks the fine-tuning options
        record = load_attack_record(source)
        parent_sha256 = check_record_hash(source)
        if args.dataset is not None and args.dataset != record['dataset']:
            raise UserError(f"{source} was trained on {record['dataset']}, but --dataset/YAML asks for {args.dataset}")
        if args.model is not None and args.model != record['model_name']:
            raise UserError(f"{source} holds a {record['model_name']} model, but --model/YAML asks for {args.model}")
        args.dataset, args.model = record['dataset'], record['model_name']
        return args, source, folder, record, parent_sha256, config_to_dict(args) | {'defense': self.name}

    def run(self, script_file: str, argv: Sequence[str] | None = None, config: dict[str, Any] | None = None) -> dict:
        """The whole defense: every check happens before anything is written."""
        args, source, folder, record, parent_sha256, config = self.resolve(script_file, argv, config)
        device = resolve_device(args.device)
        run = RunFolder(folder, what=f'the defense folder {folder}', results=(DEFENSE_RESULT,), resume=args.resume,
                        overwrite=args.overwrite, parent_lock=writer_lock_path(source)).open()
        try:
            run.check_resume(identity_of(config, attack_record_sha256=parent_sha256), args.lr_scheduler)
            model = load_record_model(record)
            train_split, test, bd_test = record_splits(record, args.dataset_path)
            seed_everything(args.random_seed)
            clean_subset = train_split.subset(class_balanced_subset(train_split.labels, args.ratio, args.random_seed))
            self.check(args, model, clean_subset)

            def unchanged():
                if check_record_hash(source) != parent_sha256:
                    raise UserError(f'{source / "attack_result.pt"} changed while this defense was starting: run it again')
            run.start(recheck=unchanged)
            ctx = DefenseContext(model.to(device), record, train_split, clean_subset, test, bd_test, device, args,
                                 Log(run.workdir / 'log.txt'), run.workdir, self.name, parent_sha256)
            result = self.defend_and_record(ctx, config, source, parent_sha256, run)
        finally:
            run.close()
        return result

    def defend_and_record(self, ctx: DefenseContext, config: dict, source: Path, parent_sha256: str | None,
                          run: RunFolder) -> dict:
        """Defend and write the defense record into ``run.workdir`` (swapped into place under --overwrite)."""
        record, log, work = ctx.record, ctx.log, run.workdir
        save_yaml(config, work / 'config.yaml')
        log(f'{self.name} on {source.name} ({record["attack"]}, {record["model_name"]}, {record["dataset"]}): '
            f'{len(ctx.clean_subset)} clean training samples, device {ctx.device}')
        started = time.time()
        before = ctx.evaluate()
        outcome = self.defend(ctx)
        summary = {'defense': self.name, 'record': source.name, 'attack_record_sha256': parent_sha256,
                   'commit': code_version(), 'before': before} | outcome.summary
        result = {'model_name': record['model_name'], 'num_classes': record['num_classes'],
                  'input_shape': record['input_shape'], 'dataset': record['dataset'], 'attack': record['attack'],
                  'defense': self.name, 'defense_config': config, 'metrics_before': before} | outcome.data
        rows = {'before (record)': before}
        if outcome.flagged is not None:
            detection = detection_metrics(outcome.flagged, ctx.poison_index, len(ctx.train))
            result |= {'flagged': torch.as_tensor(outcome.flagged, dtype=torch.int64), 'detection': detection}
            summary['detection'] = detection
            log(f'{self.name} flagged {detection["flagged"]} of {len(ctx.train)} training samples: '
                f'{detection["true_positives"]} of the {detection["poisoned"]} poisoned (precision '
                f'{detection["precision"]:.4f}, recall {detection["recall"]:.4f}, F1 {detection["f1"]:.4f})')
        if outcome.model is not None:
            after = ctx.evaluate(outcome.model)
            after['der'] = defense_effectiveness_rating(before, after)
            result |= {'model': outcome.model.cpu().state_dict(), 'metrics': after}
            summary['after'] = rows[f'after {self.name}'] = after
        summary['seconds'] = seconds = round(time.time() - started, 2)
        if outcome.model is None and outcome.flagged is None:
            save_json(summary, work / 'summary.json')
            log(f'{self.name}: no model produced; wrote {run.folder}')
        else:
            save_torch(result, work / DEFENSE_RESULT)
            save_json(summary | {'sha256': sha256_file(work / DEFENSE_RESULT)}, work / 'summary.json')
            from .report import plot_curves   # pandas and matplotlib load only here
            plot_curves(work / 'metrics.csv', work / 'curves.png', f'{source.name}: {self.name} fine-tuning')
            log(f'saved {run.folder / DEFENSE_RESULT} ({seconds:.1f} s)\n{metrics_table(rows)}')
        run.commit()
        return result


@dataclass
class Selection:
    """What a pruning defense chooses: its ``units`` (utils.pruning.ConvLayer), a score per channel
    (``scores``, written to channel_scores.csv), the channels to prune (``pruned``), and optionally
    the trigger lift it already measured, more channel sets for the CSV (``columns``), entries for
    defense_result.pt (``data``) and for summary.json (``summary``; its ``overlap`` is merged)."""
    units: list
    scores: dict[str, torch.Tensor]
    pruned: dict[str, torch.Tensor]
    lift: Optional[dict[str, torch.Tensor]] = None
    columns: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


class PruningDefense(Defense):
    """Shared behaviour of the defenses that score channels and prune them (FMP, FP, ANP, CLP, BNP,
    RNP): a subclass only says what it prunes (:meth:`select`). The base measures the trigger lift of
    every channel (how many pruned channels are among the ones the trigger excites most, beside
    what random choice would give), writes channel_scores.csv, prunes with the shared
    :func:`utils.pruning.prune_channels`, evaluates the pruned model, and fine-tunes it on the clean
    subset when ``epochs`` > 0, keeping pruned channels at zero."""
    score_name = 'score'

    def select(self, ctx: DefenseContext) -> Selection:
        raise NotImplementedError(f'{type(self).__name__} must implement select')

    def lift_modules(self, ctx: DefenseContext, selection: Selection) -> dict[str, nn.Module]:
        """Where each unit's channels are measured: where they leave the unit."""
        return {unit.name: unit.output_module for unit in selection.units}

    def zero_bn_bias(self, args) -> bool:
        return True

    def keep_pruned(self, args) -> bool:
        """Whether fine-tuning keeps the pruned channels at zero (else they may regrow)."""
        return True

    def prune(self, model: nn.Module, args, selection: Selection) -> None:
        """Zero the selected channels of ``model``, whose units ``selection.units`` are."""
        prune_channels(selection.units, selection.pruned, self.zero_bn_bias(args))

    def prunable_units(self, args, model: nn.Module, input_shape: tuple[int, ...]) -> list:
        """Every unit a selection of this defense may name: each conv layer with its BatchNorm (FMP,
        CLP) and each BatchNorm alone (ANP, BNP, RNP); their names do not clash."""
        return conv_layers(model, input_shape) + bn_units(model, input_shape)

    def prune_at(self, model: nn.Module, args, input_shape: tuple[int, ...], pruned: dict[str, torch.Tensor]) -> None:
        """Prune ``pruned`` channels of ``model`` (a fresh copy of the record's model) the way this
        defense prunes: the random control at a defense's own per-unit counts (bench/defense_table.py)."""
        self.prune(model, args, Selection(self.prunable_units(args, model, input_shape), {}, pruned))

    def defend(self, ctx: DefenseContext) -> DefenseResult:
        selection = self.select(ctx)
        lift = selection.lift if selection.lift is not None else ctx.trigger_lift(self.lift_modules(ctx, selection))
        overlap = ctx.channel_report(selection.scores, selection.pruned, lift, selection.columns, self.score_name)
        overlap |= selection.summary.pop('overlap', {})
        summary = {'pruned_total': overlap['total'], 'overlap': overlap} | selection.summary
        data = {'channel_scores': selection.scores, 'trigger_lift': lift, 'pruned_channels': selection.pruned,
                'overlap': overlap} | selection.data
        ctx.log(f'{self.name}: pruning {overlap["total"]} channels in {len(selection.scores)} units; '
                f'{overlap["with_oracle"]} of them are among the {overlap["total"]} the trigger excites most at the '
                f'same per-unit counts (random choice: {overlap["random_expected_with_oracle"]} expected)')
        if getattr(ctx.args, 'rank_only', False):
            return DefenseResult(data=data, summary=summary)
        self.prune(ctx.model, ctx.args, selection)
        pruned_metrics = ctx.evaluate()
        ctx.log('after pruning, before fine-tuning: ' + ' '.join(f'{k}={v:.4f}' for k, v in pruned_metrics.items()))
        data['metrics_after_pruning'] = summary['after_pruning'] = pruned_metrics
        if ctx.args.epochs > 0:
            after_step = (lambda model: self.prune(ctx.model, ctx.args, selection)) if self.keep_pruned(ctx.args) else None
            started = time.time()
            ctx.finetune(after_step=after_step)
            summary['finetune_seconds'] = round(time.time() - started, 3)
        return DefenseResult(ctx.model, data=data, summary=summary)


class OutlierPruning(PruningDefense):
    """Pruning defenses that score every channel of their units and prune each unit's outliers,
    above mean + u * std (CLP, BNP; Zheng et al. 2022). A subclass says which units it scores
    (:meth:`units`) and how (:meth:`channel_scores`)."""

    def add_arguments(self, parser):
        group = parser.add_argument_group(f'{self.name} defense')
        group.add_argument('--u', type=positive_float, default=3.0,
                           help=f'prune channels whose {self.score_name.replace("_", " ")} exceeds mean + u * std of their unit')

    def units(self, args, model: nn.Module, input_shape: tuple[int, ...]) -> list:
        raise NotImplementedError(f'{type(self).__name__} must implement units')

    def channel_scores(self, ctx: DefenseContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f'{type(self).__name__} must implement channel_scores')

    def check(self, args, model, clean_subset):
        self.scored_units = self.units(args, model, tuple(clean_subset.images.shape[1:]))

    def select(self, ctx):
        scores = self.channel_scores(ctx)
        return Selection(self.scored_units, scores, {name: above_mean_plus(s, ctx.args.u) for name, s in scores.items()})
