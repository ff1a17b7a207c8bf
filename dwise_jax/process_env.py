"""Process-level settings that XLA:CPU and glibc read only when a process starts.

Two settings make the CPU training step much cheaper (benchmarks/RESULTS.md, "Model"):

* `XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false` halves the peak memory of
  the train step (the flag has no effect as a per-jit compiler option);
* `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` backs XLA's large, freshly allocated buffers with
  transparent huge pages, instead of faulting them in 4 KiB at a time (about 25% of a CPU step).

The command-line entry points call `reexec_with_cpu_settings` first: if the settings are
missing, the process replaces itself (same PID, same arguments) with one that has them. On GPU
hosts both are harmless (the XLA flag is read by the CPU backend only). Set
`DWISE_JAX_NO_REEXEC=1` to keep the environment exactly as it is.
"""

from __future__ import annotations

import os
import sys

XLA_CPU_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
GLIBC_HUGETLB = "glibc.malloc.hugetlb=1"
_DONE = "DWISE_JAX_REEXECED"
OPT_OUT = "DWISE_JAX_NO_REEXEC"


def cpu_environment(env: dict[str, str]) -> dict[str, str]:
    """A copy of `env` with the XLA flag and the glibc tunable added (existing values kept)."""
    env = dict(env)
    flags = env.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        env["XLA_FLAGS"] = f"{flags} {XLA_CPU_FLAG}".strip()
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" not in tunables:
        env["GLIBC_TUNABLES"] = f"{tunables}:{GLIBC_HUGETLB}" if tunables else GLIBC_HUGETLB
    return env


def reexec_with_cpu_settings(module: str | None = None) -> None:
    """Replaces this process with `python -m module <same args>` (or, without a module, the
    same script and arguments, for the benchmarks) under `cpu_environment`, unless the
    settings are already there, this is the re-executed process, or the user opted out.
    Call it before JAX creates a backend."""
    env = os.environ
    if env.get(OPT_OUT) == "1" or env.get(_DONE) == "1":
        return
    new_env = cpu_environment(env)
    if new_env == dict(env):
        return
    new_env[_DONE] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    argv = ["-m", module, *sys.argv[1:]] if module else sys.argv
    os.execve(sys.executable, [sys.executable, *argv], new_env)


if __name__ == "__main__":
    # `python -m dwise_jax.process_env`: shows what the entry points run with.
    reexec_with_cpu_settings("dwise_jax.process_env")
    for name in ("XLA_FLAGS", "GLIBC_TUNABLES", _DONE):
        print(f"{name}={os.environ.get(name, '')}")
    print(f"pid={os.getpid()}")
