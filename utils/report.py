"""Result tables and plots, rebuilt from records alone.

    python -m utils.report record/sweeps/demo_cpu        # a sweep's folder (its steps.json)
    python -m utils.report record                         # every record under a folder
    python -m utils.report bench/results/cifar10_cpu      # a sweep's archive (utils/archive.py)

writes ``results.csv`` (one row per record x defense x setting: ACC, ASR, RA, DER, seconds, seed,
commit), ``results.md`` (mean ± std over seeds; per attack, the lowest ASR among the defenses that
keep ACC within 2 points of the undefended model is marked) and the plots: ``acc_vs_asr.png`` (every
defense per attack: the trade-off), ``bars.png`` (ACC/ASR/RA per defense), ``fmp_scores_<record>.png``
(FMP's per-layer channel scores, pruned channels marked) and ``curves_<record>.png`` (ACC/ASR per
training epoch). Where FMP ran beside its random-selection control (``select: random``, the same
options otherwise), results.md ends with FMP against the control's draws, after pruning and after
fine-tuning, with a verdict."""
from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from .archive import RECORDS, ran_on, read_stamp
from .record import ATTACK_RESULT, DEFENSE_RESULT, save_text
from .runs import NOT_IDENTITY

ACC_TOLERANCE = 0.02   # "keeps ACC": within 2 points of the undefended model
VERDICT_TOLERANCE = 1.0   # percentage points of ACC or ASR: a smaller difference counts for neither side
CONTROL_OPTIONS = {'select', 'selection_seed'}   # what FMP's random control may differ in


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _metrics(summary: dict, key: str) -> dict:
    return summary.get(key) or {}


def _row(record_folder: Path, defense: str, setting: Any, summary: dict, attack_summary: dict, config: dict,
         folder: Optional[Path] = None) -> dict:
    """One table row; ``_folder`` and ``_summary`` (the run's folder and summary) are for the report,
    not results.csv."""
    after = _metrics(summary, 'after') if defense != 'none' else _metrics(attack_summary, 'metrics')
    return {'record': record_folder.name, 'dataset': attack_summary.get('dataset'), 'model': attack_summary.get('model'),
            'attack': config.get('attack', attack_summary.get('attack')), 'seed': config.get('random_seed'),
            'defense': defense, 'setting': json.dumps(setting, sort_keys=True) if setting else '',
            'acc': after.get('acc'), 'asr': after.get('asr'), 'ra': after.get('ra'), 'der': after.get('der'),
            'seconds': summary.get('seconds', attack_summary.get('wall_seconds')) if defense != 'none' else attack_summary.get('wall_seconds'),
            'commit': summary.get('commit', attack_summary.get('commit', '')), '_folder': folder, '_summary': summary}


def _record_root(folder: Path, record_root: Optional[Path], archive: Optional[Path]) -> Path:
    """Where a sweep's records are: its archive when it has one (every verified step is archived as
    it finishes), else the record root."""
    if archive is not None:
        return Path(archive) / RECORDS
    if record_root is not None:
        return Path(record_root)
    return folder / RECORDS if (folder / RECORDS).is_dir() else folder.parents[1]


def _finished_record(root: Path, name: str) -> Optional[Path]:
    """The record ``name`` under ``root`` if it finished (or was archived finished), else None."""
    record = root / name
    return record if (record / ATTACK_RESULT).exists() or read_stamp(record) is not None else None


def _finished_run(record: Path, name: str) -> Optional[Path]:
    """The defense run ``name`` on ``record``: finished, or archived from that very attack record."""
    run = record / 'defense' / name
    return run if (run / DEFENSE_RESULT).exists() or ran_on(run, record) else None


def collect(folder: Path, record_root: Optional[Path] = None, archive: Optional[Path] = None) -> list[dict]:
    """One row per finished attack record ('none') and per finished defense run under ``folder``
    (a sweep folder or a sweep's archive: its steps, live or archived; otherwise every record found
    below it)."""
    import yaml
    folder = Path(folder)
    rows = []
    steps_file = folder / 'steps.json'
    if steps_file.exists():
        root = _record_root(folder, record_root, archive)
        steps = _read_json(steps_file)['steps']
        records = {s['record']: s for s in steps if s['kind'] == 'attack'}
        runs = [(s['record'], s['folder'], s['labels'].get('defense', s['method']), s['labels'].get('setting'))
                for s in steps if s['kind'] == 'defense']
        record_folders = [_finished_record(root, name) for name in records]
        labels = {name: s['labels'].get('attack') for name, s in records.items()}
    else:
        record_folders = sorted(p.parent for p in folder.rglob(ATTACK_RESULT) if 'defense' not in p.parts[-3:])
        runs = list(dict.fromkeys((p.parents[2].name, p.parent.name, p.parent.name, None)
                                  for p in folder.rglob(DEFENSE_RESULT)))
        labels = {}
    for record in record_folders:
        if record is None:
            continue
        attack_summary = _read_json(record / 'summary.json')
        config = yaml.safe_load((record / 'config.yaml').read_text()) if (record / 'config.yaml').exists() else {}
        if record.name in labels:
            config['attack'] = labels[record.name]
        rows.append(_row(record, 'none', None, {}, attack_summary, config))
        for parent, name, label, setting in runs:
            run = _finished_run(record, name) if parent == record.name else None
            if run is not None:
                rows.append(_row(record, label, setting, _read_json(run / 'summary.json'), attack_summary, config, run))
    return rows


def summarise(rows: list[dict]) -> pd.DataFrame:
    """Mean and std over seeds per (dataset, model, attack, defense, setting), with the ``best`` mark."""
    frame = pd.DataFrame(rows)
    keys = ['dataset', 'model', 'attack', 'defense', 'setting']
    grouped = frame.groupby(keys, dropna=False, sort=False)
    table = grouped[['acc', 'asr', 'ra', 'der']].agg(['mean', 'std']).reset_index()
    table.columns = [a if not b else f'{a}_{b}' for a, b in table.columns]
    table['seeds'] = grouped.size().values
    table['best'] = False
    for _, group in table.groupby(['dataset', 'model', 'attack'], dropna=False, sort=False):
        undefended = group[group['defense'] == 'none']['acc_mean']
        if undefended.empty:
            continue
        keeps = group[(group['defense'] != 'none') & (group['acc_mean'] >= undefended.iloc[0] - ACC_TOLERANCE)]
        if not keeps.empty:
            table.loc[keeps['asr_mean'].idxmin(), 'best'] = True
    return table


def _cell(mean, std) -> str:
    if pd.isna(mean):
        return ''
    return f'{100 * mean:.2f}' + (f' ± {100 * std:.2f}' if not pd.isna(std) else '')


def markdown(table: pd.DataFrame, heading: str = '') -> str:
    lines = ([heading, ''] if heading else []) + [
        'ACC, ASR and RA in percent (mean ± std over seeds), DER in [0, 1]. **Bold**: per attack, the lowest '
        'ASR among the defenses that keep ACC within 2 points of the undefended model.', '']
    for (dataset, model, attack), group in table.groupby(['dataset', 'model', 'attack'], dropna=False, sort=False):
        lines += [f'### {attack} ({dataset}, {model})', '', '| defense | setting | seeds | ACC | ASR | RA | DER |',
                  '|---|---|---|---|---|---|---|']
        for _, r in group.iterrows():
            asr = _cell(r['asr_mean'], r['asr_std'])
            der = '' if pd.isna(r['der_mean']) else f"{r['der_mean']:.3f}"
            lines.append(f"| {r['defense']} | {r['setting'] or ''} | {r['seeds']} | {_cell(r['acc_mean'], r['acc_std'])} | "
                         f"{'**' + asr + '**' if r['best'] else asr} | {_cell(r['ra_mean'], r['ra_std'])} | {der} |")
        lines.append('')
    return '\n'.join(lines)


def mean_std(values) -> str:
    """'mean ± sample std' of numbers, to one decimal ('mean' alone for one number)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    spread = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f'{mean:.1f} ± {spread:.1f}' if len(values) > 1 else f'{mean:.1f}'


def verdict(row, randoms) -> str:
    """Against random maps at the same per-layer counts (ACC and ASR in percent): 'better' only when ASR
    is more than VERDICT_TOLERANCE below every random draw's and ACC not more than that below every
    draw's; 'worse' when ASR is that far above every draw's, or ACC that far below every draw's
    without the ASR to show for it; a lower ASR bought with a lower ACC is a trade-off."""
    if not randoms:
        return ''
    asr, acc = float(row['asr']), float(row['acc'])
    random_asr, random_acc = [float(r['asr']) for r in randoms], [float(r['acc']) for r in randoms]
    lower_asr, lower_acc = asr < min(random_asr) - VERDICT_TOLERANCE, acc < min(random_acc) - VERDICT_TOLERANCE
    if lower_asr:
        said = 'lower ASR, lower ACC' if lower_acc else 'better'
    else:
        said = 'worse' if asr > max(random_asr) + VERDICT_TOLERANCE or lower_acc else 'no better'
    return said + (' (one random draw)' if len(randoms) == 1 else '')


def fmp_against_random(rows: list[dict]) -> list[dict]:
    """Per FMP run (``select: fraction``, whose per-layer counts the random control draws at) that has
    random-selection controls on the same record with otherwise the same options: the number of maps
    pruned, and ACC / ASR in percent of FMP and of each draw, after pruning (before fine-tuning) and
    after fine-tuning."""
    import yaml
    runs = []
    for row in rows:
        folder, summary = row['_folder'], row['_summary']
        if summary.get('defense') != 'feature' or not (folder / 'config.yaml').exists():
            continue
        config = yaml.safe_load((folder / 'config.yaml').read_text()) or {}
        key = json.dumps({k: v for k, v in config.items() if k not in NOT_IDENTITY | CONTROL_OPTIONS}, sort_keys=True, default=str)
        stages = {stage: {m: 100 * _metrics(summary, stage).get(m, float('nan')) for m in ('acc', 'asr')}
                  for stage in ('after_pruning', 'after')}
        runs.append({'row': row, 'key': (row['record'], key), 'select': summary.get('select'),
                     'amount': summary.get('amount', ''), 'maps': summary.get('pruned_total'), **stages})
    compared = []
    for run in runs:
        controls = [r for r in runs if r['key'] == run['key'] and r['select'] == 'random']
        if run['select'] == 'fraction' and controls:
            compared.append({'record': run['row']['record'], 'defense': run['row']['defense'],
                             'amount': run['amount'], 'maps': run['maps'],
                             'fmp': {s: run[s] for s in ('after_pruning', 'after')},
                             'random': [{s: r[s] for s in ('after_pruning', 'after')} for r in controls]})
    return compared


def control_markdown(compared: list[dict]) -> str:
    """results.md's closing section: FMP against its random control, stage by stage."""
    if not compared:
        return ''
    lines = ['', "## FMP's ranking against random maps at the same per-layer counts", '',
             'ACC / ASR in percent on the whole test sets; random: mean ± std over its draws (the same options but '
             f'`select: random`, one `selection_seed` each). Verdict: *better* only when FMP\'s ASR is more than '
             f'{VERDICT_TOLERANCE:g} point below every draw\'s and its ACC not more than {VERDICT_TOLERANCE:g} point below '
             'every draw\'s; *worse* when its ASR is that far above every draw\'s, or its ACC that far below without a '
             'lower ASR.', '',
             '| record | FMP run | amount | maps | stage | FMP ACC / ASR | random ACC / ASR | draws | verdict |',
             '|---|---|---|---|---|---|---|---|---|']
    for c in compared:
        for stage, said in (('after_pruning', 'pruned'), ('after', 'fine-tuned')):
            fmp, randoms = c['fmp'][stage], [r[stage] for r in c['random']]
            lines.append(f"| {c['record']} | {c['defense']} | {c['amount']} | {c['maps']} | {said} | "
                         f"{fmp['acc']:.1f} / {fmp['asr']:.1f} | {mean_std(r['acc'] for r in randoms)} / "
                         f"{mean_std(r['asr'] for r in randoms)} | {len(randoms)} | {verdict(fmp, randoms)} |")
    return '\n'.join(lines) + '\n'


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _labels(table: pd.DataFrame) -> list[str]:
    """Each row's name in the plots: its defense, with its setting only where one defense appears
    with several settings (the sweep's axes), and of that setting only the options whose values
    differ between them (``selection_seed=1``, not the whole option set)."""
    def options(setting) -> dict:
        try:
            parsed = json.loads(setting) if setting else {}
        except (TypeError, ValueError):
            parsed = None
        return parsed if isinstance(parsed, dict) else {'': setting}

    parsed = {setting: options(setting) for setting in table['setting'].unique()}   # each setting read once
    varying = {}
    for defense, settings in table.groupby('defense', sort=False)['setting']:
        siblings = [parsed[s] for s in settings.unique()]
        if len(siblings) > 1:
            keys = sorted({k for p in siblings for k in p})
            varying[defense] = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in siblings}) > 1]

    def label(defense: str, setting) -> str:
        if defense not in varying or not setting:
            return defense
        chosen = parsed[setting]
        shown = ' '.join(str(chosen[k]) if k == '' else f'{k}={chosen[k]}' for k in varying[defense] if k in chosen)
        return f'{defense} {shown}' if shown else defense

    return [label(r['defense'], r['setting']) for _, r in table.iterrows()]


def _panels(count: int, columns: int, width: float, height: float, below: float = 0.0):
    """A grid of ``count`` panels, ``columns`` to a row, each ``width`` x ``height`` inches, with
    ``below`` inches left free under them (for a legend)."""
    plt = _pyplot()
    columns = min(columns, count)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows + below), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:count])


def plot_tradeoff(table: pd.DataFrame, path: Path) -> None:
    """ACC against ASR of every defense, one panel per attack (four to a row): the trade-off at a
    glance. Each defense keeps its colour and marker in every panel; one legend names them."""
    groups = list(table.groupby(['dataset', 'model', 'attack'], dropna=False, sort=False))
    if not groups:
        return
    table = table.assign(label=_labels(table))
    names = list(dict.fromkeys(l for l in table['label'] if l != 'none'))
    colours = _pyplot().get_cmap('tab10').colors
    style = {name: (colours[i % len(colours)], 'osD^v<>ph*'[i // len(colours) % 10]) for i, name in enumerate(names)}
    style['none'] = ('black', 'X')
    legend_columns = 2 if len(groups) == 1 else 4
    legend_inches = 0.25 * -(-len(style) // legend_columns) + 0.15
    plt, fig, axes = _panels(len(groups), 4, 4.0, 3.5, legend_inches)
    # one ACC range for every panel, so a panel's spread reads against the others'
    acc = 100 * table['acc_mean'].dropna()
    acc_range = (max(0.0, acc.min() - 3), min(103.0, acc.max() + 3)) if len(acc) else (0, 100)
    for ax, ((dataset, model, attack), group) in zip(axes, groups):
        for _, r in table.loc[group.index].iterrows():
            colour, marker = style[r['label']]
            ax.scatter(100 * r['asr_mean'], 100 * r['acc_mean'], color=colour, marker=marker, s=45, alpha=0.85,
                       edgecolors='white', linewidths=0.5, zorder=3 if r['label'] == 'none' else 2)
        ax.set_ylim(*acc_range)
        ax.set_title(f'{attack} ({model})', fontsize=10)
        ax.set_xlabel('ASR (%)')
        ax.set_ylabel('ACC (%)')
        ax.set_xlim(-3, 103)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker=m, linestyle='', markersize=7) for c, m in style.values()]
    fig.legend(handles, ['none (undefended)' if n == 'none' else n for n in style], loc='lower center',
               ncol=min(legend_columns, len(style)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(table: pd.DataFrame, path: Path) -> None:
    """ACC, ASR and RA per defense as grouped bars, one panel per attack (two to a row)."""
    groups = list(table.groupby(['dataset', 'model', 'attack'], dropna=False, sort=False))
    if not groups:
        return
    table = table.assign(label=_labels(table))
    plt, fig, axes = _panels(len(groups), 2, max(6, 0.75 * max(len(g) for _, g in groups)), 3.4, 0.35)
    for ax, ((dataset, model, attack), group) in zip(axes, groups):
        names = list(table.loc[group.index, 'label'])
        positions = range(len(names))
        for offset, (metric, color) in zip((-0.27, 0, 0.27), (('acc', 'tab:blue'), ('asr', 'tab:red'), ('ra', 'tab:green'))):
            ax.bar([p + offset for p in positions], 100 * group[f'{metric}_mean'], width=0.27, color=color,
                   label=metric.upper())
        ax.set_xticks(list(positions), names, fontsize=7, rotation=30, ha='right')
        ax.set_ylabel('%')
        ax.set_ylim(0, 100)
        ax.set_title(f'{attack} ({model})', fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc='upper center', ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_channel_scores(csv_path: Path, path: Path, title: str) -> None:
    """Each conv layer's channel scores as a column of dots; pruned channels in red."""
    plt = _pyplot()
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    score = next(k for k in rows[0] if k not in ('layer', 'channel', 'trigger_lift', 'fmp', 'pruned'))
    layers = list(dict.fromkeys(r['layer'] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 3.8))
    for pruned, color, size in (('0', 'tab:gray', 6), ('1', 'tab:red', 14)):
        chosen = [r for r in rows if r['pruned'] == pruned]
        ax.scatter([layers.index(r['layer']) for r in chosen], [float(r[score]) for r in chosen], s=size, color=color,
                   label='pruned' if pruned == '1' else 'kept', alpha=0.7)
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
    ax.set_ylabel(score.replace('_', ' '))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(metrics_csv: Path, path: Path, title: str) -> bool:
    """ACC and ASR (and RA) per epoch from a run's metrics file; False when there is nothing to plot."""
    if not metrics_csv.exists():
        return False
    frame = pd.read_csv(metrics_csv)
    present = [m for m in ('acc', 'asr', 'ra') if m in frame and frame[m].notna().any()]
    if frame.empty or not present:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for metric in present:
        ax.plot(frame['epoch'], 100 * frame[metric], marker='o', label=metric.upper())
    ax.set_xlabel('epoch')
    ax.set_ylabel('%')
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _progress(folder: Path, rows: list[dict]) -> str:
    """For a sweep not yet finished, a line that says so: how many of its steps the table holds,
    and the attacks whose rows are missing or incomplete."""
    steps_file = folder / 'steps.json'
    if not steps_file.exists():
        return ''
    steps = _read_json(steps_file)['steps']
    if len(rows) >= len(steps):
        return ''
    expected, found = Counter(s['record'] for s in steps), Counter(r['record'] for r in rows)
    short = [f'{name} ({found[name]} of {count})' for name, count in expected.items() if found[name] < count]
    return (f'**Partial: {len(rows)} of {len(steps)} steps of this sweep have finished.** Records with steps to run '
            f'(finished of all, the attack included): {", ".join(short)}.')


def write_report(folder: Path, record_root: Optional[Path] = None, archive: Optional[Path] = None) -> list[dict]:
    """results.csv, results.md and the plots for ``folder``."""
    folder = Path(folder)
    rows = collect(folder, record_root, archive)
    if not rows:   # a folder holding only a copied report keeps it
        if not (folder / 'results.md').exists():
            save_text('no finished records found\n', folder / 'results.md')
        return rows
    fields = [k for k in rows[0] if not k.startswith('_')]
    lines = [','.join(fields)] + [','.join('' if r[k] is None else str(r[k]).replace(',', ';') for k in fields) for r in rows]
    save_text('\n'.join(lines) + '\n', folder / 'results.csv')
    table = summarise(rows)
    save_text(markdown(table, _progress(folder, rows)) + control_markdown(fmp_against_random(rows)), folder / 'results.md')
    plot_tradeoff(table, folder / 'acc_vs_asr.png')
    plot_bars(table, folder / 'bars.png')
    root = _record_root(folder, record_root, archive) if (folder / 'steps.json').exists() else folder
    for record in dict.fromkeys(r['record'] for r in rows):
        base = _finished_record(root, record) or next(folder.rglob(record), None)
        if base is None:
            continue
        plot_curves(base / 'metrics.csv', folder / f'curves_{record}.png', f'{record}: training')
        scores = sorted(base.glob('defense/*/channel_scores.csv'))
        feature = [p for p in scores if p.parent.name.startswith('feature')] or scores
        if feature:
            plot_channel_scores(feature[0], folder / f'fmp_scores_{record}.png', f'{record}: {feature[0].parent.name}')
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ('-h', '--help'):
        print(__doc__)
        return 0 if argv and argv[0] in ('-h', '--help') else 2
    folder = Path(argv[0])
    if not folder.is_dir():
        print(f'error: {folder} is not a folder', file=sys.stderr)
        return 2
    rows = write_report(folder)
    if not rows:
        print(f'no finished records or sweep steps in {folder}; a results.md already there is kept')
        return 0
    print(f'{len(rows)} rows; wrote {folder / "results.csv"}, {folder / "results.md"} and the plots')
    return 0


if __name__ == '__main__':
    sys.exit(main())
