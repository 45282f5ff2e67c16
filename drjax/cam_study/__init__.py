"""The lesion-localisation study of the CAM family (scripts/cam_study.py).

The paper (Sec. 3.2) argues from pictures that Grad-CAM on DenseNet121's last dense block is
too coarse for DR lesions: one cell of its 7x7 map is 1/49 of the image, far larger than a
microaneurysm. The study measures it instead: every CAM method at several stages is scored
against lesion masks per lesion type, beside the area argument computed from the masks.

  examples  fundus images with lesion masks (synthetic, IDRiD, or one image's mask files)
  study     one model: heatmaps at every stage, their scores, areas, faithfulness and controls
  controls  the randomisation cascade (Adebayo et al. 2018) and map similarity
  report    the Markdown report, and `run_workdirs`, the study of several training runs
"""

from drjax.cam_study import controls
from drjax.cam_study.examples import (
    IMAGE_EXTENSIONS,
    LESION_TYPES,
    Example,
    idrid_examples,
    lesion_stats,
    load_examples,
    load_masks_for,
    synthetic_examples,
)
from drjax.cam_study.report import (
    PAPER_TOLERANCE,
    area_markdown,
    conclusions,
    controls_markdown,
    mass_lift_table,
    metric_table,
    run_workdirs,
    write_report,
)
from drjax.cam_study.study import (
    ALL_METHODS,
    ALL_PIXEL_METHODS,
    DEFAULT_METHODS,
    FUSION,
    PAPER_SIZE,
    SLOW_METHODS,
    area_table,
    compute_heatmaps,
    faithfulness,
    layer_shapes,
    predicted_classes,
    run_controls,
    run_study,
    score_heatmaps,
    study_layers,
)

__all__ = [
    'ALL_METHODS', 'ALL_PIXEL_METHODS', 'DEFAULT_METHODS', 'FUSION', 'IMAGE_EXTENSIONS',
    'LESION_TYPES', 'PAPER_SIZE', 'SLOW_METHODS',
    'PAPER_TOLERANCE', 'Example', 'area_markdown', 'area_table', 'compute_heatmaps',
    'conclusions', 'controls', 'controls_markdown', 'faithfulness', 'idrid_examples',
    'layer_shapes', 'lesion_stats', 'load_examples', 'load_masks_for', 'mass_lift_table',
    'metric_table', 'predicted_classes', 'run_controls', 'run_study', 'run_workdirs',
    'score_heatmaps', 'study_layers', 'synthetic_examples', 'write_report',
]
