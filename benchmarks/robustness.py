#!/usr/bin/env python3
"""Issue 19's robustness corpus: lorakit tried as a hostile-but-fair user would, through the real CLI.

    python3 benchmarks/robustness.py                 # the full corpus: 419 cases, ~13 minutes on 2 shared cores
    python3 benchmarks/robustness.py --quick         # ~30 of them (1-2 minutes)
    python3 benchmarks/robustness.py --only attack --jobs 3 --out /tmp/r.json

It builds a tiny model (lorakit.testing.tiny_model_dir), random adapters, prepared data and a trained
adapter in a temp dir, then runs every case as a subprocess (`python3 -m lorakit ...`, LORAKIT_CACHE in the
temp dir, OPENBLAS_NUM_THREADS=1, HF_HUB_OFFLINE=1, stdin closed) and classifies it:

  bad_input  exit 2, stderr names the offending flag / file / field, no "Traceback", and every path on the
             command line byte-identical afterwards (sha256 before/after)
  interrupt  SIGINT (to the process group, as Ctrl-C does) / SIGTERM / kill -9 during load, first step, eval,
             mid-run, checkpoint save (train) and at several moments of prepare / eval / fuse: exit 130 with a
             resumable checkpoint or a "nothing saved" message; the documented recovery (the printed resume
             command, `--resume`, or a re-run) succeeds and leaves no staging/lock/.old leftovers; outputs of
             prepare/eval/fuse are the complete old or new output, or absent, never partial
  resume     an uninterrupted run vs one interrupted at a random step and resumed: the final
             adapters.safetensors must be byte-identical (sha256)
  corrupt    the newest checkpoint damaged (truncated/flipped/deleted files, bad JSON, NaN weights with
             consistent checksums): `--resume` warns and falls back to the previous intact checkpoint (the final
             adapter then equals the uninterrupted run's) or exits 1/2 naming it; never loads garbage
  poison     --learning-rate 1e20 and friends: exit 1, every kept safetensors finite, report/metrics strict JSON,
             and `--resume --learning-rate 1e-4` succeeds
  attack     Jinja SSTI in --template / tokenizer_config.json / chat_template.jinja / --judge-template, pickle
             weights, custom-code configs without --trust-remote-code, YAML python tags: the marker file the
             payload would write never appears, nothing from /etc/passwd leaks, exit 2 naming the template or file
             (template syntax inside *data* must stay data: exit 0), no traceback, and a bounded run time

A case that times out is not handled. Every case (command lines, exit codes, reason) goes to --out as JSON, and
a table goes to stderr. PyTorch is hidden from the subprocesses (as in a `pip install -e ".[cpu]"` install,
which has no torch; it saves ~2 s of import per command) except in the pickle cases, where a pickle loader
could use it; `--with-torch` keeps it everywhere.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import itertools
import json
import os
import pickle
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "robustness.json"

CATEGORIES = {
    "bad_input": "bad inputs",
    "interrupt": "interrupts",
    "resume": "interrupted + resumed (bit-exact)",
    "corrupt": "corrupted checkpoints",
    "poison": "poisoned runs",
    "attack": "template/pickle/remote-code attacks",
}

ANSWERS = ["Open Settings, then Reset password.", "The capital of France is Paris.",
           "Your order ships in 3-5 business days.", "Answer A is better. Verdict: A"]
PASSWD_LEAK = "root:x:0:0"


# ---------------------------------------------------------------------------------------------- helpers


def squash(text: str) -> str:
    """Whitespace removed: rich wraps long stderr lines at the terminal width."""
    return re.sub(r"\s+", "", text)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a directory (relative names)."""
    path = Path(path)
    if path.is_file():
        return {"": sha256(path)}
    if path.is_dir():
        return {str(p.relative_to(path)): sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}
    return {}


def strict_json(text: str) -> Any:
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question {i}: what about item {i * 7 % 97} and part {i % 13}?"},
                         {"role": "assistant", "content": f"{ANSWERS[i % 4]} (ref {i})"}]}


def tail(text: str, n: int = 1500) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def leftovers(root: Path) -> list[str]:
    """Staging directories, lock files and swapped-out `.old` outputs anywhere under `root`."""
    found = []
    for p in root.rglob("*"):
        if p.name.endswith((".staging", ".lock", ".tmp")) or re.fullmatch(r"\..+\.old", p.name):
            found.append(str(p.relative_to(root)))
    return sorted(found)


def checkpoint_problem(ckpt: Path) -> str | None:
    """Re-implemented here (not imported from lorakit): a checkpoint is intact when checksums.json lists
    its files and each matches."""
    sums_file = ckpt / "checksums.json"
    if not sums_file.is_file():
        return "no checksums.json"
    try:
        sums = json.loads(sums_file.read_text())
    except ValueError:
        return "unreadable checksums.json"
    for name, want in sums.items():
        if not (ckpt / name).is_file():
            return f"{name} missing"
        if sha256(ckpt / name) != want:
            return f"{name} does not match its checksum"
    return None


def nonfinite_files(root: Path) -> list[str]:
    """Every safetensors file under `root` (adapters, optimizer state, best/, checkpoints) with a NaN/inf."""
    import mlx.core as mx

    bad = []
    for path in sorted(root.rglob("*.safetensors")):
        try:
            arrays = mx.load(str(path))
        except Exception as e:  # noqa: BLE001
            bad.append(f"{path.relative_to(root)} (unloadable: {e})")
            continue
        for key, w in arrays.items():
            if mx.issubdtype(w.dtype, mx.inexact) and not mx.all(mx.isfinite(w)).item():
                bad.append(f"{path.relative_to(root)}:{key}")
                break
    return bad


class EvilPickle:
    """Unpickling it runs `touch MARKER`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"model.embed_tokens.weight": EvilPickle(marker)}, protocol=2)


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Ran:
    argv: list[str]
    rc: int | None
    out: str
    err: str
    elapsed: float
    timed_out: bool = False

    def line(self) -> str:
        return " ".join(self.argv)


class Ctx:
    """Paths of the fixtures, the subprocess environment and the per-case workspaces."""

    def __init__(self, root: Path, with_torch: bool, seed: int) -> None:
        self.root = root
        self.with_torch = with_torch
        self.rng = random.Random(seed)
        self.rng_lock = threading.Lock()
        self.counter = itertools.count()
        self.counter_lock = threading.Lock()
        (root / "cases").mkdir(parents=True, exist_ok=True)
        (root / "notorch").mkdir(exist_ok=True)
        # A `pip install -e ".[cpu]"` has no torch; transformers then never imports it.
        (root / "notorch" / "sitecustomize.py").write_text("import sys\nsys.modules.setdefault('torch', None)\n")
        self.durations: dict[str, float] = {}

    def uniform(self, a: float, b: float) -> float:
        with self.rng_lock:
            return self.rng.uniform(a, b)

    def randint(self, a: int, b: int) -> int:
        with self.rng_lock:
            return self.rng.randint(a, b)

    def ws(self, name: str) -> Path:
        with self.counter_lock:
            n = next(self.counter)
        path = self.root / "cases" / f"{n:03d}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)[:60]}"
        path.mkdir(parents=True)
        return path

    def env(self, torch: bool = False) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAKIT_")}
        env.update(OPENBLAS_NUM_THREADS="1", LORAKIT_CACHE=str(self.root / "cache"), HF_HUB_OFFLINE="1",
                   PYTHONPYCACHEPREFIX=str(self.root / "pycache"), NO_COLOR="1", TERM="dumb",
                   TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
        paths = [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        if not (torch or self.with_torch):
            paths.insert(0, str(self.root / "notorch"))
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    @staticmethod
    def cmd(argv: list[Any]) -> list[str]:
        return [sys.executable, "-m", "lorakit", *map(str, argv)]

    def cli(self, argv: list[Any], cwd: Path, *, stdin: bytes | None = None, timeout: float = 120,
            env: dict[str, str] | None = None, torch: bool = False) -> Ran:
        """Run `python3 -m lorakit ARGV`; stdout/stderr go through files (a runaway message cannot eat memory)."""
        argv = [str(a) for a in argv]
        full_env = self.env(torch)
        full_env.update(env or {})
        t0 = time.monotonic()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            p = subprocess.Popen(self.cmd(argv), cwd=cwd, env=full_env, stdout=out, stderr=err,
                                 stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                 start_new_session=True)
            timed_out = False
            try:
                p.communicate(stdin, timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _killpg(p.pid)
                p.wait()
            _killpg(p.pid)  # stray children (the JIT compiler) of a finished run
            elapsed = time.monotonic() - t0
            return Ran(["lorakit", *argv], None if timed_out else p.returncode, _read_capped(out),
                       _read_capped(err), round(elapsed, 2), timed_out)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(f, cap: int = 2 << 20) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    if size <= 2 * cap:
        return f.read().decode("utf-8", "replace")
    head = f.read(cap).decode("utf-8", "replace")
    f.seek(size - cap)
    return head + f"\n[... {size - 2 * cap} bytes cut ...]\n" + f.read().decode("utf-8", "replace")


class Live:
    """A running command whose stderr lines are watched, so a signal can be sent at a given moment."""

    def __init__(self, ctx: Ctx, argv: list[Any], cwd: Path) -> None:
        self.argv = ["lorakit", *map(str, argv)]
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(ctx.cmd(argv), cwd=cwd, env=ctx.env(), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.out = b""
        self.cond = threading.Condition()
        self.done = False
        self.sent: list[dict] = []
        self._threads = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_err(self) -> None:
        for raw in self.p.stderr:
            with self.cond:
                self.lines.append((time.monotonic() - self.t0, raw.decode("utf-8", "replace").rstrip("\n")))
                self.cond.notify_all()
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def _read_out(self) -> None:
        self.out = self.p.stdout.read()

    def wait_line(self, pattern: str, timeout: float = 120) -> str | None:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for _, line in self.lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self.done or left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))

    def wait_step(self, target: int, timeout: float = 120) -> str | None:
        """Wait for the progress line of a step >= target (`iteration=N ...`)."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for _, line in self.lines[seen:]:
                    m = re.search(r"\biteration=(\d+)\b", line)
                    if m and "val_loss" not in line and int(m.group(1)) >= target:  # a train step's line
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self.done or left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))

    def alive(self) -> bool:
        return self.p.poll() is None

    def send(self, sig: signal.Signals) -> bool:
        """SIGINT goes to the process group (what Ctrl-C does); SIGTERM and SIGKILL to the process."""
        if not self.alive():
            return False
        with self.cond:
            last = self.lines[-1][1] if self.lines else ""
        self.sent.append({"signal": sig.name, "at_s": round(time.monotonic() - self.t0, 3),
                          "last_stderr_line": last[:160]})
        try:
            if sig == signal.SIGINT:
                os.killpg(self.p.pid, sig)
            else:
                os.kill(self.p.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def finish(self, timeout: float = 120) -> int | None:
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        _killpg(self.p.pid)
        self.p.wait()
        for t in self._threads:
            t.join(5)
        return rc

    @property
    def err(self) -> str:
        with self.cond:
            return "\n".join(line for _, line in self.lines)


def result(category: str, name: str, commands: list[Ran], handled: bool, reason: str, **extra: Any) -> dict:
    short = lambda a: a if len(a) <= 300 else f"{a[:60]}...({len(a)} chars)"
    keep = 300 if handled else 1500  # what each command said, so a reader can judge the messages too
    rec = {"category": category, "name": name, "handled": bool(handled), "reason": reason,
           "commands": [{"argv": [short(a) for a in r.argv], "rc": r.rc, "elapsed_s": r.elapsed,
                         "timed_out": r.timed_out, "stderr_tail": tail(r.err.strip(), keep)} for r in commands]}
    rec["rc"] = commands[-1].rc if commands else None
    if not handled and commands:
        rec["stderr_tail"] = tail(commands[-1].err)
        if commands[-1].out.strip():
            rec["stdout_tail"] = tail(commands[-1].out, 600)
    rec.update(extra)
    return rec


# ---------------------------------------------------------------------------------------------- fixtures


@dataclass
class Fixtures:
    model: Path
    model_other: Path
    radapter: Path
    radapter_b: Path
    radapter_other: Path
    raw: Path
    raw_big: Path
    data: Path
    data_text: Path
    data_judge: Path
    data_bigval: Path
    trained: Path
    corrupt_base: Path
    corrupt_ref_sha: str
    gguf: Path
    refs: dict[str, Path] = field(default_factory=dict)


def build_fixtures(ctx: Ctx, jobs: int, need_refs: bool) -> Fixtures:
    from lorakit.testing import random_adapter_dir, tiny_model_dir

    fx = ctx.root / "fixtures"
    fx.mkdir()
    model = tiny_model_dir(fx / "model")
    model_other = tiny_model_dir(fx / "model_other", hidden_size=32, num_layers=3, seed=1)
    radapter = random_adapter_dir(model, fx / "radapter")
    radapter_b = random_adapter_dir(model, fx / "radapter_b", seed=1)
    radapter_other = random_adapter_dir(model_other, fx / "radapter_other")
    raw = write_jsonl(fx / "raw" / "chats.jsonl", [chat(i) for i in range(200)])
    raw_big = write_jsonl(fx / "raw" / "big.jsonl", [chat(i) for i in range(40000)])
    raw_bigval = write_jsonl(fx / "raw" / "bigval.jsonl", [chat(i) for i in range(600)])
    data, data_text, data_judge, data_bigval = (fx / "data", fx / "data_text", fx / "data_judge",
                                                fx / "data_bigval")
    trained, corrupt_base, corrupt_ref, gguf = fx / "trained", fx / "corrupt_base", fx / "corrupt_ref", fx / "ref.gguf"

    def check(ran: Ran) -> Ran:
        if ran.rc != 0:
            raise RuntimeError(f"fixture command failed ({ran.rc}): {ran.line()}\n{tail(ran.err, 3000)}")
        return ran

    def timed(key: str, argv: list[Any]) -> None:
        ran = check(ctx.cli(argv, fx, timeout=300))
        ctx.durations[key] = ran.elapsed

    train_small = ["--batch-size", "4", "--max-seq-length", "96", "-q"]
    stage1 = [
        lambda: check(ctx.cli(["prepare", raw, "--out", data, "--split", "0.6,0.2,0.2", "-q"], fx)),
        lambda: check(ctx.cli(["prepare", SAMPLE / "text.jsonl", "--out", data_text, "-q"], fx)),
        lambda: check(ctx.cli(["prepare", SAMPLE / "judge.jsonl", "--out", data_judge, "--stratify-by", "verdict",
                               "-q"], fx)),
        lambda: check(ctx.cli(["prepare", raw_bigval, "--out", data_bigval, "--split", "0.2,0.7,0.1", "-q"], fx)),
    ]
    if need_refs:
        stage1 += [
            lambda: timed("prepare", ["prepare", raw_big, "--out", fx / "ref_prepare" / "out", "--seed", "3", "-q"]),
            lambda: check(ctx.cli(["prepare", raw_big, "--out", fx / "old_prepare" / "out", "--seed", "4",
                                   "--split", "0.5,0.25,0.25", "-q"], fx)),
            lambda: timed("fuse", ["fuse", "--model", model, "--adapter-path", radapter, "--out",
                                   fx / "ref_fuse" / "out", "--export-gguf", fx / "ref_fuse" / "out.gguf", "-q"]),
            lambda: check(ctx.cli(["fuse", "--model", model, "--adapter-path", radapter_b, "--out",
                                   fx / "old_fuse" / "out", "--export-gguf", fx / "old_fuse" / "out.gguf", "-q"],
                                  fx)),
        ]
    with cf.ThreadPoolExecutor(jobs) as pool:
        for f in [pool.submit(s) for s in stage1]:
            f.result()
    stage2 = [
        lambda: check(ctx.cli(["train", "--model", model, "--data", data, "--adapter-path", trained, "--iters", "6",
                               "--save-every", "2", "--steps-per-eval", "3", *train_small], fx)),
        # corrupted-checkpoint base: checkpoints 4, 5, 6 of a 10-step run, and the uninterrupted 10-step run
        lambda: check(ctx.cli(["train", "--model", model, "--data", data, "--adapter-path", corrupt_base, "--iters",
                               "6", "--save-every", "1", "--keep-last", "3", "--lora-dropout", "0.1",
                               "--steps-per-eval", "100", *train_small], fx)),
        lambda: check(ctx.cli(["train", "--model", model, "--data", data, "--adapter-path", corrupt_ref, "--iters",
                               "10", "--save-every", "1", "--keep-last", "3", "--lora-dropout", "0.1",
                               "--steps-per-eval", "100", *train_small], fx)),
        lambda: check(ctx.cli(["fuse", "--model", model, "--adapter-path", radapter, "--out", fx / "fused_for_gguf",
                               "--export-gguf", gguf, "-q"], fx)),
    ]
    with cf.ThreadPoolExecutor(jobs) as pool:
        for f in [pool.submit(s) for s in stage2]:
            f.result()
    if need_refs:
        stage3 = [lambda: timed("eval", ["eval", "--model", model, "--data", data, "--adapter-path", trained,
                                         "--generate", "--max-tokens", "24", "--out", fx / "ref_eval" / "out", "-q"]),
                  lambda: check(ctx.cli(["eval", "--model", model, "--data", data, "--adapter-path", radapter_b,
                                         "--split", "valid", "--out", fx / "old_eval" / "out", "-q"], fx))]
        with cf.ThreadPoolExecutor(jobs) as pool:
            for f in [pool.submit(s) for s in stage3]:
                f.result()
    refs = {k: fx / k / "out" for k in ("ref_prepare", "old_prepare", "ref_fuse", "old_fuse", "ref_eval", "old_eval")}
    return Fixtures(model, model_other, radapter, radapter_b, radapter_other, raw, raw_big, data, data_text,
                    data_judge, data_bigval, trained, corrupt_base, sha256(corrupt_ref / "adapters.safetensors"),
                    gguf, refs)


# ---------------------------------------------------------------------------------------------- bad inputs


@dataclass
class Case:
    category: str
    name: str
    argv: list[Any]
    ws: Path
    names: tuple[str, ...] = ()  # stderr must name at least one: the offending flag, or the file (or field)
    must: tuple[str, ...] = ()  # and all of these
    expect_rc: int = 2
    inputs: tuple[Path, ...] = ()
    stdin: bytes | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 120
    marker: Path | None = None
    stdout_has: tuple[str, ...] = ()
    out_has: tuple[tuple[Path, str], ...] = ()  # (file, text) that must be in the file afterwards
    torch: bool = False
    fallback_ok: tuple[str, ...] = ()  # an exit 0 also counts when stderr holds all of these (a warned fallback)
    writable: tuple[Path, ...] = ()  # outputs such a warned exit 0 may write
    quick: bool = False


def argv_paths(argv: list[Any], cwd: Path) -> list[Path]:
    found = []
    for a in argv:
        s = str(a)
        if not s or s.startswith("-") or len(s) > 4096:
            continue
        p = Path(s) if os.path.isabs(s) else cwd / s
        try:
            if p.exists():
                found.append(p)
        except OSError:
            continue
    return found


def run_case(ctx: Ctx, case: Case) -> dict:
    watched = {p: digest(p) for p in [*argv_paths(case.argv, case.ws), *case.inputs]}
    ran = ctx.cli(case.argv, case.ws, stdin=case.stdin, timeout=case.timeout, env=case.env, torch=case.torch)
    problems = []
    warned_fallback = ran.rc == 0 and bool(case.fallback_ok) and all(
        squash(t) in squash(ran.err) for t in case.fallback_ok)
    if warned_fallback:
        watched = {p: d for p, d in watched.items() if p not in case.writable}
    if ran.timed_out:
        problems.append(f"timed out after {case.timeout:.0f} s")
    elif warned_fallback:
        pass  # warned and fell back to something intact (or did what the warning says)
    elif ran.rc != case.expect_rc:
        problems.append(f"exit {ran.rc}, expected {case.expect_rc}")
    if "Traceback" in ran.err or "Traceback" in ran.out:
        problems.append("traceback printed")
    if case.expect_rc != 0 and not ran.timed_out and ran.rc != 0:
        err = squash(ran.err)
        if case.names and not any(squash(n) in err for n in case.names):
            problems.append("stderr names none of " + ", ".join(repr(n) for n in case.names))
        missing = [m for m in case.must if squash(m) not in err]
        if missing:
            problems.append("stderr lacks " + ", ".join(repr(m) for m in missing))
    changed = [str(p) for p, before in watched.items() if digest(p) != before]
    if changed:
        problems.append("changed: " + ", ".join(changed))
    if case.marker is not None and case.marker.exists():
        problems.append(f"PAYLOAD EXECUTED: {case.marker} was created")
    if case.category == "attack":
        leaked = PASSWD_LEAK in ran.out or PASSWD_LEAK in ran.err
        for p in case.ws.rglob("*"):
            if p.is_file() and p.stat().st_size < (8 << 20) and PASSWD_LEAK.encode() in p.read_bytes():
                leaked = True
        if leaked:
            problems.append("contents of /etc/passwd leaked into the output")
    for text in case.stdout_has:
        if text not in ran.out:
            problems.append(f"stdout lacks {text!r}")
    for path, text in case.out_has:
        if not path.is_file() or text not in path.read_text(errors="replace"):
            problems.append(f"{path.name} lacks {text!r}")
    extra = {"expect_rc": case.expect_rc} if case.expect_rc != 2 else {}
    return result(case.category, case.name, [ran], not problems, "; ".join(problems) or "ok", **extra)


BAD_RECORDS: dict[str, tuple[bytes, int | None]] = {}  # name -> (content, line of the bad record or None)


def _bad_records(good_rows: list[dict] | None = None) -> dict[str, tuple[bytes, int | None]]:
    good = "".join(json.dumps(r) + "\n" for r in (good_rows or [chat(1), chat(2)])).encode()

    def after_good(line: str | bytes) -> tuple[bytes, int]:
        return good + (line.encode() if isinstance(line, str) else line) + b"\n", 3

    user, asst = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}
    deep = '{"text": "x", "meta": ' + "[" * 200000 + "]" * 200000 + "}"
    return {
        "empty-file": (b"", None),
        "blank-lines": (b"\n  \n\t\n", None),
        "binary": (bytes(range(256)) * 8, None),
        "bad-utf8": after_good(b'{"text": "caf\xe9 cr\xe8me br\xfbl\xe9e"}'),
        "nul-bytes": after_good(b'{"text": "a\x00b"}\x00\x00'),
        "truncated-line": (good + b'{"messages": [{"role": "user", "content": "How do I re', 3),
        "array-per-line": after_good(json.dumps([chat(5)])),
        "json-array-file": (json.dumps([chat(1), chat(2)], indent=2).encode(), 1),
        "scalar-lines": after_good('"just a string"\n42\nnull'),
        "messages-not-list": after_good(json.dumps({"messages": "hello"})),
        "content-wrong-type": after_good(json.dumps({"messages": [{"role": "user", "content": 5},
                                                                  {"role": "assistant", "content": ["x"]}]})),
        "prompt-wrong-type": after_good(json.dumps({"prompt": 1, "completion": {"a": 1}})),
        "null-prompt": after_good(json.dumps({"prompt": None, "completion": "x"})),
        "nan-prompt": after_good('{"prompt": NaN, "completion": "x"}'),
        "empty-content": after_good(json.dumps({"messages": [{"role": "user", "content": ""},
                                                             {"role": "assistant", "content": ""}]})),
        "whitespace-text": after_good(json.dumps({"text": "   \n\t "})),
        "unknown-role": after_good(json.dumps({"messages": [{"role": "wizard", "content": "Hi?"}, asst]})),
        "missing-role": after_good(json.dumps({"messages": [{"content": "Hi?"}, asst]})),
        "no-final-assistant": after_good(json.dumps({"messages": [user, asst, user]})),
        "consecutive-roles": after_good(json.dumps({"messages": [user, user, asst]})),
        "unknown-format": after_good(json.dumps({"foo": "bar", "baz": 1})),
        "tools-not-list": after_good(json.dumps({"messages": [user, asst], "tools": "not-a-list"})),
        "deep-nesting": after_good(deep),
    }


# Record kinds that are not errors for a command (generate --input prompts end with a user turn, etc.)
# which record kinds each command gets (prepare gets all); generate --input prompts may end with a user turn
DATA_KINDS = {
    "train": ["empty-file", "bad-utf8", "empty-content", "unknown-role", "no-final-assistant", "consecutive-roles",
              "deep-nesting"],
    "eval": ["binary", "prompt-wrong-type", "missing-role", "no-final-assistant", "nan-prompt"],
    "generate": ["scalar-lines", "null-prompt", "unknown-role", "unknown-format", "deep-nesting"],
}
GENERATE_GOOD = [{"prompt": "Hi"}, {"prompt": "What is the capital of France?"}]


class BadInputs:
    """The bad-input corpus, generated systematically per command."""

    def __init__(self, ctx: Ctx, fx: Fixtures) -> None:
        self.ctx, self.fx = ctx, fx
        self.cases: list[Case] = []

    # -- workspace helpers
    def copy(self, src: Path, dst: Path) -> Path:
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        return dst

    def add(self, name: str, argv: list[Any], ws: Path, names: tuple[Any, ...] = (), **kw: Any) -> None:
        self.cases.append(Case("bad_input", name, argv, ws, tuple(str(n) for n in names), **kw))

    def base(self, command: str, ws: Path) -> list[Any]:
        fx = self.fx
        return {
            "prepare": ["prepare", fx.raw, "--out", ws / "out"],
            "train": ["train", "--model", fx.model, "--data", fx.data, "--adapter-path", ws / "ad", "--iters", "2",
                      "--batch-size", "2", "--max-seq-length", "64", "-q"],
            "eval": ["eval", "--model", fx.model, "--data", fx.data, "--out", ws / "ev", "--limit", "4", "-q"],
            "generate": ["generate", "--model", fx.model, "--prompt", "Hi", "--max-tokens", "4", "-q"],
            "fuse": ["fuse", "--model", fx.model, "--adapter-path", fx.radapter, "--out", ws / "fused", "-q"],
        }[command]

    def build(self) -> list[Case]:
        self.flag_values()
        self.configs_and_env()
        self.data_files()
        self.models()
        self.adapters()
        self.outputs()
        self.specific()
        return self.cases

    # -- 1. flag values
    FLAGS: ClassVar[dict[str, list[tuple[str, list[str]]]]] = {
        "prepare": [
            ("--seed", ["-1", str(2**63), "abc"]),
            ("--max-error-rate", ["1.5", "nan", "1e400"]),
            ("--max-chars", ["0", "1e3"]),
            ("--max-tokens", ["0"]),
            ("--split", ["0.5,0.5", "0.9", "a,b,c", "-0.1,0.6,0.5", "0,0.5,0.5", "0.8,0.1,0.2", "nan,0,0"]),
            ("--input-format", ["xml"]),
            ("--format", ["html"]),
            ("--on-error", ["ignore"]),
            ("--template", ["chatml2", "/nonexistent/tpl.jinja"]),
            ("--field-map", ["prompt"]),
            ("--stratify-by", ["no_such_field"]),
            ("--group-by", ["no_such_field"]),
        ],
        "train": [
            ("--lora-rank", ["0", "-4", "2.5", str(2**62)]),
            ("--lora-alpha", ["0", "nan", "1e400"]),
            ("--lora-dropout", ["1", "nan"]),
            ("--num-layers", ["0", "-2", "99"]),
            ("--target-modules", ["nonexistent_proj", ",", "attention,bogus_proj"]),
            ("--max-seq-length", ["0", "1"]),
            ("--batch-size", ["2.5"]),
            ("--grad-accumulation-steps", ["0"]),
            ("--iters", ["0", "-5", str(2**63)]),
            ("--epochs", ["0", "inf"]),
            ("--learning-rate", ["-1e-4", "nan", "abc"]),
            ("--optimizer", ["adamax"]),
            ("--weight-decay", ["-0.1"]),
            ("--lr-schedule", ["exponential"]),
            ("--warmup", ["-1"]),
            ("--min-lr-ratio", ["2"]),
            ("--max-grad-norm", ["0"]),
            ("--max-memory", ["0"]),
            ("--steps-per-eval", ["0"]),
            ("--save-every", ["0"]),
            ("--keep-last", ["0"]),
            ("--val-batches", ["0", "-2"]),
            ("--early-stopping-patience", ["0"]),
            ("--dist-timeout", ["nan"]),
            ("--fine-tune-type", ["qlora"]),
            ("--train-on", ["prompts"]),
            ("--quantize", ["3"]),
            ("--q-group-size", ["7"]),
            ("--dtype", ["float64"]),
            ("--seed", ["-1"]),
        ],
        "eval": [
            ("--split", ["bogus", "../data"]),
            ("--batch-size", ["0"]),
            ("--max-seq-length", ["1"]),
            ("--limit", ["0"]),
            ("--temp", ["-1"]),
            ("--top-p", ["0", "1.5"]),
            ("--top-k", ["-1"]),
            ("--min-p", ["1.5"]),
            ("--repetition-penalty", ["inf"]),
            ("--train-on", ["x"]),
            ("--labels", [",", " , "]),
            ("--prompt-delimiter", [""]),
            ("--template", ["nosuch", "/nonexistent.jinja"]),
            ("--judge-template", ["/nonexistent/judge.jinja"]),
            ("--q-group-size", ["7"]),
            ("--dtype", ["half"]),
        ],
        "generate": [
            ("--max-tokens", ["0", "abc"]),
            ("--temp", ["-0.5", "nan"]),
            ("--top-p", ["2"]),
            ("--top-k", ["-3"]),
            ("--min-p", ["1.01"]),
            ("--repetition-penalty", ["0"]),
            ("--batch-size", ["0"]),
            ("--seed", ["abc"]),
            ("--quantize", ["5"]),
            ("--q-group-size", ["7"]),
            ("--dtype", ["fp16"]),
            ("--template", ["nosuch", "/nonexistent/x.jinja"]),
        ],
        "fuse": [
            ("--requantize", ["3"]),
            ("--q-group-size", ["7", "100"]),
            ("--dtype", ["int8"]),
            ("--gguf-type", ["q4_k_m"]),  # k-quants are not written (the gguf package cannot)
            ("--verify-tolerance", ["0", "nan"]),
            ("--quantize", ["3"]),
        ],
    }

    def flag_values(self) -> None:
        for command, flags in self.FLAGS.items():
            for flag, values in flags:
                for value in values:
                    ws = self.ctx.ws(f"{command}{flag}={value}")
                    argv = [*self.base(command, ws), flag, value]
                    if command == "eval" and flag == "--prompt-delimiter":
                        argv.append("--generate")  # the flag only matters with --generate
                    if command == "eval" and flag == "--judge-template":
                        argv = ["eval", "--model", self.fx.model, "--data", self.fx.data_judge, "--judge", "--out",
                                ws / "ev", "--limit", "2", "-q", flag, value]
                    if command == "prepare" and flag == "--max-tokens":
                        argv += ["--model", self.fx.model]
                    if command == "prepare" and flag == "--template":
                        argv += ["--format", "text"]  # the template only matters for text output
                    names: tuple[Any, ...] = (flag,)
                    if flag in ("--template", "--judge-template") and value.startswith("/"):
                        names = (flag, value)
                    if command == "eval" and flag == "--split":
                        names = (flag, f"{value}.jsonl")
                    huge = value.lstrip("-").isdigit() and len(value) > 12
                    self.add(f"{command} {flag} {value!r}", argv, ws, names, **({"timeout": 45} if huge else {}))
        # a few that need a neighbour flag to matter
        ws = self.ctx.ws("eval-label-pattern")
        self.add("eval --generate --label-pattern '('", [*self.base("eval", ws), "--generate", "--label-pattern", "("],
                 ws, ("--label-pattern",))
        ws = self.ctx.ws("eval-label-pattern2")
        self.add("eval --generate --label-pattern '[a-'", [*self.base("eval", ws), "--generate", "--label-pattern",
                                                            "[a-"], ws, ("--label-pattern",))
        ws = self.ctx.ws("eval-judge-on-chat")
        self.add("eval --judge on chat data", [*self.base("eval", ws), "--judge"], ws, ("--judge",))
        ws = self.ctx.ws("train-resume-overwrite")
        self.add("train --resume --overwrite", [*self.base("train", ws), "--resume", "--overwrite"], ws,
                 ("--resume", "--overwrite"))

    # -- 2. configs and environment variables
    def configs_and_env(self) -> None:
        ctx = self.ctx
        # names: what stderr must hold ({path}: the config file); a value error may name just the key
        syntax = ("--config", "{path}")
        yamls: dict[str, tuple[bytes, tuple[str, ...]]] = {
            "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\x00", syntax),
            "nul": (b"seed: 1\x00\x01\n", syntax),
            "invalid-syntax": (b"learning_rate: [1e-4,\n  iters: {\n", syntax),
            "top-level-list": (b"- iters: 2\n- seed: 1\n", syntax),
            "top-level-scalar": (b"just a string\n", syntax),
            "unknown-key": (b"lerning_rate: 1e-4\n", ("{path}", "lerning_rate")),
            "wrong-type": (b"seed: many\n", ("seed",)),
            "section-not-mapping": (b"{cmd}: 5\n", ("{path}", "{cmd}")),
            "other-section-unknown-key": (b"{other}:\n  bogus_key: 1\n", ("{path}", "bogus_key")),
            "nan-value": (b"seed: .nan\n", ("seed",)),
            # 9^6 aliases: a bomb big enough to show, small enough not to hurt the machine
            "alias-bomb": ((b'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
                            b"b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
                            b"d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
                            b"f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n{cmd}:\n  seed: *f\n"), ("{path}", "seed")),
        }
        train_only: dict[str, tuple[bytes, tuple[str, ...]]] = {
            "mlx-lm-rank-string": (b"lora_parameters:\n  rank: eight\n  scale: 20.0\n", ("rank",)),
            "mlx-lm-lora-parameters-scalar": (b"lora_parameters: 5\n", ("lora_parameters",)),
            "mlx-lm-schedule-bogus": (b"lr_schedule:\n  name: bogus_decay\n  arguments: [1e-5, 100, 0]\n",
                                      ("lr_schedule", "bogus_decay")),
            "mlx-lm-optimizer-config": (b"optimizer: adamw\noptimizer_config:\n  adamw:\n    weight_decay: -1\n",
                                        ("weight_decay",)),
            "mlx-lm-lora-layers-string": (b"lora_layers: all\n", ("lora_layers",)),
            "mlx-lm-keys-not-list": (b"lora_parameters:\n  keys: self_attn.q_proj\n  rank: 8\n", ("keys",)),
        }
        others = {"prepare": "train", "train": "eval", "eval": "fuse", "generate": "prepare", "fuse": "generate"}
        for command in ("prepare", "train", "eval", "generate", "fuse"):
            kinds = dict(yamls)
            if command == "train":
                kinds.update(train_only)
            if command == "prepare":
                kinds = {k: kinds[k] for k in ("binary", "nul", "invalid-syntax", "top-level-list", "unknown-key",
                                                "wrong-type", "other-section-unknown-key", "alias-bomb")}
            elif command == "train":
                kinds = {k: kinds[k] for k in ("top-level-scalar", "section-not-mapping", "nan-value", *train_only)}
            else:
                kinds = {k: kinds[k] for k in ("binary", "unknown-key")}
            for kind, (content, names) in kinds.items():
                ws = ctx.ws(f"{command}-config-{kind}")
                path = ws / "config.yaml"
                path.write_bytes(content.replace(b"{cmd}", command.encode())
                                 .replace(b"{other}", others[command].encode()))
                names = tuple(n.replace("{cmd}", command).replace("{path}", str(path)) for n in names)
                self.add(f"{command} --config ({kind})", [*self.base(command, ws), "--config", path], ws, names,
                         **({"timeout": 60} if kind == "alias-bomb" else {}))
            if command == "prepare":
                ws = ctx.ws(f"{command}-config-missing")
                self.add(f"{command} --config missing file", [*self.base(command, ws), "--config", ws / "nope.yaml"],
                         ws, ("--config", ws / "nope.yaml"))
            if command == "train":
                ws = ctx.ws(f"{command}-config-dir")
                self.add(f"{command} --config a directory", [*self.base(command, ws), "--config", ws], ws,
                         ("--config",))
        env_cases = [("prepare", "LORAKIT_SEED", "-1"), ("train", "LORAKIT_LEARNING_RATE", "abc"),
                     ("eval", "LORAKIT_BATCH_SIZE", "0"), ("generate", "LORAKIT_TEMP", "nan"),
                     ("fuse", "LORAKIT_DTYPE", "int8"), ("train", "LORAKIT_TARGET_MODULES", ",")]
        for command, var, value in env_cases:
            ws = ctx.ws(f"{command}-env-{var}")
            self.add(f"{command} with {var}={value}", self.base(command, ws), ws, (var,), env={var: value})

    # -- 3. data files
    def data_files(self) -> None:
        ctx, fx = self.ctx, self.fx
        generate_records = _bad_records(GENERATE_GOOD)
        for kind, (content, _line) in _bad_records().items():  # prepare: every kind; the others a spread
            # prepare: the raw input
            ws = ctx.ws(f"prepare-data-{kind}")
            raw = ws / "raw.jsonl"
            raw.write_bytes(content)
            self.add(f"prepare on a {kind} file", ["prepare", raw, "--out", ws / "out"], ws, (raw,))
            # train: train.jsonl of a prepared directory
            if kind not in DATA_KINDS["train"]:
                continue
            ws = ctx.ws(f"train-data-{kind}")
            data = self.copy(fx.data, ws / "data")
            (data / "train.jsonl").write_bytes(content)
            self.add(f"train on a {kind} train.jsonl",
                     ["train", "--model", fx.model, "--data", data, "--adapter-path", ws / "ad", "--iters", "2",
                      "--batch-size", "2", "-q"], ws, (data / "train.jsonl",))
        for kind, (content, _line) in _bad_records().items():
            if kind not in DATA_KINDS["eval"]:
                continue
            ws = ctx.ws(f"eval-data-{kind}")
            data = self.copy(fx.data, ws / "data")
            (data / "test.jsonl").write_bytes(content)
            self.add(f"eval on a {kind} test.jsonl",
                     ["eval", "--model", fx.model, "--data", data, "--out", ws / "ev", "-q"], ws,
                     (data / "test.jsonl",))
        for kind in DATA_KINDS["generate"]:
            if True:
                ws = ctx.ws(f"generate-input-{kind}")
                inp = ws / "prompts.jsonl"
                inp.write_bytes(generate_records[kind][0])
                self.add(f"generate --input a {kind} file",
                         ["generate", "--model", fx.model, "--input", inp, "--output", ws / "out.jsonl",
                          "--max-tokens", "4", "-q"], ws, (inp,))
        # valid.jsonl broken while train.jsonl is fine
        for kind in ("unknown-role",):
            ws = ctx.ws(f"train-valid-{kind}")
            data = self.copy(fx.data, ws / "data")
            (data / "valid.jsonl").write_bytes(_bad_records()[kind][0])
            self.add(f"train with a {kind} valid.jsonl",
                     ["train", "--model", fx.model, "--data", data, "--adapter-path", ws / "ad", "--iters", "2",
                      "--batch-size", "2", "-q"], ws, (data / "valid.jsonl",))
        # the repository's own broken samples
        for path in sorted((SAMPLE / "broken").glob("*.jsonl")):
            if path.name in ("duplicates.jsonl", "too_long.jsonl"):
                continue  # duplicates are dropped by design; too_long needs --max-chars
            ws = ctx.ws(f"prepare-sample-{path.stem}")
            self.add(f"prepare sample_data/broken/{path.name}", ["prepare", path, "--out", ws / "out"], ws, (path,))
        ws = ctx.ws("prepare-too-long")
        self.add("prepare too_long.jsonl --max-chars 50",
                 ["prepare", SAMPLE / "broken" / "too_long.jsonl", "--out", ws / "out", "--max-chars", "50"], ws,
                 (SAMPLE / "broken" / "too_long.jsonl",))
        ws = ctx.ws("prepare-some-bad-skip")
        self.add("prepare some_bad.jsonl --on-error skip --max-error-rate 0.01 (1 of 31 bad)",
                 ["prepare", SAMPLE / "broken" / "some_bad.jsonl", "--out", ws / "out", "--on-error", "skip",
                  "--max-error-rate", "0.01"], ws, ("--max-error-rate",))
        # file names rich could mistake for markup
        for label, fname in (("brackets", "notes [v2].jsonl"), ("closing tag", "odd[/]name.jsonl"),
                             ("bold tag", "data[bold]x.jsonl")):
            ws = ctx.ws(f"prepare-name-{label}")
            raw = ws / fname  # 'odd[' is a directory: the path text holds rich's closing tag '[/]'
            raw.parent.mkdir(parents=True, exist_ok=True)
            raw.write_bytes(_bad_records()["unknown-role"][0])
            self.add(f"prepare on a bad file named {fname!r}", ["prepare", raw, "--out", ws / "out"], ws, (raw,))
        # paths of the wrong kind
        ws = ctx.ws("prepare-input-dir")
        self.add("prepare INPUT is a directory", ["prepare", SAMPLE, "--out", ws / "out"], ws, (SAMPLE,))
        ws = ctx.ws("prepare-input-missing")
        self.add("prepare INPUT missing", ["prepare", ws / "nope.jsonl", "--out", ws / "out"], ws, (ws / "nope.jsonl",))
        ws = ctx.ws("prepare-no-input")
        self.add("prepare without INPUT", ["prepare", "--out", ws / "out"], ws, ("INPUT",))
        ws = ctx.ws("prepare-format-text-no-template")
        self.add("prepare --format text without a template", [*self.base("prepare", ws), "--format", "text"], ws,
                 ("--format", "--template"))
        ws = ctx.ws("prepare-max-tokens-no-model")
        self.add("prepare --max-tokens without --model/--tokenizer", [*self.base("prepare", ws), "--max-tokens", "50"],
                 ws, ("--max-tokens",))
        ws = ctx.ws("prepare-tokenizer-missing")
        self.add("prepare --tokenizer missing", [*self.base("prepare", ws), "--tokenizer", ws / "tok.json",
                                                 "--max-tokens", "50"], ws, ("--tokenizer", ws / "tok.json"))
        ws = ctx.ws("prepare-field-map-missing-field")
        self.add("prepare --field-map naming absent fields on chats",
                 [*self.base("prepare", ws), "--field-map", "prompt=question,completion=answer",
                  "--input-format", "completions"], ws, (self.fx.raw,))
        ws = ctx.ws("prepare-input-format-judge")
        self.add("prepare --input-format judge on chats", [*self.base("prepare", ws), "--input-format", "judge"], ws,
                 (self.fx.raw,))
        ws = ctx.ws("prepare-all-duplicates")
        raw = write_jsonl(ws / "dups.jsonl", [chat(1)] * 40)
        self.add("prepare on 40 copies of one record", ["prepare", raw, "--out", ws / "out"], ws, (raw,))
        for label, data_arg in (("missing", "nope"), ("a file", None), ("no train.jsonl", "empty")):
            ws = ctx.ws(f"train-data-{label}")
            if data_arg == "nope":
                data = ws / "nope"
            elif data_arg == "empty":
                data = ws / "empty"
                data.mkdir()
            else:
                data = self.copy(fx.raw, ws / "raw.jsonl")
            self.add(f"train --data {label}", ["train", "--model", fx.model, "--data", data, "--adapter-path",
                                               ws / "ad", "-q"], ws, ("--data", data))
        for label, data_arg in (("no test.jsonl", "notest"),):
            ws = ctx.ws(f"eval-data-{label}")
            data = ws / "nope"
            if data_arg == "notest":
                data = self.copy(fx.data, ws / "data")
                (data / "test.jsonl").unlink()
            self.add(f"eval --data {label}", ["eval", "--model", fx.model, "--data", data, "--out", ws / "ev", "-q"],
                     ws, (data,))
        # text records: --generate needs --prompt-delimiter, and every record must contain it
        ws = ctx.ws("eval-text-generate-no-delimiter")
        self.add("eval --generate on text records without --prompt-delimiter",
                 ["eval", "--model", fx.model, "--data", fx.data_text, "--generate", "--out", ws / "ev", "--limit", "3",
                  "-q"], ws, ("--prompt-delimiter",))
        ws = ctx.ws("eval-text-delimiter-absent")
        self.add("eval --generate --prompt-delimiter absent from the records",
                 ["eval", "--model", fx.model, "--data", fx.data_text, "--generate", "--prompt-delimiter", "@@@",
                  "--out", ws / "ev", "--limit", "3", "-q"], ws, (fx.data_text / "test.jsonl",))
        # judge data problems
        ws = ctx.ws("eval-judge-bad-verdict")
        data = self.copy(fx.data_judge, ws / "data")
        lines = (data / "test.jsonl").read_text().splitlines()
        rec = json.loads(lines[0])
        rec["verdict"] = "C"
        lines[0] = json.dumps(rec)
        (data / "test.jsonl").write_text("\n".join(lines) + "\n")
        self.add("eval --judge with a verdict 'C'", ["eval", "--model", fx.model, "--data", data, "--judge",
                                                      "--out", ws / "ev", "--limit", "3", "-q"], ws,
                 (data / "test.jsonl",))
        # generate --input of the wrong kind
        ws = ctx.ws("generate-input-dir")
        self.add("generate --input DIR", ["generate", "--model", fx.model, "--input", fx.data, "-q"], ws,
                 ("--input", fx.data))
        ws = ctx.ws("generate-input-no-prompt-field")
        inp = write_jsonl(ws / "p.jsonl", [{"question": "Hi?"}])
        self.add("generate --input without prompt/messages", ["generate", "--model", fx.model, "--input", inp, "-q"],
                 ws, (inp,))

    # -- 4. models
    def models(self) -> None:
        ctx, fx = self.ctx, self.fx
        commands = {"train": lambda ws, m: ["train", "--model", m, "--data", fx.data, "--adapter-path", ws / "ad",
                                            "--iters", "2", "-q"],
                    "eval": lambda ws, m: ["eval", "--model", m, "--data", fx.data, "--out", ws / "ev", "-q"],
                    "generate": lambda ws, m: ["generate", "--model", m, "--prompt", "Hi", "--max-tokens", "4",
                                               "-q"],
                    "fuse": lambda ws, m: ["fuse", "--model", m, "--adapter-path", fx.radapter, "--out",
                                           ws / "fused", "-q"]}

        def broken_model(ws: Path, kind: str) -> Path:
            m = ws / "model"
            if kind == "missing":
                return m
            if kind == "a file":
                return self.copy(fx.raw, ws / "model.jsonl")
            if kind == "empty dir":
                m.mkdir()
                return m
            self.copy(fx.model, m)
            if kind == "truncated weights":
                w = m / "model.safetensors"
                w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
            elif kind == "no weights":
                (m / "model.safetensors").unlink()
            elif kind == "config.json invalid":
                (m / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
            elif kind == "unsupported model_type":
                cfg = json.loads((m / "config.json").read_text())
                cfg["model_type"] = "no_such_arch"
                (m / "config.json").write_text(json.dumps(cfg))
            elif kind == "config missing keys":
                (m / "config.json").write_text(json.dumps({"model_type": "llama"}))
            elif kind == "no tokenizer":
                (m / "tokenizer.json").unlink()
                (m / "tokenizer_config.json").unlink()
            elif kind == "tokenizer.json garbage":
                (m / "tokenizer.json").write_bytes(b"\x00\x01garbage{")
            elif kind == "weights of another shape":
                shutil.copy2(fx.model_other / "model.safetensors", m / "model.safetensors")
            return m

        plan = {"train": ["missing", "unsupported model_type", "weights of another shape"],
                "eval": ["empty dir", "no tokenizer"],
                "generate": ["a file", "config.json invalid", "tokenizer.json garbage", "truncated weights"],
                "fuse": ["config missing keys"]}
        for command, kinds in plan.items():
            for kind in kinds:
                ws = ctx.ws(f"{command}-model-{kind}")
                m = broken_model(ws, kind)
                self.add(f"{command} --model {kind}", commands[command](ws, m), ws, ("--model", m))
        ws = ctx.ws("generate-model-not-repo")
        self.add("generate --model not-a-repo-id", commands["generate"](ws, "not-a-model"), ws,
                 ("--model", "not-a-model"))
        ws = ctx.ws("train-model-offline-hub")
        self.add("train --model owner/name (offline)", commands["train"](ws, "nobody/no-such-model"), ws,
                 ("--model", "nobody/no-such-model"))
        for command in ("eval",):
            ws = ctx.ws(f"{command}-gguf-garbage")
            g = ws / "model.gguf"
            g.write_bytes(b"GGUF\x03\x00\x00\x00" + random.Random(19).randbytes(4000))
            self.add(f"{command} --model a garbage .gguf", commands[command](ws, g), ws, ("--model", g))
        ws = ctx.ws("generate-gguf-truncated")
        g = ws / "model.gguf"
        g.write_bytes(fx.gguf.read_bytes()[: fx.gguf.stat().st_size // 2])
        self.add("generate --model a truncated .gguf", commands["generate"](ws, g), ws, ("--model", g))
        ws = ctx.ws("train-quantize-quantized")
        qm = ws / "qmodel"
        from lorakit.testing import tiny_model_dir

        tiny_model_dir(qm, quantize_bits=4)
        self.add("train --quantize 4 on a quantized base", [*commands["train"](ws, qm), "--quantize", "4"], ws,
                 ("--quantize",))

    # -- 5. adapters
    def adapters(self) -> None:
        ctx, fx = self.ctx, self.fx
        commands = {"eval": lambda ws, a: ["eval", "--model", fx.model, "--data", fx.data, "--adapter-path", a,
                                           "--out", ws / "ev", "--limit", "4", "-q"],
                    "generate": lambda ws, a: ["generate", "--model", fx.model, "--adapter-path", a, "--prompt",
                                               "Hi", "--max-tokens", "4", "-q"],
                    "fuse": lambda ws, a: ["fuse", "--model", fx.model, "--adapter-path", a, "--out", ws / "fused",
                                           "-q"]}

        def broken_adapter(ws: Path, kind: str) -> tuple[Path, Path]:
            a = ws / "adapter"
            if kind == "missing":
                return a, a
            if kind == "a file":
                f = self.copy(fx.radapter / "adapters.safetensors", ws / "adapters.safetensors")
                return f, f
            if kind == "empty dir":
                a.mkdir()
                return a, a
            if kind == "of another base shape":
                self.copy(fx.radapter_other, a)
                return a, a
            self.copy(fx.radapter, a)
            w, c = a / "adapters.safetensors", a / "adapter_config.json"
            if kind == "truncated weights":
                w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
                return a, w
            if kind == "adapter_config.json invalid":
                c.write_text('{"fine_tune_type": "lora", ')
                return a, c
            if kind == "no adapters.safetensors":
                w.unlink()
                return a, a
            if kind == "rank not matching weights":
                cfg = json.loads(c.read_text())
                cfg.setdefault("lora_parameters", {})["rank"] = 16
                cfg["lora_rank"] = 16
                c.write_text(json.dumps(cfg))
                return a, a
            if kind == "fine_tune_type bogus":
                cfg = json.loads(c.read_text())
                cfg["fine_tune_type"] = "bogus"
                c.write_text(json.dumps(cfg))
                return a, c
            raise ValueError(kind)

        plan = {"eval": ["missing", "truncated weights", "adapter_config.json invalid"],
                "generate": ["a file", "empty dir", "no adapters.safetensors", "fine_tune_type bogus",
                             "of another base shape"],
                "fuse": ["truncated weights", "of another base shape"]}
        for command, kinds in plan.items():
            for kind in kinds:
                ws = ctx.ws(f"{command}-adapter-{kind}")
                a, named = broken_adapter(ws, kind)
                self.add(f"{command} --adapter-path {kind}", commands[command](ws, a), ws, ("--adapter-path", named)
                         if named == a else (named,))
        ws = ctx.ws("generate-adapter-rank-mismatch")
        a, _ = broken_adapter(ws, "rank not matching weights")
        self.add("generate --adapter-path whose config's rank does not match its weights", commands["generate"](ws, a),
                 ws, ("--adapter-path",))
        for command in ("generate",):  # best/ is what loads by default
            ws = ctx.ws(f"{command}-best-truncated")
            a = self.copy(fx.trained, ws / "adapter")
            w = a / "best" / "adapters.safetensors"
            w.write_bytes(w.read_bytes()[:100])
            self.add(f"{command} --adapter-path whose best/ is truncated", commands[command](ws, a), ws, (w,))
        # train --resume / --resume-from
        base = ["train", "--model", fx.model, "--data", fx.data, "--iters", "8", "--batch-size", "4",
                "--max-seq-length", "96", "-q"]
        ws = ctx.ws("train-resume-empty")
        self.add("train --resume with nothing to resume (a warning that it starts over is accepted)",
                 [*base, "--adapter-path", ws / "ad", "--resume"], ws, ("--resume",),
                 fallback_ok=("nothing to resume",))
        ws = ctx.ws("train-resume-from-missing")
        self.add("train --resume-from missing", [*base, "--adapter-path", ws / "ad", "--resume-from", ws / "ck"], ws,
                 ("--resume-from", ws / "ck"))
        ws = ctx.ws("train-resume-from-other-shape")
        ck = self.copy(fx.trained / "checkpoints" / "step-000006", ws / "ck")
        self.add("train --resume-from a checkpoint of another model",
                 ["train", "--model", fx.model_other, "--data", fx.data, "--iters", "8", "-q", "--adapter-path",
                  ws / "ad", "--resume-from", ck], ws, ("--resume-from",))
        ws = ctx.ws("train-resume-other-data")
        ad = self.copy(fx.trained, ws / "ad")
        self.add("train --resume on different data (a warning naming the changed file is accepted)",
                 ["train", "--model", fx.model, "--data", fx.data_text, "--iters", "8", "-q", "--adapter-path", ad,
                  "--resume"], ws, ("--data",), fallback_ok=("train.jsonl", "changed since checkpoint"), writable=(ad,))
        ws = ctx.ws("train-resume-other-rank")
        ad = self.copy(fx.trained, ws / "ad")
        self.add("train --resume with another --lora-rank",
                 [*base, "--adapter-path", ad, "--resume", "--lora-rank", "4"], ws, ("--lora-rank",))
        ws = ctx.ws("train-nonempty-no-flags")
        ad = self.copy(fx.trained, ws / "ad")
        self.add("train into a non-empty --adapter-path", [*base, "--adapter-path", ad], ws, ("--adapter-path", ad))

    # -- 6. outputs: overlap with inputs, locks, wrong kinds
    def outputs(self) -> None:
        ctx, fx = self.ctx, self.fx

        def lock(target: Path) -> None:
            target = Path(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.with_name(f".{target.name}.lock").write_text(json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "since": "2025-01-01T00:00:00"}))

        # prepare
        ws = ctx.ws("prepare-out-contains-input")
        raw = self.copy(fx.raw, ws / "x" / "raw.jsonl")
        self.add("prepare --out containing INPUT --overwrite", ["prepare", raw, "--out", ws / "x", "--overwrite"],
                 ws, ("--out",))
        ws = ctx.ws("prepare-out-is-input")
        raw = self.copy(fx.raw, ws / "raw.jsonl")
        self.add("prepare --out = INPUT --overwrite", ["prepare", raw, "--out", raw, "--overwrite"], ws, ("--out",))
        ws = ctx.ws("prepare-out-inside-model")
        m = self.copy(fx.model, ws / "model")
        self.add("prepare --out inside --model", ["prepare", fx.raw, "--out", m / "data", "--model", m], ws,
                 ("--out", "--model"))
        ws = ctx.ws("prepare-out-contains-template")
        tpl = ws / "tpl" / "chat.jinja"
        tpl.parent.mkdir()
        tpl.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
        self.add("prepare --out containing --template --overwrite",
                 ["prepare", fx.raw, "--out", tpl.parent, "--format", "text", "--template", tpl, "--overwrite"], ws,
                 ("--out", "--template"))
        ws = ctx.ws("prepare-out-contains-config")
        out = ws / "out"
        out.mkdir()
        (out / "c.yaml").write_text("seed: 3\n")
        self.add("prepare --out containing --config --overwrite",
                 ["prepare", fx.raw, "--out", out, "--config", out / "c.yaml", "--overwrite"], ws, ("--out", "--config"))
        ws = ctx.ws("prepare-out-nonempty")
        out = self.copy(fx.data, ws / "out")
        self.add("prepare into a non-empty --out", ["prepare", fx.raw, "--out", out], ws, ("--out", "--overwrite"))
        ws = ctx.ws("prepare-out-file")
        out = self.copy(fx.raw, ws / "out.jsonl")
        self.add("prepare --out is a file", ["prepare", fx.raw, "--out", out], ws, ("--out", out))
        ws = ctx.ws("prepare-out-locked")
        lock(ws / "out")
        self.add("prepare --out locked by a live run", ["prepare", fx.raw, "--out", ws / "out"], ws,
                 ("--out",), must=("in use",))
        # train
        tbase = ["train", "--model", fx.model, "--iters", "2", "--batch-size", "2", "-q"]
        ws = ctx.ws("train-ad-is-data")
        d = self.copy(fx.data, ws / "data")
        self.add("train --adapter-path = --data --overwrite", [*tbase, "--data", d, "--adapter-path", d, "--overwrite"],
                 ws, ("--adapter-path", "--data"))
        ws = ctx.ws("train-ad-inside-data")
        d = self.copy(fx.data, ws / "data")
        self.add("train --adapter-path inside --data", [*tbase, "--data", d, "--adapter-path", d / "ad"], ws,
                 ("--adapter-path", "--data"))
        ws = ctx.ws("train-ad-is-model")
        m = self.copy(fx.model, ws / "model")
        self.add("train --adapter-path = --model --overwrite",
                 ["train", "--model", m, "--data", fx.data, "--adapter-path", m, "--overwrite", "--iters", "2", "-q"], ws,
                 ("--adapter-path", "--model"))
        ws = ctx.ws("train-ad-contains-model")
        m = self.copy(fx.model, ws / "runs" / "model")
        self.add("train --adapter-path containing --model --overwrite",
                 ["train", "--model", m, "--data", fx.data, "--adapter-path", ws / "runs", "--overwrite", "--iters",
                  "2", "-q"], ws, ("--adapter-path", "--model"))
        ws = ctx.ws("train-ad-locked")
        lock(ws / "ad")
        self.add("train --adapter-path locked by a live run", [*tbase, "--data", fx.data, "--adapter-path", ws / "ad"],
                 ws, ("--adapter-path",), must=("in use",))
        # eval
        ebase = ["eval", "--model", fx.model, "--limit", "4", "-q"]
        ws = ctx.ws("eval-out-is-data")
        d = self.copy(fx.data, ws / "data")
        self.add("eval --out = --data --overwrite", [*ebase, "--data", d, "--out", d, "--overwrite"], ws,
                 ("--out", "--data"))
        ws = ctx.ws("eval-out-inside-data")
        d = self.copy(fx.data, ws / "data")
        self.add("eval --out inside --data", [*ebase, "--data", d, "--out", d / "ev"], ws, ("--out", "--data"))
        ws = ctx.ws("eval-out-is-model")
        m = self.copy(fx.model, ws / "model")
        self.add("eval --out = --model --overwrite",
                 ["eval", "--model", m, "--data", fx.data, "--out", m, "--overwrite", "--limit", "4", "-q"], ws,
                 ("--out", "--model"))
        ws = ctx.ws("eval-out-is-adapter")
        a = self.copy(fx.trained, ws / "adapter")
        self.add("eval --out = --adapter-path --overwrite",
                 [*ebase, "--data", fx.data, "--adapter-path", a, "--out", a, "--overwrite"], ws,
                 ("--out", "--adapter-path"))
        ws = ctx.ws("eval-out-nonempty")
        out = self.copy(fx.data, ws / "ev")
        self.add("eval into a non-empty --out", [*ebase, "--data", fx.data, "--out", out], ws, ("--out",))
        ws = ctx.ws("eval-out-locked")
        lock(ws / "ev")
        self.add("eval --out locked by a live run", [*ebase, "--data", fx.data, "--out", ws / "ev"], ws,
                 ("--out",), must=("in use",))
        # generate
        gbase = ["generate", "--model", fx.model, "--max-tokens", "4", "-q"]
        prompts = [{"prompt": "Hi"}, {"prompt": "What is the capital of France?"}]
        ws = ctx.ws("generate-output-is-input")
        inp = write_jsonl(ws / "p.jsonl", prompts)
        self.add("generate --output = --input --overwrite", [*gbase, "--input", inp, "--output", inp, "--overwrite"],
                 ws, ("--output", "--input"))
        # --output takes --input results (a --prompt answer goes to stdout), so each case has an --input
        ws = ctx.ws("generate-output-in-model")
        m = self.copy(fx.model, ws / "model")
        inp = write_jsonl(ws / "p.jsonl", prompts)
        self.add("generate --output = the model's config.json --overwrite",
                 ["generate", "--model", m, "--input", inp, "--max-tokens", "4", "-q", "--output", m / "config.json",
                  "--overwrite"], ws, ("--output", "--model"))
        ws = ctx.ws("generate-output-adapter-weights")
        a = self.copy(fx.radapter, ws / "adapter")
        inp = write_jsonl(ws / "p.jsonl", prompts)
        self.add("generate --output = adapters.safetensors --overwrite",
                 [*gbase, "--adapter-path", a, "--input", inp, "--output", a / "adapters.safetensors", "--overwrite"],
                 ws, ("--output", "--adapter-path"))
        ws = ctx.ws("generate-output-dir")
        (ws / "outdir").mkdir()
        inp = write_jsonl(ws / "p.jsonl", prompts)
        self.add("generate --output DIR", [*gbase, "--input", inp, "--output", ws / "outdir"], ws,
                 ("--output", ws / "outdir"))
        ws = ctx.ws("generate-output-exists")
        out = write_jsonl(ws / "out.jsonl", [{"old": True}])
        inp = write_jsonl(ws / "p.jsonl", prompts)
        self.add("generate --output existing without --overwrite", [*gbase, "--input", inp, "--output", out], ws,
                 ("--output", "--overwrite"))
        ws = ctx.ws("generate-output-locked")
        lock(ws / "out.jsonl")
        inp = write_jsonl(ws / "p.jsonl", prompts)
        self.add("generate --output locked by a live run", [*gbase, "--input", inp, "--output", ws / "out.jsonl"],
                 ws, ("--output",), must=("in use",))
        ws = ctx.ws("generate-output-with-prompt")
        self.add("generate --prompt with --output", [*gbase, "--prompt", "Hi", "--output", ws / "o.jsonl"], ws,
                 ("--output",))
        # fuse
        ws = ctx.ws("fuse-out-is-model")
        m = self.copy(fx.model, ws / "model")
        self.add("fuse --out = --model --overwrite",
                 ["fuse", "--model", m, "--adapter-path", fx.radapter, "--out", m, "--overwrite", "-q"], ws,
                 ("--out", "--model"))
        ws = ctx.ws("fuse-out-is-adapter")
        a = self.copy(fx.radapter, ws / "adapter")
        self.add("fuse --out = --adapter-path --overwrite",
                 ["fuse", "--model", fx.model, "--adapter-path", a, "--out", a, "--overwrite", "-q"], ws,
                 ("--out", "--adapter-path"))
        ws = ctx.ws("fuse-out-inside-adapter")
        a = self.copy(fx.radapter, ws / "adapter")
        self.add("fuse --out inside --adapter-path",
                 ["fuse", "--model", fx.model, "--adapter-path", a, "--out", a / "fused", "-q"], ws,
                 ("--out", "--adapter-path"))
        ws = ctx.ws("fuse-gguf-is-model-weights")
        m = self.copy(fx.model, ws / "model")
        self.add("fuse --export-gguf = the model's weights --overwrite",
                 ["fuse", "--model", m, "--adapter-path", fx.radapter, "--out", ws / "fused", "--export-gguf",
                  m / "model.safetensors", "--overwrite", "-q"], ws, ("--export-gguf", "--model"))
        ws = ctx.ws("fuse-gguf-inside-adapter")
        a = self.copy(fx.radapter, ws / "adapter")
        self.add("fuse --export-gguf inside --adapter-path",
                 ["fuse", "--model", fx.model, "--adapter-path", a, "--out", ws / "fused", "--export-gguf",
                  a / "model.gguf", "-q"], ws, ("--export-gguf", "--adapter-path"))
        ws = ctx.ws("fuse-out-nonempty")
        out = self.copy(fx.data, ws / "fused")
        self.add("fuse into a non-empty --out", self.base("fuse", ws), ws, ("--out", "--overwrite"))
        ws = ctx.ws("fuse-out-locked")
        lock(ws / "fused")
        self.add("fuse --out locked by a live run", self.base("fuse", ws), ws, ("--out",), must=("in use",))
        ws = ctx.ws("fuse-gguf-locked")
        lock(ws / "m.gguf")
        self.add("fuse --export-gguf locked by a live run", [*self.base("fuse", ws), "--export-gguf", ws / "m.gguf"],
                 ws, ("--export-gguf",), must=("in use",))

    # -- 7. the rest the issue named
    def specific(self) -> None:
        ctx, fx = self.ctx, self.fx
        long_prompt = "Paris " * 3000
        ws = ctx.ws("generate-prompt-too-long")
        self.add("generate --prompt longer than the context (2048)",
                 ["generate", "--model", fx.model, "--prompt", long_prompt, "--max-tokens", "4", "-q"], ws,
                 ("--prompt",))
        ws = ctx.ws("generate-input-prompt-too-long")
        inp = write_jsonl(ws / "p.jsonl", [{"prompt": "Hi"}, {"prompt": long_prompt}])
        self.add("generate --input with a prompt longer than the context",
                 ["generate", "--model", fx.model, "--input", inp, "--max-tokens", "4", "-q"], ws, (inp,))
        ws = ctx.ws("eval-generate-prompt-too-long")
        data = self.copy(fx.data, ws / "data")
        write_jsonl(data / "test.jsonl", [chat(1), {"messages": [{"role": "user", "content": long_prompt},
                                                                 {"role": "assistant", "content": "Yes."}]}])
        self.add("eval --generate with a prompt longer than the context",
                 ["eval", "--model", fx.model, "--data", data, "--generate", "--max-seq-length", "8192",
                  "--max-tokens", "4", "--out", ws / "ev", "-q"], ws, (data / "test.jsonl",))
        ws = ctx.ws("generate-no-prompt")
        self.add("generate without --prompt or --input", ["generate", "--model", fx.model, "-q"], ws,
                 ("--prompt", "--input"))
        ws = ctx.ws("generate-prompt-and-input")
        inp = write_jsonl(ws / "p.jsonl", [{"prompt": "Hi"}])
        self.add("generate --prompt and --input", ["generate", "--model", fx.model, "--prompt", "x", "--input", inp,
                                                   "-q"], ws, ("--prompt", "--input"))
        ws = ctx.ws("generate-stdin-empty")
        self.add("generate --prompt - with empty stdin", ["generate", "--model", fx.model, "--prompt", "-", "-q"], ws,
                 ("--prompt", "stdin"), stdin=b"")
        ws = ctx.ws("generate-system-no-template")
        self.add("generate --system with --no-chat-template",
                 [*self.base("generate", ws), "--system", "Be brief.", "--no-chat-template"], ws,
                 ("--system", "--no-chat-template"))
        ws = ctx.ws("generate-compare-base-no-adapter")
        self.add("generate --compare-base without --adapter-path", [*self.base("generate", ws), "--compare-base"], ws,
                 ("--compare-base", "--adapter-path"))
        for command, flag in (("eval", "--template"), ("generate", "--template"), ("prepare", "--template")):
            ws = ctx.ws(f"{command}-template-invalid-jinja")
            tpl = ws / "bad.jinja"
            tpl.write_text("{% for m in messages %}{{ m['content'] }")
            argv = [*self.base(command, ws), flag, tpl] + (["--format", "text"] if command == "prepare" else [])
            self.add(f"{command} {flag} with invalid Jinja", argv, ws, (flag, tpl))
            if command != "prepare":
                continue
            ws = ctx.ws(f"{command}-template-binary")
            tpl = ws / "bin.jinja"
            tpl.write_bytes(b"\x89PNG\x00\xff\xfe")
            argv = [*self.base(command, ws), flag, tpl] + (["--format", "text"] if command == "prepare" else [])
            self.add(f"{command} {flag} binary file", argv, ws, (flag, tpl))
            ws = ctx.ws(f"{command}-template-dir")
            argv = [*self.base(command, ws), flag, ws] + (["--format", "text"] if command == "prepare" else [])
            self.add(f"{command} {flag} a directory", argv, ws, (flag,))
        ws = ctx.ws("eval-template-raises")
        tpl = ws / "raise.jinja"
        tpl.write_text("{{ raise_exception('this template refuses') }}")
        # a template's raise_exception rejects a conversation: the message names the record and quotes the template
        self.add("eval --template that raises", [*self.base("eval", ws), "--template", tpl], ws,
                 (fx.data / "test.jsonl",), must=("this template refuses",))
        ws = ctx.ws("eval-judge-template-unknown-var")
        tpl = ws / "j.jinja"
        tpl.write_text("Q: {{ question }} A: {{ answer_a }} B: {{ answer_b }} C: {{ answer_c }}")
        self.add("eval --judge-template with an unknown variable",
                 ["eval", "--model", fx.model, "--data", fx.data_judge, "--judge", "--judge-template", tpl, "--out",
                  ws / "ev", "--limit", "2", "--max-tokens", "4", "-q"], ws, ("--judge-template",))
        ws = ctx.ws("eval-judge-template-invalid")
        tpl = ws / "j.jinja"
        tpl.write_text("{% if question %}unclosed")
        self.add("eval --judge-template invalid Jinja",
                 ["eval", "--model", fx.model, "--data", fx.data_judge, "--judge", "--judge-template", tpl, "--out",
                  ws / "ev", "--limit", "2", "-q"], ws, ("--judge-template", tpl))
        for command in ("train", "generate"):
            ws = ctx.ws(f"{command}-q-group-size-7-quantize")
            self.add(f"{command} --quantize 4 --q-group-size 7",
                     [*self.base(command, ws), "--quantize", "4", "--q-group-size", "7"], ws, ("--q-group-size",))
        ws = ctx.ws("unknown-flag")
        self.add("train --lerning-rate (misspelt flag)", [*self.base("train", ws), "--lerning-rate", "1e-4"], ws,
                 ("--lerning-rate",))
        ws = ctx.ws("unknown-command")
        self.add("lorakit finetune (no such command)", ["finetune", "--model", fx.model], ws, ("finetune",))


# ---------------------------------------------------------------------------------------------- attacks


PAYLOADS = {
    "mro-subclasses": "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'catch_warnings' %}"
                      "{{ c()._module.__builtins__['__import__']('os').system('touch MARK') }}{% endif %}{% endfor %}"
                      "{{ messages[0]['content'] }}",
    "cycler-globals": "{{ cycler.__init__.__globals__.os.system('touch MARK') }}{{ messages[0]['content'] }}",
    "joiner-globals": "{{ joiner.__init__.__globals__.os.popen('touch MARK').read() }}",
    "namespace-globals": "{{ namespace.__init__.__globals__.os.system('touch MARK') }}",
    "lipsum-globals": "{{ lipsum.__globals__['os'].system('touch MARK') }}",
    "template-reference": "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch MARK') }}",
    "self-globals": "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch MARK') }}",
    "raise-exception-globals": "{{ raise_exception.__globals__.__builtins__.__import__('os').system('touch MARK') }}",
    "attr-filter-escape": "{{ (lipsum|attr('\\x5f\\x5fglobals\\x5f\\x5f'))['os'].system('touch MARK') }}",
    "format-string": "{{ '{0.__class__.__mro__[1].__subclasses__}'.format('') }}",
    "include-passwd": "{% include '/etc/passwd' %}{{ messages[0]['content'] }}",
    "import-passwd": "{% import '/etc/passwd' as p %}{{ p }}",
    "extends-passwd": "{% extends '/etc/passwd' %}",
    "from-import": "{% from 'os' import system %}{{ system('touch MARK') }}",
    "mutate-messages": "{{ messages.append({'role': 'x', 'content': 'y'}) }}{{ messages[0]['content'] }}",
    "range-huge": "{% for i in range(10**9) %}x{% endfor %}",
    "nested-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
}
SLOW_PAYLOADS = {"range-huge", "nested-loops"}


class Attacks:
    def __init__(self, ctx: Ctx, fx: Fixtures) -> None:
        self.ctx, self.fx = ctx, fx
        self.cases: list[Case] = []

    def add(self, name: str, argv: list[Any], ws: Path, names: tuple[Any, ...], marker: Path, **kw: Any) -> None:
        kw.setdefault("timeout", 25 if any(s in name for s in SLOW_PAYLOADS) else 120)
        self.cases.append(Case("attack", name, argv, ws, tuple(str(n) for n in names), marker=marker, **kw))

    def payload(self, name: str, marker: Path) -> str:
        return PAYLOADS[name].replace("MARK", str(marker))

    def evil_model(self, ws: Path, marker: Path, *, template: str | None = None, jinja_file: str | None = None) -> Path:
        m = ws / "model"
        shutil.copytree(self.fx.model, m)
        if template is not None:
            cfg = json.loads((m / "tokenizer_config.json").read_text())
            cfg["chat_template"] = template
            (m / "tokenizer_config.json").write_text(json.dumps(cfg))
        if jinja_file is not None:
            cfg = json.loads((m / "tokenizer_config.json").read_text())
            cfg.pop("chat_template", None)
            (m / "tokenizer_config.json").write_text(json.dumps(cfg))
            (m / "chat_template.jinja").write_text(jinja_file)
        return m

    def build(self) -> list[Case]:
        ctx, fx = self.ctx, self.fx
        # V1: prepare --format text --template FILE (every payload)
        for name in PAYLOADS:
            ws = ctx.ws(f"attack-prepare-template-{name}")
            marker = ws / "PWNED"
            tpl = ws / "evil.jinja"
            tpl.write_text(self.payload(name, marker))
            self.add(f"prepare --template FILE: {name}",
                     ["prepare", fx.raw, "--out", ws / "out", "--format", "text", "--template", tpl], ws,
                     ("--template", tpl), marker)
        # V4: the tokenizer's chat_template (tokenizer_config.json), through generate
        for name in ("mro-subclasses", "cycler-globals", "template-reference", "include-passwd", "range-huge",
                     "nested-loops"):
            ws = ctx.ws(f"attack-tokcfg-{name}")
            marker = ws / "PWNED"
            m = self.evil_model(ws, marker, template=self.payload(name, marker))
            self.add(f"generate, tokenizer_config.json chat_template: {name}",
                     ["generate", "--model", m, "--prompt", "Hi", "--max-tokens", "4", "-q"], ws,
                     (m, "tokenizer_config.json", "--model", "tokenizer's chat template"), marker)
        # V7: prepare --format text --model (the tokenizer's template renders the data)
        for name in ("cycler-globals",):
            ws = ctx.ws(f"attack-prepare-model-{name}")
            marker = ws / "PWNED"
            m = self.evil_model(ws, marker, template=self.payload(name, marker))
            self.add(f"prepare --format text --model, tokenizer template: {name}",
                     ["prepare", fx.raw, "--out", ws / "out", "--format", "text", "--model", m], ws,
                     (m, "tokenizer_config.json", "--model", "tokenizer's chat template"), marker)
        # V5: chat_template.jinja in the model directory
        for command, name in (("train", "cycler-globals"), ("train", "include-passwd"), ("fuse", "lipsum-globals"),
                              ("eval", "self-globals")):
            ws = ctx.ws(f"attack-jinjafile-{command}-{name}")
            marker = ws / "PWNED"
            m = self.evil_model(ws, marker, jinja_file=self.payload(name, marker))
            argv = {"train": ["train", "--model", m, "--data", fx.data, "--adapter-path", ws / "ad", "--iters", "2",
                              "--batch-size", "2", "-q"],
                    "eval": ["eval", "--model", m, "--data", fx.data, "--out", ws / "ev", "--limit", "2", "-q"],
                    "fuse": ["fuse", "--model", m, "--adapter-path", fx.radapter, "--out", ws / "fused", "-q"]}[command]
            self.add(f"{command}, chat_template.jinja in the model: {name}", argv, ws,
                     (m, "chat_template.jinja", "--model", "tokenizer's chat template"), marker)
        # V2 / V3: --template FILE for generate and eval
        for command, name in (("generate", "lipsum-globals"), ("generate", "extends-passwd"),
                              ("eval", "namespace-globals"), ("eval", "raise-exception-globals")):
            ws = ctx.ws(f"attack-{command}-template-{name}")
            marker = ws / "PWNED"
            tpl = ws / "evil.jinja"
            tpl.write_text(self.payload(name, marker))
            argv = {"generate": ["generate", "--model", fx.model, "--prompt", "Hi", "--max-tokens", "4", "-q"],
                    "eval": ["eval", "--model", fx.model, "--data", fx.data, "--out", ws / "ev", "--limit", "2",
                             "-q"]}[command]
            self.add(f"{command} --template FILE: {name}", [*argv, "--template", tpl], ws, ("--template", tpl), marker)
        # V6: eval --judge --judge-template FILE
        for name, text in (("cycler-globals", "{{ cycler.__init__.__globals__.os.system('touch MARK') }}"),
                           ("include-passwd", "{% include '/etc/passwd' %}{{ question }}"),
                           ("range-huge", PAYLOADS["range-huge"])):
            ws = ctx.ws(f"attack-judge-template-{name}")
            marker = ws / "PWNED"
            tpl = ws / "judge.jinja"
            tpl.write_text(text.replace("MARK", str(marker)))
            self.add(f"eval --judge-template FILE: {name}",
                     ["eval", "--model", fx.model, "--data", fx.data_judge, "--judge", "--judge-template", tpl,
                      "--out", ws / "ev", "--limit", "2", "--max-tokens", "4", "-q"], ws, ("--judge-template", tpl),
                     marker)
        # template syntax inside data is data: rendered literally, exit 0
        ws = ctx.ws("attack-data-injection-prepare")
        marker = ws / "PWNED"
        evil = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
        raw = write_jsonl(ws / "raw.jsonl", [chat(i) for i in range(30)] +
                          [{"messages": [{"role": "user", "content": evil}, {"role": "assistant", "content": evil}]}])
        self.add("prepare --format text --template chatml, template syntax inside the data (must stay data)",
                 ["prepare", raw, "--out", ws / "out", "--format", "text", "--template", "chatml", "--split",
                  "1,0,0"], ws, (), marker, expect_rc=0, out_has=((ws / "out" / "train.jsonl", "cycler.__init__"),))
        ws = ctx.ws("attack-data-injection-generate")
        marker = ws / "PWNED"
        evil = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}{% include '/etc/passwd' %}"
        self.add("generate --prompt holding template syntax (must stay data)",
                 ["generate", "--model", fx.model, "--prompt", evil, "--max-tokens", "4", "-q"], ws, (), marker,
                 expect_rc=0)
        # YAML python tags in --config, every command
        base = {"prepare": ["prepare", fx.raw, "--out", "out"],
                "train": ["train", "--model", fx.model, "--data", fx.data, "--adapter-path", "ad", "--iters", "2", "-q"],
                "eval": ["eval", "--model", fx.model, "--data", fx.data, "--out", "ev", "-q"],
                "generate": ["generate", "--model", fx.model, "--prompt", "Hi", "--max-tokens", "4", "-q"],
                "fuse": ["fuse", "--model", fx.model, "--adapter-path", fx.radapter, "--out", "fused", "-q"]}
        for command, argv in base.items():
            if command in ("eval", "fuse"):
                continue
            ws = ctx.ws(f"attack-yaml-{command}")
            marker = ws / "PWNED"
            cfg = ws / "evil.yaml"
            cfg.write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\n'
                           f'x: !!python/object/new:subprocess.Popen [["touch", "{marker}"]]\n')
            self.add(f"{command} --config with YAML python tags", [*argv, "--config", cfg], ws, ("--config", cfg), marker)
        self.pickles_and_code()
        return self.cases

    def pickles_and_code(self) -> None:
        ctx, fx = self.ctx, self.fx
        gen = lambda m: ["generate", "--model", m, "--prompt", "Hi", "--max-tokens", "4", "-q"]

        # P1: weights only as a pickle (pytorch_model.bin)
        ws = ctx.ws("attack-pickle-bin-only")
        marker = ws / "PWNED"
        m = self.evil_model(ws, marker)
        (m / "model.safetensors").unlink()
        (m / "pytorch_model.bin").write_bytes(pickle_payload(marker))
        self.add("generate, model weights only as a pickle pytorch_model.bin", gen(m), ws, ("--model",), marker,
                 torch=True)
        # P2: a pickle named model.safetensors
        ws = ctx.ws("attack-pickle-as-safetensors")
        marker = ws / "PWNED"
        m = self.evil_model(ws, marker)
        (m / "model.safetensors").write_bytes(pickle_payload(marker))
        self.add("generate, a pickle named model.safetensors", gen(m), ws, ("--model", m), marker, torch=True)
        # P3: a pickle named adapters.safetensors
        ws = ctx.ws("attack-pickle-adapter")
        marker = ws / "PWNED"
        a = ws / "adapter"
        shutil.copytree(fx.radapter, a)
        (a / "adapters.safetensors").write_bytes(pickle_payload(marker))
        self.add("generate, a pickle named adapters.safetensors",
                 [*gen(fx.model), "--adapter-path", a], ws, ("adapters.safetensors",), marker, torch=True)
        # P4: a PEFT-style pickle adapter_model.bin
        ws = ctx.ws("attack-pickle-peft-bin")
        marker = ws / "PWNED"
        a = ws / "adapter"
        shutil.copytree(fx.radapter, a)
        (a / "adapters.safetensors").unlink()
        (a / "adapter_model.bin").write_bytes(pickle_payload(marker))
        self.add("eval, adapter only as a pickle adapter_model.bin",
                 ["eval", "--model", fx.model, "--data", fx.data, "--adapter-path", a, "--out", ws / "ev", "-q"], ws,
                 ("--adapter-path",), marker, torch=True)
        # P5: a pickle as a checkpoint's optimizer state, with checksums made to match
        ws = ctx.ws("attack-pickle-optimizer")
        marker = ws / "PWNED"
        ad = ws / "ad"
        shutil.copytree(fx.corrupt_base, ad)
        ck = ad / "checkpoints" / "step-000006"
        (ck / "optimizer.safetensors").write_bytes(pickle_payload(marker))
        sums = json.loads((ck / "checksums.json").read_text())
        sums["optimizer.safetensors"] = sha256(ck / "optimizer.safetensors")
        (ck / "checksums.json").write_text(json.dumps(sums))
        self.add("train --resume, a pickle as optimizer.safetensors (checksums consistent)",
                 ["train", "--model", fx.model, "--data", fx.data, "--adapter-path", ad, "--iters", "10",
                  "--save-every", "1", "--keep-last", "3", "--lora-dropout", "0.1", "--steps-per-eval", "100",
                  "--batch-size", "4", "--max-seq-length", "96", "-q", "--resume"], ws,
                 ("optimizer.safetensors",), marker, torch=True, fallback_ok=("step-000006", "unusable"))
        # P6: a GGUF that is a pickle
        ws = ctx.ws("attack-pickle-gguf")
        marker = ws / "PWNED"
        g = ws / "model.gguf"
        g.write_bytes(pickle_payload(marker))
        self.add("generate --model a pickle named .gguf", gen(g), ws, ("--model", g), marker, torch=True)
        # P7: custom code without --trust-remote-code
        evil_py = "import os\nos.system('touch MARK')\nopen('MARK', 'w').write('x')\n"
        ws = ctx.ws("attack-model-file")
        marker = ws / "PWNED"
        m = self.evil_model(ws, marker)
        cfg = json.loads((m / "config.json").read_text())
        cfg["model_file"] = "evil_model.py"
        (m / "config.json").write_text(json.dumps(cfg))
        (m / "evil_model.py").write_text(evil_py.replace("MARK", str(marker)))
        self.add("train, config.json model_file (mlx-lm custom code) without --trust-remote-code",
                 ["train", "--model", m, "--data", fx.data, "--adapter-path", ws / "ad", "--iters", "2", "-q"], ws,
                 ("--model", "--trust-remote-code"), marker)
        ws = ctx.ws("attack-auto-map-model")
        marker = ws / "PWNED"
        m = self.evil_model(ws, marker)
        cfg = json.loads((m / "config.json").read_text())
        cfg.update(model_type="evil_arch", architectures=["EvilForCausalLM"],
                   auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                             "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
        (m / "config.json").write_text(json.dumps(cfg))
        (m / "modeling_evil.py").write_text(evil_py.replace("MARK", str(marker)))
        self.add("generate, config.json auto_map to custom modeling code", gen(m), ws, ("--model",), marker)
        for label, drop_tokenizer_json in (("with tokenizer.json", False), ("without tokenizer.json", True)):
            ws = ctx.ws(f"attack-auto-map-tokenizer-{drop_tokenizer_json}")
            marker = ws / "PWNED"
            m = self.evil_model(ws, marker)
            cfg = json.loads((m / "tokenizer_config.json").read_text())
            cfg.update(tokenizer_class="EvilTokenizer",
                       auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
            (m / "tokenizer_config.json").write_text(json.dumps(cfg))
            (m / "tokenization_evil.py").write_text(evil_py.replace("MARK", str(marker)))
            if drop_tokenizer_json:
                (m / "tokenizer.json").unlink()
            self.add(f"generate, tokenizer_config.json auto_map to custom tokenizer code ({label})", gen(m), ws,
                     ("--model",), marker)
        for key, value in (("chat_template_type", "../../../tmp/evil"), ("tool_parser_type", "evil_parser")):
            ws = ctx.ws(f"attack-{key}")
            marker = ws / "PWNED"
            m = self.evil_model(ws, marker)
            cfg = json.loads((m / "tokenizer_config.json").read_text())
            cfg[key] = value
            (m / "tokenizer_config.json").write_text(json.dumps(cfg))
            self.add(f"generate, tokenizer_config.json {key}={value!r}", gen(m), ws, ("--model",), marker)
        ws = ctx.ws("attack-prepare-tokenizer-auto-map")
        marker = ws / "PWNED"
        m = self.evil_model(ws, marker)
        cfg = json.loads((m / "tokenizer_config.json").read_text())
        cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
        (m / "tokenizer_config.json").write_text(json.dumps(cfg))
        (m / "tokenizer.json").unlink()
        (m / "tokenization_evil.py").write_text(evil_py.replace("MARK", str(marker)))
        self.add("prepare --tokenizer with auto_map custom code", ["prepare", fx.raw, "--out", ws / "out",
                                                                   "--tokenizer", m, "--max-tokens", "200"], ws,
                 ("--tokenizer",), marker)


# ---------------------------------------------------------------------------------------------- interrupts


def recover_train(ctx: Ctx, ws: Path, flags: list[Any], err: str, *, overwrite: bool) -> tuple[list[Ran], str]:
    """The documented way back after an interrupted train: the printed resume command; else `--resume` when a
    checkpoint exists; else the same command again (with --overwrite if the directory is refused)."""
    ad = Path(flags[flags.index("--adapter-path") + 1])
    m = re.search(r"Resume with: lorakit train --config (\S+) --resume", re.sub(r"\s*\n\s*", " ", err))
    runs = []
    plain = [f for f in flags if f != "--overwrite"]
    if m:
        cfg = m.group(1)
        runs.append(ctx.cli(["train", "--config", cfg, "--resume", "-q"], ws))
        return runs, "printed resume command"
    if overwrite:
        runs.append(ctx.cli([*flags, "-q"], ws))
        return runs, "same --overwrite command again"
    if any((ad / "checkpoints").glob("step-*")):
        runs.append(ctx.cli([*plain, "--resume", "-q"], ws))
        if runs[-1].rc == 0:
            return runs, "--resume"
    runs.append(ctx.cli([*plain, "-q"], ws))
    if runs[-1].rc == 2 and "--overwrite" in runs[-1].err:
        runs.append(ctx.cli([*plain, "--overwrite", "-q"], ws))
        return runs, "same command with --overwrite"
    return runs, "same command again"


def check_train_dir(ad: Path) -> list[str]:
    problems = []
    if not (ad / "adapters.safetensors").is_file():
        problems.append("no final adapters.safetensors")
    for ck in sorted((ad / "checkpoints").glob("step-*")):
        why = checkpoint_problem(ck)
        if why:
            problems.append(f"{ck.name}: {why}")
    bad = nonfinite_files(ad)
    if bad:
        problems.append("non-finite: " + ", ".join(bad))
    if (ad / "report.json").is_file():
        try:
            strict_json((ad / "report.json").read_text())
        except ValueError as e:
            problems.append(f"report.json: {e}")
    return problems


def train_interrupt(ctx: Ctx, fx: Fixtures, sig: signal.Signals, moment: str, *, double: bool = False,
                    overwrite: bool = False, resume_run: bool = False) -> dict:
    label = f"train {sig.name}{' x2' if double else ''} during {moment}" + (" (--overwrite run)" if overwrite else "") \
        + (" (a --resume run)" if resume_run else "")
    ws = ctx.ws(label)
    ad = ws / "ad"
    data = fx.data_bigval if moment == "eval" else fx.data
    flags: list[Any] = ["train", "--model", fx.model, "--data", data, "--adapter-path", ad, "--iters", "40",
                        "--batch-size", "4", "--max-seq-length", "96", "--steps-per-report", "1", "--steps-per-eval",
                        "10", "--save-every", "5", "--lora-dropout", "0.1"]
    if moment == "eval":
        flags += ["--steps-per-eval", "5", "--val-batches", "-1"]
    if moment == "checkpoint save":
        flags += ["--save-every", "1", "--fine-tune-type", "full", "--learning-rate", "1e-5", "--keep-last", "3"]
    setup_runs: list[Ran] = []
    old = None
    if overwrite:
        setup_runs.append(ctx.cli([*flags, "--iters", "4", "--seed", "1", "-q"], ws))
        old = digest(ad)
        flags.append("--overwrite")
    if resume_run:
        setup_runs.append(ctx.cli([*flags, "--iters", "6", "-q"], ws))
        flags.append("--resume")
    if any(r.rc != 0 for r in setup_runs):
        return result("interrupt", label, setup_runs, False, "harness: setup run failed")
    live = Live(ctx, flags, ws)
    seen: str | None = ""
    if moment == "load":
        time.sleep(ctx.uniform(0.3, 3.0))
    elif moment == "first step":
        seen = live.wait_line(r"\biteration=0\b.*val_loss")  # the first validation is done: step 1 starts
    elif moment == "eval":
        seen = live.wait_step(5)  # step 5's report line: its validation over 420 examples follows
    elif moment == "mid-run":
        seen = live.wait_step(ctx.randint(8, 25))
        time.sleep(ctx.uniform(0, 0.03))
    elif moment == "checkpoint save":
        seen = live.wait_step(ctx.randint(3, 20))  # the report line comes right before the save
    sent = live.send(sig) if seen is not None else False
    if double and sent:
        time.sleep(0.05)
        live.send(sig)
    rc = live.finish()
    first = Ran(live.argv, rc, live.out.decode("utf-8", "replace"), live.err, round(time.monotonic() - live.t0, 2),
                rc is None)
    problems = []
    if not sent:
        problems.append(f"harness: the run ended (exit {rc}) before the signal (its moment was never seen)")
    if rc is None:
        problems.append("did not stop within 120 s of the signal")
    elif sig == signal.SIGKILL:
        pass
    elif rc != 130:
        problems.append(f"exit {rc}, expected 130")
    elif "interrupted" not in first.err.lower():
        problems.append("no 'interrupted' message")
    if "Traceback" in first.err:
        problems.append("traceback printed")
    m = re.search(r"saved checkpoint at step (\d+)", first.err)
    if m and sig != signal.SIGKILL:
        ck = ad / "checkpoints" / f"step-{int(m.group(1)):06d}"
        if checkpoint_problem(ck):
            problems.append(f"the announced checkpoint {ck.name} is not intact: {checkpoint_problem(ck)}")
    if overwrite and old is not None and ad.is_dir():
        now = digest(ad)
        if now != old and not any(checkpoint_problem(c) is None for c in (ad / "checkpoints").glob("step-*")):
            problems.append("the old run was replaced by one without an intact checkpoint")
    runs, how = recover_train(ctx, ws, flags, first.err, overwrite=overwrite)
    if runs[-1].rc != 0:
        problems.append(f"recovery ({how}) exit {runs[-1].rc}")
    else:
        problems += check_train_dir(ad)
    if any("Traceback" in r.err for r in runs):
        problems.append("traceback during recovery")
    left = leftovers(ws)
    if left:
        problems.append("leftovers after recovery: " + ", ".join(left))
    return result("interrupt", label, [*setup_runs, first, *runs], not problems, "; ".join(problems) or "ok",
                  signals=live.sent, recovery=how)


def _normalised(path: Path, out: Path) -> dict[str, bytes]:
    files = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            files[str(p.relative_to(path))] = p.read_bytes().replace(str(out).encode(), b"<OUT>")
    return files


def _out_state(command: str, out: Path, fx: Fixtures, new_ref: Path, old_ref: Path | None,
               gguf: Path | None = None) -> tuple[str, str]:
    """'absent', 'old' or 'new' when the output is whole, else 'partial' with why."""
    if not out.exists():
        state = "absent"
    else:
        got = _normalised(out, out)
        if command == "prepare":  # the splits byte for byte; manifest and settings (they record the flags) parse
            state = "partial"
            for name, ref in [("new", new_ref)] + ([("old", old_ref)] if old_ref else []):
                want = _normalised(ref, ref)
                if sorted(got) != sorted(want) or any(got[k] != want[k] for k in want if k.endswith(".jsonl")):
                    continue
                try:
                    strict_json((out / "manifest.json").read_text())
                except ValueError:
                    continue
                state = name
                break
        elif command == "fuse":
            state = "partial"
            for name, ref in [("new", new_ref)] + ([("old", old_ref)] if old_ref else []):
                if sorted(got) == sorted(p.name for p in ref.iterdir()) and \
                        sha256(out / "model.safetensors") == sha256(ref / "model.safetensors"):
                    state = name
                    break
        else:  # eval: predictions are deterministic (greedy), eval.json carries timings
            state = "partial"
            for name, ref in [("new", new_ref)] + ([("old", old_ref)] if old_ref else []):
                names = sorted(p.name for p in ref.iterdir())
                if sorted(got) != names:
                    continue
                try:
                    strict_json((out / "eval.json").read_text())
                except ValueError:
                    continue
                if (out / "predictions.jsonl").read_bytes() == (ref / "predictions.jsonl").read_bytes():
                    state = name
                    break
        if state == "partial":
            return state, f"{out.name} holds {sorted(got)} matching neither the old nor the new output"
    if gguf is not None and gguf.exists():
        import mlx.core as mx

        try:
            got = mx.load(str(gguf))
            want = mx.load(str(new_ref.with_suffix(".gguf")))
            olds = mx.load(str(old_ref.with_suffix(".gguf"))) if old_ref else None
            same = lambda a, b: set(a) == set(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)
            if not (same(got, want) or (olds is not None and same(got, olds))):
                return "partial", f"{gguf.name} matches neither the old nor the new GGUF"
        except Exception as e:  # noqa: BLE001
            return "partial", f"{gguf.name} unreadable ({e})"
    return state, ""


def output_interrupt(ctx: Ctx, fx: Fixtures, command: str, sig: signal.Signals, frac: float, overwrite: bool) -> dict:
    label = f"{command} {sig.name} at {frac:.0%} of its run" + (" (--overwrite over an old output)" if overwrite else "")
    ws = ctx.ws(label)
    out = ws / "out"
    gguf = ws / "out.gguf" if command == "fuse" else None
    new_ref = fx.refs[f"ref_{command}"]
    old_ref = fx.refs[f"old_{command}"] if overwrite else None
    argv: list[Any] = {
        "prepare": ["prepare", fx.raw_big, "--out", out, "--seed", "3"],
        "eval": ["eval", "--model", fx.model, "--data", fx.data, "--adapter-path", fx.trained, "--generate",
                 "--max-tokens", "24", "--out", out],
        "fuse": ["fuse", "--model", fx.model, "--adapter-path", fx.radapter, "--out", out, "--export-gguf", gguf],
    }[command]
    if overwrite:
        shutil.copytree(old_ref, out)
        if gguf is not None:
            shutil.copy2(old_ref.with_suffix(".gguf"), gguf)
        argv.append("--overwrite")
    duration = ctx.durations.get(command, 5.0)
    runs: list[Ran] = []
    problems: list[str] = []
    sent_info: list[dict] = []
    for attempt in range(3):
        live = Live(ctx, argv, ws)
        time.sleep(max(0.2, frac * duration * (0.6 ** attempt)))
        sent = live.send(sig)
        rc = live.finish()
        sent_info += live.sent
        runs.append(Ran(live.argv, rc, live.out.decode("utf-8", "replace"), live.err,
                        round(time.monotonic() - live.t0, 2), rc is None))
        if sent:
            break
        shutil.rmtree(out, ignore_errors=True)  # it finished first: start over, signalling earlier
        if gguf is not None:
            gguf.unlink(missing_ok=True)
        if overwrite:
            shutil.copytree(old_ref, out)
            if gguf is not None:
                shutil.copy2(old_ref.with_suffix(".gguf"), gguf)
    else:
        problems.append("harness: the command always finished before the signal")
    first = runs[-1]
    if first.rc is None:
        problems.append("did not stop within 120 s of the signal")
    elif sig != signal.SIGKILL and first.rc != 130:
        problems.append(f"exit {first.rc}, expected 130")
    if "Traceback" in first.err:
        problems.append("traceback printed")
    state, why = _out_state(command, out, fx, new_ref, old_ref, gguf)
    if state == "partial":
        problems.append("partial output after the interrupt: " + why)
    again = ctx.cli([*argv, "-q"], ws)
    if again.rc == 2 and "--overwrite" in again.err and "--overwrite" not in argv:
        runs.append(again)
        again = ctx.cli([*argv, "--overwrite", "-q"], ws)
    runs.append(again)
    if again.rc != 0:
        problems.append(f"re-run exit {again.rc}")
    else:
        state2, why2 = _out_state(command, out, fx, new_ref, None, gguf)
        if state2 != "new":
            problems.append(f"re-run output is {state2} {why2}")
    left = leftovers(ws)
    if left:
        problems.append("leftovers after the re-run: " + ", ".join(left))
    return result("interrupt", label, runs, not problems, "; ".join(problems) or "ok", signals=sent_info,
                  output_after_interrupt=state)


# ---------------------------------------------------------------------------------------------- resume (bit-exact)


RESUME_CONFIGS = {
    "lora, dropout 0.1, warmup 2, constant LR, save every step":
        ["--iters", "24", "--lora-dropout", "0.1", "--warmup", "2", "--save-every", "1"],
    "dora, cosine with warmup 0.2, grad accumulation 2, save every 2":
        ["--iters", "20", "--fine-tune-type", "dora", "--lr-schedule", "cosine", "--warmup", "0.2",
         "--grad-accumulation-steps", "2", "--save-every", "2", "--batch-size", "2"],
    "full fine-tune, sgd + weight decay, packed rows, save every 3":
        ["--iters", "20", "--fine-tune-type", "full", "--optimizer", "sgd", "--weight-decay", "0.01",
         "--learning-rate", "1e-3", "--pack", "--save-every", "3"],
    "lora, 1.5 epochs (crosses an epoch), adam, --max-grad-norm 0.5, evals every 4 steps, save every step":
        ["--epochs", "1.5", "--optimizer", "adam", "--max-grad-norm", "0.5", "--steps-per-eval", "4",
         "--save-every", "1", "--lora-rank", "4", "--batch-size", "4", "--lora-dropout", "0.2"],
}


def resume_config(ctx: Ctx, fx: Fixtures, title: str, extra: list[str], plan: list[list[signal.Signals]]) -> list[dict]:
    """One uninterrupted reference run, then each plan entry: interrupt with its signals in turn (resuming after
    each), then resume to the end; the final adapters.safetensors must equal the reference byte for byte."""
    base = ["train", "--model", fx.model, "--data", fx.data, "--batch-size", "4", "--max-seq-length", "96",
            "--steps-per-report", "1", "--steps-per-eval", "100", "--keep-last", "2", "--seed", "7", *extra]
    ws = ctx.ws(f"resume-ref-{title}")
    ref = ctx.cli([*base, "--adapter-path", ws / "ad", "-q"], ws)
    if ref.rc != 0:
        return [result("resume", f"{title}: reference run", [ref], False, "harness: reference run failed")]
    ref_sha = sha256(ws / "ad" / "adapters.safetensors")
    total = json.loads((ws / "ad" / "report.json").read_text())["steps"]
    out = []
    for signals in plan:
        label = f"{title}: " + " then ".join(s.name for s in signals)
        ws = ctx.ws(f"resume-{label}")
        ad = ws / "ad"
        runs: list[Ran] = []
        problems: list[str] = []
        sent_info = []
        argv = [*base, "--adapter-path", ad]
        save_every = int(extra[extra.index("--save-every") + 1]) if "--save-every" in extra else 1
        for i, sig in enumerate(signals):
            live = Live(ctx, argv, ws)
            lo = 2 if i == 0 else 3
            if sig == signal.SIGKILL:  # kill -9 saves nothing: leave a checkpoint to resume from
                lo = max(lo, save_every + 1)
            target = ctx.randint(lo, max(lo + 1, int(total * 0.8)))
            got = live.wait_step(target)
            time.sleep(ctx.uniform(0, 0.02))
            sent = live.send(sig)
            rc = live.finish()
            sent_info += live.sent
            runs.append(Ran(live.argv, rc, live.out.decode("utf-8", "replace"), live.err,
                            round(time.monotonic() - live.t0, 2), rc is None))
            if not sent or got is None:
                problems.append(f"harness: run {i + 1} ended (exit {rc}) before the signal")
                break
            if sig != signal.SIGKILL and rc != 130:
                problems.append(f"interrupted run {i + 1}: exit {rc}, expected 130")
            argv = [*base, "--adapter-path", ad, "--resume"]
        final = ctx.cli([*argv, "-q"], ws)
        runs.append(final)
        if final.rc == 2 and "--overwrite" in final.err and "checkpoint" in final.err:  # nothing was saved
            final = ctx.cli([*base, "--adapter-path", ad, "--overwrite", "-q"], ws)
            runs.append(final)
        if final.rc != 0:
            problems.append(f"resume exit {final.rc}")
        elif sha256(ad / "adapters.safetensors") != ref_sha:
            problems.append("final adapters.safetensors differs from the uninterrupted run's")
        if any("Traceback" in r.err for r in runs):
            problems.append("traceback printed")
        out.append(result("resume", label, [ref, *runs], not problems, "; ".join(problems) or "ok (bit-exact)",
                          signals=sent_info))
    return out


# ---------------------------------------------------------------------------------------------- corrupt checkpoints


def corrupt_case(ctx: Ctx, fx: Fixtures, name: str, damage: Callable[[Path], Any], *, expect: str = "fallback",
                 resume_from: bool = False) -> dict:
    ws = ctx.ws(f"corrupt-{name}")
    ad = ws / "ad"
    shutil.copytree(fx.corrupt_base, ad)
    newest = ad / "checkpoints" / "step-000006"
    damage(ad)
    argv = ["train", "--model", fx.model, "--data", fx.data, "--adapter-path", ad, "--iters", "10", "--save-every",
            "1", "--keep-last", "3", "--lora-dropout", "0.1", "--steps-per-eval", "100", "--batch-size", "4",
            "--max-seq-length", "96", "-q"]
    argv += ["--resume-from", newest] if resume_from else ["--resume"]
    ran = ctx.cli(argv, ws)
    problems = []
    if "Traceback" in ran.err:
        problems.append("traceback printed")
    if expect == "fallback":
        if ran.rc == 0:
            if "step-000006" not in squash(ran.err) or "unusable" not in ran.err:
                problems.append("no warning naming the damaged checkpoint step-000006")
            if sha256(ad / "adapters.safetensors") != fx.corrupt_ref_sha:
                problems.append("final adapter differs from the uninterrupted run's (garbage was loaded?)")
        elif ran.rc in (1, 2):
            if "step-000006" not in squash(ran.err):
                problems.append(f"exit {ran.rc} without naming step-000006")
        else:
            problems.append(f"exit {ran.rc}")
    else:  # refusal expected: exit 2 naming what is wrong
        if ran.rc != 2:
            problems.append(f"exit {ran.rc}, expected 2")
        if expect not in squash(ran.err):
            problems.append(f"stderr does not name {expect!r}")
    if ran.rc == 0:
        bad = nonfinite_files(ad)
        if bad:
            problems.append("non-finite weights kept: " + ", ".join(bad))
    return result("corrupt", name, [ran], not problems, "; ".join(problems) or "ok")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 9] ^= 0x5A
    path.write_bytes(bytes(data))


def _nan_weights_consistent(ad: Path) -> None:
    import mlx.core as mx

    ck = ad / "checkpoints" / "step-000006"
    w = mx.load(str(ck / "adapters.safetensors"))
    mx.save_safetensors(str(ck / "adapters.safetensors"), {k: v * float("nan") for k, v in w.items()})
    sums = json.loads((ck / "checksums.json").read_text())
    sums["adapters.safetensors"] = sha256(ck / "adapters.safetensors")
    (ck / "checksums.json").write_text(json.dumps(sums))


def _state_step(ad: Path) -> None:
    p = ad / "checkpoints" / "step-000006" / "trainer_state.json"
    state = json.loads(p.read_text())
    state["step"] = 3
    p.write_text(json.dumps(state))


def _all_damaged(ad: Path) -> None:
    for ck in (ad / "checkpoints").glob("step-*"):
        _truncate(ck / "adapters.safetensors")


CK = "checkpoints/step-000006/"
CORRUPTIONS: list[tuple[str, Callable[[Path], Any], dict]] = [
    ("adapters.safetensors truncated", lambda ad: _truncate(ad / CK / "adapters.safetensors"), {}),
    ("adapters.safetensors one byte flipped", lambda ad: _flip(ad / CK / "adapters.safetensors"), {}),
    ("optimizer.safetensors truncated", lambda ad: _truncate(ad / CK / "optimizer.safetensors"), {}),
    ("optimizer.safetensors one byte flipped", lambda ad: _flip(ad / CK / "optimizer.safetensors"), {}),
    ("trainer_state.json step edited", _state_step, {}),
    ("checksums.json deleted", lambda ad: (ad / CK / "checksums.json").unlink(), {}),
    ("adapters.safetensors deleted", lambda ad: (ad / CK / "adapters.safetensors").unlink(), {}),
    ("NaN weights with consistent checksums", _nan_weights_consistent, {}),
    ("every checkpoint damaged", _all_damaged, {"expect": "checkpoint"}),
    ("--resume-from a damaged checkpoint", lambda ad: _truncate(ad / CK / "optimizer.safetensors"),
     {"expect": "step-000006", "resume_from": True}),
]


# ---------------------------------------------------------------------------------------------- poisoned runs


POISONS = {
    "lora, adamw, lr 1e20 after 2 good steps": (["--learning-rate", "1e20"], []),
    "dora, lr 1e20": (["--learning-rate", "1e20"], ["--fine-tune-type", "dora"]),
    "full fine-tune, lr 1e20": (["--learning-rate", "1e20"], ["--fine-tune-type", "full"]),
    "sgd, lr 1e30": (["--learning-rate", "1e30"], ["--optimizer", "sgd"]),
}


def poison_case(ctx: Ctx, fx: Fixtures, name: str, poison: list[str], extra: list[str], *, scratch: bool = False,
                overwrite: bool = False) -> dict:
    ws = ctx.ws(f"poison-{name}")
    ad = ws / "ad"
    base = ["train", "--model", fx.model, "--data", fx.data, "--adapter-path", ad, "--batch-size", "4",
            "--max-seq-length", "96", "--save-every", "1", "--keep-last", "2", "--steps-per-eval", "2",
            "--learning-rate", "1e-3", "-q", *extra]
    runs: list[Ran] = []
    problems: list[str] = []
    if not scratch:
        runs.append(ctx.cli([*base, "--iters", "2"], ws))
        if runs[-1].rc != 0:
            return result("poison", name, runs, False, "harness: the good run failed")
    before = digest(ad)
    mode = ["--overwrite"] if overwrite else ([] if scratch else ["--resume"])
    runs.append(ctx.cli([*base, "--iters", "8", *mode, *poison], ws))
    bad = runs[-1]
    if bad.rc != 1:
        problems.append(f"poisoned run exit {bad.rc}, expected 1")
    if "not finite" not in bad.err and "NaN" not in bad.err:
        problems.append("no message about non-finite values")
    if "Traceback" in bad.err:
        problems.append("traceback printed")
    if overwrite and digest(ad) != before:
        problems.append("the old run changed after the failed --overwrite run")
    nonfinite = nonfinite_files(ad) if ad.exists() else []
    if nonfinite:
        problems.append("non-finite values kept: " + ", ".join(nonfinite))
    for p in [*ad.rglob("*.json")] if ad.exists() else []:
        try:
            strict_json(p.read_text())
        except ValueError as e:
            problems.append(f"{p.relative_to(ad)}: {e}")
    if (ad / "metrics.jsonl").is_file():
        for n, line in enumerate((ad / "metrics.jsonl").read_text().splitlines(), 1):
            try:
                strict_json(line)
            except ValueError as e:
                problems.append(f"metrics.jsonl:{n}: {e}")
                break
    # recovery: resume from the kept checkpoint with a sane learning rate
    again = ctx.cli([*base, "--iters", "8", "--resume", "--learning-rate", "1e-4"], ws)
    runs.append(again)
    how = "--resume --learning-rate 1e-4"
    if scratch and again.rc == 2 and "checkpoint" in again.err:
        again = ctx.cli([*base, "--iters", "8", "--overwrite", "--learning-rate", "1e-4"], ws)
        runs.append(again)
        how = "no checkpoint left (exit 2 says so), then --overwrite --learning-rate 1e-4"
    if again.rc != 0:
        problems.append(f"recovery ({how}) exit {again.rc}")
    else:
        problems += check_train_dir(ad)
    return result("poison", name, runs, not problems, "; ".join(problems) or "ok", recovery=how)


# ---------------------------------------------------------------------------------------------- main


def select_quick(cases: list[Any], every: int) -> list[Any]:
    return [c for i, c in enumerate(cases) if i % every == 0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~30 cases (1-2 minutes)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON with every case (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="commands run at once (default: 2)")
    ap.add_argument("--only", nargs="*", choices=list(CATEGORIES), help="run only these categories")
    ap.add_argument("--seed", type=int, default=19, help="seed of the random signal delays and steps")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (printed on stderr)")
    ap.add_argument("--filter", metavar="REGEX", help="only the bad-input and attack cases whose name matches")
    ap.add_argument("--with-torch", action="store_true", help="let the subprocesses import torch")
    args = ap.parse_args()
    only = set(args.only or CATEGORIES)

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Children must start with the default dispositions: a shell that runs us in the background (`cmd &`,
    # nohup) ignores SIGINT, the ignore would be inherited, and Ctrl-C cases would test nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.path.insert(0, str(REPO))
    if not args.with_torch:
        sys.modules.setdefault("torch", None)  # the fixtures need no torch either (saves seconds of import)
    t_start = time.monotonic()
    load_start = [round(x, 2) for x in os.getloadavg()]
    root = Path(tempfile.mkdtemp(prefix="lorakit-robustness-"))
    print(f"robustness: working in {root}", file=sys.stderr)
    ctx = Ctx(root, args.with_torch, args.seed)
    try:
        fx = build_fixtures(ctx, args.jobs, need_refs="interrupt" in only and not args.quick)
        print(f"robustness: fixtures ready ({time.monotonic() - t_start:.0f} s)", file=sys.stderr)
        tasks: list[tuple[str, Callable[[], list[dict]]]] = []

        if "bad_input" in only:
            cases = BadInputs(ctx, fx).build()
            if args.filter:
                cases = [c for c in cases if re.search(args.filter, c.name)]
            if args.quick:
                cases = select_quick(cases, 15)
            tasks += [("bad_input", (lambda c=c: [run_case(ctx, c)])) for c in cases]
        if "attack" in only:
            cases = Attacks(ctx, fx).build()
            if args.filter:
                cases = [c for c in cases if re.search(args.filter, c.name)]
            if args.quick:
                cases = select_quick(cases, 10)
            tasks += [("attack", (lambda c=c: [run_case(ctx, c)])) for c in cases]
        if "interrupt" in only:
            plan: list[Callable[[], dict]] = []
            moments = ["load", "first step", "eval", "mid-run", "checkpoint save"]
            for moment in moments:
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
                    plan.append(lambda m=moment, s=sig: train_interrupt(ctx, fx, s, m))
            plan += [lambda: train_interrupt(ctx, fx, signal.SIGINT, "checkpoint save", double=True),
                     lambda: train_interrupt(ctx, fx, signal.SIGINT, "mid-run", overwrite=True),
                     lambda: train_interrupt(ctx, fx, signal.SIGKILL, "mid-run", overwrite=True)]
            outputs = [("prepare", signal.SIGINT, 0.85, False), ("prepare", signal.SIGTERM, 0.6, False),
                       ("prepare", signal.SIGKILL, 0.9, False), ("prepare", signal.SIGINT, 0.7, True),
                       ("prepare", signal.SIGKILL, 0.75, True),
                       ("eval", signal.SIGINT, 0.85, False), ("eval", signal.SIGKILL, 0.75, True),
                       ("fuse", signal.SIGTERM, 0.8, False), ("fuse", signal.SIGINT, 0.7, True),
                       ("fuse", signal.SIGKILL, 0.85, True)]
            plan += [lambda c=c, s=s, f=f, o=o: output_interrupt(ctx, fx, c, s, f, o) for c, s, f, o in outputs]
            if args.quick:  # train only: the quick run builds no prepare/eval/fuse reference outputs
                plan = [plan[9], plan[14]]
            tasks += [("interrupt", (lambda p=p: [p()])) for p in plan]
        if "resume" in only:
            S = signal
            per_config = [[[S.SIGINT], [S.SIGTERM], [S.SIGKILL], [S.SIGINT, S.SIGKILL]],
                          [[S.SIGINT], [S.SIGTERM], [S.SIGKILL]], [[S.SIGTERM], [S.SIGKILL]], [[S.SIGINT], [S.SIGKILL]]]
            for i, (title, extra) in enumerate(RESUME_CONFIGS.items()):
                p = per_config[i]
                if args.quick:
                    if i:
                        continue
                    p = [[S.SIGKILL]]
                tasks.append(("resume", (lambda t=title, e=extra, p=p: resume_config(ctx, fx, t, e, p))))
        if "corrupt" in only:
            items = CORRUPTIONS if not args.quick else CORRUPTIONS[:1]
            tasks += [("corrupt", (lambda n=n, d=d, k=k: [corrupt_case(ctx, fx, n, d, **k)])) for n, d, k in items]
        if "poison" in only:
            items = list(POISONS.items()) if not args.quick else list(POISONS.items())[:1]
            tasks += [("poison", (lambda n=n, p=p: [poison_case(ctx, fx, n, *p)])) for n, p in items]
            if not args.quick:
                tasks.append(("poison", lambda: [poison_case(ctx, fx, "from scratch, lr 1e20 (no good step)",
                                                             ["--learning-rate", "1e20"], [], scratch=True)]))
                tasks.append(("poison", lambda: [poison_case(ctx, fx, "--overwrite over a good run, lr 1e20",
                                                             ["--learning-rate", "1e20"], [], overwrite=True)]))
        # long scenarios first, so the pool's tail is short single commands
        weight = {"resume": 0, "interrupt": 1, "poison": 2, "corrupt": 3, "attack": 4, "bad_input": 5}
        tasks.sort(key=lambda t: weight[t[0]])
        print(f"robustness: {len(tasks)} tasks on {args.jobs} workers", file=sys.stderr)
        results: list[dict] = []
        done = 0
        lock = threading.Lock()

        def run_task(cat: str, fn: Callable[[], list[dict]]) -> list[dict]:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - a harness failure is recorded, not fatal
                return [{"category": cat, "name": f"harness error: {e}", "handled": False,
                         "reason": "harness error: " + traceback.format_exc()[-1500:], "commands": [], "rc": None}]

        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_suffix(".partial.json")
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_task, cat, fn) for cat, fn in tasks]
            for f in cf.as_completed(futures):
                recs = f.result()
                with lock:
                    results += recs
                    done += 1
                    if done % 20 == 0:  # a long run can be inspected (and survives being stopped)
                        partial.write_text(json.dumps({"done": done, "of": len(tasks), "cases": results}, indent=1))
                    for r in recs:
                        if not r["handled"]:
                            print(f"  NOT HANDLED [{r['category']}] {r['name']}: {r['reason'][:300]}", file=sys.stderr)
                    if done % 25 == 0:
                        print(f"robustness: {done}/{len(tasks)} tasks ({time.monotonic() - t_start:.0f} s)",
                              file=sys.stderr)
        canaries = [str(p) for p in root.rglob("PWNED")]
        if canaries:
            results.append({"category": "attack", "name": "global canary", "handled": False,
                            "reason": "marker files exist: " + ", ".join(canaries), "commands": [], "rc": None})
        wall = time.monotonic() - t_start
        partial.unlink(missing_ok=True)
        import resource

        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = resource.getrusage(resource.RUSAGE_SELF)
        order = {c: i for i, c in enumerate(CATEGORIES)}
        results.sort(key=lambda r: (order[r["category"]], r["name"]))
        summary = {}
        for cat, title in CATEGORIES.items():
            recs = [r for r in results if r["category"] == cat]
            if recs:
                ok = sum(r["handled"] for r in recs)
                summary[cat] = {"title": title, "cases": len(recs), "handled": ok,
                                "not_handled": len(recs) - ok}
        report = {
            "command": "python3 benchmarks/robustness.py " + " ".join(sys.argv[1:]),
            "quick": args.quick,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_time_s": round(wall, 1),
            "cpu_time_s": round(child.ru_utime + child.ru_stime + own.ru_utime + own.ru_stime, 1),
            "jobs": args.jobs,
            "seed": args.seed,
            "torch_visible": "everywhere" if args.with_torch else "pickle cases only",
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "load_average_at_start": load_start,
                        "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
            "versions": _versions(),
            "tree": _tree(),
            "summary": summary,
            "not_handled": [{k: r.get(k) for k in ("category", "name", "reason", "rc", "commands", "stderr_tail")}
                            for r in results if not r["handled"]],
            "cases": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print_table(summary, wall, args.out, report["cpu_time_s"])
        return 0
    finally:
        if args.keep:
            print(f"robustness: kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def _tree() -> dict[str, Any]:
    """The checkout measured: its commit and the files under lorakit/ that differ from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30,
                                  check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_under_lorakit": git("status", "--porcelain", "--", "lorakit").splitlines()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("lorakit", "mlx", "mlx-lm", "transformers", "jinja2"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def print_table(summary: dict, wall: float, out: Path, cpu: float) -> None:
    rows = [("category", "cases", "handled", "not handled")]
    rows += [(s["title"], str(s["cases"]), str(s["handled"]), str(s["not_handled"])) for s in summary.values()]
    rows.append(("total", str(sum(s["cases"] for s in summary.values())),
                 str(sum(s["handled"] for s in summary.values())),
                 str(sum(s["not_handled"] for s in summary.values()))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(file=sys.stderr)
    for n, r in enumerate(rows):
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)),
              file=sys.stderr)
        if n == 0 or n == len(rows) - 2:
            print("  ".join("-" * w for w in widths), file=sys.stderr)
    print(f"\nwall time {wall:.0f} s ({cpu:.0f} CPU-seconds); every case in {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
