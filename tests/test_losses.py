"""Each loss term against hand-computed values on 2x2 images; ignore_index, class weights and the weighted sum."""

from __future__ import annotations

import math

import pytest
import torch

from raysegtrain import config
from raysegtrain.errors import ConfigError
from raysegtrain.losses import build_loss

IGNORE = 255
# binary: one image, 2x2 logits and target
BIN_LOGITS = [0.5, 2.0, -1.0, 1.5]
BIN_TARGET = [0, 1, 1, 0]


def cfg_for(loss: dict, num_classes: int = 2, **data):
    return config.build({"data": {"num_classes": num_classes, "ignore_index": IGNORE, **data}, "loss": loss})


def binary_inputs():
    return torch.tensor(BIN_LOGITS).view(1, 1, 2, 2), torch.tensor(BIN_TARGET).view(1, 2, 2)


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def soft_sums():
    """Soft intersection, prediction sum and target sum of the binary example."""
    p = [sigmoid(v) for v in BIN_LOGITS]
    inter = sum(pi * ti for pi, ti in zip(p, BIN_TARGET))
    return inter, sum(p), sum(BIN_TARGET)


def term_value(loss: dict, logits, target, num_classes: int = 2, **data) -> dict:
    total, parts = build_loss(cfg_for(loss, num_classes, **data))(logits, target)
    return {"total": total.item(), **{k: v.item() for k, v in parts.items()}}


# --------------------------------------------------------------------------------------------- binary, by hand
def test_binary_dice_jaccard_tversky_by_hand():
    i, p, t = soft_sums()
    got = term_value({"dice": 1.0, "jaccard": 1.0, "tversky": 1.0, "tversky_alpha": 0.3, "tversky_beta": 0.7},
                     *binary_inputs())
    assert got["dice"] == pytest.approx(1 - 2 * i / (p + t), rel=1e-5)
    assert got["jaccard"] == pytest.approx(1 - i / (p + t - i), rel=1e-5)
    assert got["tversky"] == pytest.approx(1 - i / (i + 0.3 * (p - i) + 0.7 * (t - i)), rel=1e-5)


def test_binary_smooth_enters_numerator_and_denominator():
    i, p, t = soft_sums()
    got = term_value({"dice": 1.0, "smooth": 1.0}, *binary_inputs())
    # smp's soft Dice is a Tversky score with alpha = beta = 0.5: (I + s) / (I + (FP + FN) / 2 + s)
    assert got["dice"] == pytest.approx(1 - (i + 1) / ((p + t) / 2 + 1), rel=1e-5)


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_binary_focal_by_hand(alpha):
    expected = 0.0
    for x, t in zip(BIN_LOGITS, BIN_TARGET):
        pt = sigmoid(x) if t == 1 else 1 - sigmoid(x)
        term = (1 - pt) ** 2 * -math.log(pt)
        if alpha is not None:
            term *= alpha if t == 1 else 1 - alpha
        expected += term / 4
    got = term_value({"focal": 1.0, "focal_gamma": 2.0, "focal_alpha": alpha}, *binary_inputs())
    assert got["focal"] == pytest.approx(expected, rel=1e-5)


def test_binary_lovasz_by_hand():
    # hinge errors 1 - x*sign: [1.5, -1, 2, 2.5]; sorted: 2.5 (bg), 2 (fg), 1.5 (bg), -1 (fg), so gt = [0, 1, 0, 1]
    # Jaccard along the order: 1 - [2,1,1,0]/[3,3,4,4] = [1/3, 2/3, 3/4, 1] -> gradient [1/3, 1/3, 1/12, 1/4]
    expected = 2.5 / 3 + 2 / 3 + 1.5 / 12
    assert term_value({"lovasz": 1.0}, *binary_inputs())["lovasz"] == pytest.approx(expected, rel=1e-5)


def test_binary_bce_by_hand_and_pos_weight_from_class_weights():
    def bce(pos_weight: float) -> float:
        return sum(-(pos_weight * t * math.log(sigmoid(x)) + (1 - t) * math.log(1 - sigmoid(x)))
                   for x, t in zip(BIN_LOGITS, BIN_TARGET)) / 4

    assert term_value({"bce": 1.0}, *binary_inputs())["bce"] == pytest.approx(bce(1.0), rel=1e-5)
    got = term_value({"bce": 1.0}, *binary_inputs(), class_weights=[2.0, 6.0])
    assert got["bce"] == pytest.approx(bce(3.0), rel=1e-5)


def test_binary_label_smoothing_equals_two_class_cross_entropy():
    logits, target = binary_inputs()
    binary = term_value({"bce": 1.0, "label_smoothing": 0.2}, logits, target)["bce"]
    two_class = torch.cat([torch.zeros_like(logits), logits], dim=1)  # softmax([0, x]) = [1 - sigmoid x, sigmoid x]
    multiclass = torch.nn.functional.cross_entropy(two_class, target, label_smoothing=0.2).item()
    assert binary == pytest.approx(multiclass, rel=1e-5)


def test_binary_bce_zero_background_weight_is_rejected():
    with pytest.raises(ConfigError, match="background weight"):
        build_loss(cfg_for({"bce": 1.0}), class_weights=[0.0, 1.0])


# ----------------------------------------------------------------------------------------- multiclass, by hand
MC_LOGITS = torch.tensor([[[2.0, 0.0], [0.5, -1.0]],
                          [[0.0, 1.0], [0.5, 2.0]],
                          [[-1.0, 0.5], [1.0, 0.0]]]).unsqueeze(0)  # (1, 3, 2, 2)
MC_TARGET = torch.tensor([[[0, 1], [2, 1]]])


def softmax_at(pixel: int) -> list[float]:
    values = [MC_LOGITS[0, c].flatten()[pixel].item() for c in range(3)]
    z = sum(math.exp(v) for v in values)
    return [math.exp(v) / z for v in values]


def test_multiclass_cross_entropy_with_class_weights_by_hand():
    targets = MC_TARGET.flatten().tolist()
    nll = [-math.log(softmax_at(i)[c]) for i, c in enumerate(targets)]
    plain = term_value({"bce": 1.0}, MC_LOGITS, MC_TARGET, num_classes=3)["bce"]
    assert plain == pytest.approx(sum(nll) / 4, rel=1e-5)

    weights = [1.0, 2.0, 0.5]
    weighted = term_value({"bce": 1.0}, MC_LOGITS, MC_TARGET, num_classes=3, class_weights=weights)["bce"]
    expected = sum(weights[c] * v for c, v in zip(targets, nll)) / sum(weights[c] for c in targets)
    assert weighted == pytest.approx(expected, rel=1e-5)
    assert weighted != pytest.approx(plain, rel=1e-3)
    # the build_loss argument (e.g. resolved 'auto' weights) wins over the config's list
    total, _ = build_loss(cfg_for({"bce": 1.0}, 3), class_weights=weights)(MC_LOGITS, MC_TARGET)
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_multiclass_dice_by_hand_absent_class_counts_as_zero():
    target = torch.tensor([[[0, 1], [0, 1]]])  # class 2 absent
    probs = [softmax_at(i) for i in range(4)]
    losses = []
    for c in range(3):
        t = [1.0 if v == c else 0.0 for v in target.flatten().tolist()]
        p = [probs[i][c] for i in range(4)]
        inter = sum(a * b for a, b in zip(p, t))
        losses.append(1 - 2 * inter / (sum(p) + sum(t)) if sum(t) > 0 else 0.0)
    got = term_value({"dice": 1.0}, MC_LOGITS, target, num_classes=3)["dice"]
    assert got == pytest.approx(sum(losses) / 3, rel=1e-5)


# ------------------------------------------------------------------------------------------ composition, ignore
ALL_TERMS = {"dice": 1.0, "jaccard": 1.0, "focal": 1.0, "lovasz": 1.0, "tversky": 1.0, "bce": 1.0}


def test_total_is_the_weighted_sum_of_terms():
    weights = {"dice": 0.3, "bce": 0.7, "focal": 0.5, "lovasz": 0.2}
    got = term_value(weights, *binary_inputs())
    assert got["total"] == pytest.approx(sum(w * got[name] for name, w in weights.items()), rel=1e-6)
    assert set(got) == {"total", *weights}


@pytest.mark.parametrize("num_classes", [2, 3])
def test_ignored_pixels_do_not_change_any_term(num_classes):
    torch.manual_seed(0)
    channels = 1 if num_classes == 2 else num_classes
    logits = torch.randn(2, channels, 4, 4)
    target = torch.randint(0, num_classes, (2, 4, 4))
    extra_logits = torch.cat([logits, 5 * torch.randn(2, channels, 4, 3)], dim=3)
    extra_target = torch.cat([target, torch.full((2, 4, 3), IGNORE)], dim=2)
    loss = build_loss(cfg_for({**ALL_TERMS, "label_smoothing": 0.1}, num_classes,
                              class_weights=[1.0, 2.0, 3.0][:num_classes]))
    total, parts = loss(logits, target)
    total_ignored, parts_ignored = loss(extra_logits, extra_target)
    assert total_ignored.item() == pytest.approx(total.item(), rel=1e-5)
    for name in ALL_TERMS:
        assert parts_ignored[name].item() == pytest.approx(parts[name].item(), rel=1e-5, abs=1e-7), name


@pytest.mark.parametrize("num_classes", [2, 3])
def test_all_ignored_batch_gives_zero_loss_and_finite_gradient(num_classes):
    channels = 1 if num_classes == 2 else num_classes
    logits = torch.randn(1, channels, 2, 2, requires_grad=True)
    total, parts = build_loss(cfg_for(ALL_TERMS, num_classes))(logits, torch.full((1, 2, 2), IGNORE))
    total.backward()
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in parts.values())
    assert torch.isfinite(logits.grad).all()


def test_loss_is_differentiable_and_parts_are_detached():
    logits, target = binary_inputs()
    logits.requires_grad_(True)
    total, parts = build_loss(cfg_for(ALL_TERMS))(logits, target)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert all(not v.requires_grad for v in parts.values())


def test_wrong_logit_channels_are_reported():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        build_loss(cfg_for({"dice": 1.0}, 3))(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_auto_class_weights_must_be_resolved_by_the_caller():
    with pytest.raises(ValueError, match="auto"):
        build_loss(cfg_for({"bce": 1.0}, class_weights="auto"))
