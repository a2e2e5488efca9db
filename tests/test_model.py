"""Model building per architecture, early config checks, local/offline encoder weights, freezing, param groups."""

from __future__ import annotations

import urllib.error

import pytest
import timm
import torch
import torchvision

import segmentation_models_pytorch as smp
from raysegtrain import config
from raysegtrain.errors import ModelError
from raysegtrain.model import (build_model, check_model_config, create_model_kwargs, param_groups,
                               set_encoder_trainable, unwrap)

# the cheapest encoder each architecture accepts: timm's test networks (random init, tiny); dpt needs a ViT
TINY_ENCODER = {"dpt": "tu-test_vit"}
DEFAULT_TINY = "tu-test_efficientnet"
# pan pools its deepest features 3 more times: at 64x64 only depth 3 leaves enough pixels (see the pan check below)
TINY_DEPTH = {"pan": 3}


def make_cfg(*overrides: str):
    return config.load(None, ["data.image_size=64", *overrides])


def forward_shape(model, size: int = 64, channels: int = 3) -> tuple:
    with torch.no_grad():
        return tuple(model.eval()(torch.randn(2, channels, size, size)).shape)


# dpt's default decoder (up to 1024 channels) dwarfs the test ViT
TINY_KWARGS = {"dpt": "model.kwargs={decoder_intermediate_channels: [16, 16, 16, 16], decoder_fusion_channels: 16}"}


@pytest.mark.parametrize("arch", config.ARCHITECTURES)
def test_every_architecture_builds_and_keeps_the_input_size(arch):
    cfg = make_cfg(f"model.arch={arch}", f"model.encoder={TINY_ENCODER.get(arch, DEFAULT_TINY)}",
                   f"model.encoder_depth={TINY_DEPTH.get(arch, 5)}", "data.num_classes=3",
                   TINY_KWARGS.get(arch, "model.kwargs={}"))
    check_model_config(cfg)
    assert forward_shape(build_model(cfg)) == (2, 3, 64, 64)


def test_binary_has_one_output_channel_and_in_channels_are_honoured():
    cfg = make_cfg(f"model.encoder={DEFAULT_TINY}", "data.in_channels=1")
    assert forward_shape(build_model(cfg), channels=1) == (2, 1, 64, 64)


@pytest.mark.parametrize("arch,depth", [("unet", 3), ("unetplusplus", 4), ("manet", 3), ("pspnet", 5), ("dpt", 3)])
def test_depth_dependent_decoder_defaults_follow_encoder_depth(arch, depth):
    cfg = make_cfg(f"model.arch={arch}", f"model.encoder={TINY_ENCODER.get(arch, DEFAULT_TINY)}",
                   f"model.encoder_depth={depth}")
    check_model_config(cfg)
    assert forward_shape(build_model(cfg)) == (2, 1, 64, 64)


def test_dpt_taps_at_most_four_vit_blocks():
    kwargs = create_model_kwargs(make_cfg("model.arch=dpt", "model.encoder=tu-test_vit", "model.encoder_depth=5"))
    assert kwargs["encoder_depth"] == 4 and len(kwargs["decoder_intermediate_channels"]) == 4


# ------------------------------------------------------------------------------------------------ early checks
@pytest.mark.parametrize("encoder,suggestion", [("resnet181", "resnet18"), ("tu-resnet_18", "tu-resnet18"),
                                                ("efficientnet_b0", "efficientnet-b0")])
def test_unknown_encoder_is_reported_with_close_names(encoder, suggestion):
    with pytest.raises(ModelError, match=f"unknown encoder.*{suggestion}"):
        check_model_config(make_cfg(f"model.encoder={encoder}"))


@pytest.mark.parametrize("overrides,message", [
    (["model.arch=dpt", "model.encoder=resnet18"], "Only Timm encoders"),
    (["model.arch=linknet", "model.encoder=mit_b0"], "not supported for Linknet"),
    (["model.arch=pan", "model.encoder=resnet18"], "cannot process 64x64"),
    (["model.kwargs={activation: sigmoid}"], "must return logits"),
    (["model.kwargs={decoder_chanels: [8, 8, 8, 8, 8]}"], "did you mean 'decoder_channels'"),
    (["model.encoder_weights=noisy-student"], "pretrained weights"),
    (["model.encoder_weights=/no/such/encoder.pth"], "file not found"),
])
def test_check_model_config_rejects_bad_combinations(overrides, message):
    with pytest.raises(ModelError, match=message) as err:
        check_model_config(make_cfg("model.encoder=resnet18", *overrides))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- local weights
def encoder_tensors(model) -> dict:
    return {k: v for k, v in unwrap(model).encoder.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_encoder_state_dict_file_loads(tmp_path):
    source = smp.create_model("unet", "resnet18", None).encoder
    path = tmp_path / "resnet18_encoder.pth"
    torch.save(source.state_dict(), path)
    cfg = make_cfg("model.encoder=resnet18", f"model.encoder_weights={path}")
    check_model_config(cfg)
    loaded = encoder_tensors(build_model(cfg))
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items() if k in loaded)


def test_torchvision_classifier_file_loads_without_its_head(tmp_path, caplog):
    classifier = torchvision.models.mobilenet_v2(weights=None)  # same layout as mobilenet_v2-b0353104.pth
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(classifier.state_dict(), path)
    with caplog.at_level("INFO", logger="raysegtrain.model"):
        model = build_model(make_cfg("model.encoder=mobilenet_v2", f"model.encoder_weights={path}"))
    loaded = encoder_tensors(model)
    assert torch.equal(loaded["features.0.0.weight"], classifier.features[0][0].weight)
    assert "loaded 260/260 tensors" in caplog.text and "2 tensors of the file not used" in caplog.text


def test_first_convolution_is_adapted_to_one_input_channel(tmp_path):
    classifier = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(classifier.state_dict(), path)
    model = build_model(make_cfg("model.encoder=resnet18", "data.in_channels=1", f"model.encoder_weights={path}"))
    torch.testing.assert_close(encoder_tensors(model)["conv1.weight"], classifier.conv1.weight.sum(1, keepdim=True))


def test_timm_classifier_loads_by_name_and_renamed_tensors_by_position(tmp_path):
    classifier = timm.create_model("test_efficientnet")
    by_name, renamed = tmp_path / "timm.pth", tmp_path / "ported.pth"
    torch.save(classifier.state_dict(), by_name)
    torch.save({f"w{i}": v for i, v in enumerate(classifier.state_dict().values())}, renamed)
    for path in (by_name, renamed):
        cfg = make_cfg(f"model.encoder={DEFAULT_TINY}", f"model.encoder_weights={path}")
        check_model_config(cfg)
        loaded = encoder_tensors(build_model(cfg))
        assert torch.equal(loaded["model.conv_stem.weight"], classifier.conv_stem.weight)


def test_weights_of_another_network_are_rejected(tmp_path):
    other = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    with pytest.raises(ModelError, match="does not fit encoder resnet50"):
        check_model_config(make_cfg("model.encoder=resnet50", f"model.encoder_weights={other}"))
    with pytest.raises(ModelError, match="has only 100 of the 180 tensors"):  # resnet18's blocks are a subset
        check_model_config(make_cfg("model.encoder=resnet34", f"model.encoder_weights={other}"))
    with pytest.raises(ModelError, match="has only 0 of the 260 tensors"):
        build_model(make_cfg("model.encoder=mobilenet_v2", f"model.encoder_weights={other}"))


def test_file_that_is_no_state_dict_is_rejected(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(ModelError, match="not a PyTorch weights file"):
        build_model(make_cfg("model.encoder=resnet18", f"model.encoder_weights={text}"))


@pytest.mark.parametrize("error", [urllib.error.URLError("no route to host"), ConnectionError("network down")])
def test_imagenet_weights_offline_is_a_one_line_model_error(monkeypatch, error):
    def offline(*args, **kwargs):
        raise error

    monkeypatch.setattr(smp.encoders, "hf_hub_download", offline)  # the download smp's get_encoder calls
    with pytest.raises(ModelError, match="needs network access.*model.encoder_weights=/path/to/encoder.pth") as err:
        build_model(make_cfg("model.encoder=resnet18", "model.encoder_weights=imagenet"))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ training helpers
def test_freeze_and_unfreeze_toggle_requires_grad_and_keep_frozen_norms_in_eval():
    model = build_model(make_cfg(f"model.encoder={DEFAULT_TINY}"))
    set_encoder_trainable(model, False)
    model.train()
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    norms = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    set_encoder_trainable(model, True)
    assert all(p.requires_grad for p in model.encoder.parameters()) and all(m.training for m in norms)
    model.eval()
    set_encoder_trainable(model, True)
    assert not any(m.training for m in norms)


def test_param_groups_split_encoder_and_rest_and_unwrap_ddp(tmp_path):
    model = build_model(make_cfg(f"model.encoder={DEFAULT_TINY}"))
    torch.distributed.init_process_group("gloo", store=torch.distributed.FileStore(str(tmp_path / "s"), 1),
                                         rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        assert unwrap(wrapped) is model
        encoder, rest = param_groups(wrapped, lr=1e-3, encoder_lr_mult=0.1)
    finally:
        torch.distributed.destroy_process_group()
    assert (encoder["name"], rest["name"]) == ("encoder", "decoder")
    assert encoder["lr"] == pytest.approx(1e-4) and rest["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in encoder["params"]} == {id(p) for p in model.encoder.parameters()}
    assert len(encoder["params"]) + len(rest["params"]) == len(list(model.parameters()))
    torch.optim.AdamW([encoder, rest])  # accepted as optimizer groups
