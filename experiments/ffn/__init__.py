"""A concept that lives in the FFNs, and ConceptPrune on it (issue 21).

On the shipped toy UNet ConceptPrune removes little, because that UNet keeps its textures mostly outside
``ff.net.2``. This experiment gives ConceptPrune a concept that is in the FFNs by construction: the shipped model
is taught a texture it does not know, ``waves`` (``toyworld.render.FFN_TEXTURES``), by fine-tuning **only**
feed-forward weights of the transformer blocks, then ConceptPrune and Concept Ablation try to remove it.

One module per job:

* ``data``: the waves world (scenes, captions, image pools) and the shipped LDM it starts from;
* ``detector``: the waves detector beside the shipped judge (``style_of``), its training and accuracy;
* ``teach``: the FFN fine-tune, the hidden-unit masks, the shipped deltas (``VARIANTS``) and base + waves;
* ``experiment``: the run (fine-tune, ConceptPrune, Concept Ablation, each scored), the sweep and the CLI;
* ``report``: the tables and the image grid.

Shipped files (``assets/toyworld/ffn/``): ``ffn_delta.safetensors`` ("units": only 1/8 of each FFN's hidden
units learn, the least used by the shipped model on world captions) and ``ffn_delta_dense.safetensors``
("dense": every FFN weight), fp16, each with its settings, chosen units and loss history in the ``.json`` beside
it; ``waves_detector.safetensors``; ``eval.json`` and the waves prompt files. The full "base + waves" checkpoint
is built at run time in the output folder (ConceptPrune and Concept Ablation need a file)::

    python -m experiments.ffn --out outputs/toyworld-ffn             # fine-tune check, ConceptPrune, CA
    python -m experiments.ffn --out outputs/toyworld-ffn --quick     # fewer images
    python -m experiments.ffn --out outputs/toyworld-ffn --sweep     # the skill_ratio x tau sweep
    python -m experiments.ffn --out outputs/toyworld-ffn-dense --variant dense   # the run on the dense delta
    python -m experiments.ffn --train_detector              # -> assets/toyworld/ffn/waves_detector.*
    python -m experiments.ffn --train_delta [units|dense]   # -> assets/toyworld/ffn/ffn_delta*.*

``--train_delta`` and ``--train_detector`` retrain the shipped files with fixed seeds (``DELTA_SETTINGS`` with
``VARIANTS``, ``DETECTOR_SETTINGS``). The run writes ``{out}/ffn.{md,json}`` and ``{out}/grid.png``, the sweep
``{out}/sweep.{md,json}``. Measured results, times and the conditions they were taken under:
``docs/experiments/ffn-waves.md``.
"""
from toyworld.render import FFN_TEXTURES

from .data import ASSETS, FFN_ASSETS, TEXTURE, chw, ffn_item, ffn_pool, load_base, texture_scene
from .detector import (
    DETECTOR_FILE,
    DETECTOR_SETTINGS,
    EVAL_SEED,
    detect,
    detector_accuracy,
    detector_pool,
    load_detector,
    reconstruction_accuracy,
    style_of,
    train_detector,
)
from .experiment import (
    EVAL_JSON,
    PRUNE_FILES,
    SIZES,
    SWEEP_N,
    SWEEP_SKILL_RATIOS,
    SWEEP_TAUS,
    ablation_recipe,
    eval_prompt_dir,
    evaluate_run,
    evaluate_settings,
    main,
    prompt_files,
    prune_run,
    pruned_fraction,
    run,
    scorers,
    shares,
    sweep,
    sweep_prompts,
    taught_share,
    teach_run,
    texture_share,
)
from .report import markdown, report_json, sweep_markdown, write_grid
from .teach import (
    DELTA_FILE,
    DELTA_FILES,
    DELTA_SETTINGS,
    FFN_PATTERN,
    VARIANTS,
    build_checkpoint,
    fine_tune_ffn,
    is_ffn,
    suffix,
    train_delta,
    unit_masks,
    unit_usage,
)

__all__ = [
    "ASSETS", "DELTA_FILE", "DELTA_FILES", "DELTA_SETTINGS", "DETECTOR_FILE", "DETECTOR_SETTINGS", "EVAL_JSON",
    "EVAL_SEED", "FFN_ASSETS", "FFN_PATTERN", "FFN_TEXTURES", "PRUNE_FILES", "SIZES", "SWEEP_N",
    "SWEEP_SKILL_RATIOS", "SWEEP_TAUS", "TEXTURE", "VARIANTS", "ablation_recipe", "build_checkpoint", "chw",
    "detect", "detector_accuracy", "detector_pool", "eval_prompt_dir", "evaluate_run", "evaluate_settings",
    "ffn_item", "ffn_pool", "fine_tune_ffn", "is_ffn", "load_base", "load_detector", "main", "markdown",
    "prompt_files", "prune_run", "pruned_fraction", "reconstruction_accuracy", "report_json", "run", "scorers",
    "shares", "style_of", "suffix", "sweep", "sweep_markdown", "sweep_prompts", "taught_share", "teach_run",
    "texture_scene", "texture_share", "train_delta", "train_detector", "unit_masks", "unit_usage", "write_grid",
]
