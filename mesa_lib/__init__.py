"""mesa_lib: MESA (Qiao, Yang, Li, NeurIPS 2019) -- defending neural backdoors by modelling the
distribution of triggers, on CPU or GPU.

The modules follow the data's path through the method:
``data -> triggers -> models -> attack -> mine -> mesa -> detect -> baselines -> defense ->
evaluate -> plots``, with :mod:`~mesa_lib.presets` holding every setting and
:mod:`~mesa_lib.pipeline` running the whole story. Shared checks and helpers sit below them
(:mod:`~mesa_lib.common`, :mod:`~mesa_lib.validate`, :mod:`~mesa_lib.datafiles`); the
experiment runners above (:mod:`~mesa_lib.sweep`, :mod:`~mesa_lib.cli`). Apart from the
method, for teaching: :mod:`~mesa_lib.book` (a chapter's setup), :mod:`~mesa_lib.classroom`
(the exercises' checkers and grading), :mod:`~mesa_lib.toy` (the 2-D landscape of chapters
4 and 5), :mod:`~mesa_lib.zoo` (the detection game) and :mod:`~mesa_lib.devicecheck` (GPU
mistakes caught on a CPU).
"""

from .common import __version__

from .data import DatasetSplits, ImageSet, load_dataset
from .triggers import (
    FixedTrigger,
    bright_member,
    canonical_patterns,
    pattern_from_id,
    random_color_triggers,
    stamp,
    trigger_from_pattern,
)
from .models import build_model, load_weights, save_weights, train_classifier
from .attack import inject_backdoor
from .evaluate import attack_success_rate, clean_accuracy
from .mine import MINE, dv_bound
from .mesa import MesaConfig, StaircaseSampler, train_mesa, train_staircase
from .detect import scan_classes
from .baselines import reverse_engineer_trigger, reverse_engineer_triggers
from .defense import retrain
from .presets import PRESETS, Preset, get_preset
from .pipeline import run_pipeline
