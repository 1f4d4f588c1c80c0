"""The shipped examples stay valid: the commented config loads for every command, the scripts parse."""

import subprocess
from pathlib import Path

import pytest

from lorakit.settings import COMMANDS, load_settings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("command", COMMANDS)
def test_example_config_loads_for_every_command(command):
    settings, notes = load_settings(command, {}, EXAMPLES / "config.yaml")
    assert notes == []
    assert getattr(settings, "seed", 0) == 0  # fuse draws no random numbers: it has no seed


def test_example_config_sections_override_top_level():
    train, _ = load_settings("train", {}, EXAMPLES / "config.yaml")
    fuse, _ = load_settings("fuse", {}, EXAMPLES / "config.yaml")
    assert train.iters == 300 and train.lr_schedule == "cosine"
    assert str(fuse.out) == "runs/support/fused"


@pytest.mark.parametrize("script", ["quickstart.sh", "judge.sh", "chat.sh", "preference.sh"])
def test_example_scripts_parse(script):
    subprocess.run(["bash", "-n", str(EXAMPLES / script)], check=True)
