"""`ray job submit --runtime-env ray_job.yaml` against a Ray head started here on 127.0.0.1.

The head gets its own temp dir and free ports, runs in its own process group (`ray start --block`
in a new session) and is stopped by PID at the end: never `ray stop`, which would kill every Ray
on the machine. Token authentication is on (Ray's default): the CLI needs RAY_AUTH_MODE=token.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def test_ray_job_yaml_pins_match_pyproject():
    """The runtime env's pip list must install what pyproject pins (GPU flavour: vllm + its torch)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.importorskip("tomli")
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime_env = yaml.safe_load((REPO / "ray_job.yaml").read_text())
    packages = [p.split("#")[0].strip() for p in runtime_env["pip"]["packages"]]
    expected = [d for d in project["dependencies"] if not d.startswith("torch")]
    expected += project["optional-dependencies"]["gpu"]
    assert sorted(p for p in packages if not p.startswith("torch==")) == sorted(expected)
    assert any(p.startswith("torch==") for p in packages)
    assert {".venv/", ".git/", "runs/"} <= set(runtime_env["excludes"])


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


# At the teardown's SIGTERM, `ray start` would ask the GCS (SIGTERMed too, by the same killpg) to
# drain the node and wait up to 30 s for it (a 30 s teardown, --durations); no job runs by then.
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with its own temp dir; yields (dashboard URL, env for the CLI)."""
    temp_dir = tempfile.mkdtemp(prefix="bgrpo-ray-", dir="/tmp")  # short: unix socket paths
    gcs, dash, client, metrics, agent, agent_grpc, rt_agent, om, nm = _free_ports(9)
    env = {**os.environ, **NO_DRAIN}
    env.update(
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",  # the job's shell finds `bgrpo` in the venv
        RAY_AUTH_MODE="token",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        RAY_ADDRESS="",  # never inherit another cluster
    )
    env.pop("RAY_ADDRESS")
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
        "--ray-client-server-port", str(client), "--metrics-export-port", str(metrics),
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(rt_agent), "--object-manager-port", str(om),
        "--node-manager-port", str(nm), "--temp-dir", temp_dir, "--num-cpus", "8", "--disable-usage-stats",
    ]
    log = open(tmp_path / "ray-head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", url], env=env,
                                   capture_output=True, text=True, timeout=60)
            # Ready = the job API answers AND `ray start` finished starting every process (it
            # prints the --block banner); the dashboard can answer before the raylet is up.
            if probe.returncode == 0 and "block forever" in (tmp_path / "ray-head.log").read_text():
                break
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray head did not come up: {(tmp_path / 'ray-head.log').read_text()[-3000:]}")
            time.sleep(2)
        yield url, env
    finally:
        # --- stop exactly this head: its process group, then anything that names its temp dir ---
        try:
            os.killpg(head.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _pids_mentioning(temp_dir) and time.monotonic() < deadline:
            time.sleep(1)
        for pid in _pids_mentioning(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        log.close()
        assert not _pids_mentioning(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.browser
def test_ray_job_submit_local_preset(ray_head, tmp_path):
    url, env = ray_head
    # The project's runtime env minus `pip:` (the venv is already installed here; pip would need
    # network) plus offline model flags.
    runtime_env = yaml.safe_load((REPO / "ray_job.yaml").read_text())
    runtime_env.pop("pip")
    runtime_env.setdefault("env_vars", {}).update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    rt_path = tmp_path / "runtime_env.yaml"
    rt_path.write_text(yaml.safe_dump(runtime_env))
    run_dir = tmp_path / "run"
    from tests.test_e2e import E2E_MODEL, SMOKE

    model_args = ["--model", E2E_MODEL]
    if E2E_MODEL == "tiny-lm":
        model_args += ["--rollout.prompt.include_screenshot", "false", "--rollout.prompt.include_axtree", "true"]
    job_id = f"bgrpo-test-{uuid.uuid4().hex[:8]}"
    ray = str(VENV_BIN / "ray")
    submit = subprocess.run(
        [ray, "job", "submit", "--address", url, "--submission-id", job_id, "--no-wait",
         "--runtime-env", str(rt_path), "--working-dir", str(REPO), "--",
         "bgrpo", "train", "--config", "local", "--cluster.run_dir", str(run_dir),
         # One learner step: what this test adds to tests/test_e2e.py's runs is the job path (a
         # driver joining the job's cluster, the runtime env), not more steps.
         "--cluster.total_steps", "1", "--eval.at_end", "false", "--logging.progress_bar", "false",
         *model_args, *[x for k, v in SMOKE.items() if k != "cluster.total_steps" and f"--{k}" not in model_args
           for x in (f"--{k}", v)]],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    status = ""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        proc = subprocess.run([ray, "job", "status", "--address", url, job_id], env=env,
                              capture_output=True, text=True, timeout=60)
        out = proc.stdout + proc.stderr  # the CLI logs the status line to stderr
        low = out.lower()  # "Job 'ID' succeeded" / "failed" / "was stopped", or RUNNING/PENDING
        status = next((s.upper() for s in ("succeeded", "failed", "stopped")
                       if f"'{job_id}' {s}" in low or f"'{job_id}' was {s}" in low), "")
        if status:
            break
        time.sleep(5)
    proc = subprocess.run([ray, "job", "logs", "--address", url, job_id], env=env,
                          capture_output=True, text=True, timeout=60)
    logs = proc.stdout + proc.stderr
    assert status == "SUCCEEDED", f"job ended {status or 'not in time'}:\n{logs[-4000:]}"
    # The driver joined the job's cluster (no second local Ray) and left a complete run folder.
    assert "Started a local Ray instance" not in logs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["accounting"]["balanced"]
    assert summary["worker_versions"] == [summary["learner_version"]] * 2
    for name in ("config.yaml", "metrics.jsonl", "reward.png"):
        assert (run_dir / name).is_file()
    assert list((run_dir / "trajectories").glob("*.parquet"))
    assert (run_dir / "checkpoints" / "latest").is_file()  # the final checkpoint (save_final)
