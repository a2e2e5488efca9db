"""`run.preset`: the zero-argument fit sized to a machine without GPU, and never shrunk behind the user's back."""

from __future__ import annotations

import io

import pytest
import yaml
from rich.console import Console

from raysegtrain import config, presets
from raysegtrain.config import Config
from raysegtrain.errors import ConfigError


class GPUQuestion:
    """`resolve`'s question about the cluster: answers GPU (and CPUS of a local Ray) and counts how often it was
    asked (asking may connect to a cluster)."""

    def __init__(self, gpu: bool, cpus: int | None = None):
        self.answer, self.asked = presets.Cluster(gpu=gpu, local_cpus=cpus), 0

    def __call__(self) -> presets.Cluster:
        self.asked += 1
        return self.answer


def _is_cpu_preset(cfg: Config) -> bool:
    return all(_get(cfg, k) == v for k, v in presets.CPU_PRESET.items())


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_auto_without_gpu_and_without_size_keys_is_the_cpu_preset():
    cfg = config.load(None, ["optim.weight_decay=1e-3", "run.name=demo"])  # settings, but no size
    no_gpu = GPUQuestion(False)
    resolved, note = presets.resolve(cfg, no_gpu)
    assert no_gpu.asked == 1
    assert _is_cpu_preset(resolved) and resolved.run.preset == "cpu"
    assert resolved.optim.weight_decay == 1e-3 and resolved.run.name == "demo"
    assert resolved.data.synthetic.size == resolved.data.image_size == 128
    assert note.startswith("no GPU, so the CPU preset: unet/resnet18, 128², 12 epochs, 96 training images")
    assert note.endswith("add run.preset=full") and "unet/resnet34, 256², 30 epochs" in note


@pytest.mark.parametrize("override", [f"{k}={v}" for k, v in Config().flat().items() if k in presets.CPU_PRESET]
                         + ["data.root=/data/mine"])
def test_auto_keeps_a_config_that_names_any_size_or_its_own_data(override):
    cfg = config.load(None, [override])  # even a default value, named, is the user's choice
    resolved, note = presets.resolve(cfg, GPUQuestion(False))
    assert note is None and resolved.run.preset == "full"
    assert resolved.model_copy(update={"run": cfg.run}) == cfg


def test_auto_with_a_gpu_or_on_gpu_workers_is_full_size():
    cfg = config.load(None, [])
    gpu = GPUQuestion(True)
    resolved, note = presets.resolve(cfg, gpu)
    assert gpu.asked == 1 and note is None and resolved.run.preset == "full" and resolved.train.epochs == 30
    for wants_gpu in (["scaling.use_gpu=true"], ["scaling.wait_for_resources=true"]):
        never = GPUQuestion(False)
        resolved, note = presets.resolve(config.load(None, wants_gpu), never)
        assert never.asked == 0 and note is None and resolved.run.preset == "full"
    # custom datasets (fit's DATASETS) replace the configured data: nothing to size
    resolved, note = presets.resolve(cfg, GPUQuestion(False), custom_data=True)
    assert note is None and resolved.run.preset == "full"


def test_cpu_workers_on_a_gpu_machine_get_the_cpu_preset():
    resolved, note = presets.resolve(config.load(None, ["scaling.use_gpu=false"]), GPUQuestion(True))
    assert _is_cpu_preset(resolved) and note.startswith("no GPU")


def test_full_never_shrinks_and_cpu_always_applies_under_explicit_keys():
    resolved, note = presets.resolve(config.load(None, ["run.preset=full"]), GPUQuestion(False))
    assert note is None and resolved.train.epochs == 30 and resolved.model.encoder == "resnet34"

    resolved, note = presets.resolve(config.load(None, ["run.preset=cpu", "train.epochs=3"]), GPUQuestion(True))
    assert resolved.run.preset == "cpu"
    assert resolved.train.epochs == 3  # named explicitly: it wins over the preset
    assert resolved.data.image_size == 128 and resolved.model.encoder == "resnet18"
    assert note.startswith("the CPU preset: unet/resnet18, 128², 3 epochs")


def test_a_preset_that_conflicts_with_explicit_keys():
    # warm-up must be shorter than the run: auto keeps the full size, an explicit cpu says what conflicts
    resolved, note = presets.resolve(config.load(None, ["schedule.warmup_epochs=15"]), GPUQuestion(False))
    assert note is None and resolved.train.epochs == 30 and resolved.run.preset == "full"
    with pytest.raises(ConfigError, match="run.preset=cpu: .*warmup_epochs"):
        presets.resolve(config.load(None, ["run.preset=cpu", "schedule.warmup_epochs=15"]), GPUQuestion(False))


def test_the_resolved_config_reloads_to_the_same_run_anywhere(tmp_path):
    resolved, _ = presets.resolve(config.load(None, []), GPUQuestion(False))
    path = tmp_path / "resolved.yaml"
    resolved.to_yaml(path)
    assert yaml.safe_load(path.read_text())["run"]["preset"] == "cpu"
    for has_gpu in (False, True):  # a re-run, or `fit --resume` with the dumped file, on any machine
        again, note = presets.resolve(config.load(path), GPUQuestion(has_gpu))
        assert again == resolved and note is None

    # auto that chose full records it, and stays full on a machine without GPU
    full, _ = presets.resolve(config.load(None, []), GPUQuestion(True))
    again, note = presets.resolve(config.build(yaml.safe_load(full.to_yaml())), GPUQuestion(False))
    assert again == full and note is None


def test_defaults_describe_the_preset_it_applies():
    line = next(ln for ln in config.describe_defaults().splitlines() if ln.startswith("run.preset = auto"))
    p = presets.CPU_PRESET
    for text in (f"{p['model.encoder']}", f"{p['data.image_size']}²", f"{p['train.epochs']} epochs",
                 f"{p['data.synthetic.num_train']} train / {p['data.synthetic.num_val']} val / "
                 f"{p['data.synthetic.num_test']} test", f"batch {p['train.batch_size']}", f"lr {p['optim.lr']:g}"):
        assert text in line, (text, line)


def test_probe_asks_the_ray_it_will_train_on(ray_local):
    # the session's Ray has num_gpus=0; its CPUs are its own business, not this machine's
    assert presets.probe() == presets.Cluster(gpu=False, local_cpus=None)


def test_the_cpu_preset_lets_the_worker_use_the_cpus_of_a_local_ray():
    # Ray gives a worker as many torch threads as CPUs it reserves for it
    resolved, _ = presets.resolve(config.load(None, []), GPUQuestion(False, cpus=2))
    assert resolved.scaling.cpus_per_worker == 2
    resolved, _ = presets.resolve(config.load(None, ["scaling.num_workers=2"]), GPUQuestion(False, cpus=6))
    assert resolved.scaling.cpus_per_worker == 3
    resolved, _ = presets.resolve(config.load(None, ["scaling.cpus_per_worker=1"]), GPUQuestion(False, cpus=2))
    assert resolved.scaling.cpus_per_worker == 1 and _is_cpu_preset(resolved)  # a resource, not a size: kept
    resolved, _ = presets.resolve(config.load(None, []), GPUQuestion(False, cpus=None))  # another cluster
    assert resolved.scaling.cpus_per_worker == 1 and _is_cpu_preset(resolved)


class Ready(Exception):
    """Raised by on_ready: the checks passed with this config; the test needs no training past that point."""


def test_fit_without_size_keys_on_cpu_checks_and_hands_on_the_cpu_preset(tmp_path, ray_local, monkeypatch):
    """A zero-argument fit but for where it writes, stopped when its checks have passed (the preset's training takes
    minutes): the preset is applied before the data is generated, said once, and is the config that fit goes on
    with (MLflow's params, the workers and their checkpoints all get the config on_ready sees)."""
    from raysegtrain.data import synthetic
    from raysegtrain.train import fit

    monkeypatch.setenv("RAYSEGTRAIN_CACHE", str(tmp_path / "cache"))  # the checks run here, in the driver
    cfg = config.load(None, [f"run.storage_path={tmp_path / 'runs'}",
                             f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    out, seen = io.StringIO(), []

    def ready(resolved, name):
        seen.append(resolved)
        raise Ready

    with pytest.raises(Ready):
        fit(cfg, progress="lines", console=Console(file=out, width=100), on_ready=ready)
    resolved = seen[0]
    assert _is_cpu_preset(resolved) and resolved.run.preset == "cpu"
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("no GPU, so the CPU preset: unet/resnet18, 128², 12 epochs, 96 training images")
    assert lines[1].startswith(f"generating the synthetic dataset (144 images, 128²) into {tmp_path / 'cache'}")
    assert len(lines) == 2, lines
    assert resolved.data.augment == "default"  # auto, resolved for the preset's 96 training images
    assert synthetic.cache_path(resolved.data.synthetic).is_dir()
    assert not (tmp_path / "mlflow.db").exists()  # nothing was tracked: on_ready stopped it first
