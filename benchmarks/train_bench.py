"""Train lorakit and mlx-lm's own trainer side by side on the same model, data and settings.

    python benchmarks/train_bench.py --model llama-3.2-1b --data uniform --batch-size 8 --steps 40
    python benchmarks/train_bench.py --model tiny --max-len 256 --steps 10 --json

Each trainer runs in its own process (clean peak memory; on CPU each can get its own BLAS):
  lorakit     lorakit's trainer (OpenBLAS preloaded on Linux CPU, as lorakit always does)
  mlx-lm      mlx_lm.tuner.trainer.train, given the same BLAS as lorakit
  mlx-lm-ref  mlx-lm as users install it on Linux CPU: the wheel's reference BLAS (LORAKIT_NO_OPENBLAS=1)
Settings shared by all: LoRA rank 8, scale 20 (alpha 160), all linear layers of all blocks, Adam, lr 1e-5.
Throughput counts trained tokens only (targets that carry loss; no padding), over the steps after warm-up.
See benchmarks/README.md ("Training throughput") for the FLOP count behind MFU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# bf16 dense tensor-core peak (no sparsity), TFLOP/s, by GPU name
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], check=False,
                             capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("mlx", "mlx-lm")}


def _run_worker(trainer: str, spec: dict, scratch: Path) -> dict:
    result = scratch / f"{trainer.replace(':', '-')}.json"
    spec = dict(spec, trainer=trainer, scratch=str(scratch), result=str(result))
    if trainer == "mlx-lm-ref":
        spec["steps"] = spec.pop("ref_steps") or spec["steps"]
        spec["warmup"] = min(spec["warmup"], 1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]))
    if trainer == "mlx-lm-ref":
        env["LORAKIT_NO_OPENBLAS"] = "1"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "bench_worker.py"), json.dumps(spec)], check=False, env=env,
                          stdout=sys.stderr, stderr=sys.stderr)
    if proc.returncode != 0:
        return {"trainer": trainer, "error": f"worker exited with {proc.returncode}"}
    result = json.loads(Path(spec["result"]).read_text())
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def _summarise(raw: dict, peak_tflops: float | None) -> dict:
    if "error" in raw:
        return raw
    warm = raw["warmup"]
    times, tokens = raw["step_times"][warm:], raw["step_tokens"][warm:]
    tok_s = sum(tokens) / sum(times)
    # steady state: without the steps that compiled a new shape (over 3x the median step)
    median = sorted(times)[len(times) // 2]
    steady = [(t, n) for t, n in zip(times, tokens) if t <= 3 * median]
    row = {
        "trainer": raw["trainer"],
        "tokens_per_s": round(tok_s, 1),
        "steady_tokens_per_s": round(sum(n for _, n in steady) / sum(t for t, _ in steady), 1),
        "peak_memory_gb": round(raw["peak_memory"] / 1e9, 3),
        "timed_steps": len(times),
        "trained_tokens": int(sum(tokens)),
        "step_s_median": round(sorted(times)[len(times) // 2], 4),
        "first_loss": raw["losses"][0] if raw["losses"] else None,
        "last_loss": raw["losses"][-1] if raw["losses"] else None,
        "blas": raw["blas"],
        "cpu_matmul_gflops": raw["cpu_matmul_gflops"],
        "wall_s": raw.get("wall_s"),
        "step_times": [round(t, 4) for t in raw["step_times"]],  # warm-up steps included
        "step_tokens": raw["step_tokens"],
        "layout": raw.get("layout", ""),
    }
    if raw.get("plan"):
        plan = raw["plan"]
        row["plan"] = {k: plan[k] for k in ("layout", "peak_memory_gb", "step_time_s", "tokens_per_second",
                                             "compiled_shapes", "compile_time_s", "tried")}
    if peak_tflops:
        row["mfu"] = round(tok_s * raw["flops_per_trained_token"] / (peak_tflops * 1e12), 4)
    return row


def _ratios(rows: list[dict]) -> dict:
    by = {r["trainer"]: r for r in rows if "error" not in r}
    out = {}
    for mine in (name for name in by if name.startswith("lorakit")):  # lorakit and lorakit:<variant>
        for other in ("mlx-lm", "mlx-lm-ref"):
            if other in by:
                out[f"{mine}/{other}"] = {
                    "tokens_per_s": round(by[mine]["tokens_per_s"] / by[other]["tokens_per_s"], 2),
                    "steady_tokens_per_s": round(by[mine]["steady_tokens_per_s"] / by[other]["steady_tokens_per_s"], 2),
                    "peak_memory": round(by[mine]["peak_memory_gb"] / by[other]["peak_memory_gb"], 3),
                }
    return out


def _render(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["settings"]
    title = (f"{s['model']} {s['dtype']} | {s['data']} mask_prompt={s['mask_prompt']} | batch {s['batch_size']} "
             f"max_len {s['max_len']} | {report['device']}")
    table = Table(title=title)
    for col in ("trainer", "tokens/s", "steady", "peak GB", "MFU", "median step s", "timed steps", "loss first->last",
                "BLAS"):
        table.add_column(col)
    for r in report["results"]:
        if "error" in r:
            table.add_row(r["trainer"], r["error"], *[""] * 7)
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        loss = f"{r['first_loss']:.3f}->{r['last_loss']:.3f}" if r["first_loss"] is not None else "-"
        table.add_row(r["trainer"], f"{r['tokens_per_s']:,.0f}", f"{r['steady_tokens_per_s']:,.0f}",
                      f"{r['peak_memory_gb']:.2f}", mfu,
                      f"{r['step_s_median']:.3f}", str(r["timed_steps"]), loss, r["blas"])
    console = Console(width=max(Console().width, 150))
    console.print(table)
    for label, opts in s.get("variants", {}).items():
        console.print(f"lorakit:{label} = lorakit with {opts}")
    for r in report["results"]:
        if r.get("layout"):
            console.print(f"{r['trainer']} layout: {r['layout']}")
        if r.get("plan"):
            p = r["plan"]
            console.print(f"{r['trainer']} --plan predicted {p['peak_memory_gb']:.2f} GB (measured "
                          f"{r['peak_memory_gb']:.2f}), {p['tokens_per_second']:,.0f} tokens/s after warm-up "
                          f"(measured {r['tokens_per_s']:,.0f} incl. compiles), {p['compiled_shapes']} shapes "
                          f"x {p['compile_time_s']:.1f} s compile")
    for name, ratio in report["ratios"].items():
        console.print(f"{name}: {ratio['tokens_per_s']}x tokens/s ({ratio['steady_tokens_per_s']}x steady, without "
                      f"compiling steps), {ratio['peak_memory']}x peak memory")


@app.command()
def main(
    model: Annotated[str, typer.Option(help="tiny, a model dir / .gguf, or a shape: smollm2-135m, qwen2.5-0.5b, "
                                            "llama-3.2-1b, llama-3.2-3b, llama-3.1-8b (random weights).")] = "tiny",
    quantize: Annotated[int | None, typer.Option(help="Quantize a random-weight shape to 4 or 8 bits "
                                                      "(group 64, as mlx_lm convert -q) for QLoRA.")] = None,
    dtype: Annotated[str | None, typer.Option(help="bfloat16/float16/float32, or none (a model file as stored; default: bf16 on GPU, "
                                                      "fp32 on CPU).")] = None,
    data: Annotated[str, typer.Option(help="uniform (~1000-token chats) or longtail (50-2000 tokens).")] = "uniform",
    mask_prompt: Annotated[bool, typer.Option(help="Train on completions only.")] = False,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    max_len: Annotated[int, typer.Option(help="Max sequence length (longer examples are cut).")] = 2048,
    length_scale: Annotated[float, typer.Option(help="Multiply example lengths (e.g. 0.25 for CPU).")] = 1.0,
    steps: Annotated[int, typer.Option(help="Timed steps.")] = 40,
    warmup: Annotated[int, typer.Option(help="Warm-up steps (not timed).")] = 3,
    ref_steps: Annotated[int | None, typer.Option(help="Timed steps for mlx-lm-ref (slow).")] = None,
    trainers: Annotated[str, typer.Option(help="Comma list of lorakit, mlx-lm, mlx-lm-ref "
                                               "(default: all three on CPU, first two on GPU).")] = "",
    lorakit_opt: Annotated[list[str], typer.Option(help="Extra lorakit TrainSettings as key=value "
                                                        "(e.g. pack=true); repeatable.")] = [],  # noqa: B006
    variant: Annotated[list[str], typer.Option(help="An extra lorakit run, label:key=value[,key=value] on top of "
                                                    "--lorakit-opt (e.g. pack-b4:pack=true,batch_size=4; "
                                                    "batch_size there is lorakit's alone; env_NAME=value sets an "
                                                    "environment variable for that run); repeatable.")] = [],  # noqa: B006
    grad_checkpoint: Annotated[bool, typer.Option(help="Gradient checkpointing in both trainers "
                                                       "(default: mlx-lm without, lorakit as autofit decides).")] = False,
    plan: Annotated[bool, typer.Option(help="Run `lorakit train --plan` before lorakit's run and report both.")] = False,
    peak_tflops: Annotated[float | None, typer.Option(help="Device peak for MFU (default from GPU name).")] = None,
    seed: Annotated[int, typer.Option(help="Data and weight seed.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON report here.")] = None,
) -> None:
    """Benchmark lorakit's trainer against mlx-lm's on one configuration."""
    gpu = _gpu_name()
    dtype = dtype or ("bfloat16" if gpu else "float32")
    names = [t.strip() for t in trainers.split(",") if t.strip()] or (
        ["lorakit", "mlx-lm"] if gpu else ["lorakit", "mlx-lm", "mlx-lm-ref"])
    spec = {"model": model, "dtype": dtype, "quantize": quantize, "data": data, "mask_prompt": mask_prompt, "batch_size": batch_size,
            "max_len": max_len, "length_scale": length_scale, "steps": steps, "warmup": warmup,
            "ref_steps": ref_steps, "rank": 8, "scale": 20.0, "lr": 1e-5, "seed": seed,
            "grad_checkpoint": grad_checkpoint, "plan": plan, "lorakit_opts": dict(kv.split("=", 1) for kv in lorakit_opt)}
    runs = [(name, spec) for name in names]
    variants = {}
    for v in variant:
        label, _, opts = v.partition(":")
        variants[label] = dict(kv.split("=", 1) for kv in opts.split(",") if kv)
        runs.append((f"lorakit:{label}", dict(spec, lorakit_opts={**spec["lorakit_opts"], **variants[label]})))
    if peak_tflops is None and gpu:
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        results = [_summarise(_run_worker(name, run_spec, Path(tmp)), peak_tflops) for name, run_spec in runs]
    settings = {k: v for k, v in spec.items() if k != "ref_steps"}
    if variants:
        settings["variants"] = variants
    report = {"settings": settings, "device": gpu or "cpu",
              "peak_tflops": peak_tflops, "versions": _versions(), "cpu_count": os.cpu_count(),
              "results": results, "ratios": _ratios(results)}
    if out:
        out.write_text(json.dumps(report, indent=2))
    if json_output:
        print(json.dumps(report))
    else:
        _render(report)


if __name__ == "__main__":
    app()
