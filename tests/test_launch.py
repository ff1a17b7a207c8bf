"""Launch scripts: their dry runs print the commands they would run."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

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
