"""The one command-line runner: in-process calls, usage errors, user errors, --help."""

from __future__ import annotations

from absl import flags

from dwise_jax import cli


class Broken(RuntimeError):
    pass


def define(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("count", 1, "How many.", flag_values=fv)
    flags.DEFINE_bool("fail", False, "Raise the command's own error.", flag_values=fv)


def run(fv: flags.FlagValues, args: list[str]) -> int:
    if fv.count < 0:
        raise cli.UsageError("--count must be >= 0")
    if fv.fail:
        raise Broken("data/x.npy: is broken")
    print(f"count={fv.count} args={args}")
    return 0


def test_flags_and_positional_arguments_reach_the_command(capsys):
    assert cli.call(define, run, ["root", "--count", "3"]) == 0
    assert capsys.readouterr().out.strip() == "count=3 args=['root']"
    assert cli.call(define, run, ["--count=4"]) == 0  # a fresh FlagValues every call
    assert capsys.readouterr().out.strip() == "count=4 args=[]"


def test_usage_errors_exit_2_with_one_line(capsys):
    for args in (["--count", "x"], ["--nope"], ["--count=-1"]):
        assert cli.call(define, run, args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err


def test_user_errors_exit_1_and_others_propagate(capsys):
    assert cli.call(define, run, ["--fail"], errors=(Broken,)) == 1
    assert capsys.readouterr().err.strip() == "error: data/x.npy: is broken"
    try:
        cli.call(define, run, ["--fail"])
    except Broken:
        pass
    else:
        raise AssertionError("an error the command does not name must propagate")


def test_help_lists_the_flags(capsys):
    assert cli.call(define, run, ["--help"], doc="The test command.") == 0
    out = capsys.readouterr().out
    assert out.startswith("The test command.") and "--count" in out and "--fail" in out


def test_config_overrides_are_read_from_this_call_not_sys_argv():
    """ml_collections' config flag reads `--config.KEY=value` from sys.argv: in process the
    call's own arguments stand there while parsing, and sys.argv is restored after."""
    import sys
    from pathlib import Path

    from dwise_jax import train

    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo.py")
    seen, before = {}, list(sys.argv)
    status = cli.call(train.define_flags,
                      lambda fv, args: seen.update(ratio=fv.config.model.expansion_ratio) or 0,
                      ["--config", demo, "--config.model.expansion_ratio=3"])
    assert (status, seen, sys.argv) == (0, {"ratio": 3}, before)
