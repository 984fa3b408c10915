"""Two "nodes" on loopback: two `accelerate launch --config_file configs/accelerate/cpu_multinode_ddp.yaml
--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1 --main_process_port <free port>` started
side by side, one gloo process each (DDP on CPU), train the tiny stage-2 model.

- They match one process with the same global batch (2 nodes x batch 1 = 1 process x batch 2, the
  `dist_reference` run) to the tolerances of test_distributed.py (launch_helpers.RTOL on each step's
  loss, WEIGHT_ATOL on every exported weight; measured noise there: 1e-7 relative).
- Both nodes killed with SIGKILL (every process of both launch trees) once the step-1 checkpoint is
  complete, then relaunched with train.resume=auto, continue the uninterrupted run: the same per-step
  losses, bit for bit (the resumed steps run the same float operations in the same order, as the
  ZeRO-2 resume of test_distributed.py), and the same final weights.

Not flaky by construction: every launch pair has a deadline (a hang fails with both logs, and
the process trees are killed, whatever the outcome); a port taken between `free_port()` and
the launch is retried with another; the kill lands at any moment after the checkpoint (often
mid-step, sometimes after the run has finished), and the complete checkpoints after step 1 are
then removed, so the relaunch resumes from step 1 every time.

The shipped GPU files (multinode_ddp.yaml, multinode_zero3.yaml) and examples/ are checked for
their keys and shell syntax; they need GPUs and several hosts to run.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest
import yaml

from medvlm3d.config import config_dir
from medvlm3d.train.checkpointing import MARKER, complete_checkpoints, read_progress, step_dir
from launch_helpers import STEPS, assert_matches, free_port, launch_cmd, launch_env, losses

NODES = 2
DEADLINE_S = 540  # per launch pair (as test_distributed.py): a pair takes 20-70 s on 2 busy cores
PORT_TRIES = 3
PORT_TAKEN = ("utilizing it", "address already in use", "EADDRINUSE")
REPO = config_dir().parent


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it. torchrun starts its workers in new sessions,
    so a process-group kill would miss them: collect the tree first, then kill it."""
    if proc.poll() is not None:
        return  # exited and reaped (torchrun ends its workers first): its pid may already be reused
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in [*tree, proc]:
        try:
            p.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


def start_nodes(data: dict[str, Path], out: Path, extra: tuple[str, ...], port: int, tag: str
                ) -> tuple[list[subprocess.Popen], list[Path]]:
    procs, logs = [], []
    for rank in range(NODES):
        log = data["root"] / f"{out.name}.{tag}.node{rank}.log"
        args = ("--num_machines", str(NODES), "--machine_rank", str(rank), "--num_processes", str(NODES),
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port))
        with open(log, "w") as fh:
            procs.append(subprocess.Popen(launch_cmd("cpu_multinode_ddp.yaml", data, out, *extra, launch_args=args),
                                          cwd=REPO, env=launch_env(), stdout=fh, stderr=subprocess.STDOUT))
        logs.append(log)
    return procs, logs


def watch(procs: list[subprocess.Popen], stop_when: Callable[[], bool] | None) -> str:
    """Wait for both nodes: "done" (both exited), "failed" (one exited non-zero), "stopped"
    (stop_when() came true) or "timeout". The trees are killed in every case but "done"."""
    deadline = time.monotonic() + DEADLINE_S
    outcome = "timeout"
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                outcome = "done"
                break
            if any(c not in (None, 0) for c in codes):
                outcome = "failed"
                break
            if stop_when is not None and stop_when():
                outcome = "stopped"
                break
            time.sleep(0.02)
    finally:
        for p in procs:
            kill_tree(p)
    return outcome


def run_nodes(data: dict[str, Path], out: Path, *extra: str, tag: str = "run",
              stop_when: Callable[[], bool] | None = None) -> tuple[str, list[str]]:
    """Launch both nodes and watch them; returns the outcome ("done" or "stopped") and both logs."""
    for _ in range(PORT_TRIES):
        procs, paths = start_nodes(data, out, extra, free_port(), tag)
        outcome = watch(procs, stop_when)
        logs = [p.read_text(errors="replace") for p in paths]
        if outcome == "failed" and any(s in logs[0] for s in PORT_TAKEN):
            continue  # the port was taken between free_port() and the launch: try another
        break
    report = "\n".join(f"--- node {r} (exit {p.returncode}) ---\n{log[-3000:]}" for r, (p, log) in
                       enumerate(zip(procs, logs)))
    assert outcome in ("done", "stopped"), f"{outcome}\n{report}"
    assert not any("terminate called" in log for log in logs), report
    return outcome, logs


@pytest.fixture(scope="module")
def uninterrupted(dist_data) -> Path:
    out = dist_data["root"] / "two_nodes"
    _, logs = run_nodes(dist_data, out, "train.save_every=2", "train.keep_last=2")
    assert "MULTI_CPU, 2 process(es)" in logs[0], logs[0][-3000:]  # one distributed job, not two
    return out


@pytest.mark.slow
def test_two_nodes_match_one_process(uninterrupted, dist_reference) -> None:
    assert_matches(uninterrupted, dist_reference)
    assert read_progress(step_dir(uninterrupted, STEPS))["layout"]["processes"] == NODES


@pytest.mark.slow
def test_two_nodes_killed_resume_from_their_checkpoint(dist_data, uninterrupted, dist_reference) -> None:
    out = dist_data["root"] / "two_nodes_killed"
    first = step_dir(out, 1) / MARKER
    outcome, _ = run_nodes(dist_data, out, "train.save_every=1", tag="killed", stop_when=first.is_file)
    print(f"kill landed {'mid-run' if outcome == 'stopped' else 'after the run had finished'}")
    assert first.is_file()
    for ckpt in complete_checkpoints(out)[1:]:  # the relaunch resumes from step 1, wherever the kill landed
        shutil.rmtree(ckpt)
    shutil.rmtree(out / "final", ignore_errors=True)

    _, logs = run_nodes(dist_data, out, "train.save_every=1", "train.resume=auto", tag="resumed")
    assert f"resumed from {step_dir(out, 1)} at step 1" in logs[0], logs[0][-3000:]
    assert losses(out) == losses(uninterrupted)  # metrics.jsonl: steps 1 (before the kill) to 4
    assert read_progress(step_dir(out, STEPS))["loss_history"] == \
        read_progress(step_dir(uninterrupted, STEPS))["loss_history"]
    assert_matches(out, dist_reference)


def test_multinode_configs_have_the_launch_keys() -> None:
    acc = config_dir() / "accelerate"
    for name, kind in [("multinode_ddp", "MULTI_GPU"), ("multinode_zero3", "DEEPSPEED"),
                       ("cpu_multinode_ddp", "MULTI_GPU")]:
        cfg = yaml.safe_load((acc / f"{name}.yaml").read_text())
        assert cfg["distributed_type"] == kind and cfg["num_machines"] > 1, name
        assert cfg["num_processes"] % cfg["num_machines"] == 0, name
        assert cfg["rdzv_backend"] == "static" and cfg["same_network"] is True, name
    zero3 = yaml.safe_load((acc / "multinode_zero3.yaml").read_text())["deepspeed_config"]
    assert zero3["deepspeed_multinode_launcher"] == "standard"  # torchrun on each node: what srun starts
    assert (REPO / zero3["deepspeed_config_file"]).is_file()


def test_multinode_examples_parse() -> None:
    examples = REPO / "examples"
    for script in ["slurm_multinode.sh", "deepspeed_multinode.sh"]:
        text = (examples / script).read_text()
        subprocess.run(["bash", "-n", str(examples / script)], check=True, timeout=30)
        assert "accelerate launch" in text and "-m medvlm3d.train" in text, script
    slurm = (examples / "slurm_multinode.sh").read_text()
    for needed in ["#SBATCH --nodes", "#SBATCH --ntasks-per-node=1", "srun", "--machine_rank", "$SLURM_NODEID",
                   "scontrol show hostnames", "configs/accelerate/multinode_"]:
        assert needed in slurm, needed
    hosts = [line.split() for line in (examples / "hostfile").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert len(hosts) >= 2 and all(len(h) == 2 and h[1].startswith("slots=") for h in hosts), hosts
