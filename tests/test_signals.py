"""Stop signals as launchers, terminals and schedulers send them, and one run per run dir.

Each test starts real processes in their own process group (a terminal's foreground job,
``setsid``, ``timeout`` and Slurm's tasks are groups) and signals the whole group with
``os.killpg``, so the DataLoader workers get the signal too, as they do in the field.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipline.launch.lock import LOCK_FILE, DirLock
from clipline.pretrain.checkpoint import consolidated_state, list_checkpoints
from tests.helpers import free_port, make_shards, micro_recipe, to_toml

TIMEOUT = 240  # seconds for one run on a loaded 2-core machine; never a measured figure


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("signals") / "shards", n=96, per_shard=16)


def _recipe(path: Path, shards: Path, run_dir: str | Path, **loop) -> Path:
    recipe = micro_recipe(shards, Path(run_dir), **{"checkpoint_every": 1000, **loop})
    recipe["run_dir"] = str(run_dir)  # as given: relative paths stay relative
    recipe["data"]["workers"] = 1  # the group's signal also reaches a worker process
    path.write_text(to_toml(recipe))
    return path


class Run:
    """A command started as its own process group, stderr kept in a file to read live."""

    def __init__(self, cmd: list[str], cwd: Path, name: str, env: dict | None = None):
        self.err_path = cwd / f"{name}.err"
        self.proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=open(self.err_path, "w"),  # noqa: SIM115 - the child owns it
            start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)  # what a terminal's Ctrl-C, `kill -- -PGID` do

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"still running after {timeout}s:\n{self.err[-4000:]}") from None

    def wait_for(self, ready, what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                if self.proc.poll() is None:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                raise AssertionError(f"never {what} (rc {self.proc.poll()}):\n{self.err[-4000:]}")
            time.sleep(0.05)


def pretrain(recipe: Path, *args: str, cwd: Path, name: str) -> Run:
    cmd = [sys.executable, "-m", "clipline", "pretrain", "--recipe", str(recipe), *args]
    return Run(cmd, cwd, name)


def torchrun_pretrain(recipe: Path, *args: str, cwd: Path, name: str) -> Run:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [f"--master_port={free_port()}", "-m", "clipline", "pretrain", "--recipe", str(recipe)]
    return Run([*cmd, *args], cwd, name)


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def past_step(run_dir: Path, step: int):
    return lambda: any(r.get("step", 0) >= step for r in rows(run_dir))


def saved_steps(run_dir: Path) -> list[int]:
    return [json.loads((c / "state.json").read_text())["step"] for c in list_checkpoints(run_dir)]


def no_crash(err: str) -> None:
    assert "DataLoader worker" not in err, err[-4000:]
    assert "KeyboardInterrupt" not in err and "Traceback" not in err, err[-4000:]


def _same_run(run_a: Path, run_b: Path, steps: int) -> None:
    """Equal losses at every step and equal final weights."""
    want = {r["step"]: r["train/loss"] for r in rows(run_a) if "train/loss" in r}
    got = {r["step"]: r["train/loss"] for r in rows(run_b) if "train/loss" in r}
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    w_a = consolidated_state(list_checkpoints(run_a)[-1])
    w_b = consolidated_state(list_checkpoints(run_b)[-1])
    for k in w_a:
        torch.testing.assert_close(w_b[k], w_a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_process_group_sigterm_saves_and_the_resume_equals_the_uninterrupted_run(shards, tmp_path):
    steps = 24
    full = pretrain(
        _recipe(tmp_path / "full.toml", shards, "full", steps=steps), cwd=tmp_path, name="full"
    )
    recipe = _recipe(tmp_path / "killed.toml", shards, "killed", steps=steps)
    killed = pretrain(recipe, cwd=tmp_path, name="killed")  # relative run_dir: cwd/killed
    killed.wait_for(past_step(tmp_path / "killed", 3), "reached step 3")
    killed.signal_group(signal.SIGTERM)  # `kill -TERM -- -PGID`: trainer and worker alike
    assert killed.wait() == 143, killed.err[-4000:]
    no_crash(killed.err)
    assert killed.err.count("SIGTERM: saving a checkpoint after this step") == 1
    (stopped_at,) = saved_steps(tmp_path / "killed")
    assert 3 <= stopped_at < steps

    resumed = pretrain(recipe, "--resume", "latest", cwd=tmp_path, name="resumed")
    assert resumed.wait() == 0, resumed.err[-4000:]
    assert full.wait() == 0, full.err[-4000:]
    _same_run(tmp_path / "full", tmp_path / "killed", steps)


def test_ctrl_c_says_it_is_saving_saves_and_exits_130(shards, tmp_path):
    recipe = _recipe(tmp_path / "r.toml", shards, tmp_path / "run", steps=200)
    run = pretrain(recipe, cwd=tmp_path, name="run")
    run.wait_for(past_step(tmp_path / "run", 2), "reached step 2")
    run.signal_group(signal.SIGINT)  # a terminal's Ctrl-C goes to the foreground group
    assert run.wait() == 130, run.err[-4000:]
    no_crash(run.err)
    assert run.err.count("saving a checkpoint") == 1
    assert (
        "clipline: SIGINT: saving a checkpoint after this step, then stopping (Ctrl-C again to "
        "stop at once without one)\n" in run.err
    )
    (stopped_at,) = saved_steps(tmp_path / "run")
    assert f"stopped by a signal after step {stopped_at}; checkpoint saved" in run.err


def test_a_second_ctrl_c_stops_at_once_even_while_data_stalls(shards, tmp_path):
    recipe = _recipe(tmp_path / "r.toml", shards, tmp_path / "run", steps=200)
    run = pretrain(recipe, cwd=tmp_path, name="run")
    run.wait_for(past_step(tmp_path / "run", 2), "reached step 2")
    # Stall the data (a hung read): the trainer soon waits for a batch, and no step ends.
    (worker,) = subprocess.check_output(["pgrep", "-P", str(run.proc.pid)], text=True).split()
    os.kill(int(worker), signal.SIGSTOP)
    try:
        seen = [-1]
        while len(seen) < 4 or len(set(seen[-4:])) > 1:  # no step has ended for 3 s
            time.sleep(1.0)
            seen.append(len(rows(tmp_path / "run")))
        run.signal_group(signal.SIGINT)
        run.wait_for(lambda: "saving a checkpoint" in run.err, "said it is saving")
        time.sleep(0.7)  # a person's second press, not one press delivered twice
        run.signal_group(signal.SIGINT)
        run.wait_for(lambda: "interrupted" in run.err, "stopped")
    finally:
        # The stopped worker cannot take part in its loader's shutdown; a hung one would be
        # ended by its loader, as test_a_stuck_worker_is_still_ended_by_its_loader checks.
        os.kill(int(worker), signal.SIGKILL)
    assert run.wait() == 130, run.err[-4000:]
    assert "interrupted (second Ctrl-C: stopped at once, without a checkpoint)" in run.err
    assert saved_steps(tmp_path / "run") == []  # the stalled step never ended


SLOW_LOADER = """
import signal, time
import torch
from clipline.data.worker_signals import shield_worker, start_workers

class Slow(torch.utils.data.IterableDataset):
    def __iter__(self):
        for i in range(4):
            time.sleep(0.5 if i < 3 else 3600)  # the fourth item hangs
            yield i

got = set()
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # the trainer's handlers
    signal.signal(s, lambda signum, frame: got.add(signal.Signals(signum).name))
loader = torch.utils.data.DataLoader(Slow(), num_workers=1, worker_init_fn=shield_worker)
it = start_workers(loader)
print("ready", flush=True)
print([int(next(it)) for _ in range(3)], sorted(got), flush=True)
del it  # torch joins the hung worker for a while, then ends it with SIGTERM (terminate())
print("ended", flush=True)
"""


def test_a_worker_outlives_its_groups_signals_and_is_still_ended_by_its_loader(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(SLOW_LOADER)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            os.killpg(proc.pid, sig)  # to the process and its (maybe still starting) worker
            time.sleep(0.1)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["[0, 1, 2] ['SIGINT', 'SIGTERM', 'SIGUSR1']", "ended"], err
    assert "Traceback" not in err, err


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def test_a_second_pretrain_into_a_live_run_dir_fails_naming_the_holder(shards, tmp_path):
    recipe = _recipe(tmp_path / "r.toml", shards, "run", steps=10_000, checkpoint_every=2)
    holder = pretrain(recipe, cwd=tmp_path, name="holder")  # run_dir "run", relative
    holder.wait_for(lambda: saved_steps(tmp_path / "run"), "saved a checkpoint")
    os.kill(holder.proc.pid, signal.SIGSTOP)  # alive and holding, but writing nothing more
    try:
        before = _snapshot(tmp_path / "run")
        # The same directory, spelt absolute, under torchrun: every rank must fail promptly
        # (none waiting in a collective), and nothing in the directory may change.
        second = torchrun_pretrain(recipe, f"run_dir={tmp_path / 'run'}", cwd=tmp_path, name="2")
        assert second.wait() != 0, second.err[-4000:]
        assert _snapshot(tmp_path / "run") == before
        holder_is = f"PID {holder.proc.pid} on host {socket.gethostname()}"
        refusals = [ln for ln in second.err.splitlines() if "another clipline pretrain" in ln]
        assert len(refusals) == 2, second.err[-4000:]  # one line per rank, no traceback
        assert all(ln.startswith("clipline pretrain: error: ") for ln in refusals), refusals
        assert all(holder_is in ln for ln in refusals), (holder_is, refusals)
    finally:
        os.kill(holder.proc.pid, signal.SIGKILL)  # a crash: its lock goes with it
    holder.wait()
    # At once, although the killed holder's DataLoader worker lives on for a few seconds.
    with DirLock(tmp_path / "run" / LOCK_FILE, busy="the killed holder still has it"):
        pass

    step = saved_steps(tmp_path / "run")[-1]
    resumed = pretrain(
        recipe, "--resume", "latest", f"loop.steps={step + 2}", cwd=tmp_path, name="resumed"
    )
    assert resumed.wait() == 0, resumed.err[-4000:]
    assert saved_steps(tmp_path / "run")[-1] == step + 2


@pytest.mark.parametrize(
    ("sig", "code", "check_resume"),
    [(signal.SIGINT, 130, True), (signal.SIGTERM, 143, False)],  # Ctrl-C; `kill -- -PGID`
    ids=["ctrl-c", "sigterm"],
)
def test_torchrun_signalled_saves_on_every_rank_and_each_exits_128_plus_signal(
    shards, tmp_path, sig, code, check_resume
):
    steps = 16
    if check_resume:
        full = torchrun_pretrain(
            _recipe(tmp_path / "full.toml", shards, "full", steps=steps), cwd=tmp_path, name="full"
        )
    recipe = _recipe(tmp_path / "r.toml", shards, "run", steps=steps)
    # Each rank is `python -m clipline pretrain` in a shell that records its exit status; the
    # shell is in the rank's process group, where torchrun sends what it forwards, so it
    # traps the signals (`:`; its child starts with the default handlers all the same).
    rank = 'trap : INT TERM; python -m clipline pretrain "$@"; echo $? > "rc.$RANK"'
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [f"--master_port={free_port()}", "--no-python", "bash", "-c", rank, "rank"]
    run = Run(
        [*cmd, "--recipe", str(recipe)],
        tmp_path,
        "torchrun",
        env={"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    run.wait_for(past_step(tmp_path / "run", 2), "reached step 2")
    run.signal_group(sig)  # torchrun's group: a terminal's foreground job, or kill -- -PGID
    assert run.wait() == 1, run.err[-4000:]  # torchrun's own status after forwarding a signal
    assert [(tmp_path / f"rc.{r}").read_text() for r in (0, 1)] == [f"{code}\n"] * 2
    assert "DataLoader worker" not in run.err and "KeyboardInterrupt" not in run.err
    assert run.err.count("saving a checkpoint") == 1  # rank 0 speaks for all
    (ckpt,) = list_checkpoints(tmp_path / "run")
    state = json.loads((ckpt / "state.json").read_text())
    assert 2 <= state["step"] < steps
    assert len(state["stream"]) == 2  # both ranks took part in the save
    assert f"stopped by a signal after step {state['step']}; checkpoint saved" in run.err
    assert "forcefully" not in run.err  # no rank needed torchrun's SIGKILL

    if check_resume:
        resumed = torchrun_pretrain(recipe, "--resume", "latest", cwd=tmp_path, name="resumed")
        assert resumed.wait() == 0, resumed.err[-4000:]
        assert full.wait() == 0, full.err[-4000:]
        _same_run(tmp_path / "full", tmp_path / "run", steps)
