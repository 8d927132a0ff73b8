"""The CLI's dispatch table and its parser stay in sync, and every flag maps to a parameter."""
import inspect

import pytest

from attune import cli


def test_every_command_parses_and_maps_to_its_function():
    parser = cli.build_parser()
    for path, (fn, args) in cli.COMMANDS.items():
        ns = parser.parse_args(list(path))
        assert ns._fn is fn
        params = set(inspect.signature(fn).parameters)
        dests = {k for k in vars(ns) if k not in ("_fn", *cli._NAV)}
        assert dests == params, f"{' '.join(path)}: flags {dests} != parameters {params}"


def test_every_command_has_help():
    for path, (fn, _) in cli.COMMANDS.items():
        assert fn.__doc__ and fn.__doc__.strip(), f"attune {' '.join(path)} has no help text"


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["nonsense"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_every_help_page_renders(capsys):
    prefixes = {path[:n] for path in cli.COMMANDS for n in range(len(path) + 1)}
    for prefix in sorted(prefixes):
        with pytest.raises(SystemExit) as e:
            cli.main([*prefix, "--help"])
        assert e.value.code == 0, f"attune {' '.join(prefix)} --help"
        assert "usage: attune" in capsys.readouterr().out
