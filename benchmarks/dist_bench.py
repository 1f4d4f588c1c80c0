"""GPU check for issue 10: lorakit train on 1 GPU vs 2 GPUs (mlx.launch --backend nccl -n 2), validation on.

Builds a random-weight Llama-3.2-1B-shape model (bf16) with the tiny BPE tokenizer, and ~1000-token chats.
Writes $OUT/dist_bench.json and the runs' logs.
"""

import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(os.environ.get("OUT", "/tmp/out"))
OUT.mkdir(parents=True, exist_ok=True)
WORK = Path("/tmp/distbench")
MODEL, DATA = WORK / "model", WORK / "data"
ITERS, PER_GPU_BATCH, SEQ = (int(os.environ.get(k, d)) for k, d in (("ITERS", 40), ("BATCH", 8), ("SEQ", 1024)))
SHAPE = os.environ.get("SHAPE", "llama-3.2-1b")  # "tiny": the test fixture's shape (a CPU smoke test)
BACKEND = os.environ.get("BACKEND", "nccl")  # "ring" for a CPU smoke test


def build() -> None:
    sys.path.insert(0, os.getcwd())
    from lorakit.blas import preload

    preload()  # OpenBLAS before mlx is first imported: keep above the mlx imports
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    from benchmarks.bench_models import SHAPES
    from lorakit.testing import _CORPUS, build_tokenizer, tiny_model_dir

    tiny_model_dir(MODEL)  # tokenizer files + chat template
    config = json.loads((MODEL / "config.json").read_text())
    config.update(SHAPES.get(SHAPE, {}), torch_dtype="bfloat16")
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    mx.save_safetensors(str(MODEL / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (MODEL / "config.json").write_text(json.dumps(config))
    tok = build_tokenizer()
    sizes = {s: len(tok.encode(s + " ").ids) for s in _CORPUS}  # count each sentence once, not the growing text
    rng = random.Random(0)
    DATA.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 16 * ITERS), ("valid", 32)):
        rows = []
        for _ in range(n):
            parts, count = [], 0
            while count < SEQ - 80:
                parts.append(rng.choice(_CORPUS))
                count += sizes[parts[-1]]
            rows.append(json.dumps({"messages": [{"role": "user", "content": rng.choice(_CORPUS)},
                                                 {"role": "assistant", "content": " ".join(parts)}]}))
        (DATA / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


try:
    import rich  # noqa: F401
    import typer  # noqa: F401
    HAVE_CLI = True
except ImportError:
    HAVE_CLI = False

DRIVER = """
import json, sys
from dataclasses import asdict
from pathlib import Path
import lorakit.engine
from lorakit.engine.model.distributed import world
from lorakit.engine.reporter import Reporter
from lorakit.engine.train import run
from lorakit.settings import load_settings
argv = sys.argv[1:]
flags = {}
while argv:
    key = argv.pop(0).lstrip("-").replace("-", "_")
    flags[key] = True if not argv or argv[0].startswith("--") else argv.pop(0)
flags.pop("json", None)
settings, _ = load_settings("train", flags, None)
result = run(settings, Reporter())
if world().is_main:
    print(json.dumps(asdict(result)), flush=True)
"""


def train(gpus: int) -> dict:
    out = WORK / f"adapters-{gpus}"
    args = ["-m", "lorakit", "train", "--model", str(MODEL), "--data", str(DATA), "--adapter-path", str(out),
            "--overwrite", "--iters", str(ITERS), "--batch-size", str(PER_GPU_BATCH * gpus),
            "--max-seq-length", str(SEQ), "--steps-per-report", "5", "--steps-per-eval", "20",
            "--val-batches", "2", "--save-every", "1000", "--learning-rate", "1e-4", "--json"]
    if not HAVE_CLI:  # same engine call as the CLI makes, without typer/rich on the machine
        args = ["-c", DRIVER, *args[3:]]
    cmd = [sys.executable, *args] if gpus == 1 else ["mlx.launch", "--backend", BACKEND, "-n", str(gpus), "--",
                                                      sys.executable, *args]
    tic = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=190)
    except subprocess.TimeoutExpired as e:
        proc = subprocess.CompletedProcess(cmd, 124, e.stdout or "", (e.stderr or "") + "\nTIMEOUT 190 s")
        proc.stdout = proc.stdout.decode() if isinstance(proc.stdout, bytes) else proc.stdout
        proc.stderr = proc.stderr.decode() if isinstance(proc.stderr, bytes) else proc.stderr
    (OUT / f"run{gpus}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    results = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if (
        out / "metrics.jsonl").exists() else []
    tps = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r]
    return {"gpus": gpus, "rc": proc.returncode, "wall_s": round(time.time() - tic, 1),
            "results_on_stdout": len(results), "result": results[0] if results else None,
            "tokens_per_second_windows": tps,
            "steady_tokens_per_second": statistics.median(tps[1:]) if len(tps) > 2 else None,
            "val_losses": [r["val_loss"] for r in rows if "val_loss" in r],
            "error_tail": proc.stderr[-3000:] if proc.returncode or not results else ""}


STREAM_CHECK = """
import mlx.core as mx
g = mx.distributed.init()
out = {"rank": g.rank(), "size": g.size(), "device": str(mx.default_device())}
for name, kw in (("default_stream", {}), ("cpu_stream", {"stream": mx.cpu})):
    try:
        out[name] = mx.distributed.all_sum(mx.array([float(g.rank() + 1)]), **kw).item()
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
print("STREAM", __import__("json").dumps(out), flush=True)
"""


def stream_check() -> dict:
    """The issue's NCCL trap: all_sum on the default stream works, stream=mx.cpu fails under NCCL."""
    script = WORK / "stream_check.py"
    script.write_text(STREAM_CHECK)
    try:
        proc = subprocess.run(["mlx.launch", "--backend", BACKEND, "-n", "2", "--", sys.executable, str(script)],
                              capture_output=True, text=True, check=False, timeout=90)
    except subprocess.TimeoutExpired:
        return {"error": "timeout 90 s"}
    ranks = [json.loads(x.split("STREAM", 1)[1]) for x in proc.stdout.splitlines() if "STREAM {" in x]
    return {"rc": proc.returncode, "ranks": ranks, "stderr_tail": proc.stderr[-1500:]}


def main() -> None:
    report = {"nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"), "cli": HAVE_CLI}
    try:
        report["gpus"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip().splitlines()
    except OSError as e:
        report["gpus"] = str(e)
    tic = time.time()
    build()
    report["build_s"] = round(time.time() - tic, 1)
    report["stream_check"] = stream_check()
    (OUT / "dist_bench.json").write_text(json.dumps(report, indent=2))
    report["runs"] = [train(1)]
    (OUT / "dist_bench.json").write_text(json.dumps(report, indent=2))
    report["runs"].append(train(2))
    one, two = (r["steady_tokens_per_second"] for r in report["runs"])
    report["scaling"] = round(two / one, 3) if one and two else None
    (OUT / "dist_bench.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
