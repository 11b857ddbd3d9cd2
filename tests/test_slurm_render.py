"""Rendering the sbatch template: `mmt slurm submit --dry-run` output, config checks, the template language."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from mmt.config import ConfigError
from mmt.slurm.cli import main as slurm_main
from mmt.slurm.job import parse_sweeps, plan_job, write_job
from mmt.slurm.template import TemplateError, render
from tests import slurm_standin
from tests.fixtures_slurm import REPO


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": str(REPO / "configs" / "model" / "tiny_tri.yaml"),
                "train": {"max_steps": 10},
                "tracking": {"run_name": "big"},
            }
        )
    )
    return path


def _dry_run(config: Path, *args: str, capsys, monkeypatch) -> str:
    monkeypatch.chdir(config.parent)
    assert slurm_main(["submit", str(config), *args, "--dry-run"]) == 0
    return capsys.readouterr().out


def _bash_syntax_ok(script: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_4_nodes_8_gpus(config, tmp_path, capsys, monkeypatch):
    out = _dry_run(
        config,
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--account",
        "proj",
        "--qos",
        "high",
        "--time",
        "2-00:00:00",
        "train.optimizer.lr=3e-4",
        capsys=capsys,
        monkeypatch=monkeypatch,
    )
    lines = out.splitlines()
    for expected in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@180",
        "#SBATCH --open-mode=append",
        "#SBATCH --job-name=big",
        "trap forward_signal USR1",
    ):
        assert expected in lines, expected
    assert f"#SBATCH --output={tmp_path}/runs/big/slurm-%j.out" in lines
    assert "#SBATCH --array" not in out
    # srun launch: 32 ranks, one per GPU, head node from scontrol, the run dir's copy of the config.
    srun = out[out.index("srun --kill-on-bad-exit=1") :].split(" &\n")[0]
    # The node count is the allocation's (a --nodes=min-max job may get fewer), so the rank count follows it.
    assert 'nnodes="${SLURM_JOB_NUM_NODES}"' in lines
    assert '--nodes="${nnodes}" --ntasks="$((nnodes * 8))"' in srun and "--ntasks-per-node=8" in srun
    assert re.search(r"python\S* -m mmt\.cli train \"\$\{config\}\"$", srun), srun
    assert "torch.distributed.run" not in out
    assert 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in lines
    assert f"configs=({tmp_path}/runs/big/config.yaml)" in lines
    assert 'scancel --signal=USR1 "${SLURM_JOB_ID}"' in out
    assert 'scontrol requeue "${SLURM_JOB_ID}"' in out
    assert "slurm.max_failures=3" in out
    _bash_syntax_ok(out)
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_dry_run_torchrun_mode(config, capsys, monkeypatch):
    out = _dry_run(
        config,
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--launch",
        "torchrun",
        "--signal",
        "TERM",
        capsys=capsys,
        monkeypatch=monkeypatch,
    )
    lines = out.splitlines()
    assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --gpus-per-node=8" in lines
    assert "#SBATCH --signal=B:TERM@180" in lines and "trap forward_signal TERM" in lines
    launch = out[out.index("srun --kill-on-bad-exit=1") :].split(" &\n")[0]
    assert '--nodes="${nnodes}" --ntasks="${nnodes}" --ntasks-per-node=1' in launch
    for part in (
        '-m torch.distributed.run --nnodes="${nnodes}" --nproc-per-node=8',
        "--rdzv-conf=join_timeout=300",
        "--rdzv-backend=c10d",
        '--rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}"',
        '--rdzv-id="${SLURM_JOB_ID}"',
        "--max-restarts=0",
        "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT",
        'trap "" TERM',
    ):
        assert part in launch, part
    assert "trap 'preempted=1" not in out  # TERM is the forwarded signal itself
    _bash_syntax_ok(out)


def test_dry_run_cpu_nodes_use_ntasks_per_node(config, capsys, monkeypatch):
    out = _dry_run(
        config,
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--ntasks-per-node",
        "4",
        "--cpus-per-task",
        "3",
        "--signal",
        "SIGHUP",
        "--min-nodes",
        "1",
        capsys=capsys,
        monkeypatch=monkeypatch,
    )
    lines = out.splitlines()
    assert "#SBATCH --mincpus=12" in lines  # a node range asks for CPUs per node, not tasks per node
    assert not any(x.startswith(("#SBATCH --ntasks-per-node", "#SBATCH --cpus-per-task")) for x in lines)
    assert not any("--gpus" in line for line in lines)
    assert "export OMP_NUM_THREADS=3" in lines
    assert "#SBATCH --signal=B:HUP@180" in lines
    assert "#SBATCH --nodes=1-2" in lines  # slurm.min_nodes: may run on 1 node when the other is lost
    assert '--nodes="${nnodes}" --ntasks="$((nnodes * 4))" --ntasks-per-node=4' in out
    assert "--cpus-per-task=3" in out
    _bash_syntax_ok(out)
    with pytest.raises(ConfigError, match="slurm.min_nodes.*3 is more than slurm.nodes=2"):
        plan_job(config, ["slurm.nodes=2", "slurm.min_nodes=3"])


def test_submit_writes_resolved_config_with_resume_and_signal(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = plan_job(config, ["slurm.signal=HUP", "train.max_steps=7"])
    script = write_job(plan)
    (member,) = plan.members
    saved = yaml.safe_load(member.config_path.read_text())
    assert saved["train"]["max_steps"] == 7
    assert saved["train"]["resume"] == "auto"
    assert saved["train"]["run_dir"] == str(tmp_path / "runs" / "big")
    assert "SIGHUP" in saved["train"]["preempt_signals"]  # the ranks must handle the job's signal
    assert saved["slurm"]["signal"] == "HUP"
    assert script == member.run_dir / "job.sbatch" and script.stat().st_mode & 0o111


def test_sweep_is_a_job_array(config, tmp_path, capsys, monkeypatch):
    out = _dry_run(
        config,
        "--sweep",
        "train.optimizer.lr=1e-3,3e-3",
        "--sweep",
        "train.seed=1,2",
        capsys=capsys,
        monkeypatch=monkeypatch,
    )
    assert "#SBATCH --array=0-3" in out.splitlines()
    assert f"#SBATCH --output={tmp_path}/runs/big/slurm-%A_%a.out" in out.splitlines()
    plan = plan_job(config, [], parse_sweeps(["train.optimizer.lr=1e-3,3e-3", "train.seed=1,2"]))
    assert [m.label for m in plan.members] == [
        "lr=1e-3_seed=1",
        "lr=1e-3_seed=2",
        "lr=3e-3_seed=1",
        "lr=3e-3_seed=2",
    ]
    assert [m.config.train.optimizer.lr for m in plan.members] == [1e-3, 1e-3, 3e-3, 3e-3]
    assert {m.config.tracking.experiment for m in plan.members} == {"mmt"}
    assert len({m.config.tracking.run_name for m in plan.members}) == 4
    assert len({m.run_dir for m in plan.members}) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--time", "1:2:3:4:5"], "slurm.time"),
        (["--time", "00:02:00"], "slurm.signal_seconds: 180 s is not shorter than the time limit"),
        (["--launch", "mpirun"], "slurm.launch"),
        (["--signal", "KILL"], "slurm.signal"),
        (["--sweep", "train.nope=1,2"], "train.nope"),
        (["--sweep", "train.seed="], "expected key=value1,value2"),
        (["train.resume=/some/checkpoint"], "a Slurm job resumes with train.resume=auto"),
        (["slurm.sbatch_args=[exclusive]"], "slurm.sbatch_args"),
        (["train.preempt_signals=SIGFOO"], "train.preempt_signals"),
        (["--sweep", "data.train_urls=a/b,a b"], "clashing run directories"),
    ],
)
def test_bad_input_is_a_clear_error(config, capsys, monkeypatch, args, message):
    monkeypatch.chdir(config.parent)
    assert slurm_main(["submit", str(config), *args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("mmt slurm: error:"), err


def test_submit_without_slurm_says_so(config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert slurm_main(["submit", str(config)]) == 2
    assert "sbatch not found on PATH" in capsys.readouterr().err


def test_template_language():
    text = (
        "a={{a}}\n{{#f}}\nflag {{a}}\n{{/f}}\n{{^f}}\nno flag\n{{/f}}\n{{#items}}\n- {{items}}\n{{/items}}\n"
    )
    assert render(text, {"a": "{{x}}", "f": True, "items": ["1", "2"]}) == "a={{x}}\nflag {{x}}\n- 1\n- 2\n"
    assert render(text, {"a": 1, "f": False, "items": []}) == "a=1\nno flag\n"
    with pytest.raises(TemplateError, match="no value for template names"):
        render("{{b}}", {})
    with pytest.raises(TemplateError, match="not used by the template"):
        render("x", {"b": 1})
    with pytest.raises(TemplateError, match="never closed"):
        render("{{#b}}x", {"b": 1})
    with pytest.raises(TemplateError, match="malformed tag"):
        render("{{ b }}", {})


def test_standin_matches_trainer_contract():
    from mmt.config.preemption import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER

    assert (slurm_standin.PREEMPTED_EXIT_CODE, slurm_standin.PREEMPTED_MARKER) == (
        PREEMPTED_EXIT_CODE,
        PREEMPTED_MARKER,
    )


def test_config_error_names_the_key():
    with pytest.raises(ConfigError, match="slurm.signal_seconds"):
        from mmt.config import load_config

        load_config(None, ["slurm.time=00:01:00", "slurm.signal_seconds=60"])
