"""File helpers: output locks, outputs that would swallow their inputs, modes of written files, leftovers."""

import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from lorakit.errors import UserError
from lorakit.io import check_output_location, output_lock, staging_dir, write_text


def test_second_lock_on_one_output_is_refused_and_released_after(tmp_path):
    out = tmp_path / "run"
    with output_lock(out, "--adapter-path"):
        lock = tmp_path / ".run.lock"
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(UserError, match=r"--adapter-path .*run: in use by another lorakit run \(pid"), \
                output_lock(out, "--adapter-path"):
            pass
    assert not lock.exists()
    with output_lock(out, "--adapter-path"):  # free again
        pass


def test_stale_lock_is_taken_over_and_leftovers_cleared(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / ".out.lock").write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    leftover = staging_dir(tmp_path / "out")
    other = staging_dir(tmp_path / "out.v2")  # another output's staging: not ours to remove
    (tmp_path / ".out.old").mkdir()  # killed between the two renames of a swap: the old output is put back
    with output_lock(tmp_path / "out", "--out"):
        assert not leftover.exists() and other.exists()
        assert (tmp_path / "out").is_dir() and not (tmp_path / ".out.old").exists()


def test_lock_of_another_host_is_respected(tmp_path):
    (tmp_path / ".out.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "x"}))
    with pytest.raises(UserError, match="elsewhere"), output_lock(tmp_path / "out", "--out"):
        pass


@pytest.mark.parametrize("relation", ["same", "contains", "inside"])
def test_output_overlapping_an_input_is_refused(tmp_path, relation):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    out = {"same": data, "contains": tmp_path, "inside": data / "run"}[relation]
    with pytest.raises(UserError, match=rf"--out {out}: (is an input \(--data|contains an input \(--data|is inside an input)"):
        check_output_location(out, "--out", [("--data", data)])


def test_output_beside_inputs_and_designed_locations_pass(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "adapter").mkdir()
    check_output_location(tmp_path / "run", "--out", [("--data", tmp_path / "data"), ("--model", "org/name")])
    check_output_location(tmp_path / "adapter" / "eval-test", "--out", [("--adapter-path", tmp_path / "adapter")],
                          inside_ok={"--adapter-path"})


def test_written_files_and_dirs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        staged = staging_dir(tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE(staged.stat().st_mode) == 0o755
