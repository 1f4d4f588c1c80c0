"""One pydantic settings family for every subcommand.

Sources, highest first: CLI flags, `LORAKIT_*` environment variables, a YAML `--config` file, defaults.
A config file may hold top-level keys (any command's) and per-command sections (`train:`, `eval:`, ...);
mlx-lm's LoRA YAML keys are translated. A key no lorakit command knows is an error naming the closest one.
"""

from __future__ import annotations

import contextvars
import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from lorakit.builtin_templates import BUILTIN_TEMPLATES
from lorakit.errors import UserError

COMMANDS = ("prepare", "train", "eval", "generate", "fuse", "report", "models")
TEMPLATES = tuple(BUILTIN_TEMPLATES)
TARGET_PRESETS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
OUTPUT_FIELDS = {"json_output", "quiet", "debug"}

_yaml_data: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "yaml_data", default=MappingProxyType({}))


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _split_stop(value: Any) -> Any:
    """Stop strings keep their whitespace (a newline is a common one); only empty parts are dropped."""
    if isinstance(value, str):
        return [part for part in value.split(",") if part]
    return value


CommaList = Annotated[list[str], NoDecode]
FloatTriple = Annotated[tuple[float, float, float], NoDecode]
Q_GROUP_SIZES = (32, 64, 128)  # the group sizes mx.quantize accepts


def _check_group_size(value: int) -> int:
    if value not in Q_GROUP_SIZES:
        sizes = ", ".join(map(str, Q_GROUP_SIZES[:-1])) + f" or {Q_GROUP_SIZES[-1]}"
        raise ValueError(f"must be {sizes}: the group sizes MLX quantizes with")
    return value


QGroupSize = Annotated[int, AfterValidator(_check_group_size)]


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return _yaml_data.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_yaml_data.get())


# Every settings class and mixin shares this config: pydantic merges the bases' configs, so a mixin with
# BaseSettings' defaults would otherwise turn the LORAKIT_ prefix off (and read bare TEMP, MODEL, ...).
# allow_inf_nan=False: `inf` and `nan` are refused in every float setting (flag, env or config), naming it.
SETTINGS_CONFIG = SettingsConfigDict(env_prefix="LORAKIT_", extra="forbid", validate_default=True,
                                     populate_by_name=True, allow_inf_nan=False)


class Common(BaseSettings):
    """Fields every command has."""

    model_config = SETTINGS_CONFIG

    json_output: bool = Field(False, description="Print the result as one JSON object on stdout.")
    quiet: bool = Field(False, description="Only errors and warnings on stderr; no progress.")
    debug: bool = Field(False, description="Show tracebacks for errors (or LORAKIT_DEBUG=1).")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, env_settings, _YamlSource(settings_cls))


class SeedOption(BaseSettings):
    """The random seed, mixed into the commands that draw random numbers (all but fuse)."""

    model_config = SETTINGS_CONFIG

    seed: int = Field(0, ge=0, lt=2**63, description="Random seed (splits, shuffling, LoRA init, sampling).")


class ModelOptions(Common):
    """How to load the base model (shared by train, eval, generate, fuse)."""

    model: str = Field(description="Hugging Face repo id, local model directory, or .gguf file.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of --model.")
    trust_remote_code: bool = Field(False, description="Allow custom code from the model repo.")
    quantize: Literal[4, 8] | None = Field(None, description="Quantize a float base in memory (QLoRA).")
    q_group_size: QGroupSize = Field(64, description="Group size for --quantize (32, 64 or 128).")
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="Cast a float base (de-quantize a quantized one) to this type."
    )


class PrepareSettings(SeedOption, Common):
    inputs: CommaList = Field(description="Raw JSONL / JSON files to read.")
    out: Path = Field(description="Output directory for train/valid/test.jsonl.")
    input_format: Literal["auto", "chat", "sharegpt", "completions", "alpaca", "text", "judge",
                          "preference"] = Field(
        "auto", description="Record format; auto detects it per record."
    )
    format: Literal["messages", "text"] = Field(
        "messages", description="Output: chat messages, or text rendered through a chat template."
    )
    field_map: CommaList = Field(
        [], description="Rename input fields, e.g. 'prompt=question,completion=answer'."
    )
    system: str | None = Field(None, description="System prompt added to examples that have none.")
    template: str | None = Field(
        None,
        description=f"Chat template: {', '.join(TEMPLATES)}, or a Jinja file (default: the tokenizer's).",
    )
    model: str | None = Field(
        None, description="Model whose tokenizer counts tokens / supplies the template."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer (tokenizer.json, model dir or .gguf) to count tokens."
    )
    split: FloatTriple = Field((0.8, 0.1, 0.1), description="train,valid,test ratios.")
    stratify_by: str | None = Field(
        None, description="Keep this field's label distribution equal across splits."
    )
    group_by: str | None = Field(None, description="Records sharing this field's value stay in one split.")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="On a bad record: fail, or skip it to rejected.jsonl."
    )
    max_error_rate: float = Field(
        0.05, ge=0, le=1, description="With --on-error skip, fail above this share."
    )
    max_chars: int | None = Field(None, gt=0, description="Reject examples longer than this many characters.")
    max_tokens: int | None = Field(None, gt=0, description="Reject examples longer than this many tokens.")
    dedupe: bool = Field(
        True, description="Treat exact duplicates (after normalising whitespace) as bad records."
    )
    overwrite: bool = Field(False, description="Replace a non-empty --out directory.")

    _split = field_validator("inputs", "field_map", mode="before")(_split_list)

    @field_validator("split", mode="before")
    @classmethod
    def _parse_split(cls, value: Any) -> Any:
        expected = "expected three numbers like 0.8,0.1,0.1 (train,valid,test)"
        if isinstance(value, str):
            try:
                value = [float(x) for x in value.replace("/", ",").split(",")]
            except ValueError:
                raise ValueError(expected) from None
        if isinstance(value, (list, tuple)) and len(value) != 3:
            raise ValueError(f"{expected}, not {len(value)}")
        return value

    @field_validator("split")
    @classmethod
    def _check_split(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v < 0 for v in value) or abs(sum(value) - 1.0) > 1e-6 or value[0] <= 0:
            got = ",".join(map(str, value))
            raise ValueError(f"ratios must be >= 0, train > 0, and sum to 1 (got {got})")
        return value


class TrainSettings(SeedOption, ModelOptions):
    data: Path = Field(description="Directory with train.jsonl and valid.jsonl (from `lorakit prepare`).")
    adapter_path: Path = Field(Path("adapters"), description="Where adapters, checkpoints and metrics go.")
    fine_tune_type: Literal["lora", "dora", "full"] = Field("lora", description="lora, dora or full.")
    lora_rank: int = Field(8, gt=0, le=65536, description="LoRA rank r.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch input.")
    num_layers: int = Field(-1, description="Adapt the last N transformer blocks (-1: all).")
    target_modules: CommaList = Field(
        ["all-linear"], description="Module names or presets: attention, mlp, all-linear."
    )
    train_on: Literal["auto", "all", "completions", "assistant"] = Field(
        "auto",
        description="Tokens that carry loss (auto: assistant for chats, completions for prompt/completion).",
    )
    objective: Literal["sft", "dpo", "orpo"] | None = Field(
        None, description="sft, dpo or orpo (default: dpo for preference pairs, else sft)."
    )
    beta: float = Field(0.1, gt=0, description="DPO: strength of the pull to the base; ORPO: odds-ratio weight.")
    dpo_loss: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="DPO loss: sigmoid, ipo, hinge.")
    max_seq_length: int = Field(2048, gt=1, description="Truncate examples to this many tokens.")
    pack: bool = Field(False, description="Pack several examples per row (no cross-example attention).")
    batch_size: int = Field(4, gt=0, description="Examples per step (rows with --pack): the effective batch.")
    batch_tokens: int | None = Field(
        None, gt=0, description="Token budget per micro-batch (rows x padded length; default: autofit's)."
    )
    grad_accumulation_steps: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    iters: int | None = Field(None, gt=0, le=10**12, description="Optimizer steps to train (overrides --epochs).")
    epochs: float | None = Field(
        None, gt=0, description="Epochs to train when --iters is not given (default 3)."
    )
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    optimizer: Literal["adam", "adamw", "sgd", "adafactor"] = Field("adamw", description="Optimizer.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (adamw, sgd).")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="Learning-rate schedule."
    )
    warmup: float = Field(0, ge=0, description="Warmup: steps if >= 1, else a fraction of all steps.")
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Final LR as a fraction of peak (cosine, linear)."
    )
    max_grad_norm: float | None = Field(None, gt=0, description="Clip the global gradient norm to this.")
    grad_checkpoint: bool = Field(False, description="Recompute activations in backward to save memory.")
    recompute_swiglu: bool = Field(
        False, description="Recompute the SwiGLU product that LoRA on down_proj needs, in backward (SiLU "
        "MLPs with --lean-activations, no LoRA dropout)."
    )
    recompute_mlp: bool = Field(
        False, description="Recompute only the MLPs in backward: about half the memory of no checkpointing."
    )
    recompute_mlp_blocks: int | None = Field(
        None, gt=0, description="Recompute the MLPs of only the first N blocks (implies --recompute-mlp; "
        "autofit picks N to fill --max-memory)."
    )
    max_memory: float | None = Field(
        None, gt=0, description="Memory budget in GB the run must fit (default: what the device reports usable); "
        "MLX then queues less work ahead of the GPU (CUDA: smaller graphs; elsewhere: up to 0.8x of it)."
    )
    autofit: bool = Field(
        True, description="Choose packing, batch layout, checkpointing, accumulation: fastest that fits."
    )
    plan: bool = Field(False, description="Measure the run and print its plan (memory, speed, time); no training.")
    fast_qlora: bool = Field(
        True, description="Quantized base: de-quantize each weight just before its matmul (CPU, CUDA; not Metal)."
    )
    lean_activations: bool = Field(
        True, description="Keep fewer activations for backward (SwiGLU recomputes its sigmoid)."
    )
    steps_per_report: int = Field(10, gt=0, description="Log train loss every N steps.")
    steps_per_eval: int = Field(100, gt=0, description="Validate every N steps.")
    val_batches: int = Field(25, ge=-1, description="Validation batches per eval (-1: the whole valid set).")

    @field_validator("val_batches")
    @classmethod
    def _check_val_batches(cls, value: int) -> int:
        if value == 0:
            raise ValueError("pass a positive number of batches, or -1 for the whole valid set")
        return value
    save_every: int = Field(100, gt=0, description="Checkpoint every N steps.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept besides best/.")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N evals without improvement."
    )
    resume: bool = Field(False, description="Continue from the last checkpoint in --adapter-path.")
    resume_from: Path | None = Field(None, description="Continue from this checkpoint directory.")
    overwrite: bool = Field(False, description="Start over in a non-empty --adapter-path.")
    dist_timeout: float = Field(
        600.0, gt=0, description="Under mlx.launch: exit when no step ends for this many seconds (lost rank)."
    )

    _split = field_validator("target_modules", mode="before")(_split_list)

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one module or preset (attention, mlp, all-linear)")
        return value

    @model_validator(mode="after")
    def _check_resume(self) -> TrainSettings:
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other; pick one")
        return self

    @model_validator(mode="after")
    def _blocks_imply_recompute(self) -> TrainSettings:
        if self.recompute_mlp_blocks is None or self.recompute_mlp:
            return self
        if "recompute_mlp" in self.model_fields_set:
            raise ValueError("--recompute-mlp-blocks needs --recompute-mlp; drop --no-recompute-mlp")
        self.recompute_mlp = True
        self.model_fields_set.add("recompute_mlp")  # chosen by the user, so autofit leaves it
        return self

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank


class SamplingOptions(BaseSettings):
    """Generation knobs shared by generate and eval --generate (mixed into their settings)."""

    model_config = SETTINGS_CONFIG

    max_tokens: int = Field(256, gt=0, description="Most tokens to generate per answer.")
    temp: float = Field(0.0, ge=0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens (0: off).")
    min_p: float = Field(0.0, ge=0, le=1, description="Drop tokens below min_p x the top probability.")
    repetition_penalty: float | None = Field(None, gt=0, description="Penalise recently seen tokens (>1).")
    stop: CommaList = Field([], description="Stop strings (comma-separated or repeated).")

    _stop_strings = field_validator("stop", mode="before")(_split_stop)


class RenderingOptions(BaseSettings):
    """How prompts are rendered, shared by eval and generate (default: the way the adapter was trained)."""

    model_config = SETTINGS_CONFIG

    chat_template: bool | None = Field(
        None, description="Render prompts through a chat template, or as raw text (default: as the adapter "
                          "was trained; the tokenizer's template without an adapter)."
    )
    template: str | None = Field(
        None, description=f"Render prompts through this chat template: {', '.join(TEMPLATES)}, or a Jinja file."
    )


class EvalSettings(SeedOption, ModelOptions, SamplingOptions, RenderingOptions):
    data: Path = Field(description="Directory from `lorakit prepare`.")
    split: str = Field("test", description="Which split file to evaluate (train, valid, test).")
    adapter_path: Path | None = Field(None, description="Adapter directory from `lorakit train` (best/ if present).")
    batch_size: int = Field(8, gt=0, description="Examples per forward pass.")
    max_seq_length: int = Field(2048, gt=1, description="Truncate examples to this many tokens.")
    train_on: Literal["auto", "all", "completions", "assistant"] = Field(
        "auto", description="Tokens that carry loss (as in training)."
    )
    compare_base: bool = Field(False, description="Evaluate the base model too and show the change.")
    generate: bool = Field(False, description="Also generate answers and score them against references.")
    prompt_delimiter: str | None = Field(
        None, description="--generate on 'text' records: the prompt is the text up to and including the last "
                          "occurrence of this string (e.g. '\\nA:'; \\n and \\t are understood), the "
                          "reference the rest."
    )
    judge: bool = Field(False, description="Pairwise judge mode: verdict accuracy and A/B swap consistency.")
    judge_template: str | None = Field(None, description="Jinja file for the judge prompt (default built in).")
    label_pattern: str | None = Field(None, description="Regex whose first group extracts a label.")
    labels: CommaList = Field([], description="Allowed labels, e.g. A,B,tie.")
    ignore_case: bool = Field(True, description="Case-insensitive exact match and labels.")
    limit: int | None = Field(None, gt=0, description="Evaluate at most N examples (chosen by --seed).")
    out: Path | None = Field(None, description="Where eval.json and predictions.jsonl go.")
    overwrite: bool = Field(False, description="Replace existing eval outputs.")

    @field_validator("labels", mode="before")
    @classmethod
    def _split_labels(cls, value: Any) -> Any:
        labels = _split_list(value)
        if isinstance(value, str) and value.strip() and not labels:
            raise ValueError(f"no label in {value!r}; give names separated by commas, e.g. A,B,tie")
        return labels

    @field_validator("prompt_delimiter", mode="before")
    @classmethod
    def _unescape_delimiter(cls, value: Any) -> Any:
        """`--prompt-delimiter '\\nA:'` as typed in a shell means a newline: \\n, \\t and \\\\ are decoded."""
        if isinstance(value, str):
            value = re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), value)
            if not value:
                raise ValueError("an empty delimiter splits nothing")
        return value


class GenerateSettings(SeedOption, ModelOptions, SamplingOptions, RenderingOptions):
    adapter_path: Path | None = Field(None, description="Adapter directory from `lorakit train`.")
    prompt: str | None = Field(None, description="The prompt ('-' reads stdin).")
    input: Path | None = Field(None, description="JSONL with `prompt` or `messages` per line.")
    output: Path | None = Field(None, description="Write JSONL results here (default stdout).")
    system: str | None = Field(None, description="System prompt.")
    compare_base: bool = Field(False, description="Also answer with the base model, side by side.")
    batch_size: int = Field(8, gt=0, description="Prompts generated together for --input.")
    overwrite: bool = Field(False, description="Replace an existing --output file.")


class FuseSettings(ModelOptions):
    adapter_path: Path = Field(Path("adapters"), description="Adapter directory from `lorakit train`.")
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="Type of the fused weights (default: the base's float type, else float16)."
    )
    q_group_size: QGroupSize = Field(
        64,
        description="Group size for --quantize and --requantize (--requantize keeps a quantized base's by "
                    "default).",
    )
    out: Path = Field(Path("fused_model"), description="Output model directory.")
    requantize: Literal[4, 8] | None = Field(
        None, description="Quantize the fused weights (reports the error)."
    )
    export_gguf: Path | None = Field(
        None, description="Also write a GGUF file for llama.cpp, checked, with an Ollama Modelfile beside it."
    )
    gguf_type: Literal["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"] = Field(
        "f16", description="Tensor type of the GGUF export (k-quants: llama-quantize the f16 file)."
    )
    gguf_adapter: Path | None = Field(
        None, description="Also write the adapter alone as a GGUF LoRA (llama.cpp --lora, Ollama ADAPTER)."
    )
    verify: bool = Field(
        True, description="Compare fused logits with base+adapter, and the GGUF read back; fail on mismatch."
    )
    verify_tolerance: float | None = Field(
        None, gt=0,
        description="Largest max logit difference --verify accepts (default: scaled by the dtype).",
    )
    overwrite: bool = Field(False, description="Replace an existing --out.")


class ModelsSettings(Common):
    """`lorakit models` lists the cache; it has only the common flags."""


class ReportSettings(Common):
    paths: CommaList = Field(description="Prepared data directories, training runs (--adapter-path) and eval "
                                         "outputs (a run brings its data and its eval-* outputs along).")
    out: Path = Field(Path("report.html"), description="The HTML file to write (one self-contained page).")
    examples: int = Field(3, ge=0, description="Training examples shown token by token, loss tokens marked.")
    samples: int = Field(6, ge=0, description="Generations shown side by side per eval (reference, base, "
                                              "adapter).")
    overwrite: bool = Field(False, description="Replace an existing --out file.")

    _split = field_validator("paths", mode="before")(_split_list)


SETTINGS: dict[str, type[Common]] = {
    "prepare": PrepareSettings,
    "train": TrainSettings,
    "eval": EvalSettings,
    "generate": GenerateSettings,
    "fuse": FuseSettings,
    "report": ReportSettings,
    "models": ModelsSettings,
}


def all_keys() -> set[str]:
    return {name for cls in SETTINGS.values() for name in cls.model_fields}


def _translate_mlx_lm(data: dict[str, Any], command: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """An mlx-lm LoRA config's keys -> lorakit keys, with notes on what lorakit does differently and the
    problems that stop it (lorakit/mlx_lm_config.py); any other config is returned as it is."""
    from lorakit.mlx_lm_config import translate

    return translate(data, command)


def _read_yaml(path: Path) -> Any:
    """The config file's YAML data; an unreadable, binary or malformed file is a UserError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--config {path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"--config {path}: is a directory; give a YAML file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--config {path}: not a text YAML file (invalid UTF-8 at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.reader.ReaderError as e:  # control characters: a binary file that happens to be valid UTF-8
        raise UserError(f"--config {path}: not a text YAML file (character #x{e.character:04x} at "
                        f"position {e.position})") from None
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: invalid YAML: {e}") from None


def read_config(path: Path | None, command: str) -> tuple[dict[str, Any], list[str]]:
    """Read a YAML config for `command`: merge its section over top-level keys; check every key."""
    if path is None:
        return {}, []
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"--config {path}: expected a mapping of settings, got {type(raw).__name__}")
    # `train: true` is mlx-lm's "do train" flag (its YAML), not lorakit's train section
    top = {k: v for k, v in raw.items() if k not in COMMANDS or (k == "train" and isinstance(v, bool))}
    section = {} if command in top else raw.get(command) or {}
    if not isinstance(section, dict):
        raise UserError(f"--config {path}: section '{command}' must be a mapping")
    merged, notes, mlx_problems = _translate_mlx_lm({**top, **section}, command)
    if command != "train":  # an mlx-lm file configures training; other commands take only the keys they share
        notes, mlx_problems = [], []
    known = all_keys()
    mine = SETTINGS[command].model_fields
    problems = [f"{path}: {problem}" for problem in mlx_problems]
    for key in merged:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{path}: unknown key '{key}'{hint}")
    for name, sec in raw.items():
        if name in COMMANDS and name != command and isinstance(sec, dict):
            for key in sec:
                if key not in SETTINGS[name].model_fields:
                    close = difflib.get_close_matches(str(key), sorted(SETTINGS[name].model_fields), n=1)
                    hint = f"; did you mean '{close[0]}'?" if close else ""
                    problems.append(f"{path}: unknown key '{name}.{key}'{hint}")
    if problems:
        raise UserError("invalid config:\n  " + "\n  ".join(problems))
    return {k: v for k, v in merged.items() if k in mine and k not in OUTPUT_FIELDS}, notes


def flag(name: str) -> str:
    """How the command line spells a settings field (the CLI's options and the error messages use it)."""
    if name in ("inputs", "paths"):  # prepare's and report's positional arguments
        return "INPUT..." if name == "inputs" else "PATH..."
    return "--json" if name == "json_output" else "--" + name.replace("_", "-")


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        name = loc[0] if loc else ""
        where = f"{flag(name)} (env LORAKIT_{name.upper()}, config key '{name}')" if name else "settings"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing" and len(loc) > 1:  # an item of a list or tuple
            msg = f"item {loc[1]} is missing"
        elif e["type"] == "missing":
            msg = f"required; pass {flag(name)}"
        elif "input" in e and e["type"] not in ("extra_forbidden",) and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{where}: {msg}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings(command: str, cli: dict[str, Any], config: Path | None = None) -> tuple[Common, list[str]]:
    """Resolve settings for `command`: CLI flags > LORAKIT_* env > YAML config > defaults.

    `cli` holds only the flags the user gave (None means not given). Returns (settings, notes).
    """
    cls = SETTINGS[command]
    data, notes = read_config(config, command)
    token = _yaml_data.set(data)
    try:
        return cls(**{k: v for k, v in cli.items() if v is not None}), notes
    except ValidationError as e:
        raise UserError(format_validation_error(e)) from None
    finally:
        _yaml_data.reset(token)


def settings_dict(settings: Common) -> dict[str, Any]:
    """The resolved settings as plain data, without the output-only fields."""
    return settings.model_dump(mode="json", exclude=OUTPUT_FIELDS)


def save_settings(settings: Common, path: Path) -> None:
    from lorakit.io import write_text

    write_text(path, yaml.safe_dump(settings_dict(settings), sort_keys=False, allow_unicode=True))
