"""Search-space files for `raysegtrain tune SPACE.yaml`: parsing, validation, and compilation to Optuna define-by-run.

A space file is a base fit config plus distributions over its dotted keys, and the study settings::

    base: ../my_fit.yaml              # a fit config file (relative to this file) or an inline mapping
    overrides: [train.batch_size=16]  # dotted key=value applied to the base
    objective: {metric: auto, mode: max}   # auto: val_fg_iou (binary) / val_iou; mode default: min for *loss
    budget: {num_samples: 8, time_budget_s: 3600}
    max_concurrent_trials: 4
    trial: {num_workers: 1, gpus_per_worker: 0.25, cpus_per_worker: 4}   # -> scaling.* of every trial
    asha: {max_epochs: 20, grace_period: 2, reduction_factor: 3}        # max_epochs -> train.epochs
    searcher: {algorithm: tpe, seed: 0, points_to_evaluate: [{model.arch: unet, model.encoder: resnet34}]}
    repeat: {top: 3, seeds: 3}        # after the search: the top 3 configs x 3 seeds, the best chosen by the mean
    space:
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
      model.arch:
        choice:
          unet: {model.encoder: {choice: [resnet18, resnet34]}}
          fpn:  {model.encoder: {choice: [resnet34, efficientnet-b0]}}
      schedule.name: {choice: [cosine, step]}
      schedule.step_size: {int: [2, 10], when: {schedule.name: step}}
      loss_mix:                                       # a label, not a config key: one option per loss mix
        branch:
          dice_bce:   {loss.dice: {uniform: [0.2, 0.8]}, loss.bce: {uniform: [0.2, 0.8]}}
          dice_focal: {loss.dice: 1.0, loss.focal: {uniform: [0.5, 2]}, loss.focal_gamma: {uniform: [1, 3]}}

Entries of `space` (keys are dotted config keys, except `branch` labels):
- `{choice: [a, b]}`; `{choice: {a: {sub-space}, b: {}}}` samples the sub-space only when its option is chosen;
  `{branch: {label: {sub-space}, ...}}` is such a choice whose value is not a config key (only its sub-space is set).
- `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}`, `{int: [lo, hi], log: false, step: 1}`, `{quniform: [lo, hi, q]}`.
- a scalar: a constant. (A bare list is rejected as ambiguous: write `{choice: [...]}`.)
- `when: {parent.key: option}` (or a list of options) on any entry is short for nesting the entry in those options'
  sub-spaces; the parent must be a choice at the same level.
- Loss mixes: if a trial's sampled values name any loss weight (`loss.dice`, `loss.bce`, ...), they define the whole
  mix: the base's weights are dropped and unnamed terms are 0 (the rule of `config.LossConfig`).
- Owned by the study settings and rejected in `space`: train.epochs (asha.max_epochs), scaling.num_workers /
  gpus_per_worker / cpus_per_worker / use_gpu (trial.*), train.monitor / train.mode (objective).

API: `load_space(path, cli_overrides)` -> `SearchSpace` (everything validated; ConfigError otherwise) with
`define_by_run(trial)`, `sample(trial)` (flat overrides), `trial_config(overrides)`, `points_to_evaluate` (Optuna
names, for OptunaSearch's `points_to_evaluate`, which enqueues them as fixed params), `make_sampler()`, `asha`
(ASHAScheduler kwargs), `metric`/`mode`/`num_samples`/`time_budget_s`/`max_concurrent_trials`, `parameters`,
`overrides_for_params(optuna_params)`, `example_configs()` (one config per option/range end/branch combination, for
slow preflight checks such as building each arch/encoder model) and `to_dict()` (for logging).

Modules, in the order a file goes through them: `settings` (the study-settings schema), `keys` (which keys an entry
may have), `nodes` (the tree) and `parsing` (the `space` mapping into it), `naming` (Optuna names), `pickers` (walking
the tree to a trial's overrides), `validation` (every value and combination checked before Ray starts), `space`
(`SearchSpace`) and `loading` (files and command-line overrides).
"""

from .keys import RAY_RESULT_KEY
from .loading import apply_cli_overrides, load_space, space_from_dict
from .naming import optuna_name
from .settings import SpaceFile, parse_settings
from .space import TIME_ATTR, SearchSpace
from .validation import MAX_CHECKED_COMBINATIONS

__all__ = ["MAX_CHECKED_COMBINATIONS", "RAY_RESULT_KEY", "TIME_ATTR", "SearchSpace", "SpaceFile", "apply_cli_overrides",
           "load_space", "optuna_name", "parse_settings", "space_from_dict"]
