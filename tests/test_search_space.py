"""Search-space files: every shipped file loads, conditional spaces never sample an invalid combination, every
mistake is one ConfigError line naming the key, and the Optuna compilation behaves as Ray's OptunaSearch needs."""

from __future__ import annotations

import copy
import pickle
import random
from pathlib import Path

import optuna
import pytest
import yaml

from raysegtrain.config import Config
from raysegtrain.errors import ConfigError
from raysegtrain.search_space import SearchSpace, load_space, optuna_name, space_from_dict

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
TINY_BASE = {"data": {"synthetic": {"size": 64, "num_train": 12, "num_val": 6}, "image_size": 64},
             "model": {"encoder": "resnet18"}}

ENCODERS = {"unet": ["resnet18", "resnet34"], "fpn": ["resnet34", "efficientnet-b0"], "linknet": ["resnet18"]}
MIXES = {"dice_bce": {"dice", "bce"}, "dice_focal": {"dice", "focal"}, "tversky": {"tversky"}}
CONDITIONAL = {
    "base": TINY_BASE,
    "asha": {"max_epochs": 6, "grace_period": 1, "reduction_factor": 2},
    "trial": {"num_workers": 2, "gpus_per_worker": 0.25, "cpus_per_worker": 2},
    "searcher": {"seed": 0, "n_startup_trials": 5,
                 "points_to_evaluate": [{"model.arch": "fpn", "model.encoder": "efficientnet-b0",
                                         "optim.lr": 1.0e-3, "loss_mix": "dice_focal", "loss.focal_gamma": 2.5}]},
    "space": {
        "optim.lr": {"loguniform": ["1e-4", 1.0e-2]},          # a bare 1e-4 is text to PyYAML: accepted as a float
        "model.arch": {"choice": {"unet": {"model.encoder": {"choice": ENCODERS["unet"]}},
                                  "fpn": {"model.encoder": {"choice": ENCODERS["fpn"]},
                                          "model.encoder_depth": {"int": [3, 5]}},
                                  "linknet": {"model.encoder": "resnet18"}}},
        "schedule.name": {"choice": {"cosine": {"schedule.min_lr": {"loguniform": [1.0e-7, 1.0e-5]}},
                                     "step": {"schedule.step_size": {"int": [1, 4]},
                                              "schedule.gamma": {"quniform": [0.1, 0.5, 0.1]}},
                                     "poly": {}}},
        "schedule.warmup_epochs": {"uniform": [0, 2], "when": {"schedule.name": ["cosine", "poly"]}},
        "loss_mix": {"branch": {
            "dice_bce": {"loss.dice": {"uniform": [0.2, 0.8]}, "loss.bce": {"uniform": [0.2, 0.8]}},
            "dice_focal": {"loss.dice": 0.5, "loss.focal": {"uniform": [0.5, 2.0]},
                           "loss.focal_gamma": {"uniform": [1.0, 3.0]}},
            "tversky": {"loss.tversky": 1.0, "loss.tversky_beta": {"uniform": [0.5, 0.9]}}}},
        "train.batch_size": {"choice": [2, 4]},
    },
}
STEP_ONLY = {"schedule.step_size", "schedule.gamma"}


@pytest.fixture(scope="module")
def conditional() -> SearchSpace:
    return space_from_dict(copy.deepcopy(CONDITIONAL))


def quiet_study(sampler) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(sampler=sampler, direction="maximize")


# ------------------------------------------------------------------------------------------- shipped space files
@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_loads(path):
    space = load_space(path)
    assert space.parameters and space.num_samples >= 1
    assert space.base_config.train.epochs == space.asha["max_t"] and space.asha["time_attr"] == "epoch"
    study = quiet_study(space.make_sampler())
    for point in space.points_to_evaluate:
        study.enqueue_trial(point)
    for _ in range(5):
        trial = study.ask()
        assert isinstance(space.trial_config(space.define_by_run(trial)), Config)
        study.tell(trial, 0.5)
    yaml.safe_dump(space.to_dict())


def test_shipped_file_names():
    names = {p.name for p in SPACES.glob("*.yaml")}
    assert {"smoke.yaml", "arch_encoders.yaml", "loss_weights.yaml", "lr_schedules.yaml", "combined.yaml"} <= names


def test_smoke_space_is_tiny_and_lets_asha_stop_trials():
    space = load_space(SPACES / "smoke.yaml")
    base = space.base_config
    assert base.data.synthetic.size == 64 and base.data.synthetic.num_train <= 16 and base.data.synthetic.num_val <= 8
    assert base.scaling.num_workers == 1 and base.scaling.use_gpu == "false"
    assert space.num_samples >= 6 and space.max_concurrent_trials == 2
    assert space.asha == {"time_attr": "epoch", "max_t": 3, "grace_period": 1, "reduction_factor": 2}
    encoders = {cfg.model.encoder for _, cfg in space.example_configs()}
    assert encoders <= {"resnet18", "mobilenet_v2"}


# ------------------------------------------------------------------------------ conditional sampling is always valid
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_conditional_space_never_samples_an_invalid_combination(conditional, sampler):
    chosen = optuna.samplers.RandomSampler(seed=1) if sampler == "random" else conditional.make_sampler()
    assert isinstance(chosen, optuna.samplers.TPESampler if sampler == "tpe" else optuna.samplers.RandomSampler)
    study = quiet_study(chosen)
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        trial = study.ask()
        overrides = conditional.define_by_run(trial)["overrides"]
        cfg = conditional.trial_config(overrides)
        assert_consistent(cfg, overrides, trial.params)
        seen.add((cfg.model.arch, cfg.schedule.name, trial.params["loss_mix"]))
        study.tell(trial, cfg.optim.lr * 10 + rng.random())
    assert len(seen) >= 20   # the branches really were explored: 3 archs x 3 schedules x 3 mixes


def assert_consistent(cfg: Config, overrides: dict, params: dict):
    assert cfg.model.encoder in ENCODERS[cfg.model.arch]
    assert ("model.encoder_depth" in overrides) == (cfg.model.arch == "fpn")
    assert (STEP_ONLY <= set(overrides)) == (cfg.schedule.name == "step")
    assert not (STEP_ONLY & set(overrides)) or cfg.schedule.name == "step"
    assert ("schedule.min_lr" in overrides) == (cfg.schedule.name == "cosine")
    assert ("schedule.warmup_epochs" in overrides) == (cfg.schedule.name in ("cosine", "poly"))
    mix = params["loss_mix"]
    assert set(cfg.loss.terms()) == MIXES[mix]
    assert {k.split(".")[1] for k in overrides if k.startswith("loss.")} <= MIXES[mix] | {"focal_gamma",
                                                                                           "tversky_beta"}
    assert ("loss.focal_gamma" in overrides) == (mix == "dice_focal")
    assert cfg.train.epochs == 6 and cfg.scaling.num_workers == 2 and cfg.scaling.gpus_per_worker == 0.25
    for name, value in params.items():          # every conditional name is used only under its parent's option
        key, *conditions = name.split(":")
        for parent, label in zip(conditions[::2], conditions[1::2]):
            assert str(overrides.get(parent, params.get(parent))) == label, name


def test_optuna_names_are_unique_per_branch(conditional):
    names = set(conditional.parameters)
    assert {"optim/lr", "model/arch", "loss_mix", "model/encoder:model.arch:unet", "model/encoder:model.arch:fpn",
            "schedule/step_size:schedule.name:step", "schedule/warmup_epochs:schedule.name:cosine",
            "schedule/warmup_epochs:schedule.name:poly", "loss/dice:loss_mix:dice_bce"} <= names
    assert "model/encoder:model.arch:linknet" not in names   # a constant in its branch: not an Optuna parameter
    assert optuna_name("a.b", ()) == "a/b"


def test_same_seed_same_sequence_and_another_seed_differs():
    def sequence(seed: int) -> list[dict]:
        raw = copy.deepcopy(CONDITIONAL)
        raw["searcher"].update(seed=seed, points_to_evaluate=[])
        space = space_from_dict(raw)
        study = quiet_study(space.make_sampler())
        out = []
        for _ in range(25):
            trial = study.ask()
            overrides = space.define_by_run(trial)["overrides"]
            out.append(overrides)
            study.tell(trial, overrides["optim.lr"])
        return out

    first = sequence(7)
    assert first == sequence(7)
    assert first != sequence(8)


def test_points_to_evaluate_are_optuna_names_and_run_first(conditional):
    assert conditional.points_to_evaluate == [{
        "model/arch": "fpn", "model/encoder:model.arch:fpn": "efficientnet-b0", "optim/lr": 1.0e-3,
        "loss_mix": "dice_focal", "loss/focal_gamma:loss_mix:dice_focal": 2.5}]
    study = quiet_study(conditional.make_sampler())
    study.enqueue_trial(conditional.points_to_evaluate[0])
    overrides = conditional.define_by_run(study.ask())["overrides"]
    assert overrides["model.arch"] == "fpn" and overrides["model.encoder"] == "efficientnet-b0"
    assert overrides["optim.lr"] == 1.0e-3 and overrides["loss.focal_gamma"] == 2.5 and overrides["loss.dice"] == 0.5


def test_ray_optuna_search_passes_overrides_and_survives_a_checkpoint(conditional, tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space=conditional.define_by_run, metric=conditional.metric, mode=conditional.mode,
                            points_to_evaluate=conditional.points_to_evaluate, sampler=conditional.make_sampler())
    config = searcher.suggest("t0")
    assert config["overrides"]["model.encoder"] == "efficientnet-b0"        # the point comes first
    assert config["model"]["encoder:model.arch:fpn"] == "efficientnet-b0"   # Ray nests the Optuna names on '/'
    assert conditional.trial_config(config).model.arch == "fpn"             # the Ray config itself is accepted
    searcher.on_trial_complete("t0", {"val_iou": 0.4})
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = OptunaSearch()
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert isinstance(conditional.trial_config(restored.suggest("t1")), Config)


def test_overrides_for_params_rebuilds_a_finished_trial(conditional):
    study = quiet_study(optuna.samplers.RandomSampler(seed=3))
    trial = study.ask()
    overrides = conditional.define_by_run(trial)["overrides"]
    study.tell(trial, 0.1)
    assert conditional.overrides_for_params(study.trials[0].params) == overrides


# ------------------------------------------------------------------------------------------- trial configs
def test_trial_config_layers_base_settings_and_sampled_values(tmp_path):
    base = tmp_path / "configs" / "fit.yaml"
    base.parent.mkdir()
    base.write_text(yaml.safe_dump({**TINY_BASE, "loss": {"dice": 0.3, "bce": 0.7}, "train": {"epochs": 50}}))
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({
        "base": "configs/fit.yaml", "overrides": ["train.batch_size=3"],
        "objective": {"metric": "val_loss"}, "trial": {"num_workers": 2, "cpus_per_worker": 3},
        "asha": {"max_epochs": 4}, "space": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]},
                                             "loss_mix": {"branch": {"focal": {"loss.focal": 1.0}, "keep": {}}}}}))
    space = load_space(space_file, ["train.seed=5", "budget.num_samples=3"])
    assert space.mode == "min" and space.num_samples == 3
    cfg = space.trial_config({"optim.lr": 2e-3, "loss.focal": 1.0})
    assert cfg.optim.lr == 2e-3 and cfg.train.batch_size == 3 and cfg.train.seed == 5 and cfg.train.epochs == 4
    assert cfg.scaling.num_workers == 2 and cfg.scaling.cpus_per_worker == 3
    assert cfg.train.monitor == "val_loss" and cfg.train.monitor_mode == "min"
    assert cfg.loss.terms() == {"focal": 1.0}                           # the mix replaces the base's weights
    assert space.trial_config({"optim.lr": 2e-3}).loss.terms() == {"dice": 0.3, "bce": 0.7}   # "keep": base mix


def test_cli_overrides_reach_settings_space_and_base():
    space = load_space(SPACES / "smoke.yaml", ["budget.num_samples=9", "max_concurrent_trials=1",
                                               "space.optim.lr={loguniform: [1.0e-3, 1.0e-2]}",
                                               "data.synthetic.seed=3"])
    assert space.num_samples == 9 and space.max_concurrent_trials == 1
    assert space.parameters["optim/lr"] == "loguniform [0.001, 0.01]"
    assert space.base_config.data.synthetic.seed == 3


def test_space_pickles_with_its_define_by_run(conditional):
    again = pickle.loads(pickle.dumps(conditional.define_by_run))
    study = quiet_study(optuna.samplers.RandomSampler(seed=0))
    assert isinstance(conditional.trial_config(again(study.ask())), Config)


# ---------------------------------------------------------------------------------------------- bad space files
def with_changes(*changes) -> dict:
    """CONDITIONAL with (dotted path in the space file, value) changes; value None deletes the entry."""
    raw = copy.deepcopy(CONDITIONAL)
    raw["searcher"]["points_to_evaluate"] = []
    for path, value in changes:
        *parents, last = path
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return raw


ARCH_BRANCHES = ("space", "model.arch", "choice")
BAD = {
    "unknown top-level key": ([(("serach",), {})], "unknown key 'serach' (did you mean 'searcher'?)"),
    "config section at top level": ([(("model",), {"arch": "unet"})], "'model': config sections go under base:"),
    "unknown settings key": ([(("asha", "grace"), 1)], "unknown key 'asha.grace' (did you mean 'asha.grace_period'?)"),
    "bad algorithm": ([(("searcher", "algorithm"), "cmaes")], "searcher.algorithm"),
    "unknown metric": ([(("objective", "metric"), "val_iuo")], "objective.metric: unknown metric 'val_iuo'"),
    "grace above max epochs": ([(("asha", "grace_period"), 9)], "asha.grace_period (9) must be <= asha.max_epochs"),
    "fractional gpus must be positive": ([(("trial", "gpus_per_worker"), 0)], "trial.gpus_per_worker"),
    "missing space": ([(("space",), None)], "space: required"),
    "unknown config key": ([(("space", "model.encodr"), "resnet18")],
                           "space.model.encodr: unknown config key 'model.encodr' (did you mean 'model.encoder'?)"),
    "unknown nested config key": ([(("space", "data.synthetic.sise"), {"choice": [64, 96]})],
                                  "did you mean 'data.synthetic.size'?"),
    "unknown key inside a branch": ([((*ARCH_BRANCHES, "unet", "model.encodr"), "resnet18")],
                                    "space.model.arch.choice.unet.model.encodr: unknown config key"),
    "section instead of key": ([(("space", "data.synthetic"), 3)], "'data.synthetic' is a config section"),
    "undotted key": ([(("space", "lr"), {"loguniform": [1.0e-4, 1.0e-2]})],
                     "space.lr: unknown config key 'lr' (did you mean 'optim.lr'?)"),
    "owned by asha": ([(("space", "train.epochs"), {"int": [2, 5]})], "space.train.epochs: train.epochs is set by "
                                                                      "the study settings; use asha.max_epochs"),
    "owned by trial": ([(("space", "scaling.gpus_per_worker"), {"choice": [0.5, 1]})], "use trial.gpus_per_worker"),
    "misspelt distribution": ([(("space", "optim.lr"), {"loguniformm": [1.0e-4, 1.0e-2]})],
                              "space.optim.lr.loguniformm: unknown keyword (did you mean 'loguniform'?)"),
    "two distributions": ([(("space", "optim.lr"), {"uniform": [0.1, 0.2], "loguniform": [0.1, 0.2]})],
                          "space.optim.lr: give exactly one of"),
    "bare list": ([(("space", "train.batch_size"), [2, 4])], "space.train.batch_size: a bare list is ambiguous"),
    "empty choice": ([(("space", "train.batch_size"), {"choice": []})], "space.train.batch_size.choice: empty choice"),
    "empty choice mapping": ([(ARCH_BRANCHES, {})], "space.model.arch.choice: empty choice"),
    "duplicate option": ([(("space", "train.batch_size"), {"choice": [2, 2]})], "option 2 is listed twice"),
    "low above high": ([(("space", "optim.lr"), {"uniform": [0.1, 0.01]})],
                       "space.optim.lr.uniform: low (0.1) must be < high (0.01)"),
    "loguniform from zero": ([(("space", "optim.lr"), {"loguniform": [0, 0.1]})],
                             "space.optim.lr.loguniform: low must be > 0"),
    "bounds not numbers": ([(("space", "optim.lr"), {"uniform": ["a", 0.1]})], "space.optim.lr.uniform: bounds must"),
    "three bounds": ([(("space", "optim.lr"), {"uniform": [0.1, 0.2, 0.3]})], "space.optim.lr.uniform: must be"),
    "non-integer int bound": ([(("space", "train.batch_size"), {"int": [2.5, 8]})],
                              "space.train.batch_size.int: low must be an integer"),
    "int step not dividing": ([(("space", "train.batch_size"), {"int": [2, 9], "step": 2})],
                              "space.train.batch_size.step: step (2) must divide high - low (7)"),
    "log int from zero": ([(("space", "train.batch_size"), {"int": [0, 8], "log": True})],
                          "space.train.batch_size.log: needs low >= 1"),
    "step on a float": ([(("space", "optim.lr"), {"uniform": [0.1, 0.2], "step": 0.1})],
                        "space.optim.lr.step: only for int"),
    "bad q": ([(("space", "optim.lr"), {"quniform": [0.1, 1.0, 0.4]})],
              "space.optim.lr.quniform: q (0.4) must divide high - low (0.9)"),
    "zero q": ([(("space", "optim.lr"), {"quniform": [0.1, 1.0, 0]})], "space.optim.lr.quniform: q must be > 0"),
    "condition on a missing parent": ([(("space", "schedule.warmup_epochs", "when"), {"schedule.nam": "poly"})],
                                      "space.schedule.warmup_epochs.when.schedule.nam: the condition's parent "
                                      "'schedule.nam' is not in the space at this level (did you mean "
                                      "'schedule.name'?)"),
    "condition on a constant": ([(("space", "optim.name"), "adam"),
                                 (("space", "optim.weight_decay"), {"uniform": [0, 0.1], "when": {"optim.name": "a"}})],
                                "'optim.name' is not a choice"),
    "condition on a missing option": ([(("space", "schedule.warmup_epochs", "when"), {"schedule.name": "stepp"})],
                                      "'stepp' is not an option of schedule.name"),
    "condition on two parents": ([(("space", "schedule.warmup_epochs", "when"),
                                   {"schedule.name": "poly", "model.arch": "unet"})], "warmup_epochs.when: must be one"),
    "option the config rejects": ([((*ARCH_BRANCHES, "notanarch"), {})],
                                  "space.model.arch: option 'notanarch' gives an invalid trial config: "
                                  "model.arch: unknown architecture 'notanarch'"),
    "constant the config rejects": ([(("space", "optim.name"), "adamx")],
                                    "space.optim.name: value 'adamx' gives an invalid trial config: optim.name"),
    "range the config rejects": ([(("space", "optim.lr"), {"uniform": [0.1, 20]})],
                                 "space.optim.lr: high end 20.0 gives an invalid trial config: optim.lr"),
    "warm-up past the epochs": ([(("space", "schedule.warmup_epochs"), {"uniform": [0, 6]})],
                                "space.schedule.warmup_epochs: high end 6.0 gives an invalid trial config: "
                                "schedule.warmup_epochs (6.0) must be < train.epochs (6)"),
    "loss mix that can be all zero": ([(("space", "loss_mix", "branch", "dice_bce"),
                                        {"loss.dice": {"uniform": [0, 1]}, "loss.bce": {"uniform": [0, 1]}})],
                                      "space: model.arch=unet, schedule.name=cosine, loss_mix=dice_bce with every "
                                      "range at its low end gives an invalid trial config: loss: at least one loss "
                                      "weight"),
    "key set twice in one trial": ([(("space", "model.encoder"), "resnet18")],
                                   "space.model.encoder: sets model.encoder, which space.model.arch also sets in "
                                   "the same trial"),
    "dotted branch": ([(("space", "loss.dice"), {"branch": {"a": {}}})], "space.loss.dice: 'branch' is for labels"),
    "branch label that is a section": ([(("space", "loss"), {"branch": {"a": {"loss.dice": 1.0}}})],
                                       "space.loss: branch label 'loss' is a reserved name"),
    "branch as a list": ([(("space", "loss_mix", "branch"), ["a", "b"])], "space.loss_mix.branch: must map each"),
    "sub-space not a mapping": ([((*ARCH_BRANCHES, "unet"), ["resnet18"])],
                                "space.model.arch.choice.unet: an option's sub-space must be a mapping"),
    "only constants": ([(("space",), {"optim.lr": 1.0e-3})], "space: has no distribution to search"),
    "point with an unknown key": ([(("searcher", "points_to_evaluate"), [{"optim.lrr": 1.0e-3}])],
                                  "searcher.points_to_evaluate[0].optim.lrr: is not in the space (did you mean "
                                  "'optim.lr'?)"),
    "point outside a range": ([(("searcher", "points_to_evaluate"), [{"optim.lr": 0.5}])],
                              "searcher.points_to_evaluate[0].optim.lr: 0.5 is outside loguniform [0.0001, 0.01]"),
    "point with a bad option": ([(("searcher", "points_to_evaluate"), [{"model.arch": "pan"}])],
                                "searcher.points_to_evaluate[0].model.arch: 'pan' is not an option"),
    "point without the parent": ([(("searcher", "points_to_evaluate"), [{"model.encoder": "resnet34"}])],
                                 "searcher.points_to_evaluate[0].model.encoder: lives under model.arch; give "
                                 "model.arch too"),
    "point in an inactive branch": ([(("searcher", "points_to_evaluate"),
                                      [{"model.arch": "unet", "model.encoder_depth": 4}])],
                                    "searcher.points_to_evaluate[0].model.encoder_depth: is not active"),
    "point setting a constant": ([(("searcher", "points_to_evaluate"),
                                   [{"loss_mix": "tversky", "loss.tversky": 2.0}])],
                                 "searcher.points_to_evaluate[0].loss.tversky: is a constant of the space"),
}


@pytest.mark.parametrize("changes, message", BAD.values(), ids=BAD.keys())
def test_bad_space_is_one_config_error_line_naming_the_key(changes, message):
    with pytest.raises(ConfigError) as err:
        space_from_dict(with_changes(*changes))
    text = str(err.value)
    assert message in text, text
    assert "\n" not in text


def test_bad_files(tmp_path):
    missing_base = tmp_path / "a.yaml"
    missing_base.write_text("base: nowhere.yaml\nspace: {optim.lr: {loguniform: [1.0e-4, 1.0e-2]}}\n")
    with pytest.raises(ConfigError, match="base: config file not found: .*nowhere.yaml"):
        load_space(missing_base)
    broken = tmp_path / "b.yaml"
    broken.write_text("space: {optim.lr: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(broken)
    with pytest.raises(ConfigError, match="config file not found"):
        load_space(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="unknown key 'budget.num_sample' \\(did you mean 'budget.num_samples'"):
        load_space(SPACES / "smoke.yaml", ["budget.num_sample=3"])
    with pytest.raises(ConfigError, match="base is invalid: unknown key 'model.archh'"):
        load_space(SPACES / "smoke.yaml", ["model.archh=fpn"])


def test_study_trials_default_to_short_trial_settings_unless_the_base_sets_them(tmp_path):
    """Trials checkpoint on improvement and skip cuDNN autotuning by default; a base that says otherwise wins."""
    space = load_space(SPACES / "smoke.yaml")
    assert space.base_config.run.checkpoint_every == 0 and space.base_config.train.cudnn_benchmark == "off"
    told = load_space(SPACES / "smoke.yaml", ["run.checkpoint_every=2", "train.cudnn_benchmark=on"])
    assert told.base_config.run.checkpoint_every == 2 and told.base_config.train.cudnn_benchmark == "on"
    assert told.trial_config({"optim.lr": 1e-3}).run.checkpoint_every == 2
