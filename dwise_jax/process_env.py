"""Process settings that XLA:CPU and glibc read only at start: the entry points call
`reexec_with_cpu_settings` first, which re-executes the process with them
(docs/design.md#process-settings-for-xlacpu). `DWISE_JAX_NO_REEXEC=1` opts out."""

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
    flags, tunables = env.get("XLA_FLAGS", ""), env.get("GLIBC_TUNABLES", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        env["XLA_FLAGS"] = f"{flags} {XLA_CPU_FLAG}".strip()
    if "glibc.malloc.hugetlb" not in tunables:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, (tunables, GLIBC_HUGETLB)))
    return env


def reexec_with_cpu_settings(module: str | None = None) -> None:
    """Replaces this process (before JAX creates a backend) with `python -m module <same args>`,
    or without a module the same script and arguments, under `cpu_environment`; unless the
    settings are there already, this is the re-executed process, or the user opted out."""
    new_env = cpu_environment(os.environ)
    if "1" in (os.environ.get(OPT_OUT), os.environ.get(_DONE)) or new_env == dict(os.environ):
        return
    new_env[_DONE] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    argv = ["-m", module, *sys.argv[1:]] if module else sys.argv
    os.execve(sys.executable, [sys.executable, *argv], new_env)


if __name__ == "__main__":  # `python -m dwise_jax.process_env`: what the entry points run with
    reexec_with_cpu_settings("dwise_jax.process_env")
    for name in ("XLA_FLAGS", "GLIBC_TUNABLES", _DONE):
        print(f"{name}={os.environ.get(name, '')}")
    print(f"pid={os.getpid()}")
