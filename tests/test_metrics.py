"""ConfusionMeter against hand-computed confusion matrices, accumulation, and all_reduce over 2 gloo processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raysegtrain.metrics import ConfusionMeter

IGNORE = 255


def one_hot_logits(predicted: list, num_classes: int) -> torch.Tensor:
    """Logits whose argmax is `predicted` (N, H, W)."""
    return torch.nn.functional.one_hot(torch.tensor(predicted), num_classes).permute(0, 3, 1, 2).float()


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def assert_metrics_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == pytest.approx(b[key], rel=1e-9), key


# -------------------------------------------------------------------------------------------------- multiclass
# 4 classes: class 2 is predicted but never in the target, class 3 appears nowhere; 255 is ignored
BATCH_A = ([[[0, 1, IGNORE], [1, 1, 0]], [[0, 0, 0], [0, 0, 0]]],
           [[[0, 1, 2], [0, 1, 2]], [[0, 0, 0], [0, 0, 0]]])
BATCH_B = ([[[1, 1, 1], [IGNORE, IGNORE, IGNORE]]],
           [[[1, 1, 0], [2, 2, 2]]])
EXPECTED_CONFUSION = np.array([[7, 0, 1, 0],
                               [2, 4, 0, 0],
                               [0, 0, 0, 0],
                               [0, 0, 0, 0]])


def multiclass_meter() -> ConfusionMeter:
    meter = ConfusionMeter(4, ignore_index=IGNORE, class_names=["bg", "scratch", "crack", "spot"])
    for target, predicted in (BATCH_A, BATCH_B):
        meter.update(one_hot_logits(predicted, 4), torch.tensor(target))
    return meter


def test_multiclass_confusion_matrix_by_hand():
    meter = multiclass_meter()
    np.testing.assert_array_equal(meter.confusion_matrix(), EXPECTED_CONFUSION)
    assert meter.confusion_matrix().dtype == np.int64


def test_multiclass_scores_by_hand():
    m = multiclass_meter().compute()
    # class bg: tp 7, fp 2, fn 1; scratch: tp 4, fp 0, fn 2; crack: tp 0, fp 1, fn 0; spot: nothing anywhere
    assert m["val_iou_bg"] == pytest.approx(7 / 10)
    assert m["val_iou_scratch"] == pytest.approx(4 / 6)
    assert m["val_iou_crack"] == 0.0
    assert math.isnan(m["val_iou_spot"])
    assert m["val_iou"] == pytest.approx((7 / 10 + 4 / 6 + 0) / 3)  # spot (0/0) left out of the mean
    assert m["val_dice"] == pytest.approx((14 / 17 + 8 / 10 + 0) / 3)
    assert m["val_precision"] == pytest.approx((7 / 9 + 1 + 0) / 3)
    assert math.isnan(m["val_recall_crack"])  # never in the target: recall undefined, not 0
    assert m["val_recall"] == pytest.approx((7 / 8 + 4 / 6) / 2)
    assert m["val_pixel_acc"] == pytest.approx(11 / 14)
    assert "val_fg_iou" not in m


def test_multiclass_image_iou_by_hand():
    m = multiclass_meter().compute()
    # image 0: bg 1/3, scratch 2/3, crack 0 -> 1/3; image 1: only bg, perfect -> 1; image 2: bg 0, scratch 2/3 -> 1/3
    assert m["val_image_iou"] == pytest.approx(5 / 9)
    assert m["val_image_iou_std"] == pytest.approx(math.sqrt(8) / 9)


def test_accumulating_batches_equals_one_shot_on_the_concatenation():
    torch.manual_seed(0)
    batches = []
    for _ in range(4):
        target = torch.randint(0, 3, (3, 8, 8))  # class 3 is absent from every batch
        target[torch.rand(target.shape) < 0.1] = IGNORE
        batches.append((torch.randn(3, 4, 8, 8), target))
    streamed = ConfusionMeter(4, ignore_index=IGNORE)
    for logits, target in batches:
        streamed.update(logits, target)
    once = ConfusionMeter(4, ignore_index=IGNORE)
    once.update(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    np.testing.assert_array_equal(streamed.confusion_matrix(), once.confusion_matrix())
    assert_metrics_equal(streamed.compute(), once.compute())


def test_reset_and_target_with_channel_dimension():
    meter = multiclass_meter()
    meter.reset()
    assert meter.confusion_matrix().sum() == 0 and math.isnan(meter.compute()["val_iou"])
    target, predicted = BATCH_A
    meter.update(one_hot_logits(predicted, 4), torch.tensor(target).unsqueeze(1))
    assert meter.confusion_matrix().sum() == 11


def test_class_id_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMeter(3).update(one_hot_logits([[[0, 1]]], 3), torch.tensor([[[0, 7]]]))


# ------------------------------------------------------------------------------------------------------ binary
BIN_TARGET = [[[1, 0], [1, IGNORE]], [[0, 0], [0, 0]], [[1, 1], [0, 0]]]
BIN_PROBS = [[[0.9, 0.6], [0.2, 0.99]], [[0.1, 0.1], [0.1, 0.1]], [[0.8, 0.65], [0.3, 0.1]]]


def binary_metrics(threshold: float) -> tuple[np.ndarray, dict]:
    meter = ConfusionMeter(2, ignore_index=IGNORE, binary=True, threshold=threshold)
    logits = torch.tensor([[[logit(p) for p in row] for row in img] for img in BIN_PROBS]).unsqueeze(1)
    meter.update(logits, torch.tensor(BIN_TARGET))
    return meter.confusion_matrix(), meter.compute()


def test_binary_by_hand_at_threshold_half():
    confusion, m = binary_metrics(0.5)
    np.testing.assert_array_equal(confusion, [[6, 1], [1, 3]])
    assert m["val_fg_iou"] == m["val_iou_class_1"] == pytest.approx(3 / 5)
    assert m["val_iou_class_0"] == pytest.approx(6 / 8)
    assert m["val_iou"] == pytest.approx((3 / 5 + 6 / 8) / 2)
    assert m["val_dice_class_1"] == pytest.approx(6 / 8)
    assert m["val_pixel_acc"] == pytest.approx(9 / 11)
    # per image foreground IoU: 1/3, 1 (no foreground in target nor prediction), 1
    assert m["val_image_iou"] == pytest.approx(7 / 9)


def test_binary_threshold_is_applied():
    confusion, m = binary_metrics(0.7)
    np.testing.assert_array_equal(confusion, [[7, 0], [2, 2]])
    assert m["val_fg_iou"] == pytest.approx(2 / 4)
    assert m["val_image_iou"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)


def test_fully_ignored_images_are_not_counted():
    meter = ConfusionMeter(2, ignore_index=IGNORE, binary=True)
    meter.update(torch.full((2, 1, 2, 2), 5.0), torch.tensor([[[1, 1], [1, 1]], [[IGNORE] * 2] * 2]))
    assert meter.image_iou[2].item() == 1 and meter.compute()["val_image_iou"] == 1.0


# ------------------------------------------------------------------------------------------------- all_reduce
def _shard_batches(seed: int = 1, count: int = 4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        target = torch.randint(0, 3, (2, 6, 6), generator=g)
        target[torch.rand(target.shape, generator=g) < 0.1] = IGNORE
        out.append((torch.randn(2, 3, 6, 6, generator=g), target))
    return out


def _reduce_worker(rank: int, world: int, store_path: str, out_path: str):
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        meter = ConfusionMeter(3, ignore_index=IGNORE)
        for logits, target in _shard_batches()[rank::world]:
            meter.update(logits, target)
        meter.all_reduce()
        if rank == 0:
            torch.save({"confusion": meter.confusion_matrix(), "metrics": meter.compute()}, out_path)
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_gloo_processes_equals_single_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_reduce_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    reduced = torch.load(out, weights_only=False)
    single = ConfusionMeter(3, ignore_index=IGNORE)
    for logits, target in _shard_batches():
        single.update(logits, target)
    np.testing.assert_array_equal(reduced["confusion"], single.confusion_matrix())
    assert_metrics_equal(reduced["metrics"], single.compute())


def test_all_reduce_without_process_group_is_a_no_op():
    meter = multiclass_meter()
    meter.all_reduce()
    np.testing.assert_array_equal(meter.confusion_matrix(), EXPECTED_CONFUSION)
