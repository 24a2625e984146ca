"""Several instances: two ./train processes on this machine, each its own /opt/ml, over gloo."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import FAST, failure_text, model_files, start_train, write_tree

HOSTS = ["127.0.0.1", "localhost"]  # both resolve to this machine


def free_port_pair() -> int:
    """A port whose successor is free too (rendezvous + the failure watchdog's store)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def node(base: Path, host: str, hyperparameters: dict, n_images: int = 28) -> Path:
    write_tree(base, hyperparameters, n_images=n_images)  # the same data on every node
    (base / "input" / "config" / "resourceconfig.json").write_text(
        json.dumps({"current_host": host, "hosts": HOSTS, "network_interface_name": "lo"})
    )
    return base


def start(base: Path, port: int) -> subprocess.Popen:
    # Two "hosts" share this machine's cores: one thread each avoids oversubscription.
    return start_train(base, MASTER_PORT=str(port), OMP_NUM_THREADS="1")


def test_layout_from_resourceconfig(tmp_path, monkeypatch):
    from sm_effdet.environment import Paths, read_environment
    from sm_effdet.errors import UserInputError
    from sm_effdet.training.distributed import plan_layout, resolve

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    paths = Paths(tmp_path)
    paths.input_config.mkdir(parents=True)
    paths.resource_config_file.write_text(json.dumps(
        {"current_host": "algo-2", "hosts": ["algo-1", "algo-2", "algo-3"], "network_interface_name": "eth0"}))
    env = read_environment(paths)
    layout = plan_layout(env, "auto", gpus=4)
    assert (layout.num_nodes, layout.processes_per_node, layout.world_size) == (3, 4, 12)
    assert (layout.node_rank, layout.global_rank, layout.backend) == (1, 4, "nccl")
    assert (layout.master_addr, layout.master_port) == ("algo-1", 7777)
    assert plan_layout(env, 2, gpus=4).world_size == 6
    assert plan_layout(env, "auto", gpus=0).backend == "gloo"
    with pytest.raises(UserInputError, match="'devices' is 8 but this instance has 4 GPU"):
        plan_layout(env, 8, gpus=4)
    with pytest.raises(UserInputError, match="host 'no-such-host.invalid' from resourceconfig.json did not resolve within 1 s"):
        resolve("no-such-host.invalid", timeout_s=1)


def test_two_nodes_train_one_model_together(tmp_path):
    hp = {**FAST, "batch_size": "2", "val_fraction": "0.25"}
    master = node(tmp_path / "master", HOSTS[0], hp)
    worker = node(tmp_path / "worker", HOSTS[1], hp)
    port = free_port_pair()
    jobs = [start(master, port), start(worker, port)]
    logs = [job.communicate(timeout=600)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    for rank, log in enumerate(logs):
        assert re.search(rf"layout: 2 node\(s\) x 1 process\(es\) = world size 2, backend gloo, this process: global rank {rank}", log)
        # 21 training images over 2 ranks: 11 each, the sampler repeating one to even them out
        seen = re.search(rf"rank {rank} trained on (\d+) images in epoch 1 \((\d+) on all 2 ranks\)", log)
        assert seen, log[-3000:]
        assert int(seen.group(1)) == 11 and int(seen.group(2)) == 22
    # Only the master writes: the model, the report and the metric lines.
    assert model_files(master) == ["inference.py", "model.json", "model.safetensors", "model_card.py", "preprocessing.py"]
    assert model_files(worker) == []
    assert (master / "output" / "data" / "data_report.json").exists()
    assert not (worker / "output" / "data" / "data_report.json").exists()
    assert "epoch=1/1 " in logs[0] and "epoch=1/1 " not in logs[1]
    # The validation mAP covers each of the 7 validation images exactly once.
    assert re.search(r"epoch=1/1 .*valid_images=7\b", logs[0]), logs[0][-2000:]
    meta = json.loads((master / "model" / "model.json").read_text())
    assert meta["world_size"] == 2 and meta["metrics"]["valid_images"] == 7


def test_a_failing_rank_ends_the_other_quickly(tmp_path):
    hp = {**FAST, "batch_size": "2"}
    master = node(tmp_path / "master", HOSTS[0], hp, n_images=8)
    worker = node(tmp_path / "worker", HOSTS[1], hp, n_images=8)
    (worker / "input" / "config" / "inputdataconfig.json").unlink()
    for image in (worker / "input" / "data" / "training" / "images").iterdir():
        image.unlink()
    (worker / "input" / "data" / "training" / "annotations.json").unlink()
    port = free_port_pair()
    jobs = [start(master, port), start(worker, port)]
    worker_log = jobs[1].communicate(timeout=300)[0]
    failed_at = time.monotonic()
    assert jobs[1].returncode == 2, worker_log[-2000:]
    jobs[0].communicate(timeout=120)
    assert time.monotonic() - failed_at < 60
    assert jobs[0].returncode != 0
    reason = failure_text(master).splitlines()[0]
    assert reason.startswith("training stopped because rank 1 on localhost failed: no COCO annotation file"), reason
    assert model_files(master) == []


def _freezing_rank(rank: int, store: str, out: str) -> None:
    import torch

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same weights on both ranks
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    backbone = net[0]
    # As job.py wraps a model whose backbone may freeze: every parameter trainable at wrap time.
    ddp = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    data = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(5))
    grads = {}
    for step, frozen in enumerate([True, True, False]):
        backbone.requires_grad_(not frozen)
        net.zero_grad(set_to_none=True)
        ddp(data[rank] * (step + 1)).square().sum().backward()
        grads[step] = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
    torch.save(grads, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_a_frozen_backbone_has_no_gradients_under_ddp_and_thaws_averaged(tmp_path):
    """Freezing by requires_grad (training/lightning_module.py) under DDP with
    find_unused_parameters (job.py): while frozen no rank computes or receives a backbone
    gradient; once thawed both get the average of the two ranks' gradients, as every layer does."""
    import torch

    torch.multiprocessing.spawn(_freezing_rank, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    # The average each gradient should be, computed here in one process without DDP.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    data = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(5))
    for step, frozen in enumerate([True, True, False]):
        local = []
        for rank in range(2):
            net.zero_grad(set_to_none=True)
            net(data[rank] * (step + 1)).square().sum().backward()
            local.append({n: p.grad.clone() for n, p in net.named_parameters()})
        for name in local[0]:
            got = [ranks[r][step][name] for r in range(2)]
            if frozen and name.startswith("0."):
                assert got == [None, None], (step, name)
            else:
                average = (local[0][name] + local[1][name]) / 2
                assert all(g is not None and torch.allclose(g, average, atol=1e-6) for g in got), (step, name)
