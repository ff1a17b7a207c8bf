"""The entry points' start-up settings (XLA:CPU scheduler flag, glibc huge pages)."""

import os
import subprocess
import sys

from dwise_jax import process_env


def test_cpu_environment_adds_both_settings_and_keeps_existing_values():
    env = process_env.cpu_environment(
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/x"})
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4",
                                        process_env.XLA_CPU_FLAG]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env["HOME"] == "/x"
    # A user's own choice of the scheduler flag is left alone.
    mine = {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"}
    assert process_env.cpu_environment(mine)["XLA_FLAGS"] == mine["XLA_FLAGS"]


def _run(extra_env):
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", "DWISE_JAX_REEXECED", process_env.OPT_OUT)}
    env.update(extra_env)
    process = subprocess.Popen([sys.executable, "-m", "dwise_jax.process_env"], env=env,
                               stdout=subprocess.PIPE, text=True)
    out, _ = process.communicate()
    assert process.returncode == 0
    shown = dict(line.split("=", 1) for line in out.splitlines())
    # exec, not a child: the PID a launcher or a SIGTERM sees is the one that trains.
    assert int(shown["pid"]) == process.pid
    return shown


def test_entry_point_reexecutes_itself_once_with_the_settings():
    shown = _run({})
    assert process_env.XLA_CPU_FLAG in shown["XLA_FLAGS"]
    assert shown["GLIBC_TUNABLES"] == process_env.GLIBC_HUGETLB
    assert shown["DWISE_JAX_REEXECED"] == "1"


def test_opt_out_keeps_the_environment():
    shown = _run({process_env.OPT_OUT: "1"})
    assert shown["XLA_FLAGS"] == "" and shown["GLIBC_TUNABLES"] == ""
    assert shown["DWISE_JAX_REEXECED"] == ""
