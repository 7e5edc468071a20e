"""Launch files: the Accelerate configs pass through `accelerate launch`'s own code, and the
Slurm script forwards the pre-emption warning and requeues (run against fake srun/scontrol)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, patch_environment
from accelerate.utils import launch as accelerate_launch
from accelerate.utils.launch import _filter_args
from torch.distributed import run as distrib_run

from clipline.pretrain.checkpoint import list_checkpoints
from tests.helpers import free_port, make_shards, micro_recipe, to_toml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "launch" / "accelerate"
SBATCH = REPO / "launch" / "slurm" / "pretrain.sbatch"

# name -> (distributed_type, machines, processes per machine)
EXPECTED = {
    "single_gpu.yaml": (DistributedType.NO, 1, 1),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, 1, 8),
    "multi_node.yaml": (DistributedType.MULTI_GPU, 2, 8),
    "fsdp.yaml": (DistributedType.FSDP, 1, 8),
    "multi_node_fsdp.yaml": (DistributedType.FSDP, 2, 8),
}
FSDP_CONFIGS = [n for n, (kind, _, _) in EXPECTED.items() if kind == DistributedType.FSDP]


def _launch_args(config: Path, *flags: str):
    """What `accelerate launch --config_file CONFIG FLAGS -m clipline pretrain` resolves to."""
    argv = ["--config_file", str(config), *flags, "-m", "clipline", "pretrain"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    return args


def _rank_env(args) -> dict[str, str]:
    """The environment the launcher gives each rank (without binding a port)."""
    with mock.patch.object(accelerate_launch, "is_port_in_use", return_value=False):
        return accelerate_launch.prepare_multi_gpu_env(args)


def test_the_shipped_configs_are_the_expected_ones():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_process_counts_agree(name):
    path = CONFIGS / name
    text = path.read_text()
    assert isinstance(yaml.safe_load(text), dict)
    # The header documents the launch command for this very file.
    assert text.startswith("#") and f"--config_file launch/accelerate/{name}" in text

    kind, machines, per_machine = EXPECTED[name]
    cfg = load_config_from_file(str(path))  # what `accelerate launch --config_file` calls
    assert isinstance(cfg, ClusterConfig)
    # A str in the YAML; an unquoted NO would load as False and stay False.
    assert cfg.distributed_type == kind and isinstance(cfg.distributed_type, DistributedType)
    assert cfg.num_machines == machines
    # num_processes is the total: accelerate gives each node num_processes // num_machines.
    assert cfg.num_processes == machines * per_machine

    args = _launch_args(path)
    if kind == DistributedType.NO:  # `accelerate launch` runs the one process itself
        cmd, env = accelerate_launch.prepare_simple_launcher_cmd_env(args)
        assert cmd[-3:] == ["-m", "clipline", "pretrain"]
    else:
        env = _rank_env(args)
        assert args.nproc_per_node == str(per_machine)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env.get("ACCELERATE_USE_FSDP") == ("true" if kind == DistributedType.FSDP else None)


@pytest.mark.parametrize("name", ["multi_node.yaml", "multi_node_fsdp.yaml"])
def test_multi_node_placeholders_are_overridden_by_the_sbatch_flags(name):
    flags = ["--num_machines", "4", "--num_processes", "32", "--machine_rank", "3"]
    flags += ["--main_process_ip", "node0", "--main_process_port", "23456"]
    args = _launch_args(CONFIGS / name, *flags)
    _rank_env(args)
    # With the sbatch's PET_SIGNALS_TO_HANDLE, torchrun's agent (which `accelerate launch`
    # runs in-process) also forwards SIGUSR1 to the ranks instead of dying from it.
    with patch_environment(PET_SIGNALS_TO_HANDLE="SIGTERM,SIGUSR1"):
        torchrun = _filter_args(args, distrib_run.get_args_parser(), ["--training_script", "x"])
    assert (torchrun.nnodes, torchrun.nproc_per_node, torchrun.node_rank) == ("4", "8", 3)
    assert (torchrun.rdzv_backend, torchrun.rdzv_endpoint) == ("static", "node0:23456")
    assert torchrun.signals_to_handle == "SIGTERM,SIGUSR1"


@pytest.mark.parametrize("name", FSDP_CONFIGS)
def test_fsdp_config_reaches_the_plugin_as_fsdp2(name):
    path = CONFIGS / name
    # accelerate checks only the top-level keys; a misspelt fsdp_* key is silently dropped.
    launch_flags = {a.dest for a in launch_command_parser()._actions}
    unknown = set(yaml.safe_load(path.read_text())["fsdp_config"]) - launch_flags
    assert not unknown, f"not `accelerate launch` options (ignored by accelerate): {unknown}"

    env = _rank_env(_launch_args(path))
    with patch_environment(**{k: v for k, v in env.items() if k.startswith("FSDP_")}):
        plugin = FullyShardedDataParallelPlugin()  # what Accelerator() builds in each rank
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's FULL_SHARD
    assert plugin.transformer_cls_names_to_wrap is None  # the model's _no_split_modules
    assert plugin.cpu_ram_efficient_loading is False


def test_fsdp_units_are_each_towers_blocks():
    from clipline.pretrain.model import DualEncoder, ModelConfig

    model = DualEncoder.from_config(ModelConfig(name="clipline:tiny", image_tower="timm:resnet18"))
    assert model._no_split_modules == ["BasicBlock", "ResidualAttentionBlock"]


def test_sbatch_parses_and_has_the_requeue_plumbing():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    directives = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert any("--signal=" in d and "USR1@" in d for d in directives)
    assert any(d.split()[1] == "--requeue" for d in directives)
    assert any(d.split()[1] == "--ntasks-per-node=1" for d in directives)
    assert "--resume latest" in text and "scontrol requeue" in text


# A fake cluster for the sbatch script. srun runs the per-node command once, as node
# $FAKE_NODEID (default 1), in its own process group, as slurmstepd runs each task, and passes
# USR1/TERM on to that whole group, as Slurm does. scancel --signal=SIG signals each task's
# group (not the batch shell, as Slurm does without --batch/--full). scontrol records requeues.
# The fake "launcher" records its arguments and, like torchrun's agent, exits 1 after USR1.
FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$SIM/log"
while [[ $1 == --* ]]; do shift; done
set -m  # job control: the task gets a process group of its own
# Traps first, as real srun has its handlers before it starts a task: the task may be ready
# (and the batch shell forward a signal) before this shell runs its next line.
task= pending=
forward() { if [[ -n $task ]]; then kill -s "$1" -- "-$task"; else pending=$1; fi; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
SLURM_NODEID=${FAKE_NODEID:-1} "$@" &
task=$!
if [[ -n $pending ]]; then kill -s "$pending" -- "-$task"; fi
echo "$task" >> "$SIM/task_groups"
while :; do wait $task; rc=$?; kill -0 $task 2>/dev/null || exit $rc; done
"""
FAKE_SCANCEL = """#!/bin/bash
echo "scancel $*" >> "$SIM/log"
sig=${1#--signal=}
while read -r group; do kill -s "$sig" -- "-$group"; done < "$SIM/task_groups"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$SIM/log"
if [[ $1 == show ]]; then printf '%s\\n' ${FAKE_HOSTS:-gpu-a gpu-b}; fi
"""
FAKE_LAUNCHER = """#!/bin/bash
printf '%s\\n' "$(basename "$0")" "$@" > "$SIM/argv"
trap 'echo "launcher got USR1" >> "$SIM/log"; exit 1' USR1
touch "$SIM/ready"
if [[ $FAKE_EXIT != wait ]]; then exit "$FAKE_EXIT"; fi
for _ in $(seq 300); do sleep 0.05; done
"""


@pytest.fixture
def cluster(tmp_path):
    for rel, body in [
        ("bin/srun", FAKE_SRUN),
        ("bin/scontrol", FAKE_SCONTROL),
        ("bin/scancel", FAKE_SCANCEL),
        ("venv/bin/accelerate", FAKE_LAUNCHER),
        ("venv/bin/torchrun", FAKE_LAUNCHER),
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(body)
        (tmp_path / rel).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PET_"))}
    env |= {
        "PATH": f"{tmp_path / 'bin'}:{env['PATH']}",
        "SIM": str(tmp_path),
        "CLIPLINE_VENV": str(tmp_path / "venv"),
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_CPUS_PER_TASK": "16",
    }

    def submit(exit_code="wait", signal_after_start=False, **extra):
        proc = subprocess.Popen(
            ["bash", str(SBATCH), "--recipe", "vit-b-32-cc3m", "data.shards=/my data"],
            env=env | {"FAKE_EXIT": exit_code} | extra,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if signal_after_start:  # Slurm's --signal=B:USR1 goes to the batch shell
            deadline = time.monotonic() + 20
            while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=30)
        log, argv = tmp_path / "log", tmp_path / "argv"
        log = log.read_text() if log.exists() else ""
        argv = argv.read_text().splitlines() if argv.exists() else []
        return proc.returncode, out, log, argv

    def start(*args: str, **extra: str) -> subprocess.Popen:
        """The batch shell, started with ``args`` and running on, as Slurm starts it."""
        return subprocess.Popen(
            ["bash", str(SBATCH), *args],
            env=env | extra,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    submit.start, submit.env, submit.sim = start, env, tmp_path
    return submit


def test_sbatch_forwards_the_warning_and_requeues(cluster):
    rc, out, log, argv = cluster(signal_after_start=True)
    assert rc == 0, out
    assert "launcher got USR1" in log and "scontrol requeue 4242" in log, out
    # One launcher per node, each with its own node's rank (expanded on the node, not here).
    srun = next(ln for ln in log.splitlines() if ln.startswith("srun "))
    assert "--ntasks-per-node=1" in srun and "--nodes=2" in srun and "--cpus-per-task=16" in srun
    assert argv[:2] == ["accelerate", "launch"]
    module = argv.index("-m")
    assert dict(zip(argv[2:module:2], argv[3:module:2], strict=True)) == {
        "--config_file": "launch/accelerate/multi_node.yaml",
        "--num_machines": "2",
        "--num_processes": "16",
        "--machine_rank": "1",
        "--main_process_ip": "gpu-a",
        "--main_process_port": str(20000 + 4242),
    }
    # The user's arguments arrive intact, with --resume latest last so that it wins.
    assert argv[module:] == [
        "-m",
        "clipline",
        "pretrain",
        "--recipe",
        "vit-b-32-cc3m",
        "data.shards=/my data",
        "--resume",
        "latest",
    ]


@pytest.mark.parametrize(
    ("exit_code", "requeued", "expected_rc"),
    # 143 without the USR1 warning: a rank saved after scancel --signal=TERM, stop for good.
    [("0", False, 0), ("2", False, 2), ("143", False, 143)],
)
def test_sbatch_requeues_only_preempted_runs(cluster, exit_code, requeued, expected_rc):
    rc, out, log, _ = cluster(exit_code=exit_code)
    assert rc == expected_rc, out
    assert ("scontrol requeue" in log) is requeued, out


def test_sbatch_stops_requeueing_after_max_requeues(cluster):
    rc, out, log, _ = cluster(signal_after_start=True, SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    assert rc == 1 and "scontrol requeue" not in log and "giving up" in out, out


def test_sbatch_torchrun_launcher(cluster):
    rc, out, _, argv = cluster(exit_code="0", LAUNCHER="torchrun")
    assert rc == 0, out
    assert argv[:9] == [
        "torchrun",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "8",
        "--node_rank",
        "1",
        "--master_addr",
        "gpu-a",
    ]
    assert argv[-2:] == ["--resume", "latest"]


# The same script with the fake srun running a real torchrun (2 gloo CPU ranks on one node)
# and a real, tiny `clipline pretrain`, each rank with a DataLoader worker.
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("sbatch") / "shards", n=64, per_shard=16)


def _real_job(cluster, shards: Path) -> subprocess.Popen:
    submit_dir = Path(cluster.sim)
    recipe = micro_recipe(shards, Path("run"), steps=10_000, checkpoint_every=10_000)
    recipe["run_dir"] = "run"  # relative: the job runs in the submit directory
    recipe["data"]["workers"] = 1
    (submit_dir / "recipe.toml").write_text(to_toml(recipe))
    return cluster.start(
        "--recipe",
        "recipe.toml",
        LAUNCHER="torchrun",
        CLIPLINE_VENV=str(Path(sys.executable).parents[1]),
        GPUS_PER_NODE="2",
        SLURM_NNODES="1",
        FAKE_NODEID="0",
        FAKE_HOSTS="127.0.0.1",
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
    )


def _when_training(job: subprocess.Popen, run_dir: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            raise AssertionError(f"the job never trained:\n{job.communicate()[0][-4000:]}")
        time.sleep(0.05)


def _saved(run_dir: Path) -> dict:
    (ckpt,) = list_checkpoints(run_dir)
    return json.loads((ckpt / "state.json").read_text())


def test_sbatch_usr1_warning_checkpoints_every_rank_and_requeues(cluster, shards):
    job = _real_job(cluster, shards)
    run_dir = Path(cluster.sim) / "run"
    _when_training(job, run_dir)
    job.send_signal(signal.SIGUSR1)  # --signal=B:USR1@120: to the batch shell only
    out, _ = job.communicate(timeout=240)
    log = (Path(cluster.sim) / "log").read_text()
    assert job.returncode == 0, out[-4000:]
    assert "scontrol requeue 4242" in log, out[-4000:]
    assert "clipline: SIGUSR1: saving a checkpoint after this step" in out
    assert "DataLoader worker" not in out and "forcefully" not in out, out[-4000:]
    state = _saved(run_dir)
    assert len(state["stream"]) == 2  # both ranks saved their stream position
    assert f"stopped by a signal after step {state['step']}; checkpoint saved" in out


def test_sbatch_scancel_term_saves_every_rank_and_is_not_requeued(cluster, shards):
    job = _real_job(cluster, shards)
    run_dir = Path(cluster.sim) / "run"
    _when_training(job, run_dir)
    # scancel --signal=TERM: Slurm signals each task's process group (torchrun's here).
    subprocess.run(["scancel", "--signal=TERM", "4242"], env=cluster.env, check=True)
    out, _ = job.communicate(timeout=240)
    log = (Path(cluster.sim) / "log").read_text()
    assert job.returncode == 1, out[-4000:]  # torchrun's status after forwarding a signal
    assert "scontrol requeue" not in log and "not requeueing" in out, out[-4000:]
    assert "clipline: SIGTERM: saving a checkpoint after this step" in out
    assert "DataLoader worker" not in out and "forcefully" not in out, out[-4000:]
    state = _saved(run_dir)
    assert len(state["stream"]) == 2
    assert f"stopped by a signal after step {state['step']}; checkpoint saved" in out
