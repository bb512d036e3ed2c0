"""utils/report.py: FMP set beside its random-selection control, from the run folders alone."""
import json

import pandas as pd
import yaml

from utils.report import _labels, control_markdown, fmp_against_random, verdict


def _run(tmp_path, name, select, asr, acc=80.0, pruned_asr=50.0, selection_seed=None, eps=0.06, defense='feature'):
    """A defense run folder with the summary.json and config.yaml fields defense/feature.py writes."""
    folder = tmp_path / 'rec' / 'defense' / name
    folder.mkdir(parents=True)
    config = {'defense': defense, 'eps': eps, 'prune_exponent': 4, 'select': select, 'selection_seed': selection_seed,
              'save_folder_name': name, 'record_root': str(tmp_path), 'device': 'cpu'}
    (folder / 'config.yaml').write_text(yaml.safe_dump(config))
    summary = {'defense': defense, 'select': select, 'amount': '1/16 per layer (floor)', 'pruned_total': 49,
               'after_pruning': {'acc': 0.6, 'asr': pruned_asr / 100}, 'after': {'acc': acc / 100, 'asr': asr / 100}}
    (folder / 'summary.json').write_text(json.dumps(summary))
    return {'record': 'rec', 'defense': name, '_folder': folder, '_summary': summary}


def test_fmp_is_set_beside_the_draws_that_differ_from_it_only_in_selection(tmp_path):
    rows = [{'record': 'rec', 'defense': 'none', '_folder': None, '_summary': {}},
            _run(tmp_path, 'fmp', 'fraction', asr=10.0, pruned_asr=5.0),
            _run(tmp_path, 'random0', 'random', asr=40.0, pruned_asr=60.0),
            _run(tmp_path, 'random1', 'random', asr=20.0, pruned_asr=40.0, selection_seed=1),
            _run(tmp_path, 'random_other_eps', 'random', asr=0.0, eps=0.1),      # other options: not its control
            _run(tmp_path, 'ft', 'fraction', asr=0.0, defense='ft'),
            _run(tmp_path, 'oracle', 'oracle_trigger', asr=0.0),      # not FMP: a ceiling, not compared
            _run(tmp_path, 'kmeans', 'kmeans', asr=0.0)]              # other counts than the draws'
    compared = fmp_against_random(rows)
    assert len(compared) == 1 and compared[0]['defense'] == 'fmp' and len(compared[0]['random']) == 2
    assert [r['after']['asr'] for r in compared[0]['random']] == [40.0, 20.0]
    table = control_markdown(compared)
    assert '| rec | fmp | 1/16 per layer (floor) | 49 | pruned | 60.0 / 5.0 | 60.0 ± 0.0 / 50.0 ± 14.1 | 2 | better |' in table
    assert '| fine-tuned | 80.0 / 10.0 | 80.0 ± 0.0 / 30.0 ± 14.1 | 2 | better |' in table
    assert control_markdown(fmp_against_random(rows[:2])) == ''   # no control, no section


def test_verdict_needs_every_draw_beaten_and_calls_a_trade_off_one():
    draws = [{'acc': 80, 'asr': 30}, {'acc': 81, 'asr': 12}]
    assert verdict({'acc': 80.5, 'asr': 10.5}, draws) == 'better'
    assert verdict({'acc': 80.5, 'asr': 11.5}, draws) == 'no better'      # within a point of one draw
    assert verdict({'acc': 70, 'asr': 5}, draws) == 'lower ASR, lower ACC'
    assert verdict({'acc': 80, 'asr': 31.5}, draws) == 'worse'
    assert verdict({'acc': 80, 'asr': 50}, draws[:1]) == 'worse (one random draw)'
    assert verdict({'acc': 80, 'asr': 50}, []) == ''


def test_a_plot_names_a_setting_by_the_options_that_tell_it_from_its_siblings():
    draw = {'prune_exponent': 4, 'select': 'random'}
    table = pd.DataFrame([
        {'defense': 'none', 'setting': ''},
        {'defense': 'ft', 'setting': json.dumps({'epochs': 10})},                  # one setting: no suffix
        {'defense': 'draw', 'setting': json.dumps(dict(draw, selection_seed=1), sort_keys=True)},
        {'defense': 'draw', 'setting': json.dumps(dict(draw, selection_seed=2), sort_keys=True)},
        {'defense': 'fmp', 'setting': json.dumps({'prune_exponent': 4, 'eps': 0.06})},
        {'defense': 'fmp', 'setting': json.dumps({'prune_exponent': 3})},          # eps only in one of them
        {'defense': 'odd', 'setting': 'not json'},
        {'defense': 'odd', 'setting': 'also not json'}])
    assert _labels(table) == ['none', 'ft', 'draw selection_seed=1', 'draw selection_seed=2',
                              'fmp eps=0.06 prune_exponent=4', 'fmp prune_exponent=3',
                              'odd not json', 'odd also not json']
