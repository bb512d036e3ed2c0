"""The training loop: learning, per-epoch checkpoints and an exact resume after an interruption."""
from __future__ import annotations

import csv

import pytest
import torch

from models import build_model
from utils import UserError
from utils.data import Split
from utils.evaluate import evaluate
from utils.record import load_torch
from utils.train import CHECKPOINT, TrainSettings, train

CPU = torch.device('cpu')
SHAPE = (3, 8, 8)
CLASSES = 4


def quiet(message):
    pass


def random_split(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8),
                 torch.randint(0, CLASSES, (n,), generator=g))


def make_model(seed):
    torch.manual_seed(seed)
    return build_model('mlp', CLASSES, SHAPE)


def settings(**overrides):
    values = dict(epochs=3, batch_size=8, lr=0.05, seed=1, augment=True)
    return TrainSettings(**(values | overrides))


class Interrupted(Exception):
    pass


def counting_hook(raise_at=None):
    """A batch hook that passes batches through, counts its calls and raises at call ``raise_at``."""
    def hook(x, y, generator, model):
        hook.calls += 1
        if hook.calls == raise_at:
            raise Interrupted
        return x, y
    hook.calls = 0
    return hook


def test_resume_after_an_interrupted_epoch_matches_an_uninterrupted_run(tmp_path):
    data = random_split()                 # 64 samples, batch 8: 8 batches per epoch
    evaluate_fn = lambda model: evaluate(model, data, None, CPU)   # noqa: E731

    reference = make_model(0)
    reference_rows = train(reference, data, settings(), CPU, evaluate_fn=evaluate_fn, workdir=tmp_path / 'reference',
                           batch_hook=counting_hook(), log=quiet)

    interrupted = make_model(0)
    hook = counting_hook(raise_at=8 + 3)  # epoch 2, batch 3
    with pytest.raises(Interrupted):
        train(interrupted, data, settings(), CPU, evaluate_fn=evaluate_fn, workdir=tmp_path / 'run',
              batch_hook=hook, log=quiet)
    checkpoint = load_torch(tmp_path / 'run' / CHECKPOINT, 'checkpoint')
    assert checkpoint['epoch'] == 0 and len(checkpoint['rows']) == 1

    # a fresh process would build the model from scratch: start from other weights to prove they are loaded
    resumed = make_model(123)
    hook = counting_hook()
    logged = []
    rows = train(resumed, data, settings(), CPU, evaluate_fn=evaluate_fn, workdir=tmp_path / 'run', resume=True,
                 batch_hook=hook, log=logged.append)
    assert hook.calls == 2 * 8                                   # epochs 2 and 3 only
    assert any('resumed' in line for line in logged)
    assert [r['epoch'] for r in rows] == [1, 2, 3]
    assert [r['train_loss'] for r in rows] == [r['train_loss'] for r in reference_rows]
    assert [r['acc'] for r in rows] == [r['acc'] for r in reference_rows]

    final, expected = resumed.state_dict(), reference.state_dict()
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    assert not torch.equal(final['linear.weight'], make_model(0).state_dict()['linear.weight'])   # it did train

    with open(tmp_path / 'run' / 'metrics.csv') as handle:
        table = list(csv.DictReader(handle))
    assert [int(r['epoch']) for r in table] == [1, 2, 3]
    assert float(table[-1]['train_loss']) == rows[-1]['train_loss']


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path):
    data = random_split()
    a, b = make_model(0), make_model(0)
    train(a, data, settings(epochs=1), CPU, log=quiet)
    train(b, data, settings(epochs=1), CPU, workdir=tmp_path, resume=True, log=quiet)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resume_after_the_last_epoch_trains_no_more(tmp_path):
    data = random_split()
    model = make_model(0)
    train(model, data, settings(epochs=2), CPU, workdir=tmp_path, log=quiet)
    again = make_model(5)
    hook = counting_hook()
    rows = train(again, data, settings(epochs=2), CPU, workdir=tmp_path, resume=True, batch_hook=hook, log=quiet)
    assert hook.calls == 0 and len(rows) == 2
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), again.state_dict().values()))


def test_same_seed_same_weights_other_seed_other_weights():
    data = random_split()
    runs = {}
    for seed in (1, 1, 2):
        model = make_model(0)
        train(model, data, settings(epochs=1, seed=seed), CPU, log=quiet)
        runs.setdefault(seed, []).append(model.state_dict()['linear.weight'])
    assert torch.equal(runs[1][0], runs[1][1])
    assert not torch.equal(runs[1][0], runs[2][0])


def quadrant_data(n=256, seed=0):
    """Class c lights up quadrant c of an otherwise dim image: easy to learn."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    images = torch.randint(0, 60, (n, *SHAPE), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        r, col = divmod(c, 2)
        images[i, :, 4 * r:4 * r + 4, 4 * col:4 * col + 4] = 250
    return Split(images, labels)


def test_training_learns_an_easy_task_and_calls_after_step(tmp_path):
    data, held_out = quadrant_data(), quadrant_data(seed=1)
    model = make_model(0)
    steps = []
    rows = train(model, data, settings(epochs=4, batch_size=32, lr=0.05, augment=False), CPU,
                 evaluate_fn=lambda m: evaluate(m, held_out, None, CPU), workdir=tmp_path,
                 after_step=lambda m: steps.append(m.training), log=quiet)
    assert len(steps) == 4 * 8 and all(steps)
    assert rows[-1]['train_loss'] < rows[0]['train_loss']
    assert evaluate(model, held_out, None, CPU)['acc'] >= 0.95
    assert rows[-1]['acc'] == evaluate(model, held_out, None, CPU)['acc']
    assert {'epoch', 'lr', 'train_loss', 'acc', 'seconds'} <= set(rows[0])
    # cosine schedule from 0.05: the logged lr is the one each epoch trained with
    assert rows[0]['lr'] == pytest.approx(0.05) and rows[-1]['lr'] < rows[1]['lr'] < rows[0]['lr']
    assert (tmp_path / CHECKPOINT).is_file()


def test_divergence_is_a_user_error():
    with pytest.raises(UserError, match='diverged'):
        train(make_model(0), random_split(), settings(epochs=1, lr=1e30), CPU, log=quiet)


@pytest.mark.parametrize('overrides, message', [
    ({'epochs': -1}, 'epochs'), ({'batch_size': 0}, 'batch_size'), ({'lr': 0.0}, 'lr'), ({'lr': -0.1}, 'lr'),
    ({'compile': 'max-speed'}, 'compile'),
])
def test_settings_are_checked(overrides, message):
    with pytest.raises(UserError, match=message):
        settings(**overrides).check()


def test_a_compiled_training_step_trains_the_same_model_as_the_eager_one():
    """torch.compile changes how the step runs, not what it computes: the same losses and weights
    (to float rounding), the model itself handed back (not a wrapper), its weights trained in place.
    A smaller last batch (60 = 7 * 8 + 4) compiles once more."""
    data = random_split(60)
    eager, compiled = make_model(0), make_model(0)
    rows_eager = train(eager, data, settings(epochs=2), CPU, log=quiet)
    rows_compiled = train(compiled, data, settings(epochs=2, compile='default'), CPU, log=quiet)
    for a, b in zip(rows_eager, rows_compiled):
        assert b['train_loss'] == pytest.approx(a['train_loss'], rel=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert not any(k.startswith('_orig_mod') for k in compiled.state_dict())


# --------------------------------------------------------------------------- the caller owns loss, optimizer, phases
def test_a_custom_loss_reaches_the_loop():
    """A loss that ignores the labels and pushes every logit of class 0 up: after training, the
    model answers class 0 everywhere, which cross-entropy on random labels would never do."""
    data = random_split(n=128)
    seen = []

    def favour_class_zero(model, x, y):
        seen.append((model.training, x.shape[0]))
        return -model(x)[:, 0].mean()

    model = make_model(0)
    rows = train(model, data, settings(epochs=2, lr=0.1, augment=False), CPU, loss_fn=favour_class_zero, log=quiet)
    assert len(seen) == 2 * (128 // 8) and all(training for training, _ in seen)
    assert 'train_acc' not in rows[0]                       # the loss returned no logits
    with torch.no_grad():
        assert (model(data.images.float() / 255).argmax(1) == 0).all()


def test_a_caller_optimizer_and_state_modules_are_checkpointed_and_restored(tmp_path):
    """A mask trained beside a frozen model (ANP/RNP's shape): only the mask moves, and a resumed
    run restores the mask from the checkpoint."""
    data = random_split()

    class Mask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logit = torch.nn.Parameter(torch.zeros(CLASSES))

    def run(resume=False, seed_mask=None, interrupt_at=None):
        model, mask = make_model(0), Mask()
        if seed_mask is not None:
            torch.nn.init.normal_(mask.logit)
        frozen = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.Adam(mask.parameters(), lr=0.1)
        masked = lambda m, x, y: torch.nn.functional.cross_entropy(m(x) * torch.sigmoid(mask.logit), y)  # noqa: E731
        train(model, data, settings(), CPU, optimizer=optimizer, loss_fn=masked, state_modules={'mask': mask},
              workdir=tmp_path / ('run' if interrupt_at or resume else 'whole'), resume=resume, train_mode=False,
              batch_hook=counting_hook(raise_at=interrupt_at), log=quiet)
        assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())   # the model did not move
        return mask.logit.detach().clone()

    whole = run()
    with pytest.raises(Interrupted):
        run(interrupt_at=2 * 8 + 1)                    # epoch 3, batch 1
    resumed = run(resume=True, seed_mask=True)         # starts from another mask: the checkpoint's must win
    assert not torch.equal(whole, torch.zeros(CLASSES)) and torch.equal(whole, resumed)


def test_parameter_groups_use_the_recipe_optimizer():
    data = random_split()
    model = make_model(0)
    head = list(model.linear.parameters())
    frozen = {name: p.clone() for name, p in model.named_parameters() if not name.startswith('linear')}
    train(model, data, settings(epochs=1), CPU, optimizer=[{'params': head, 'lr': 0.5}], log=quiet)
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)


def two_phase_run(tmp_path, interrupt_at=None, resume=False):
    """Phase 'unlearn' (2 epochs) then phase 'recover' (3 epochs) on one model, RNP's shape; each
    hook counts its batches and may interrupt the run at its call ``interrupt_at``."""
    data = random_split()
    model = make_model(0)
    hooks = {'unlearn': counting_hook(), 'recover': counting_hook(raise_at=interrupt_at)}
    ascent = lambda m, x, y: -torch.nn.functional.cross_entropy(m(x), y)  # noqa: E731
    train(model, data, settings(epochs=2, lr=0.01), CPU, loss_fn=ascent, phase='unlearn', workdir=tmp_path,
          resume=resume, batch_hook=hooks['unlearn'], log=quiet)
    train(model, data, settings(epochs=3), CPU, phase='recover', workdir=tmp_path, resume=resume,
          batch_hook=hooks['recover'], log=quiet)
    return model, hooks


def test_a_two_phase_run_killed_in_phase_two_resumes_phase_two(tmp_path):
    reference, _ = two_phase_run(tmp_path / 'reference')
    with pytest.raises(Interrupted):
        two_phase_run(tmp_path / 'run', interrupt_at=8 + 4)          # phase 2, epoch 2, batch 4
    assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == [
        'checkpoint_recover.pt', 'checkpoint_unlearn.pt', 'metrics_recover.csv', 'metrics_unlearn.csv']
    resumed, hooks = two_phase_run(tmp_path / 'run', resume=True)
    assert hooks['unlearn'].calls == 0                 # phase 1 finished: loaded, not retrained
    assert hooks['recover'].calls == 2 * 8             # phase 2 resumes after its first epoch
    for name, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
