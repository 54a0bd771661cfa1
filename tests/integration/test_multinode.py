"""Two "nodes" on one host: two `accelerate launch --num_machines 2 --machine_rank {0,1}`
processes with one training process each, rendezvous at 127.0.0.1, train and checkpoint.

The same run then serves test_faults: after the checkpoint, node 1's training process is
frozen (SIGSTOP: alive, sockets open, never answering) and node 0 must give up within
engine.timeout_s."""

from __future__ import annotations

import json
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.integration.test_exact_resume import Launch, latest, logged_steps, train_args, wait_for_step

# One xdist worker runs the whole module, so its module-scoped fixture runs once, not once per
# worker (Makefile, TEST_WORKERS).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("multinode")]

HANG_TIMEOUT_S = 15  # engine.timeout_s of this run


@dataclass
class TwoNodeRun:
    run: Path
    manifest: dict  # of the checkpoint at step 10
    steps_before_hang: list[int]
    node0_exit_code: int
    seconds_to_exit: float  # node 0, from freezing node 1's rank
    node0_log: str
    node1_log: str


_CACHE: dict[str, TwoNodeRun] = {}


def two_node_run(root: Path, shards: Path) -> TwoNodeRun:
    if "run" not in _CACHE:
        run = root / "two-node"
        args = train_args(run, shards, "vdm", f"engine.timeout_s={HANG_TIMEOUT_S}")
        port = free_port()
        nodes = [Launch(args, root / f"two-node-{m}.log", num_processes=2, num_machines=2, machine_rank=m, port=port)
                 for m in (0, 1)]
        try:
            rank1 = nodes[1].workers(1)[1]
            wait_for_step(nodes[0], run, 12)  # past the checkpoint at step 10
            ckpt = run / "checkpoints" / "step-00000010"
            manifest = json.loads((ckpt / "manifest.json").read_text())
            rank1.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            rc = nodes[0].wait(timeout=HANG_TIMEOUT_S + 90)
            seconds = time.monotonic() - t0
        finally:
            for n in nodes:
                n.kill()
        _CACHE["run"] = TwoNodeRun(run, manifest, logged_steps(run), rc, seconds, nodes[0].text(), nodes[1].text())
    return _CACHE["run"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, ising_shards) -> TwoNodeRun:
    return two_node_run(tmp_path_factory.mktemp("multinode"), ising_shards)


def test_two_launchers_train_and_checkpoint_with_world_size_2(two_nodes):
    m = two_nodes.manifest
    assert m["step"] == 10 and m["world_size"] == 2
    # Node 0 hosts rank 0 (writes the shared files), node 1 hosts rank 1 (its own stream/RNG files
    # and its part of the model and optimizer, DCP).
    assert {"stream-rank00000.pt", "stream-rank00001.pt", "rng-rank00001.pt",
            "ddp-vdm/.metadata", "ddp-vdm/__0_0.distcp", "ddp-vdm/__1_0.distcp"} <= set(m["files"])
    assert two_nodes.steps_before_hang[:12] == list(range(1, 13))
    assert latest(two_nodes.run).startswith("step-")
    # The two launchers really formed one world of 2 (not two worlds of 1 each writing its own run).
    assert re.search(r"train/samples_seen \S+", two_nodes.node0_log)
    rows = [json.loads(line) for line in (two_nodes.run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r.get("step") == 1 and "event" not in r)
    assert first["train/samples_seen"] == 2 * 8  # world size 2 x batch_per_rank 8
