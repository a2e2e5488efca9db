"""The config contract: validation with dotted paths, overrides, YAML round trip."""

import pytest
import yaml

from raysegtrain import config
from raysegtrain.errors import ConfigError


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = config.load()
    path = tmp_path / "resolved.yaml"
    cfg.to_yaml(path)
    assert config.load(path) == cfg


def test_overrides_are_typed_yaml_scalars():
    cfg = config.load(None, ["model.arch=fpn", "optim.lr=1e-3", "data.image_size=[64, 96]", "train.grad_clip=null",
                             "scaling.use_gpu=false"])
    assert cfg.model.arch == "fpn" and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.size_hw == (64, 96) and cfg.train.grad_clip is None and cfg.scaling.use_gpu == "false"


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "unet++", "encoder": "resnet18"}, "train": {"epochs": 3}}))
    cfg = config.load(path, ["train.epochs=5"])
    assert cfg.model.arch == "unetplusplus" and cfg.model.encoder == "resnet18" and cfg.train.epochs == 5


@pytest.mark.parametrize("override, message", [
    ("model.archh=fpn", "unknown key 'model.archh' (did you mean 'model.arch'?)"),
    ("trian.epochs=3", "unknown key 'trian' (did you mean 'train'?)"),
    ("optim.lr=-1", "optim.lr: Input should be greater than 0"),
    ("train.early_stopping.patience=-2", "train.early_stopping.patience"),
    ("data.image_size=100", "multiple of 32"),
    ("model.arch=unett", "unknown architecture 'unett' (did you mean 'unet'?)"),
    ("train.epochs=abc", "train.epochs: Input should be a valid integer"),
    ("train.monitor=val_iuo", "did you mean 'val_iou'"),
    ("data.class_names=[a]", "class_names has 1 names for num_classes=2"),
    ("data.ignore_index=1", "collides with a class id"),
    ("loss.dice=0", "at least one loss weight"),
    ("model.arch.x=1", "model.arch: Input should be a valid string"),
])
def test_errors_name_the_path(override, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_naming_a_loss_weight_sets_the_whole_mix():
    assert config.load().loss.terms() == {"dice": 0.5, "bce": 0.5}
    assert config.load(None, ["loss.focal=0.2", "loss.dice=0.8"]).loss.terms() == {"dice": 0.8, "focal": 0.2}


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.load(tmp_path / "list.yaml")


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="must look like key=value"):
        config.apply_overrides({}, ["model.arch"])
    with pytest.raises(ConfigError, match="empty key"):
        config.apply_overrides({}, ["model..arch=1"])


def test_multiclass_synthetic_follows_its_classes():
    assert config.load(None, ["data.synthetic.variant=multiclass"]).data.num_classes == 4
    assert config.load(None, ["data.synthetic.variant=multiclass", "data.num_classes=4"]).data.binary is False


def test_monitor_mode_and_flat_params():
    cfg = config.load(None, ["train.monitor=val_loss"])
    assert cfg.train.monitor_mode == "min"
    flat = cfg.flat()
    assert flat["train.monitor"] == "val_loss" and flat["optim.lr"] == cfg.optim.lr


def test_every_default_is_documented():
    text = config.describe_defaults()
    for line in text.splitlines():
        key, _, comment = line.partition("#")
        assert comment.strip(), f"undocumented: {key}"
    assert "optim.lr = 0.001" in text


def test_yaml_booleans_read_as_the_words_they_were(tmp_path):
    """YAML 1.1 turns on/off/true/false into booleans: word-valued keys get their word back, in a file and on the
    command line; a real boolean key stays a boolean."""
    f = tmp_path / "c.yaml"
    f.write_text("train: {channels_last: on, cudnn_benchmark: off, amp: off, deterministic: yes}\n"
                 "scaling: {use_gpu: false}\n")
    cfg = config.load(f, ["train.channels_last=off"])
    assert (cfg.train.channels_last, cfg.train.cudnn_benchmark, cfg.train.amp) == ("off", "off", "off")
    assert cfg.scaling.use_gpu == "false" and cfg.train.deterministic is True
    with pytest.raises(ConfigError, match="channels_last"):
        config.load(None, ["train.channels_last=sometimes"])


def _word_keys():
    """Every dotted key whose allowed words include a YAML 1.1 boolean spelling, with those words."""
    from raysegtrain.config import Section, _literal_words

    bool_words = {"on", "off", "yes", "no", "true", "false"}

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Section):
                yield from walk(ann, f"{prefix}{name}.")
            elif _literal_words(ann) & bool_words:
                yield f"{prefix}{name}", sorted(_literal_words(ann) & bool_words)

    return list(walk(config.Config, ""))


@pytest.mark.parametrize("key,words", _word_keys(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_on_off_style_key_takes_its_words_from_yaml_and_the_command_line(tmp_path, key, words):
    section, name = key.rsplit(".", 1)
    for word in words:
        f = tmp_path / "c.yaml"
        f.write_text(f"{section.replace('.', ': {')}: {{{name}: {word}}}" + "}" * section.count(".") + "\n")
        for cfg in (config.load(f), config.load(None, [f"{key}={word}"])):
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            assert value == word, (key, word)
