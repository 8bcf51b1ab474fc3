"""The `medlora` command table: every command parses through its dataclasses, has a --help, and is listed."""

import pytest

from conftest import run_main
from medlora.cli import COMMANDS, USAGE


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_and_is_listed(name, capsys):
    code, out, err = run_main([name, "--help"], capsys)
    assert code == 0 and f"usage: medlora {name}" in out and not err.strip(), err[-2000:]
    assert f"  {name} " in USAGE


def test_positional_arguments_and_unknown_commands(tmp_path, capsys):
    code, out, _ = run_main(["build-tiny", str(tmp_path / "tiny")], capsys)  # positional = --output_dir
    assert code == 0 and (tmp_path / "tiny" / "config.json").is_file() and str(tmp_path / "tiny") in out
    code, _, err = run_main(["ask", "Which nerve?", "--options", "a", "b", "c"], capsys)  # positional = --question
    assert code == 2 and "--options: expected 4 arguments" in err
    code, _, err = run_main(["trian"], capsys)
    assert code == 2 and "unknown command 'trian'" in err and "(did you mean 'train'?)" in err
    code, out, _ = run_main([], capsys)
    assert code == 2 and out.startswith("usage: medlora")
