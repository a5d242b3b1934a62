"""Launchers: local.py runs, prefixes, fails and times out cleanly; dry runs print what would run."""

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"

# What each child of local.py runs: reports its environment, then behaves as its rank is told.
CHILD = textwrap.dedent("""
    import os, subprocess, sys, time
    rank = os.environ["RECSYS_PROCESS_ID"]
    print("env", rank, os.environ["RECSYS_NUM_PROCESSES"], os.environ["RECSYS_COORDINATOR"],
          os.environ.get("JAX_NUM_CPU_DEVICES"), os.environ.get("JAX_LOCAL_DEVICE_IDS"),
          "XLA_FLAGS" in os.environ, flush=True)
    grandchild = subprocess.Popen(["sleep", "60"])
    print("pids", os.getpid(), grandchild.pid, flush=True)
    mode = sys.argv[1]
    if mode == "ok":
        grandchild.kill()
        sys.exit(0)
    if mode == "fail" and rank == "1":
        time.sleep(1)
        sys.exit(3)
    time.sleep(60)
""")


def alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def local(tmp_path, *args, mode="ok", timeout=60):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    return subprocess.run([sys.executable, str(LAUNCH / "local.py"), *args, "--",
                           sys.executable, str(script), mode],
                          capture_output=True, text=True, env=env, timeout=timeout, check=False)


def child_pids(output: str) -> list[int]:
    return [int(p) for line in re.findall(r"^\[\d\] pids (\d+) (\d+)$", output, re.MULTILINE)
            for p in line]


def test_local_runs_every_rank_with_its_environment_and_prefixed_output(tmp_path):
    result = local(tmp_path, "--num-processes", "2", "--devices-per-process", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    envs = sorted(re.findall(r"^\[(\d)\] env (\d) 2 127\.0\.0\.1:(\d+) (\S+) (\S+) (\S+)$",
                             result.stdout, re.MULTILINE))
    assert [e[:2] for e in envs] == [("0", "0"), ("1", "1")]
    assert envs[0][2] == envs[1][2]  # one coordinator port
    assert all(e[3:] == ("4", "None", "False") for e in envs)  # CPU devices; XLA_FLAGS removed


def test_local_gives_each_process_its_gpus(tmp_path):
    result = local(tmp_path, "--num-processes", "2", "--gpus-per-process", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    ids = dict(re.findall(r"^\[\d\] env (\d) .* None (\S+) False$", result.stdout, re.MULTILINE))
    assert ids == {"0": "0,1", "1": "2,3"}


def test_local_failure_stops_the_other_ranks_and_returns_its_code(tmp_path):
    start = time.monotonic()
    result = local(tmp_path, "--num-processes", "2", mode="fail")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "process 1 exited with 3" in result.stdout
    assert time.monotonic() - start < 30  # rank 0 (sleeping 60 s) was stopped
    pids = child_pids(result.stdout)
    assert len(pids) == 4 and not any(alive(p) for p in pids)


def test_local_timeout_ends_only_its_own_children(tmp_path):
    bystander = subprocess.Popen(["sleep", "60"])  # not the launcher's: must survive
    try:
        result = local(tmp_path, "--num-processes", "2", "--timeout", "3", mode="hang")
        assert result.returncode == 124, result.stdout + result.stderr
        assert "timeout after 3 s" in result.stdout
        pids = child_pids(result.stdout)
        assert len(pids) == 4 and not any(alive(p) for p in pids)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("parent_ignores_sigint", [False, True])
def test_local_interrupt_stops_children_and_exits_130(tmp_path, parent_ignores_sigint):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    # A parent that ignores SIGINT passes that on to the launcher (nohup, some CI runners).
    ignore_then_exec = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                        "os.execv(sys.argv[1], sys.argv[1:])")
    ignoring = [sys.executable, "-c", ignore_then_exec] if parent_ignores_sigint else []
    proc = subprocess.Popen([*ignoring, sys.executable, str(LAUNCH / "local.py"),
                             "--num-processes", "2", "--", sys.executable, str(script), "hang"],
                            stdout=subprocess.PIPE, text=True)
    lines = []
    while len(child_pids("".join(lines))) < 4:
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)  # a guard against a hang: stopping takes a second or two
    assert proc.returncode == 130
    assert not any(alive(p) for p in child_pids("".join(lines)))


@pytest.fixture
def fake_tools(tmp_path):
    """gcloud, kubectl and srun stand-ins that record their argv (and stdin) instead of running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "kubectl", "srun", "sbatch"):
        path = bin_dir / tool
        path.write_text(f'#!/bin/sh\nprintf "%s\\n" "{tool}" "$@" > "{tmp_path}/{tool}.argv"\n'
                        f'cat > "{tmp_path}/{tool}.stdin" 2>/dev/null || true\n')
        path.chmod(0o755)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text("")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(tmp_path / "venv")}
    return tmp_path, env


def recorded(tmp_path, tool: str) -> list[str] | None:
    path = tmp_path / f"{tool}.argv"
    return path.read_text().splitlines() if path.exists() else None


COMMAND = ["recsys", "train", "--config", "configs/quickstart.py", "--workdir", "/shared/run 1"]


def test_tpu_vm_dry_run_prints_exactly_the_gcloud_command_it_runs(fake_tools):
    tmp_path, env = fake_tools
    env = {**env, "TPU_NAME": "slice-1", "ZONE": "us-west4-a"}
    dry = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *COMMAND], capture_output=True,
                         text=True, env={**env, "DRY_RUN": "1"}, check=False)
    assert dry.returncode == 0, dry.stderr
    assert recorded(tmp_path, "gcloud") is None  # a dry run runs nothing
    argv = shlex.split(dry.stdout)
    assert argv[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "slice-1", "--zone=us-west4-a"]
    assert "--worker=all" in argv
    remote = next(a for a in argv if a.startswith("--command="))[len("--command="):]
    assert "RECSYS_DISTRIBUTED=auto" in remote
    assert shlex.split(remote.split("RECSYS_DISTRIBUTED=auto ", 1)[1]) == COMMAND
    real = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *COMMAND], capture_output=True,
                          text=True, env=env, check=False)
    assert real.returncode == 0, real.stderr
    assert recorded(tmp_path, "gcloud") == argv


def test_tpu_vm_needs_a_slice_name(fake_tools):
    _, env = fake_tools
    env.pop("TPU_NAME", None)
    result = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *COMMAND], capture_output=True,
                            text=True, env={**env, "ZONE": "z", "DRY_RUN": "1"}, check=False)
    assert result.returncode != 0 and "TPU_NAME" in result.stderr


def test_slurm_dry_run_prints_exactly_the_srun_command_it_runs(fake_tools):
    tmp_path, env = fake_tools
    dry = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *COMMAND], capture_output=True,
                         text=True, env={**env, "DRY_RUN": "1"}, check=False)
    assert dry.returncode == 0, dry.stderr
    assert recorded(tmp_path, "srun") is None
    activate, srun = [shlex.split(line) for line in dry.stdout.strip().splitlines()]
    assert activate == ["source", f"{tmp_path}/venv/bin/activate"]
    assert srun == ["srun", "--kill-on-bad-exit=1", "--label", *COMMAND]
    real = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *COMMAND], capture_output=True,
                          text=True, env=env, check=False)
    assert real.returncode == 0, real.stderr
    assert recorded(tmp_path, "srun") == srun
    sbatch_lines = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=" in sbatch_lines


GKE_TPU = ["--name", "r1", "--image", "gcr.io/p/recsys:1", "--num-hosts", "4",
           "--tpu", "tpu-v5-lite-podslice", "--topology", "4x4", "--chips-per-host", "4"]


def gke(env, *args):
    return subprocess.run([sys.executable, str(LAUNCH / "gke" / "render.py"), *args, "--",
                           *COMMAND], capture_output=True, text=True, env=env, check=False)


def manifest_of(dry_run_output: str) -> dict:
    first, *body = dry_run_output.splitlines()
    assert first == "# kubectl apply -f - <<'EOF'" and body[-1] == "EOF"
    return yaml.safe_load("\n".join(body[:-1]))


def pod_spec(manifest: dict) -> dict:
    job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 4 and job["completionMode"] == "Indexed"
    return job["template"]["spec"]


def test_gke_dry_run_renders_a_tpu_jobset_and_applies_the_same(fake_tools):
    tmp_path, env = fake_tools
    dry = gke(env, *GKE_TPU, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert recorded(tmp_path, "kubectl") is None
    manifest = manifest_of(dry.stdout)
    assert manifest["kind"] == "JobSet" and manifest["metadata"]["name"] == "r1"
    spec = pod_spec(manifest)
    assert spec["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                    "cloud.google.com/gke-tpu-topology": "4x4"}
    container = spec["containers"][0]
    assert container["command"] == COMMAND
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    env_vars = {e["name"]: e for e in container["env"]}
    assert env_vars["RECSYS_COORDINATOR"]["value"] == "r1-workers-0-0.r1:8476"
    assert env_vars["RECSYS_NUM_PROCESSES"]["value"] == "4"
    assert "job-completion-index" in env_vars["RECSYS_PROCESS_ID"]["valueFrom"]["fieldRef"][
        "fieldPath"]
    real = gke(env, *GKE_TPU)
    assert real.returncode == 0, real.stderr
    assert recorded(tmp_path, "kubectl") == ["kubectl", "apply", "-f", "-"]
    assert yaml.safe_load((tmp_path / "kubectl.stdin").read_text()) == manifest


def test_gke_gpu_pool_and_bad_shapes(fake_tools):
    _, env = fake_tools
    gpu = gke(env, "--name", "g", "--image", "img", "--num-hosts", "4", "--gpu",
              "nvidia-h100-80gb", "--gpus-per-host", "8", "--dry-run")
    assert gpu.returncode == 0, gpu.stderr
    spec = pod_spec(manifest_of(gpu.stdout))
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}
    wrong = gke(env, *GKE_TPU[:5], "2", *GKE_TPU[6:], "--dry-run")
    assert wrong.returncode == 2 and "16 chips" in wrong.stderr
