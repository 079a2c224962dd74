"""mesa_lib: MESA (Qiao, Yang, Li, NeurIPS 2019) -- defending neural backdoors by modelling the
distribution of triggers, on CPU or GPU.

The modules follow the data's path through the method:
``data -> triggers -> models -> attack -> mine -> mesa -> detect -> baselines -> defense ->
evaluate -> plots``, with :mod:`~mesa_lib.presets` holding every setting and
:mod:`~mesa_lib.pipeline` running the whole story.
"""

__version__ = "0.1.0"

from .data import DatasetSplits, ImageSet, load_dataset  # noqa: E402
from .triggers import (  # noqa: E402
    FixedTrigger,
    bright_member,
    canonical_patterns,
    pattern_from_id,
    random_color_triggers,
    stamp,
    trigger_from_pattern,
)
from .models import build_model, load_weights, save_weights, train_classifier  # noqa: E402
from .attack import inject_backdoor  # noqa: E402
from .evaluate import attack_success_rate, clean_accuracy  # noqa: E402
from .mine import MINE, dv_bound  # noqa: E402
from .mesa import MesaConfig, StaircaseSampler, train_mesa, train_staircase  # noqa: E402
from .detect import scan_classes  # noqa: E402
from .baselines import reverse_engineer_trigger, reverse_engineer_triggers  # noqa: E402
from .defense import retrain  # noqa: E402
from .presets import PRESETS, Preset, get_preset  # noqa: E402
from .pipeline import run_pipeline  # noqa: E402
