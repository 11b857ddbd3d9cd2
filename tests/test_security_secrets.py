"""Secrets never leave: a secret planted in ``slurm.env``, ``tracking.tags`` and the user-info of ``tracking.uri``
appears nowhere that `mmt train` (against a real basic-auth `mlflow server`) or `mmt slurm submit` writes, except
the job's mode-0600 ``job.env``; `mmt runs` works with MLflow's credential variables, and a wrong password is one
line that does not show it."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from mmt.secrets import REDACTED, redact_url, split_userinfo
from mmt.slurm.job import plan_job, write_job
from mmt.tracking.runs_cli import main as runs_main
from tests.fixtures_mlflow import _stop, start_mlflow_server
from tests.fixtures_train import mmt_single, run, write_config, write_shards

pytestmark = pytest.mark.slow

ADMIN, PASSWORD = "admin", "Pw-4d1f0e77-server"  # the server's admin password: the secret in tracking.uri
AWS_SECRET = "aws-9c2b51e0-secret-key"  # planted in slurm.env
TAG_TOKEN = "tok-71aa03c2-ci"  # planted in tracking.tags under a *TOKEN key
SECRETS = (PASSWORD, AWS_SECRET, TAG_TOKEN)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    server, proc = start_mlflow_server(tmp_path_factory.mktemp("auth_server"), admin=(ADMIN, PASSWORD))
    try:
        yield server
    finally:
        _stop(proc)


def leaks(root: Path, *, allowed: tuple[Path, ...] = ()) -> dict[str, list[str]]:
    """Every file under ``root`` (binary included: the sqlite store) holding a planted secret."""
    found: dict[str, list[str]] = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p not in allowed):
        data = f.read_bytes()
        hits = [s for s in SECRETS if s.encode() in data]
        if hits:
            found[str(f)] = hits
    return found


def secret_config(tmp: Path, uri: str, urls: str, run_dir: Path) -> Path:
    bare, _, _ = split_userinfo(uri)
    cfg = write_config(
        tmp / "input" / "secret.yaml",
        train_urls=urls,
        run_dir=run_dir,
        train={"max_steps": 2, "zero_stage": 0, "checkpoint_at_end": True},
        tracking={
            "backend": "mlflow",
            "uri": bare.replace("http://", f"http://{ADMIN}:{PASSWORD}@"),
            "experiment": "secrets",
            "flush_interval_s": 0.2,
            "tags": f"team=vision,ci_token={TAG_TOKEN}",
        },
    )
    raw = yaml.safe_load(cfg.read_text())
    raw["slurm"] = {"env": {"AWS_SECRET_ACCESS_KEY": AWS_SECRET, "NCCL_DEBUG": "WARN"}}
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def test_train_and_runs_against_an_authenticated_server_leak_nothing(auth_server, tmp_path, monkeypatch):
    (tmp_path / "input").mkdir()
    urls = write_shards(tmp_path / "input" / "shards", 16)
    run_dir = tmp_path / "run"
    cfg = secret_config(tmp_path, auth_server.uri, urls, run_dir)
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)

    out = run(mmt_single(str(cfg)), cwd=tmp_path, timeout=300).stdout  # credentials only in the config's URI
    assert not [s for s in SECRETS if s in out], out
    assert leaks(tmp_path, allowed=(cfg,)) == {}  # run dir: config.yaml, ds_config.json, metrics.jsonl, meta
    assert leaks(auth_server.artifacts_dir.parent) == {}  # the server's sqlite store, artifacts and log
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["slurm"]["env"] == {"AWS_SECRET_ACCESS_KEY": REDACTED, "NCCL_DEBUG": "WARN"}
    assert saved["tracking"]["uri"] == redact_url(f"http://u:p@{auth_server.uri[7:]}")

    # what MLflow holds: the run, its params and tags, redacted where secret, intact elsewhere
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    run_id = json.loads((run_dir / "final_metrics.json").read_text())["mlflow_run_id"]
    data = MlflowClient(auth_server.uri).get_run(run_id).data
    assert data.params["slurm.env.AWS_SECRET_ACCESS_KEY"] == REDACTED
    assert data.params["slurm.env.NCCL_DEBUG"] == "WARN" and data.params["train.max_steps"] == "2"
    assert data.tags["ci_token"] == REDACTED and data.tags["team"] == "vision"

    # `mmt runs` with the credential variables
    assert runs_main(["list", "--experiment", "secrets", "--tracking-uri", auth_server.uri]) == 0


def test_wrong_password_is_one_line_without_the_password(auth_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-pw-5e3a")
    assert runs_main(["list", "--tracking-uri", auth_server.uri]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "authentication failed as user 'admin' (HTTP 401)" in err, err
    assert "wrong-pw-5e3a" not in err and "MLFLOW_TRACKING_PASSWORD" in err

    # `mmt train` with a wrong password in its URI: exit 2 before any work, one line, the password not shown
    (tmp_path / "input").mkdir()
    urls = write_shards(tmp_path / "input" / "shards", 8)
    cfg = secret_config(tmp_path, auth_server.uri, urls, tmp_path / "run")
    cfg.write_text(cfg.read_text().replace(PASSWORD, "wrong-pw-5e3a"))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    proc = run(mmt_single(str(cfg)), cwd=tmp_path, timeout=300, check=False)
    lines = [x for x in proc.stdout.splitlines() if "mmt train:" in x]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout
    assert "tracking error: MLflow at http://127.0.0.1" in lines[0] and "HTTP 401" in lines[0]
    assert "wrong-pw-5e3a" not in proc.stdout


def test_slurm_submit_keeps_secrets_in_the_0600_env_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "input").mkdir()
    cfg = secret_config(tmp_path, "http://127.0.0.1:5999", "shards-{000000..000001}.tar", tmp_path / "runs/x")
    monkeypatch.chdir(tmp_path)
    from mmt.slurm.cli import main as slurm_main

    overrides = [f"slurm.env.HF_TOKEN={TAG_TOKEN}", "--sweep", "train.seed=1,2"]
    assert slurm_main(["submit", str(cfg), *overrides, "--dry-run"]) == 0
    assert not [s for s in SECRETS if s in capsys.readouterr().out]

    # what `mmt slurm submit` writes before it calls sbatch
    from mmt.slurm.job import parse_sweeps

    plan = plan_job(cfg, [f"slurm.env.HF_TOKEN={TAG_TOKEN}"], parse_sweeps(["train.seed=1,2"]))
    script = write_job(plan)
    env_file = plan.env_path
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert leaks(tmp_path, allowed=(cfg, env_file)) == {}  # script, both members' config.yaml, sweep.json
    assert f". {env_file}" in script.read_text()
    # what the ranks get: every secret, exported from job.env
    shown = subprocess.run(
        ["bash", "-c", f". {env_file}; echo $AWS_SECRET_ACCESS_KEY $HF_TOKEN $MLFLOW_TRACKING_PASSWORD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert shown == [AWS_SECRET, TAG_TOKEN, PASSWORD]


def test_errors_never_show_a_secret_value(tmp_path, capsys):
    """A refused value for a secret-named key, URL user-info in a bad value or a shard URL: one line, exit 2,
    `***` in the secret's place."""
    from mmt.cli import main
    from mmt.clirun import error_line
    from mmt.config.named import CONFIG_DIR
    from mmt.data.faults import DataError

    demo = str(CONFIG_DIR / "train" / "demo.yaml")
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(yaml.safe_dump({"train": {"max_steps": f"s3://AKIA:{AWS_SECRET}@bucket/x"}}))
    for argv, culprit in (
        (["model", "tiny_tri", f"model.api_key={AWS_SECRET} x"], "model.api_key=***"),
        (
            ["slurm", "submit", demo, f"slurm.env.HF_TOKEN=[{TAG_TOKEN}", "--dry-run"],
            "slurm.env.HF_TOKEN=***",
        ),
        (["train", demo, f"train.max_steps=http://{ADMIN}:{PASSWORD}@host/x"], "http://***@host/x"),
        (["slurm", "submit", str(bad_file), "--dry-run"], "train.max_steps: Value 's3://***@bucket/x'"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and culprit in err, err
        assert not [s for s in SECRETS if s in err], err
    # A shard URL with S3 credentials in it, as a data error names it.
    line = error_line(
        "train", "data error", DataError(f"s3://AKIA:{AWS_SECRET}@bucket/a.tar: shard not found")
    )
    assert line == "mmt train: data error: s3://***@bucket/a.tar: shard not found"
