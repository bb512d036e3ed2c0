"""The base attack and the one attack pipeline: config -> dataset -> model -> poison -> train -> record.

A concrete attack (``attack/<name>_attack.py``) subclasses :class:`Attack`, registers itself with
``@register_attack``, declares its options and implements :meth:`Attack.apply_trigger`; the
stages it may add (:meth:`Attack.prepare` once data, device and model exist; its own
:meth:`Attack.train_model`) and everything else are shared here. :func:`run_attack` is the
Python entry point the command-line scripts are thin wrappers of."""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from . import UserError, distributed
from .config import (ToolkitParser, add_common_arguments, config_to_dict, fraction, parse_config, path_arg,
                     probability, resolve_device, seed_everything)
from .data import DATASETS, DatasetSpec, Split, dataset_spec, load_splits
from .evaluate import evaluate
from .poison import (LABEL_TRANSFORMS, PoisonedSet, backdoor_labels, candidate_index, check_attack_labels,
                     choose_poison_index, poisoned_training_split)
from .record import (ATTACK_RESULT, Log, artefact_path, atomic_write, cached_artefact, code_version,
                     load_attack_record, load_record_model, metrics_table, partial_path, record_folder, save_json,
                     save_torch, save_yaml)
from .registry import ATTACKS, register_attack  # noqa: F401  (register_attack: for attack modules)
from .runs import RunFolder, check_record_root, identity_of, sha256_file
from .train import CHECKPOINT, BatchHook, TrainSettings, add_training_arguments, estimated_seconds, train

# the options that determine a clean reference model (a clean record is reused when they match)
CLEAN_RECIPE = ('dataset', 'model', 'train_fraction', 'test_fraction', 'random_seed', 'epochs', 'batch_size', 'lr',
                'sgd_momentum', 'wd', 'lr_scheduler', 'min_lr', 'steplr_milestones', 'augment')


def run_attack(name: str, config: dict[str, Any] | None = None, argv: Sequence[str] = ()) -> dict:
    """Run attack ``name`` from Python: ``config`` holds option: value pairs (``yaml_path`` too),
    checked exactly as YAML values are; returns the attack record's dict. Bad input raises
    :class:`utils.UserError`."""
    attack = ATTACKS.get(name)()
    return attack.run(str(ATTACKS.script(name)), list(argv), config)


class AttackContext:
    """What an attack's data-dependent stages work with: the resolved options, the dataset's spec,
    the device, the clean splits, the model to be trained, the record folder and its log; the
    poisoned test set once it exists; and :meth:`clean_model`, a clean reference model."""

    def __init__(self, attack: 'Attack', args, spec: DatasetSpec, device: torch.device, train: Split, test: Split,
                 model: nn.Module, folder: Path, log: Log):
        self.attack, self.args, self.spec, self.device = attack, args, spec, device
        self.train, self.test, self.model, self.folder, self.log = train, test, model, folder, log
        self.bd_test: Optional[PoisonedSet] = None
        self._clean_model: Optional[nn.Module] = None
        self._clean_digest: Optional[str] = None

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """ACC/ASR/RA of ``model``; for a learned trigger, on test inputs poisoned by its current state."""
        if self.attack.learned_trigger:
            self.bd_test = self.attack.poison_test(self.test, self.args, self.spec)
        return evaluate(model, self.test, self.bd_test, self.device)

    def artefact(self, kind: str, inputs: dict[str, Any], build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A generated artefact, built once and reused while its ``inputs`` match
        (:func:`utils.record.cached_artefact`). Attacks still save what they use in their own
        record (``record_extras``), so a record never depends on the cache."""
        return cached_artefact(self.args.record_root, kind, inputs, build, self.log)

    def artefact_progress_file(self, kind: str, inputs: dict[str, Any]) -> Path:
        """Where a long build of that artefact saves its progress (:func:`utils.record.resumable_map`)."""
        return partial_path(artefact_path(self.args.record_root, kind, inputs))

    def clean_model(self) -> nn.Module:
        """The clean reference model (eval mode, on the device): the record ``--clean_model`` names,
        or else the record of a clean model trained with this run's recipe, which is trained now
        (``--pratio 0``) and saved as its own record when it does not exist yet, and reused next time."""
        if self._clean_model is None:
            name = clean_model_name(self.args)
            folder = record_folder(self.args.record_root, name)
            if not (folder / ATTACK_RESULT).exists() and distributed.active():
                raise UserError(f'no clean model record/{name}: train it first in a single process (--pratio 0), '
                                'then start the distributed run')
            if not (folder / ATTACK_RESULT).exists():
                self.log(f'no clean model record/{name} yet: training it with this recipe and pratio 0 '
                         '(saved as its own record and reused by later runs)')
                recipe = {key: getattr(self.args, key) for key in CLEAN_RECIPE}
                run_attack('badnet', recipe | {'pratio': 0, 'save_folder_name': name, 'device': self.args.device,
                                               'amp': self.args.amp, 'dataset_path': self.args.dataset_path,
                                               'record_root': self.args.record_root,
                                               'resume': (folder / CHECKPOINT).exists()})
            record = load_clean_record(self.args, name)
            self._clean_model = load_record_model(record).to(self.device).eval()
            self._clean_digest = sha256_file(folder / ATTACK_RESULT)
        return self._clean_model

    def clean_model_digest(self) -> str:
        """The SHA-256 of the clean model's record: what identifies it in an artefact's inputs."""
        self.clean_model()
        return self._clean_digest


def clean_model_name(args) -> str:
    """``--clean_model``, else ``clean_<dataset>_<model>_<hash of the recipe>``."""
    if getattr(args, 'clean_model', None):
        return args.clean_model
    recipe = json.dumps({key: getattr(args, key) for key in CLEAN_RECIPE}, sort_keys=True)
    return f'clean_{args.dataset}_{args.model}_{hashlib.sha256(recipe.encode()).hexdigest()[:8]}'


def load_clean_record(args, name: str) -> dict:
    """The clean record ``name``, checked to be clean (pratio 0) and to share this run's dataset,
    model and data subsets (so its indices and its inputs mean the same)."""
    record = load_attack_record(record_folder(args.record_root, name))
    config = record['attack_config']
    wanted = {'pratio': 0, 'dataset': args.dataset, 'model': args.model,
              'train_fraction': args.train_fraction, 'test_fraction': args.test_fraction}
    if args.train_fraction < 1 or args.test_fraction < 1:
        wanted['random_seed'] = args.random_seed   # the subsets derive from the seed
    differs = [f'{key} {config.get(key)!r} (this run: {value!r})' for key, value in wanted.items()
               if config.get(key) != value]
    if differs:
        raise UserError(f'record/{name} cannot serve as the clean model: {", ".join(differs)}')
    return record


class Attack:
    """Shared behaviour of every attack. A subclass sets ``name``, adds its options in
    :meth:`add_arguments`, checks them and builds what needs no data in :meth:`setup`, builds what
    needs data, device or a clean model in :meth:`prepare`, and implements :meth:`apply_trigger`.
    Clean-label attacks set ``clean_label = True``; attacks that poison each batch while training
    (WaNet) set ``per_batch = True`` and provide :meth:`batch_hook`; attacks that need a clean
    reference model (LF, LC, TrojanNN) set ``needs_clean_model = True`` and call
    ``ctx.clean_model()``; attacks whose trigger is trained with the classifier (Input-aware,
    LIRA) set ``learned_trigger = True`` (the record's poisoned sets are made after training, and
    every evaluation re-poisons the test set) and override :meth:`train_model`."""
    name: str = ''
    clean_label: bool = False
    per_batch: bool = False
    needs_clean_model: bool = False
    learned_trigger: bool = False
    sample_specific: bool = False     # the trigger differs between images: the preview shows the residual

    # ---- what a concrete attack provides
    def add_arguments(self, parser: ToolkitParser) -> None:
        """Attack-specific options."""

    def setup(self, args, spec: DatasetSpec) -> None:
        """Check the attack's options (raise UserError) and build what needs no data. Runs before
        anything is loaded or written."""

    def prepare(self, ctx: AttackContext) -> None:
        """Build what needs the data, the device, the model or a clean model (``ctx.clean_model()``):
        an optimised trigger, a generator. Runs before poisoning and before the record is written."""

    def apply_trigger(self, images: torch.Tensor, *, train: bool, index: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """uint8 (N, C, H, W) clean images -> uint8 poisoned images. ``train``: poisoning the
        training set (some attacks use another strength there); ``index``: the images' indices in
        their split (for per-sample triggers made in advance); ``generator``: a seeded source for
        random triggers."""
        raise NotImplementedError(f'{type(self).__name__} must implement apply_trigger')

    def batch_hook(self, args, spec: DatasetSpec) -> Optional[BatchHook]:
        """Per-batch poisoning during training (``per_batch`` attacks); None when the set is fixed."""
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

    def train_model(self, ctx: AttackContext, model: nn.Module, data: Split, settings: TrainSettings) -> list[dict]:
        """Train the backdoored model on ``data`` (the poisoned training split; the clean one for
        ``per_batch`` attacks, whose hook poisons each batch). Returns one metrics row per epoch."""
        return train(model, data, settings, ctx.device, evaluate_fn=ctx.evaluate, workdir=ctx.folder,
                     resume=ctx.args.resume, hflip=ctx.spec.hflip, batch_hook=self.batch_hook(ctx.args, ctx.spec),
                     log=ctx.log, desc=self.name)

    # ---- shared behaviour
    def training_poison_index(self, train: Split, args) -> torch.Tensor:
        """The seeded choice of training images to poison: ``pratio`` of the training set among the
        images not of the target class (clean-label attacks: ``pratio`` of the target class)."""
        if self.clean_label:
            candidates = torch.nonzero(train.labels == args.attack_target).flatten()
            return choose_poison_index(candidates, args.pratio, candidates, args.random_seed)
        candidates = candidate_index(train.labels, args.attack_target, args.attack_label_trans)
        return choose_poison_index(train.labels, args.pratio, candidates, args.random_seed)

    def poison_train(self, train: Split, args, spec: DatasetSpec) -> PoisonedSet:
        """:meth:`training_poison_index`, triggered and relabelled (clean-label attacks keep the
        labels). For ``per_batch`` attacks this is a seeded realisation of what one epoch poisons,
        recorded for defenses; training poisons anew."""
        index = self.training_poison_index(train, args)
        original = train.labels[index]
        target = original.clone() if self.clean_label else backdoor_labels(
            original, args.attack_target, args.attack_label_trans, spec.num_classes)
        generator = torch.Generator().manual_seed(args.random_seed)
        images = self.apply_trigger(train.images[index], train=True, index=index, generator=generator)
        return PoisonedSet(index, images, original, target)

    def poison_test(self, test: Split, args, spec: DatasetSpec) -> PoisonedSet:
        """Every test image that can show the backdoor (for all2one and clean-label attacks,
        images already of the target class are excluded)."""
        trans = 'all2one' if self.clean_label else args.attack_label_trans
        index = candidate_index(test.labels, args.attack_target, trans)
        original = test.labels[index]
        target = backdoor_labels(original, args.attack_target, trans, spec.num_classes)
        generator = torch.Generator().manual_seed(args.random_seed + 1)
        images = self.apply_trigger(test.images[index], train=False, index=index, generator=generator)
        return PoisonedSet(index, images, original, target)

    def build_parser(self, script_file: str) -> ToolkitParser:
        parser = ToolkitParser(prog=Path(script_file).name, description=inspect.getdoc(self),
                               script_file=script_file)
        add_common_arguments(parser)
        group = parser.add_argument_group('data and model')
        group.add_argument('--dataset', default='cifar10', choices=sorted(DATASETS))
        group.add_argument('--dataset_path', default='../data', type=path_arg,
                           help='folder holding the dataset (downloaded there by torchvision when absent)')
        group.add_argument('--model', default='preactresnet18', help='a model of the registry (models/)')
        group.add_argument('--train_fraction', type=fraction, default=1.0,
                           help='class-balanced fraction of the training set to use (quick runs)')
        group.add_argument('--test_fraction', type=fraction, default=1.0,
                           help='class-balanced fraction of the test set to use (quick runs)')
        group = parser.add_argument_group('poisoning')
        group.add_argument('--pratio', type=probability, default=0.1, help='poisoning ratio (0 trains the clean baseline)')
        group.add_argument('--attack_target', type=int, default=0, help='target class')
        group.add_argument('--attack_label_trans', default='all2one', choices=LABEL_TRANSFORMS)
        if self.needs_clean_model:
            group.add_argument('--clean_model', default=None,
                               help='record of a clean model (made with --pratio 0) to build the trigger on; default: '
                                    'the clean record of this recipe, trained now if it does not exist and reused after')
        group = parser.add_argument_group('record')
        group.add_argument('--save_folder_name', required=False, help='record/<save_folder_name>/ receives the result')
        group.add_argument('--resume', action='store_true', help='continue an interrupted run from its last checkpoint')
        group.add_argument('--overwrite', action='store_true',
                           help='replace an existing record of the same name (swapped in only once the new run has finished)')
        add_training_arguments(parser)
        self.add_arguments(parser.add_argument_group(f'{self.name} attack'))
        return parser

    def run(self, script_file: str, argv: Sequence[str] | None = None, config: dict[str, Any] | None = None) -> dict:
        """The whole attack: every check happens before anything is written."""
        args = parse_config(self.build_parser(script_file), argv, config)
        if args.save_folder_name == '':
            raise UserError('save_folder_name must not be empty (leave it out for the default <attack>_<dataset>)')
        args.save_folder_name = args.save_folder_name or f'{self.name}_{args.dataset}'
        spec = dataset_spec(args.dataset)
        check_attack_labels(args.attack_target, args.attack_label_trans, args.pratio, spec.num_classes)
        self.setup(args, spec)
        settings = TrainSettings.from_args(args)
        if settings.epochs < 1:
            raise UserError('an attack trains its model for at least one epoch (epochs >= 1)')
        device = distributed.setup(resolve_device(args.device))
        check_record_root(args.record_root)
        from models import build_model
        seed_everything(args.random_seed)
        model = build_model(args.model, spec.num_classes, spec.input_shape, dataset=args.dataset)
        folder = record_folder(args.record_root, args.save_folder_name)
        config = config_to_dict(args) | {'attack': self.name}
        run = RunFolder(folder, what=f'the record {folder}', results=(ATTACK_RESULT,), resume=args.resume,
                        overwrite=args.overwrite).open()
        try:
            run.check_resume(identity_of(config), args.lr_scheduler)
            if self.needs_clean_model and args.clean_model:
                load_clean_record(args, args.clean_model)   # a named clean record must exist and fit
            train_split, test_split = load_splits(args.dataset, args.dataset_path, args.train_fraction,
                                                  args.test_fraction, args.random_seed)
            if distributed.is_main():        # under torchrun the other processes read, never write
                run.start()
            distributed.barrier()
            result = self.train_and_record(args, config, spec, settings, device, model, train_split, test_split, run)
        finally:
            run.close()
            distributed.teardown()
        return result

    def train_and_record(self, args, config, spec, settings, device, model, train_split, test_split, run) -> dict:
        """Poison, train and write the record into ``run.workdir`` (swapped into place under --overwrite)."""
        started = time.time()
        work, main = run.workdir, distributed.is_main()
        log = Log(work / 'log.txt') if main else Log(None, quiet=True)
        ctx = AttackContext(self, args, spec, device, train_split, test_split, model, work, log)
        self.prepare(ctx)
        bd_train = self.poison_train(train_split, args, spec)
        ctx.bd_test = bd_test = self.poison_test(test_split, args, spec)
        if main:
            save_yaml(config, work / 'config.yaml')
        log(f'{self.name} on {args.dataset} with {args.model}: {self.describe_training_poison(bd_train, args)}, '
            f'{len(bd_test)} poisoned test samples, device {device}')

        data = train_split if self.per_batch else poisoned_training_split(train_split, bd_train)
        self.warn_if_long(args, model, data, settings, device, log)
        rows = self.train_model(ctx, model, data, settings)
        if self.learned_trigger:   # the trigger the model was trained with is the final one
            bd_train = self.poison_train(train_split, args, spec)
            ctx.bd_test = bd_test = self.poison_test(test_split, args, spec)
        metrics = evaluate(model, test_split, bd_test, device)
        model.cpu()
        result = {'model_name': args.model, 'num_classes': spec.num_classes, 'input_shape': list(spec.input_shape),
                  'model': model.state_dict(), 'dataset': args.dataset, 'attack': self.name,
                  'attack_config': config, 'clean_label': self.clean_label,
                  'bd_train': bd_train.to_record('poison_index'), 'bd_test': bd_test.to_record('index'),
                  'metrics': metrics} | self.record_extras()
        if not main:
            return result
        self.save_preview(test_split, work / 'preview.png')
        save_torch(result, work / ATTACK_RESULT)
        summary = {'attack': self.name, 'dataset': args.dataset, 'model': args.model, 'epochs': settings.epochs,
                   'metrics': metrics, 'train_seconds': sum(r['seconds'] for r in rows),
                   'seconds_per_epoch': (sum(r['seconds'] for r in rows) / len(rows)) if rows else None,
                   'wall_seconds': round(time.time() - started, 2), 'sha256': sha256_file(work / ATTACK_RESULT),
                   'commit': code_version()}
        save_json(summary, work / 'summary.json')
        from .report import plot_curves   # pandas and matplotlib load only here
        plot_curves(work / 'metrics.csv', work / 'curves.png', f'{args.save_folder_name}: {self.name} training')
        log(f'saved {run.folder / ATTACK_RESULT}\n' + metrics_table({f'{self.name} pratio={args.pratio:g} ({args.model})': metrics}))
        run.commit()
        return result

    LONG_ON_CPU = 2 * 3600   # seconds of training above which a CPU run is warned about

    def warn_if_long(self, args, model, data, settings, device, log) -> None:
        """A GPU recipe started on a CPU says at once how long it will take, and what runs on a CPU."""
        if device.type != 'cpu' or args.resume:
            return
        seconds = estimated_seconds(model, data, settings, device)
        if seconds > self.LONG_ON_CPU:
            log(f'warning: training {args.model} for {settings.epochs} epochs on this CPU takes about '
                f'{seconds / 3600:.0f} hours ({seconds / settings.epochs / 60:.0f} minutes an epoch, timed on the first '
                f'batches; evaluation not included). The CPU recipe: --model resnet20 --epochs 8 --lr 0.1 '
                f'--lr_scheduler CosineAnnealingLR (README, "On a CPU")')

    def save_preview(self, test: Split, path: Path, count: int = 8) -> None:
        """A PNG grid: clean test images (top row) above their poisoned versions (middle row) and,
        for sample-specific triggers, the residual |poisoned - clean| amplified to full range (bottom)."""
        from torchvision.utils import save_image
        clean = test.images[:count]
        poisoned = self.apply_trigger(clean, train=False, index=torch.arange(len(clean)),
                                      generator=torch.Generator().manual_seed(0))
        rows = [clean.float() / 255, poisoned.float() / 255]
        if self.sample_specific:
            residual = (poisoned.float() - clean.float()).abs()
            rows.append(residual / residual.max().clamp_min(1))
        grid = torch.cat(rows)
        buffer = io.BytesIO()
        save_image(grid, buffer, nrow=count, padding=2, format='png')
        atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
