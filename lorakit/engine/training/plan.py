"""`lorakit train --plan`: what the run as configured will cost, predicted from measured steps.

Peak memory is the probe's (the heaviest micro-batch, forward, backward and update); the step time scales the
probe's compiled step time by the mean padded tokens of a step; the total adds one compilation per shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.engine.data.batching import BatchPlan
from lorakit.engine.training.fit import HEADROOM, Choice


@dataclass
class TrainPlan:
    layout: str  # the flags of the chosen layout
    chosen_by: str  # "autofit" or "your settings"
    reasons: list[str]
    max_memory_gb: float
    peak_memory_gb: float
    fits: bool
    step_time_s: float
    tokens_per_step: float
    steps: int
    compiled_shapes: int
    compile_time_s: float  # per shape, measured on the heaviest one
    total_time_s: float
    tokens_per_second: float
    tried: list[dict] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str]]:
        """The plan as the table `lorakit train --plan` prints."""
        return [
            ("layout", f"{self.layout} ({self.chosen_by})"),
            *[("why", reason) for reason in self.reasons],
            ("peak memory", f"{self.peak_memory_gb:.2f} GB of {self.max_memory_gb:.2f} GB "
                            f"({'fits' if self.fits else 'does NOT fit'})"),
            ("step", f"{self.step_time_s:.3f} s, {self.tokens_per_step:,.0f} tokens"),
            ("speed", f"{self.tokens_per_second:,.0f} tokens/s after warm-up"),
            ("warm-up", f"{self.compiled_shapes} shapes to compile, ~{self.compile_time_s:.1f} s each"),
            ("total", f"{self.steps} steps, ~{_clock(self.total_time_s)}"),
        ]


def predict(choice: Choice, plan: BatchPlan, total_steps: int) -> TrainPlan:
    measured = choice.measured
    accum = choice.layout.grad_accumulation_steps
    per_token = (measured.step_s or measured.first_s) / max(measured.padded_tokens, 1)
    padded = sum(plan.batch_rows(b) * (plan.width(b) + 1) for b in range(len(plan))) / len(plan)
    real = sum(e.length for e in plan.examples) / len(plan)
    step_time = per_token * padded * accum
    shapes = len(plan.shapes())
    total = total_steps * step_time + shapes * measured.compile_s
    return TrainPlan(
        layout=choice.layout.flags(), chosen_by="autofit" if choice.by_autofit else "your settings",
        reasons=choice.reasons, max_memory_gb=round(choice.budget_bytes / 1e9, 6),
        peak_memory_gb=round(measured.peak_bytes / 1e9, 6),
        fits=not measured.out_of_memory and measured.peak_bytes <= HEADROOM * choice.budget_bytes,
        step_time_s=round(step_time, 4), tokens_per_step=round(real * accum, 1), steps=total_steps,
        compiled_shapes=shapes, compile_time_s=round(measured.compile_s, 3), total_time_s=round(total, 1),
        tokens_per_second=round(real / max(per_token * padded, 1e-12), 1),
        tried=[{"layout": layout.flags(), "peak_memory_gb": round(m.peak_bytes / 1e9, 6),
                "out_of_memory": m.out_of_memory} for layout, m in choice.tried])


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
