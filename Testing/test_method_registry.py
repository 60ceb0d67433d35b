"""One method registry and one set of defaults: the engine's runner table, ``settings.METHODS``
and the CLI's ``--method`` choices name the same methods, and the CLI's option defaults are
:class:`MethodOptions`'s own."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from oflsam2 import cli
from oflsam2.cli import engine_options
from oflsam2.methods import RUNNERS
from oflsam2.settings import DEFAULT_METHOD, DEFAULT_MODELS, METHOD_TITLES, METHODS, SLICER_METHODS, MethodOptions

METHODS_DIR = Path(__file__).resolve().parents[1] / "OFLSAM2Segment" / "oflsam2" / "methods"


def test_runner_table_and_titles_name_the_registry_methods():
    assert set(RUNNERS) == set(METHODS), f"runners {sorted(RUNNERS)} vs settings.METHODS {sorted(METHODS)}"
    assert tuple(METHOD_TITLES) == METHODS and all(METHOD_TITLES.values())
    assert set(DEFAULT_MODELS) == set(METHODS)
    assert DEFAULT_METHOD in METHODS and set(SLICER_METHODS) <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_each_runner_is_a_function_of_its_module(method):
    """Read from the source, so the check loads no torch."""
    module, name = RUNNERS[method]
    tree = ast.parse((METHODS_DIR / f"{module}.py").read_text(encoding="utf-8"))
    assert name in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def _subcommand(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def _option(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(a for a in parser._actions if a.dest == dest)


@pytest.mark.parametrize("command", ["segment", "batch", "demo"])
def test_cli_method_choices_come_from_the_registry(command):
    method = _option(_subcommand(command), "method")
    assert tuple(method.choices) == METHODS
    assert method.default == DEFAULT_METHOD == "ofl" and not method.required


@pytest.mark.parametrize("command", ["segment", "batch", "train", "demo"])
def test_cli_option_defaults_are_method_options_defaults(command):
    parser = _subcommand(command)
    defaults = MethodOptions()
    fields = [f for f in ("epochs", "gamma", "num_retrieved", "top_k", "revsam2_mode", "seed", "warm_start_epochs")
              if any(a.dest == f for a in parser._actions)]
    assert "epochs" in fields
    shown = " ".join(parser.format_help().split())
    for field in fields:
        action = _option(parser, field)
        assert action.default == getattr(defaults, field), field
        assert f"{action.option_strings[0]} " in shown and f"(default {getattr(defaults, field)})" in shown, field


@pytest.mark.parametrize("command", ["segment", "batch", "train", "demo"])
def test_cli_ofl_preset_picks_the_method_options(command, tmp_path):
    """``--ofl-preset`` (paper by default) is what the method options start from; the option
    flags apply on top."""
    argv = {"segment": ["--image", "a.nii.gz", "--out", str(tmp_path / "o.nii.gz")],
            "batch": ["scans", "--out", str(tmp_path / "out")],
            "train": ["--image", "a.nii.gz", "--support", "s.nii.gz", "--out", str(tmp_path / "adapter")],
            "demo": []}[command]
    assert _option(_subcommand(command), "ofl_preset").default is None  # not given: paper
    if command in ("segment", "batch"):
        unset = cli.build_parser().parse_args([command, *argv, "--epochs", "3"])
        assert engine_options.method_options(unset) == MethodOptions(epochs=3)
    for preset, expected in (("paper", MethodOptions(epochs=3)), ("extended", MethodOptions.extended(epochs=3))):
        args = cli.build_parser().parse_args([command, *argv, "--epochs", "3", "--ofl-preset", preset])
        if command in ("segment", "batch"):
            assert engine_options.method_options(args) == expected
        assert args.ofl_preset == preset


def test_model_settings_default_to_ofl_sams_backbone():
    from oflsam2.settings import ModelSettings, default_model

    assert ModelSettings().model == default_model(DEFAULT_METHOD) == "sam2.1-base-plus"
