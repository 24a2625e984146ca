"""Batch-norm statistics (issue 25): re-estimated for the weights that are judged and written,
the same on every rank, and the ones the written model carries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FAST, run_train, write_tree

from sm_effdet.training.precise_bn import (
    NORM_MOMENTUM,
    reestimate,
    set_norm_momentum,
    stats_subset,
    trained_norms,
)


class Net(torch.nn.Module):
    """A 'backbone' and a 'head', each with a batch norm; dropout before the second."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.01))
        self.head = torch.nn.Sequential(
            torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Conv2d(4, 5, 1),
            torch.nn.BatchNorm2d(5, momentum=0.01),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def batches(seed: int, count: int, size: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 9, 9, generator=generator) * 2 + 1 for _ in range(count)]


def expected_statistics(net: Net, data: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each batch norm's input captured by hooks with the whole net in eval mode (dropout off,
    earlier norms normalising with per-batch statistics computed here by hand), then the plain
    average over batches of each batch's channel mean and unbiased variance."""
    norms = {"backbone": net.backbone[1], "head": net.head[3]}
    sums = {name: [0, 0] for name in norms}
    for images in data:
        x = net.backbone[0](images)
        for name, layer in (("backbone", net.backbone[1]), ("head", None)):
            if name == "head":
                x = net.head[2](torch.relu(x))
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
            sums[name][0] += mean
            sums[name][1] += var
            if layer is not None:  # train-mode normalisation with the batch's biased variance
                bn = norms[name]
                x = (x - mean[None, :, None, None]) / torch.sqrt(
                    x.var((0, 2, 3), unbiased=False)[None, :, None, None] + bn.eps
                ) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    return {name: (m / len(data), v / len(data)) for name, (m, v) in sums.items()}


def test_statistics_are_the_average_over_batches_with_dropout_off():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.backbone[1].weight.uniform_(0.5, 2)
        net.backbone[1].bias.uniform_(-1, 1)
    net.train()
    net.head[1].eval()  # a layer another caller left in eval mode stays so
    data = batches(1, 4)
    with torch.no_grad():
        expected = expected_statistics(net, data)
    tracked = [bn.num_batches_tracked.item() for bn in (net.backbone[1], net.head[3])]

    used = reestimate(net, trained_norms(net, backbone_frozen=False), data)

    assert used == 4
    for name, bn in (("backbone", net.backbone[1]), ("head", net.head[3])):
        assert torch.allclose(bn.running_mean, expected[name][0], atol=1e-5)
        assert torch.allclose(bn.running_var, expected[name][1], rtol=1e-4)
        assert bn.momentum == 0.01
    # Modes and counters as they were.
    assert net.training and net.backbone[1].training and not net.head[1].training
    assert [bn.num_batches_tracked.item() for bn in (net.backbone[1], net.head[3])] == tracked


def test_a_frozen_backbone_keeps_its_statistics_and_no_batch_keeps_all():
    torch.manual_seed(0)
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layers = trained_norms(net, backbone_frozen=True)
    assert layers == [net.head[3]]
    reestimate(net, layers, batches(2, 2))
    after = net.state_dict()
    assert torch.equal(after["backbone.1.running_mean"], before["backbone.1.running_mean"])
    assert not torch.equal(after["head.3.running_mean"], before["head.3.running_mean"])

    again = {k: v.clone() for k, v in after.items()}
    assert reestimate(net, trained_norms(net, backbone_frozen=False), []) == 0
    assert all(torch.equal(net.state_dict()[k], v) for k, v in again.items())


def test_the_bifpn_and_head_norms_average_faster_than_effdets_and_the_backbone_keeps_timms():
    from sm_effdet.model.efficientdet import build_model

    net = build_model("tf_lite0", 2, 256, False, None).model
    before = {name: m.momentum for name, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {v for k, v in before.items() if not k.startswith("backbone.")} == {0.01}  # effdet's
    from sm_effdet.hyperparameters import parse_hyperparameters

    assert parse_hyperparameters({}).bn_momentum == NORM_MOMENTUM  # the job passes bn_momentum
    changed = set_norm_momentum(net)
    after = {name: m.momentum for name, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert changed == sum(not k.startswith("backbone.") for k in after) > 50
    assert {v for k, v in after.items() if not k.startswith("backbone.")} == {NORM_MOMENTUM} == {0.1}
    assert {k: v for k, v in after.items() if k.startswith("backbone.")} == {
        k: v for k, v in before.items() if k.startswith("backbone.")}


def test_the_statistics_subset_is_seeded_bounded_and_shared_between_ranks():
    records = list(range(50))
    subset = stats_subset(records, 20, seed=7)
    assert len(subset) == 20 == len(set(subset)) and subset == sorted(subset)
    assert subset == stats_subset(records, 20, seed=7) != stats_subset(records, 20, seed=8)
    shares = [stats_subset(records, 20, seed=7, rank=r, world_size=3) for r in range(3)]
    assert sorted(sum(shares, [])) == subset and [len(s) for s in shares] == [7, 7, 6]
    assert stats_subset(records, 500, seed=7) == records


def _rank(rank: int, store: str, counts: list[int], out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same weights on both ranks
    net = Net().train()
    used = reestimate(net, trained_norms(net, backbone_frozen=False), batches(10 + rank, counts[rank]))
    torch.save({"used": used, **{k: v for k, v in net.state_dict().items() if "running" in k}}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("counts", [[2, 2], [3, 1]])
def test_ranks_agree_on_the_average_over_all_their_batches(tmp_path, counts):
    """Two gloo processes, each its own images (and a different number of batches): both end
    with the statistics one process computes over every batch of both."""
    torch.multiprocessing.spawn(_rank, args=(str(tmp_path / "store"), counts, str(tmp_path / "out")), nprocs=2)
    results = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    net = Net().train()
    with torch.no_grad():
        expected = expected_statistics(net, batches(10, counts[0]) + batches(11, counts[1]))
    for result in results:
        assert result["used"] == sum(counts)
        for name, prefix in (("backbone", "backbone.1."), ("head", "head.3.")):
            assert torch.allclose(result[prefix + "running_mean"], expected[name][0], atol=1e-5)
            assert torch.allclose(result[prefix + "running_var"], expected[name][1], rtol=1e-4)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0] if k != "used")


# --- through the real ./train ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two epochs from scratch on generated shapes, statistics re-estimated over 8 images."""
    base = tmp_path_factory.mktemp("bn") / "opt_ml"
    write_tree(base, {**FAST, "epochs": "2", "val_fraction": "0.25", "bn_stats_images": "8"}, n_images=16)
    result = run_train(base)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return base, result.stdout + result.stderr


def test_the_written_model_carries_the_statistics_it_was_validated_with(trained):
    from safetensors.torch import load_file

    from sm_effdet.backbones import BACKBONES
    from sm_effdet.data.dataset import DetectionDataset, make_loader
    from sm_effdet.data.formats import DataReport, read_dataset
    from sm_effdet.data.transforms import eval_transform
    from sm_effdet.hyperparameters import parse_hyperparameters
    from sm_effdet.model.efficientdet import build_model
    from sm_effdet.model.preprocessing import backbone_normalization, normalize

    base, log = trained
    assert "batch-norm statistics of " in log and " re-estimated from 8 training images" in log
    assert "backbone 0.001 (backbone_lr_ratio auto: 1 for a start from scratch)" in log
    written = load_file(str(base / "model" / "model.safetensors"))
    means = {k: v for k, v in written.items() if k.endswith("running_mean")}
    variances = {k: v for k, v in written.items() if k.endswith("running_var")}
    fresh = [k for k in means if not k.startswith("backbone.")]
    assert len(fresh) > 50
    # Not the initial mean 0 and variance 1 anywhere in the BiFPN and heads (a layer's outputs
    # may be small: the heads' convolutions start with weights of standard deviation 0.01).
    assert all(means[k].abs().max() > 0 for k in fresh)
    assert all((variances[k.replace("mean", "var")] - 1).abs().max() > 0.01 for k in fresh)

    # The statistics are those of the written weights on the job's 8 images: re-estimated here,
    # from the same weights and images, they come out the same.
    hp = parse_hyperparameters(json.loads((base / "input/config/hyperparameters.json").read_text()))
    dataset = read_dataset({"training": base / "input/data/training"}, hp, DataReport())
    norm = backbone_normalization(BACKBONES[hp.backbone])
    bench = build_model(hp.backbone, len(dataset.categories), hp.img_size, False, None)
    bench.model.load_state_dict(written)
    loader = make_loader(
        DetectionDataset(stats_subset(dataset.train, 8, hp.seed), eval_transform(hp.img_size, norm["fill"]), hp.img_size),
        hp.batch_size, 0, shuffle=False, pin_memory=False,
    )
    reestimate(bench.model, trained_norms(bench.model, False),
               (normalize(b["images"], norm["mean"], norm["std"]) for b in loader))
    again = bench.model.state_dict()
    for key in [*means, *variances]:
        assert torch.allclose(again[key], written[key], rtol=1e-4, atol=1e-5), key


def test_the_written_model_predicts_what_validation_scored(trained):
    """model/inference.py on the validation images gives the detections the job kept for its
    best epoch (output/data/report/detections.json), so the same mAP."""
    from sm_effdet.model import inference

    base, _ = trained
    meta = json.loads((base / "model" / "model.json").read_text())
    kept = json.loads((base / "output" / "data" / "report" / "detections.json").read_text())
    coco = json.loads((base / "input" / "data" / "training" / "annotations.json").read_text())
    files = {image["id"]: image["file_name"] for image in coco["images"]}
    val_ids = sorted({d["image_id"] for d in kept})
    assert val_ids and meta["best_epoch"] >= 1

    model, card = inference.load_model(base / "model")
    for image_id in val_ids:
        path = base / "input" / "data" / "training" / files[image_id]
        array, size = inference.preprocessing.decode_image(path, card["img_size"])
        batch, _ = inference.preprocess([array], card)
        rows = inference.infer(model, card, batch, [size])[0]
        rows = rows[rows[:, 4] >= 0.001]
        ours = sorted((float(r[4]) for r in rows), reverse=True)
        theirs = sorted((d["score"] for d in kept if d["image_id"] == image_id), reverse=True)
        assert len(ours) == len(theirs), image_id
        assert np.allclose(ours, theirs, atol=1e-4), image_id
