"""Launch scripts: their dry runs print the commands they would run."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dwise_jax import sharding

REPO = Path(__file__).resolve().parents[1]


def test_train_folds_dry_run_assigns_gpus_round_robin(tmp_path):
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "train_folds.sh"), "configs/true_batch.py",
         "--folds", "0,3,5", "--gpus", "0,1", "--dry-run", "--", "--workdir=/w"],
        capture_output=True, text=True, cwd=tmp_path, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    parsed = [shlex.split(line) for line in lines]
    assert [p[1] for p in parsed] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1",
                                      "CUDA_VISIBLE_DEVICES=0"]
    for fold, p in zip((0, 3, 5), parsed, strict=True):
        assert p[4:10] == ["dwise_jax.train", "--config", "configs/true_batch.py", "--folds",
                          str(fold), "--workdir=/w"]
        assert p[-3:] == [">", f"logs/true_batch_fold_{fold}.log", "2>&1"]
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


def dry_run(script: str, *args: str, cwd: Path, env: dict | None = None) -> list[list[str]]:
    """The commands a launch script's dry run prints, each split into words."""
    args = list(args)
    args.insert(args.index("--") if "--" in args else len(args), "--dry-run")
    out = subprocess.run(["bash", str(REPO / "launch" / script), *args],
                         capture_output=True, text=True, cwd=cwd, check=True,
                         env={**{k: v for k, v in os.environ.items() if k != "LOG_DIR"},
                              "PYTHON": "/no/such/python", **(env or {})})
    return [shlex.split(line) for line in out.stdout.strip().splitlines()]


def test_train_folds_all_gpus_is_one_process_over_every_gpu(tmp_path):
    (cmd,) = dry_run("train_folds.sh", "configs/true_batch.py", "--all-gpus", "--folds", "0,1",
                     cwd=tmp_path)
    assert cmd == ["/no/such/python", "-m", "dwise_jax.train", "--config",
                   "configs/true_batch.py", "--folds", "0,1", ">",
                   "logs/true_batch_all_gpus.log", "2>&1"]
    (cmd,) = dry_run("train_folds.sh", "configs/true_batch.py", "--all-gpus", "--gpus", "2,3",
                     cwd=tmp_path, env={"LOG_DIR": "/workdir/logs"})
    assert cmd[:2] == ["env", "CUDA_VISIBLE_DEVICES=2,3"] and cmd[8] == "0,1,2,3,4,5,6"
    assert cmd[-2] == "/workdir/logs/true_batch_all_gpus.log"  # LOG_DIR, as the image sets it


def test_train_folds_reports_a_failed_fold(tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text('#!/usr/bin/env bash\nfor a in "$@"; do [ "$a" = 3 ] && exit 3; done; '
                    'echo "ran $*"\n')
    fake.chmod(0o755)
    run = subprocess.run(["bash", str(REPO / "launch" / "train_folds.sh"), "c.py", "--folds",
                          "0,3,5", "--gpus", "0,1"], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHON": str(fake)})
    assert run.returncode == 1 and "1 of 3 folds failed" in run.stderr
    assert (tmp_path / "logs" / "c_fold_5.log").read_text().startswith("ran -m dwise_jax.train")


def test_multihost_starts_one_process_per_host_over_ssh(tmp_path):
    cmds = dry_run("multihost.sh", "configs/true_batch.py", "--hosts", "node-a,node-b,node-c",
                   "--port", "4000", "--folds", "2", "--dir", "/srv/my repo", "--",
                   "--workdir=/shared/w", cwd=tmp_path)
    assert len(cmds) == 3
    for i, (cmd, host) in enumerate(zip(cmds, ("node-a", "node-b", "node-c"), strict=True)):
        assert cmd[:4] == ["ssh", "-o", "BatchMode=yes", host]
        assert cmd[5:] == [">", f"logs/true_batch_host{i}.log", "2>&1"]
        remote = shlex.split(cmd[4])  # what the remote shell runs
        assert remote[:4] == ["cd", "/srv/my repo", "&&", "env"]
        assert remote[4:7] == ["JAX_COORDINATOR_ADDRESS=node-a:4000", "JAX_NUM_PROCESSES=3",
                               f"JAX_PROCESS_ID={i}"]
        # Exactly the variables the entry points read (dwise_jax.sharding).
        assert [v.split("=")[0] for v in remote[4:7]] == list(sharding.LAUNCH_VARIABLES)
        assert remote[7:] == ["/no/such/python", "-m", "dwise_jax.train", "--config",
                              "configs/true_batch.py", "--folds", "2", "--workdir=/shared/w"]
    missing = subprocess.run(["bash", str(REPO / "launch" / "multihost.sh"), "c.py",
                              "--dry-run"], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2 and "--hosts is required" in missing.stderr


def test_slurm_script_runs_one_srun_step_and_documents_itself(tmp_path):
    (cmd,) = dry_run("slurm_train.sbatch", "configs/distillation.py", "--folds", "4", "--",
                     "--data_root=/d", cwd=tmp_path)
    assert cmd == ["srun", "--kill-on-bad-exit=1", "/no/such/python", "-m", "dwise_jax.train",
                   "--config", "configs/distillation.py", "--folds", "4", "--data_root=/d"]
    text = (REPO / "launch" / "slurm_train.sbatch").read_text()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=8" in directives and "#SBATCH --gpus-per-node=8" in directives
    # sbatch reads directives only before the first command.
    first_command = next(i for i, line in enumerate(text.splitlines()[1:], 1)
                         if line.strip() and not line.startswith("#"))
    assert all(text.splitlines().index(d) < first_command for d in directives)
    outside = subprocess.run(["bash", str(REPO / "launch" / "slurm_train.sbatch"), "c.py"],
                             capture_output=True, text=True, cwd=tmp_path,
                             env={k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"})
    assert outside.returncode == 2 and "sbatch" in outside.stderr


SPLITS = ["live_test_main", "live_test_bonus", "final_test_main", "final_test_bonus", "folds"]


def test_predict_all_predicts_every_split_then_ensembles_every_split(tmp_path):
    cmds = dry_run("predict_all.sh", "--workdir", "/w", "--data_root", "/d", "--gpu", "1", "--",
                   "--anchor_stride=2", cwd=tmp_path)
    predicts, ensembles = cmds[:10], cmds[10:]
    expected = [(e, s) for e in ("distillation_001", "true_batch_001") for s in SPLITS]
    for cmd, (experiment, split) in zip(predicts, expected, strict=True):
        assert cmd == ["env", "CUDA_VISIBLE_DEVICES=1", "/no/such/python", "-m",
                       "dwise_jax.predict", "--experiment", experiment, "--split", split,
                       "--workdir", "/w", "--data_root", "/d", "--anchor_stride=2", ">",
                       f"logs/predict_{experiment}_{split}.log", "2>&1"]
    for cmd, split in zip(ensembles, SPLITS, strict=True):
        assert cmd == ["env", "CUDA_VISIBLE_DEVICES=1", "/no/such/python", "-m",
                       "dwise_jax.predict", "--experiment", "distillation_001,true_batch_001",
                       "--blend_only", "--split", split, "--workdir", "/w", "--data_root", "/d",
                       ">",
                       f"logs/blend_{split}.log", "2>&1"]
    one = dry_run("predict_all.sh", "--workdir", "/w", "--experiments", "true_batch_001",
                  "--splits", "folds,live_test_main", cwd=tmp_path)
    assert [c[2:3] + c[-7:-3] for c in one] == [
        ["dwise_jax.predict", "--split", "folds", "--workdir", "/w"],
        ["dwise_jax.predict", "--split", "live_test_main", "--workdir", "/w"]]  # no ensemble
    bad = subprocess.run(["bash", str(REPO / "launch" / "predict_all.sh"), "--workdir", "/w",
                          "--splits", "train", "--dry-run"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown split: train" in bad.stderr


def test_predict_all_stops_at_the_first_failure(tmp_path):
    fake = tmp_path / "fake_python"
    fake.write_text('#!/usr/bin/env bash\necho "$*" >> calls.txt\n'
                    'case "$*" in *final_test_main*) exit 1 ;; esac\n')
    fake.chmod(0o755)
    run = subprocess.run(["bash", str(REPO / "launch" / "predict_all.sh"), "--workdir", "w",
                          "--experiments", "a,b"], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHON": str(fake)})
    assert run.returncode == 1
    assert "logs/predict_a_final_test_main.log" in run.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert [c.split("--split ")[1].split()[0] for c in calls] == SPLITS[:3]


def test_profile_traces_steps_in_a_separate_workdir(tmp_path):
    (cmd,) = dry_run("profile.sh", "configs/true_batch.py", "--fold", "3", "--steps", "5:9",
                     "--gpus", "0", cwd=tmp_path)
    assert cmd == ["env", "CUDA_VISIBLE_DEVICES=0", "/no/such/python", "-m", "dwise_jax.train",
                   "--config", "configs/true_batch.py", "--folds", "3", "--workdir",
                   "profiles/true_batch_fold3_steps5-9", "--profile_steps", "5:9",
                   "--max_steps", "9", "--dump_hlo"]
    for steps in ("9:5", "5", "a:b"):
        bad = subprocess.run(["bash", str(REPO / "launch" / "profile.sh"), "c.py", "--steps",
                              steps, "--dry-run"], capture_output=True, text=True)
        assert bad.returncode == 2 and "START:END" in bad.stderr
    (tmp_path / "profiles" / "c_fold0_steps10-20").mkdir(parents=True)
    exists = subprocess.run(["bash", str(REPO / "launch" / "profile.sh"), "c.py"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert exists.returncode == 2 and "would resume" in exists.stderr


def _tool(name: str) -> str:
    """A linter from requirements-dev.txt: on PATH or beside this Python (the venv's bin/)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail(f"{name} is missing: install requirements-dev.txt (./setup.sh does)")
    return path


def test_launch_scripts_pass_shellcheck():
    scripts = sorted((REPO / "launch").iterdir())
    assert {p.name for p in scripts} >= {"train_folds.sh", "multihost.sh", "slurm_train.sbatch",
                                         "predict_all.sh", "profile.sh"}
    out = subprocess.run([_tool("shellcheck"), "--shell=bash", *map(str, scripts)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    for script in [p for p in scripts if p.name != "lib.sh"]:  # lib.sh: sourced by the others
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
        help_text = subprocess.run(["bash", str(script), "--help"], capture_output=True,
                                   text=True, check=True).stdout
        assert "--dry-run" in help_text and "#" not in help_text.splitlines()[0]
