"""The study's Markdown report: tables and conclusion sentences computed from the numbers of
`drjax.cam_study.study.run_study`, and `run_workdirs`, the study of several training runs."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from drjax import cam_figures, evaluate
from drjax.cam_study import controls as controls_lib
from drjax.cam_study import examples as examples_lib
from drjax.cam_study import study
from drjax.cam_study.examples import LESION_TYPES, Example

PAPER_TOLERANCE = 15  # pointing-game tolerance in pixels at study.PAPER_SIZE
# The methods the figure shows; the others stay in the tables, so that it stays readable.
_IN_FIGURE = ('gradcam', 'layercam', study.FUSION, 'eigencam', 'randomcam', 'gradients',
              'guided_gradcam', 'fullgrad')
# A map whose rank correlation with the trained one stays at or above this after the head is
# re-initialised is reported as barely depending on the classifier (this report's threshold).
_UNCHANGED_RHO = 0.5


def _fmt(v, digits=3):
  if v is None or (isinstance(v, float) and np.isnan(v)):
    return 'n/a'
  if isinstance(v, float) and abs(v) < 1e-3 and v != 0:
    return f'{v:.2e}'
  return f'{v:.{digits}f}' if isinstance(v, float) else str(v)


def _pct(v):
  return 'n/a' if v is None or np.isnan(v) else f'{100 * v:.3g}%'


def _present_types(result) -> list[str]:
  any_key = next(iter(result['scores']))
  return [t for t in (*LESION_TYPES, 'any') if result['scores'][any_key][t]['n'] > 0]


def _lift(s: dict) -> float:
  """Relevance mass over lesion area: how many times a uniform map's mass."""
  return s['mass'] / s['area'] if s['area'] > 0 else float('nan')


def metric_table(result: dict, metric: str) -> str:
  """'method @ layer' x lesion type table of one score of `drjax.localize.score`."""
  types = _present_types(result)
  lines = ['| method @ layer | ' + ' | '.join(types) + ' |',
           '|---|' + '---|' * len(types)]
  for key, per in result['scores'].items():
    lines.append(f'| {key} | ' + ' | '.join(_fmt(per[t][metric]) for t in types) + ' |')
  return '\n'.join(lines)


def mass_lift_table(result: dict) -> str:
  """Relevance mass divided by the lesion area (1.0 = a uniform heatmap)."""
  types = _present_types(result)
  lines = ['| method @ layer | ' + ' | '.join(types) + ' |', '|---|' + '---|' * len(types)]
  for key, per in result['scores'].items():
    lines.append(f'| {key} | ' + ' | '.join(
        _fmt(_lift(per[t]), 2) if per[t]['area'] > 0 else 'n/a' for t in types) + ' |')
  return '\n'.join(lines)


def _cells(shapes: dict, layers: Sequence[str]) -> str:
  return ', '.join(f'{layer} {shapes[layer][0]}x{shapes[layer][1]}: '
                   f'{_pct(1 / (shapes[layer][0] * shapes[layer][1]))}' for layer in layers)


def area_markdown(result: dict) -> str:
  """The area argument: lesion sizes against one heatmap cell of each stage."""
  layers, shapes = result['layers'], result['layer_shapes']
  head = ['lesion', 'images', 'lesions', 'total area / image', 'one lesion / image (median)']
  head += [f'one lesion / {layer} cell ({shapes[layer][0]}x{shapes[layer][1]})'
           for layer in layers]
  lines = ['| ' + ' | '.join(head) + ' |', '|---|' + '---|' * (len(head) - 1)]
  for t, row in result['areas'].items():
    if row['images']:
      lines.append('| ' + ' | '.join(
          [t, str(row['images']), str(row['lesions']), _pct(row['total_fraction']),
           _pct(row['lesion_fraction'])] +
          [_pct(row[f'lesion_per_cell_{layer}']) for layer in layers]) + ' |')
  text = f'\n\nOne heatmap cell as a fraction of the image: {_cells(shapes, layers)}.'
  paper = result.get('paper_layer_shapes')
  if paper and result['image_size'] != study.PAPER_SIZE:
    text += (f' At the paper\'s {study.PAPER_SIZE} px (the lesion fractions above are '
             f'measured at full resolution, whatever the input size): {_cells(paper, layers)}.')
  return '\n'.join(lines) + text


def _step_label(name: str) -> str:
  """How the report names a control step ('head', a stage, 'untrained')."""
  if name == controls_lib.HEAD:
    return 'after re-initialising the head'
  if name == controls_lib.UNTRAINED:
    return 'for an untrained network'
  return f'after re-initialising the head down to {name}'


def _step_column(name: str) -> str:
  return {controls_lib.HEAD: 'head', controls_lib.UNTRAINED: 'untrained'}.get(name, f'to {name}')


def controls_markdown(result: dict) -> str:
  """The randomisation cascade and the untrained network: rank correlation with the trained
  model's maps and pixel AUROC for any lesion, per 'method@layer'; then SSIM."""
  steps, scores = result['controls']['steps'], result['scores']
  reinit = '; '.join(f'{_step_column(s["name"])}: {", ".join(s["reinitialised"])} '
                     f'({_pct(s["parameter_fraction"])} of the parameters)'
                     for s in steps if s['name'] != controls_lib.UNTRAINED)
  head = ['method @ layer', 'trained AUROC']
  for s in steps:
    head += [f'{_step_column(s["name"])}: rho', f'{_step_column(s["name"])}: AUROC']
  lines = [f'Re-initialised, {reinit}; untrained: every parameter.', '',
           '| ' + ' | '.join(head) + ' |', '|---|' + '---|' * (len(head) - 1)]
  controlled = [k for k in scores if k in steps[0]['similarity']]
  for key in controlled:
    row = [key, _fmt(scores[key]['any']['auroc'])]
    for s in steps:
      row += [_fmt(s['similarity'][key]['spearman'], 2), _fmt(s['scores'][key]['any']['auroc'])]
    lines.append('| ' + ' | '.join(row) + ' |')
  lines += ['', 'SSIM between the trained and the controls\' maps (1 = the same map):', '',
            '| method @ layer | ' + ' | '.join(_step_column(s['name']) for s in steps) + ' |',
            '|---|' + '---|' * len(steps)]
  lines += [f'| {key} | ' + ' | '.join(_fmt(s['similarity'][key]['ssim'], 2) for s in steps)
            + ' |' for key in controlled]
  return '\n'.join(lines)


def passes_controls(result: dict, key: str) -> bool | None:
  """Whether 'method@layer' explains the model: its maps change when the head is
  re-initialised (rank correlation below `_UNCHANGED_RHO`) and the untrained network's maps
  localise lesions worse (pixel AUROC, any lesion). None: not run through the controls."""
  steps = (result.get('controls') or {}).get('steps') or []
  head = next((s for s in steps if s['name'] == controls_lib.HEAD), None)
  untrained = next((s for s in steps if s['name'] == controls_lib.UNTRAINED), None)
  if head is None or untrained is None or key not in head['similarity']:
    return None
  rho = head['similarity'][key]['spearman']
  return bool(not np.isnan(rho) and rho < _UNCHANGED_RHO and
              result['scores'][key]['any']['auroc'] > untrained['scores'][key]['any']['auroc'])


def _better_than_default_sentences(result: dict) -> list[str]:
  """Which maps localise lesions better than Grad-CAM at the default layer while passing the
  randomisation controls (the study's question to every method)."""
  scores = result['scores']
  default = f'gradcam@{result["default_layer"]}'
  if default not in scores or not (result.get('controls') or {}).get('steps'):
    return []
  base = scores[default]['any']['auroc']
  better = {k: v['any']['auroc'] for k, v in scores.items()
            if k != default and v['any']['auroc'] > base}
  passing = [k for k in better if passes_controls(result, k)]
  untested = [k for k in better if passes_controls(result, k) is None]
  text = (f'Better than {default} (pixel AUROC {_fmt(base)}, any lesion) and passing the '
          f'controls (head re-initialised: rank correlation below {_UNCHANGED_RHO}; the '
          'untrained network localises worse): ' +
          (', '.join(f'{k} ({_fmt(better[k])})' for k in sorted(passing, key=better.get,
                                                                reverse=True)) or 'none') +
          f'; {len(better) - len(passing) - len(untested)} other maps score higher but fail '
          'the controls')
  if untested:
    text += f', and {", ".join(untested)} score higher without having been through them'
  return [text + '.']


def _slow_methods_sentence(result: dict) -> list[str]:
  slow = {m: n for m, n in (result.get('slow_methods') or {}).items()
          if n < result['num_images']}
  if not slow:
    return []
  return ['Computed on fewer images (one forward pass per channel or window), without the '
          'controls: ' + ', '.join(f'{m} on {n}' for m, n in slow.items()) + '.']


def _setting_sentence(result: dict) -> list[str]:
  """Input size, the default layer's grid and the classifier's kappa, as measured."""
  default, shapes = result.get('default_layer'), result.get('layer_shapes') or {}
  if 'image_size' not in result or default not in shapes:
    return []
  h, w = shapes[default]
  kappa = ((result.get('model_info') or {}).get('metrics') or {}).get('kappa')
  return [f'Setting: {result.get("arch", "the model")} at {result["image_size"]} px, where '
          f'the {default} map is {h}x{w} (one cell = {_pct(1 / (h * w))} of the image); the '
          f'classifier\'s validation kappa is {_fmt(kappa)}.']


def _control_sentences(result: dict) -> list[str]:
  """What the randomisation cascade and the untrained network did to the maps."""
  if not (result.get('controls') or {}).get('steps'):
    return []
  steps, scores = result['controls']['steps'], result['scores']
  out = []
  default = f'gradcam@{result["default_layer"]}'
  if default in scores:
    parts = [f'{_fmt(s["scores"][default]["any"]["auroc"])} {_step_label(s["name"])} '
             f'({_rho_words(s["similarity"][default]["spearman"])})' for s in steps]
    out.append(f'Grad-CAM@{result["default_layer"]}, any lesion: pixel AUROC '
               f'{_fmt(scores[default]["any"]["auroc"])} for the trained model, '
               + ', '.join(parts) + '.')
  head = next((s for s in steps if s['name'] == controls_lib.HEAD), None)
  if head:
    kept = {k: v['spearman'] for k, v in head['similarity'].items()
            if v['spearman'] >= _UNCHANGED_RHO}
    out.append(
        f'After re-initialising the head, these maps keep a rank correlation of at least '
        f'{_UNCHANGED_RHO} with the trained ones, so they depend little on what the classifier '
        'learned: ' + ', '.join(f'{k} ({_fmt(v, 2)})' for k, v in kept.items()) + '.' if kept
        else f'Every map\'s rank correlation with the trained one falls below {_UNCHANGED_RHO} '
        'when the head is re-initialised: all of them depend on the learned classifier.')
  untrained = steps[-1]
  if untrained['name'] == controls_lib.UNTRAINED:
    auroc = {k: (scores[k]['any']['auroc'], untrained['scores'][k]['any']['auroc'])
             for k in scores if k in untrained['scores']}
    better = [k for k, (t, u) in auroc.items() if t > u]
    worse = [k for k in auroc if k not in better]
    # Name the smaller group, so that the sentence stays short.
    named = (f': {", ".join(better)}' if len(better) <= len(worse)
             else f'; not for {", ".join(worse)}')
    out.append(f'The trained model\'s maps localise lesions better than the untrained '
               f'network\'s (pixel AUROC, any lesion) for {len(better)} of {len(auroc)} '
               f'method@layer' + (named if better and worse else '') + '.')
  return out


def _rho_words(rho: float) -> str:
  if np.isnan(rho):
    return 'rank correlation undefined: constant maps'
  return f'rank correlation {_fmt(rho, 2)} with the trained maps'


def _verdict(auroc: float, lift: float) -> str:
  if np.isnan(auroc):
    return 'no data'
  if auroc < 0.45:
    return 'below chance (the map avoids these lesions)'
  if auroc <= 0.55 or lift <= 1.2:
    return 'at chance level'
  if auroc >= 0.65 and lift >= 1.5:
    return 'clearly above chance'
  return 'weakly above chance'


def _default_setting_sentences(scores: dict, default: str, types: Sequence[str]) -> list[str]:
  """Per lesion type: how the paper's setting scores, and which setting scores best."""
  out = []
  for t in types:
    s = scores[default][t]
    images = f'{s["n"]} image' + ('' if s['n'] == 1 else 's')
    out.append(f'{t} ({images}): the paper\'s setting ({default}) scores pixel AUROC '
               f'{_fmt(s["auroc"])}, relevance mass {_fmt(s["mass"])} vs {_fmt(s["area"])} for '
               f'a uniform map (x{_fmt(_lift(s), 2)}), pointing game {_fmt(s["pointing"], 2)}: '
               f'{_verdict(s["auroc"], _lift(s))}.')
    best = max(scores, key=lambda k: -1 if np.isnan(scores[k][t]['auroc'])
               else scores[k][t]['auroc'])
    out.append(f'{t}: the best pixel AUROC is {best} ({_fmt(scores[best][t]["auroc"])}).')
  return out


def _layer_sentences(scores: dict, layers: Sequence[str], types: Sequence[str]) -> list[str]:
  """Which stage Grad-CAM localises best at, and whether the finest beats the coarsest."""
  out = []
  means = {layer: np.nanmean([scores[f'gradcam@{layer}'][t]['auroc'] for t in types])
           for layer in layers if f'gradcam@{layer}' in scores}
  if means:
    out.append('Grad-CAM pixel AUROC averaged over lesion types: ' + ', '.join(
        f'{layer} {_fmt(float(v))}' for layer, v in means.items()) +
        f'; best: {max(means, key=means.get)}.')
  fine, coarse = f'gradcam@{layers[0]}', f'gradcam@{layers[-1]}'
  if fine in scores and coarse in scores and fine != coarse:
    better = [t for t in types if scores[fine][t]['auroc'] > scores[coarse][t]['auroc']]
    out.append(f'Grad-CAM at the finer {layers[0]} beats {layers[-1]} in pixel AUROC for '
               f'{len(better)} of {len(types)} lesion types ({", ".join(better) or "none"}).')
  return out


def conclusions(result: dict) -> list[str]:
  """Sentences derived from the numbers (nothing here is assumed)."""
  scores, layers = result['scores'], result['layers']
  default = f'gradcam@{result["default_layer"]}'
  types = [t for t in _present_types(result) if t != 'any']
  out = _setting_sentence(result)
  if default in scores:
    out += _default_setting_sentences(scores, default, types)
    out += _layer_sentences(scores, layers, types)
  coarse = result['default_layer']
  for t in types:
    row = result['areas'].get(t)
    if row and row['lesions'] and f'lesion_per_cell_{coarse}' in row:
      out.append(f'Area: a median {t} lesion covers {_pct(row["lesion_fraction"])} of the image, '
                 f'{_pct(row[f"lesion_per_cell_{coarse}"])} of one {coarse} cell.')
  return (out + _control_sentences(result) + _better_than_default_sentences(result)
          + _slow_methods_sentence(result))


def _write_figure(heatmaps: dict[str, np.ndarray], examples: Sequence[Example], path: str,
                  num_images: int) -> None:
  """The first `num_images` examples, one overlay column per kept 'method@layer'."""
  shown = examples[:num_images]
  # Methods computed on fewer images (study.SLOW_METHODS) are left out when they lack a row.
  columns = {k.split('@')[0] if k.startswith(study.FUSION) else k: maps[:len(shown)]
             for k, maps in heatmaps.items()
             if k.split('@')[0] in _IN_FIGURE and len(maps) >= len(shown)}
  cam_figures.grid([e.image for e in shown], columns, path, row_titles=[e.id for e in shown],
                   masks=[None if e.masks is None else e.masks.any(-1) for e in shown])


def _summary_lines(result: dict, title: str) -> list[str]:
  """Title, what was run, and the classifier's quality."""
  info = result.get('model_info') or {}
  lines = [f'# {title}', '',
           f'Model: {result["arch"]} ({info.get("workdir", "")}), input '
           f'{result["image_size"]} px, {result["num_images"]} images, dataset '
           f'{info.get("dataset", "?")}. Stages: '
           + ', '.join(f'{k} {v[0]}x{v[1]}' for k, v in result['layer_shapes'].items()) + '.']
  if info.get('metrics'):
    names = dict(kappa='validation kappa', accuracy='accuracy', referable_auc='referable AUC')
    lines += ['', 'Classifier on its own validation split: ' + ', '.join(
        f'{names.get(k, k)} {_fmt(v)}' for k, v in info['metrics'].items()) + '.']
  if info.get('note'):
    lines += ['', f'**Note:** {info["note"]}']
  return lines


def _table_lines(result: dict) -> list[str]:
  lines = ['', '## The area argument', '', area_markdown(result), '',
           '## Pixel AUROC of the heatmap as a classifier of lesion pixels (0.5 = chance)', '',
           metric_table(result, 'auroc'), '',
           '## Average precision (chance = lesion area fraction)', '',
           metric_table(result, 'ap'), '',
           '## Relevance mass inside the mask / lesion area (1.0 = uniform heatmap)', '',
           mass_lift_table(result), '',
           f'## Pointing game (tolerance {result["tolerance"]} px)', '',
           metric_table(result, 'pointing'), '']
  if result.get('faithfulness'):
    lines += ['## Faithfulness without masks', '',
              'Deletion and insertion AUC of the predicted grade\'s probability (deletion: lower '
              'is better; insertion: higher), and ROAD (Rong et al. 2022; pytorch-grad-cam\'s '
              'ROADCombined over percentiles 10-90: higher is better), which imputes the removed '
              'pixels from their neighbours instead of blanking them.', '',
              '| method @ layer | deletion AUC | insertion AUC | ROAD combined |',
              '|---|---|---|---|']
    lines += [f'| {k} | {_fmt(v["deletion_auc"])} | {_fmt(v["insertion_auc"])} | '
              f'{_fmt(v.get("road_combined", float("nan")))} |'
              for k, v in result['faithfulness'].items()]
    lines.append('')
  if (result.get('controls') or {}).get('steps'):
    lines += ['## Controls: randomised layers (Adebayo et al. 2018) and an untrained network', '',
              'Each map is recomputed for the trained model\'s predicted grade after '
              're-initialising the layers above a stage with fresh random values, cascading from '
              'the head down, and for the same architecture with every parameter at its random '
              'init. rho: Spearman rank correlation of its pixels with the trained model\'s map '
              '(mean over images; a map that does not change does not explain the model); '
              'AUROC: pixel AUROC for any lesion.', '', controls_markdown(result), '']
  return lines


def write_report(result: dict, heatmaps: dict[str, np.ndarray], examples: Sequence[Example],
                 out_dir: str | os.PathLike, title: str = 'CAM lesion-localisation study',
                 grid_images: int = 4) -> pathlib.Path:
  """Writes report.md, results.json and figure_grid.png into `out_dir`."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  with open(out_dir / 'results.json', 'w') as f:
    json.dump(result, f, indent=1, default=float)
  _write_figure(heatmaps, examples, str(out_dir / 'figure_grid.png'), grid_images)
  lines = _summary_lines(result, title)
  lines += ['', '## Conclusion (computed from the tables below)', '']
  lines += [f'- {s}' for s in conclusions(result)]
  lines += _table_lines(result)
  lines += ['## Figure', '', '![heatmaps](figure_grid.png)', '',
            'Rows: images (white: lesion outlines); columns: method @ layer overlays.', '']
  path = out_dir / 'report.md'
  path.write_text('\n'.join(lines))
  return path


def _model_info(workdir: pathlib.Path, config, dataset: str) -> dict:
  """Where the run is, what it was trained on, and its metrics.json summary."""
  info = dict(workdir=str(workdir), dataset=dataset, trained_on=config.input.dataset)
  metrics_path = workdir / 'metrics.json'
  if not metrics_path.exists():
    info['note'] = 'no metrics.json in the run: classifier quality unknown.'
    return info
  m = json.loads(metrics_path.read_text())
  summary = {k: round(float(m[k]), 3) for k in ('accuracy', 'kappa')
             if isinstance(m.get(k), (int, float))}
  ref = m.get('referable') or {}
  if isinstance(ref, dict) and isinstance(ref.get('auc'), (int, float)):
    summary['referable_auc'] = round(float(ref['auc']), 3)
  info['metrics'] = summary
  if summary.get('accuracy', 1.0) < 0.5 or summary.get('referable_auc', 1.0) < 0.7:
    info['note'] = ('this classifier is weak (see its metrics), so these maps explain a '
                    'model that has not learned the grades; they test the pipeline, '
                    'not the paper\'s trained DenseNet121.')
  return info


_HEADER = ['# CAM lesion-localisation study', '',
           'Does Grad-CAM on the last dense block localise DR lesions (paper, Sec. 3.2)? '
           'Each heatmap is scored against lesion masks (drjax.localize): pixel AUROC and '
           'average precision of the heatmap as a lesion-pixel classifier, relevance mass '
           'inside the lesions relative to a uniform map, and the pointing game. Controls: '
           'the model-parameter randomisation test (Adebayo et al. 2018) and an untrained '
           'network. Generated by scripts/cam_study.py.', '']


def run_workdirs(workdirs: Sequence[str], out_dir, *, dataset: str = 'synthetic_fundus',
                 idrid_dir: str | None = None, num_images: int = 16,
                 methods: Sequence[str] = study.DEFAULT_METHODS, image_size: int | None = None,
                 tolerance: float | None = None, faithfulness_images: int = 4,
                 seed: int = 1000, stats_size: int = 1024,
                 controls: bool = True, pixel_methods: Sequence[str] = ('gradients',),
                 slow_images: int | None = None) -> pathlib.Path:
  """The study for each run in `workdirs`; one report.md with a section per run.

  `tolerance` is the pointing game's, in pixels of the study's input; None scales
  15 px at the paper's 224 px to it, so that a hit means the same fraction of the
  fundus at any size. `controls` runs the randomisation cascade and the untrained network
  (`study.run_controls`).
  """
  out_dir = pathlib.Path(out_dir)
  sections = []
  for workdir in workdirs:
    config, model, variables = evaluate.load_run(workdir)
    size = image_size or config.input.image_size
    examples = examples_lib.load_examples(
        dataset, num_images, size, seed=seed, idrid_dir=idrid_dir,
        btgraham=bool(config.input.get('btgraham', False)), stats_size=stats_size)
    examples = [e for e in examples if e.masks is not None and e.masks.any()]
    tol = PAPER_TOLERANCE * size / study.PAPER_SIZE if tolerance is None else tolerance
    run = study.run_study(model, variables, examples, arch=config.model, methods=methods,
                          tolerance=round(tol, 1), faithfulness_images=faithfulness_images,
                          model_info=_model_info(pathlib.Path(workdir), config, dataset),
                          controls=controls, pixel_methods=pixel_methods,
                          slow_images=slow_images)
    path = write_report(run['result'], run['heatmaps'], examples, out_dir / config.model,
                        title=f'{config.model} on {dataset}')
    # One level down in the combined report, its figure one folder down.
    text = path.read_text().replace('](figure_grid.png)', f']({config.model}/figure_grid.png)')
    sections.append(text.replace('# ', '## ', 1).replace('\n## ', '\n### '))
  report = out_dir / 'report.md'
  report.write_text('\n'.join(_HEADER) + '\n' + '\n\n'.join(sections))
  return report
