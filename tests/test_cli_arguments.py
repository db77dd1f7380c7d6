"""Where ``fit`` adds its run-directory claim among the user's arguments: Hydra's parser takes
the overrides as one run of positionals, so the claim must join that run (appended after
``--cfg job`` it was fine, appended after ``model=x --cfg job`` or put before ``-m`` it was refused)."""

from __future__ import annotations

import argparse

import pytest

from nde_zoo.cli import _with_override


def _hydra_like_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--cfg", "-c", choices=["job", "hydra", "all"])
    parser.add_argument("--multirun", "-m", action="store_true")
    parser.add_argument("--config-name", "-cn")
    return parser


@pytest.mark.parametrize("args", [
    [], ["--cfg", "job"], ["model=a", "--cfg", "job"], ["-m", "a=1,2", "b=2"], ["a=1", "-m"],
    ["-m", "--cfg", "job", "a=1"], ["-cn", "fit", "a=1"],
])
def test_the_claim_joins_the_overrides_where_the_parser_accepts_it(args):
    parsed = _hydra_like_parser().parse_args(_with_override(args, "++claim=1"))
    users = [a for a in args if "=" in a]
    assert parsed.overrides == ["++claim=1", *users] or parsed.overrides == [*users, "++claim=1"]
