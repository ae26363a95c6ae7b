"""`bgrpo demo` and `bgrpo env-server` entry points."""

from __future__ import annotations

import pytest

from cluster.cli import main as bgrpo


@pytest.mark.browser
def test_demo_solves_click_test_end_to_end(capsys):
    assert bgrpo(["demo", "--tasks", "click-test"]) == 0
    out = capsys.readouterr().out
    assert "goal: Click the button." in out and "reward 1.0" in out and "1/1 episodes solved" in out


def test_env_server_help_and_bad_configuration(capsys):
    with pytest.raises(SystemExit) as excinfo:
        bgrpo(["env-server", "--help"])
    assert excinfo.value.code == 0
    assert "--task" in capsys.readouterr().out
    assert bgrpo(["env-server", "--task", "click-test", "--action-subsets", "python", "--port", "0"]) == 2
    assert "executes model output as Python" in capsys.readouterr().err
