"""mlx-lm's LoRA YAML (`mlx_lm.lora --config FILE`, e.g. its examples/lora_config.yaml) as lorakit settings.

mlx_lm.lora takes each key of its YAML as the flag of that name and fills what the file leaves out from its
CONFIG_DEFAULTS. A file is read as mlx-lm's when it holds a key only mlx-lm has (`train: true`,
`lora_parameters`, `training_mode`, `mask_prompt`, `lr_schedule` as a mapping, ...). Then every mlx-lm key is

- mapped to the lorakit setting with the same meaning (lora_parameters -> lora_rank, lora_alpha, lora_dropout,
  target_modules; lr_schedule -> lr_schedule, learning_rate, warmup, min_lr_ratio; mask_prompt -> train_on;
  optimizer_config's weight_decay; *_feature -> prepare's field_map; ...),
- or accepted with one note naming it and what lorakit does instead (Adam betas and eps, warmup_init, a test
  pass after training, reporting to wandb, ...),
- or refused (exit 2, naming it) where following the file would train something else altogether: DPO or GRPO,
  a Hugging Face dataset, the Muon optimizer, exponential or step schedules, optimizer options mlx refuses,
  starting from adapter weights that are not a lorakit checkpoint.

What the file leaves out takes mlx-lm's defaults where they differ from lorakit's (iters 1000, learning rate
1e-5, 16 layers, LoRA scale 20, the whole sequence trained on, AdamW weight decay 0.01), named in one note.
A lorakit key in the same file wins over a translated one; flags and LORAKIT_* variables win over the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# mlx-lm's data-format keys and the lorakit field each names (prepare's --field-map renames to it)
_FEATURES = {"prompt_feature": "prompt", "completion_feature": "completion", "chat_feature": "messages",
             "text_feature": "text"}
# Keys of preference / RL training modes (DPO, GRPO, ORPO in mlx-lm-lora's config): unused by normal training
_PREFERENCE_KEYS = ("reference_model_path", "group_size", "beta", "epsilon", "max_completion_length",
                    "use_chat_template", "use_prompt", "temperature", "reward_weights", "reward_functions",
                    "system_feature", "chosen_feature", "rejected_feature", "preference_score_feature",
                    "answer_feature")
_MARKERS = {"training_mode", "lora_parameters", "lora_layers", "optimizer_config", "mask_prompt",
            "resume_adapter_file", "test", "test_batches", "hf_dataset", "report_to", "project_name", "wandb",
            "clear_cache_threshold", *_FEATURES}
_CONSUMED = {*_MARKERS, *_PREFERENCE_KEYS, "train", "config", "lr_schedule", "optimizer"}

# mlx_lm.lora's CONFIG_DEFAULTS where they differ from lorakit's defaults
_DEFAULTS = {"iters": 1000, "learning_rate": 1e-5, "num_layers": 16, "steps_per_eval": 200}
_LORA_DEFAULTS = {"rank": 8, "scale": 20.0, "dropout": 0.0}
_OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "adafactor": "Adafactor"}
# mlx's optimizer options lorakit has no setting for, at the values lorakit's optimizers use
# (engine/training/optimizer.py); weight_decay is lorakit's own setting for adamw and sgd
_FIXED: dict[str, dict[str, Any]] = {
    "adam": {"betas": [0.9, 0.999], "eps": 1e-8, "bias_correction": False},
    "adamw": {"betas": [0.9, 0.999], "eps": 1e-8, "bias_correction": False},
    "sgd": {"momentum": 0.0, "dampening": 0.0, "nesterov": False},
    "adafactor": {"eps": [1e-30, 1e-3], "clip_threshold": 1.0, "decay_rate": -0.8, "beta_1": None,
                  "weight_decay": 0.0, "scale_parameter": False, "relative_step": False, "warmup_init": False},
}
_WEIGHT_DECAY = {"adamw": 0.01, "sgd": 0.0}  # mlx's default weight decay, for the optimizers lorakit sets it on
_MLX_ADAFACTOR = {"scale_parameter": True, "relative_step": True}  # mlx's defaults where lorakit's differ
_SCHEDULES = {"cosine_decay": "cosine", "linear_schedule": "linear"}


def is_mlx_lm_config(data: dict[str, Any]) -> bool:
    return (any(key in data for key in _MARKERS) or isinstance(data.get("train"), bool)
            or isinstance(data.get("lr_schedule"), dict))


def translate(data: dict[str, Any], command: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """(lorakit keys, notes, problems) for a merged config mapping; anything not mlx-lm's is left as it is."""
    if not is_mlx_lm_config(data):
        return dict(data), [], []
    t = _Translation(data, command)
    _run_mode(t)
    _lora(t)
    _optimizer(t)
    _schedule(t)
    _data(t)
    _resume(t)
    _reporting(t)
    _defaults(t)
    return t.out, t.notes, t.problems


class _Translation:
    def __init__(self, data: dict[str, Any], command: str):
        self.src = data
        self.command = command
        self.out = {k: v for k, v in data.items() if k not in _CONSUMED}
        self.notes: list[str] = []
        self.problems: list[str] = []
        self.filled: list[str] = []  # mlx-lm defaults applied, for the one note about them

    def set(self, key: str, value: Any) -> None:
        """A lorakit key written in the same file wins."""
        self.out.setdefault(key, value)

    def note(self, key: str, text: str) -> None:
        self.notes.append(f"mlx-lm key '{key}' {text}")

    def problem(self, key: str, text: str) -> None:
        self.problems.append(f"mlx-lm key '{key}' {text}")

    def number(self, key: str, value: Any) -> float | None:
        number = _to_float(value)
        if number is None:
            self.problem(key, f"must be a number (got {_show(value)})")
        return number


def _to_float(value: Any) -> float | None:
    """YAML reads `1e-5` as a string (mlx-lm's own loader reads it as a float): a number either way."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, str) and _to_float(value) is not None:
        return value  # a number YAML read as text (1e-6)
    return json.dumps(value, default=str)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


def _run_mode(t: _Translation) -> None:
    """train, test, test_batches, training_mode and the keys of preference/RL modes."""
    if t.src.get("train") is False:
        t.note("train", "is false: `lorakit train` trains anyway (for the test loss alone use `lorakit eval`)")
    if t.src.get("test"):
        t.note("test", "is not done by `lorakit train`: run `lorakit eval --split test` after training for "
                       "the test loss and perplexity")
    if t.src.get("test_batches") is not None:
        t.note("test_batches", f"({_show(t.src['test_batches'])}) is not used: `lorakit train` does not "
                               "evaluate the test split (`lorakit eval --split test [--limit N]` does)")
    mode = t.src.get("training_mode")
    if mode not in (None, "normal", "sft"):
        t.problem("training_mode", f"is {_show(mode)}: lorakit does supervised training only ('normal')")
    for key in _PREFERENCE_KEYS:
        if key in t.src:
            t.note(key, "belongs to preference/RL training modes (DPO, GRPO), which lorakit does not have: "
                        "ignored")


def _lora(t: _Translation) -> None:
    """lora_parameters (rank, scale, dropout, keys), the old lora_layers, full fine-tuning's layer choice."""
    if "lora_layers" in t.src:
        layers = t.src["lora_layers"]
        if isinstance(layers, bool) or not isinstance(layers, int):
            t.problem("lora_layers", f"must be a whole number of blocks, -1 for all (got {_show(layers)})")
        else:
            t.set("num_layers", layers)
    params = t.src.get("lora_parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        t.problem("lora_parameters", f"must be a mapping of rank, scale, dropout, keys (got {_show(params)})")
        return
    if "alpha" in params and "scale" not in params:
        t.problem("lora_parameters.alpha", "is not mlx-lm's: its LoRA update is scaled by 'scale' (mlx-lm "
                                           "refuses alpha too); give scale, or lorakit's lora_alpha = scale x rank")
    rank, scale = params.get("rank", _LORA_DEFAULTS["rank"]), params.get("scale", _LORA_DEFAULTS["scale"])
    for key, lorakit_key in (("rank", "lora_rank"), ("scale", "lora_alpha"), ("dropout", "lora_dropout")):
        if key not in params and lorakit_key not in t.src:
            t.filled.append(f"lora_parameters.{key} {_show(_LORA_DEFAULTS[key])}")
    t.set("lora_rank", rank)  # lorakit's lora_rank, if the file has it too, is the rank the scale goes with
    rank_n, scale_n = t.number("lora_parameters.rank", t.out["lora_rank"]), t.number("lora_parameters.scale", scale)
    if rank_n is not None and scale_n is not None:
        t.set("lora_alpha", scale_n * rank_n)
    t.set("lora_dropout", params.get("dropout", _LORA_DEFAULTS["dropout"]))
    keys = params.get("keys")
    if keys is not None:
        if isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys):
            t.set("target_modules", keys)  # block-relative paths such as self_attn.q_proj match as they are
        else:
            t.problem("lora_parameters.keys", f"must be a list of module paths such as self_attn.q_proj "
                                              f"(got {_show(keys)})")
    for key in sorted(set(params) - {"rank", "scale", "dropout", "keys"}):
        if key != "alpha" or "scale" in params:  # alpha without scale is refused above
            t.note(f"lora_parameters.{key}", "is not read by mlx-lm or lorakit: ignored")
    if t.src.get("fine_tune_type") == "full":
        t.note("fine_tune_type", "is full: lorakit trains every weight (embeddings and final norm too), where "
                                 "mlx-lm trains only the last num_layers blocks")


def _optimizer(t: _Translation) -> None:
    """optimizer and the chosen one's optimizer_config section (mlx-lm ignores the other sections)."""
    name = str(t.src.get("optimizer") or "adam").lower()
    if name not in _OPTIMIZERS:
        t.problem("optimizer", f"is {_show(name)}: lorakit has {', '.join(_OPTIMIZERS)}")
        return
    if "optimizer" not in t.src:
        t.filled.append("optimizer adam")
    t.set("optimizer", name)
    configs = t.src.get("optimizer_config") or {}
    if not isinstance(configs, dict):
        t.problem("optimizer_config", f"must map optimizer names to their options (got {_show(configs)})")
        return
    for other, section in configs.items():
        if other != name and section:
            t.note(f"optimizer_config.{other}", f"is not used: the optimizer is {name} (mlx-lm ignores it too)")
    section = configs.get(name) or {}
    if not isinstance(section, dict):
        t.problem(f"optimizer_config.{name}", f"must be a mapping of options (got {_show(section)})")
        return
    _optimizer_options(t, name, section)


def _optimizer_options(t: _Translation, name: str, section: dict[str, Any]) -> None:
    fixed, cls = _FIXED[name], _OPTIMIZERS[name]
    for key, value in section.items():
        where = f"optimizer_config.{name}.{key}"
        if key == "weight_decay" and name in _WEIGHT_DECAY:
            t.set("weight_decay", value)
        elif key not in fixed:
            options = sorted(set(fixed) | ({"weight_decay"} if name in _WEIGHT_DECAY else set()))
            hint = "; weight decay needs adamw" if key == "weight_decay" else ""
            t.problem(where, f"is not an option of mlx's {cls} (mlx-lm fails on it); it takes "
                             f"{', '.join(options)}{hint}")
        elif not _same(value, fixed[key]):
            t.note(where, f"({_show(value)}) has no lorakit setting yet: lorakit's {cls} keeps {key} "
                          f"{_show(fixed[key])}")
    default_decay = _WEIGHT_DECAY.get(name)
    if default_decay and "weight_decay" not in section:
        if "weight_decay" not in t.src:
            t.filled.append(f"weight_decay {default_decay} (mlx's {cls} default)")
        t.set("weight_decay", default_decay)
    if name == "adafactor":
        for key, mlx_default in _MLX_ADAFACTOR.items():
            if key not in section:
                t.note("optimizer", f"is adafactor: mlx-lm runs it with {key} {_show(mlx_default)} (mlx's "
                                    f"default); lorakit's Adafactor keeps {key} false and follows learning_rate")


def _schedule(t: _Translation) -> None:
    """lr_schedule {name, arguments, warmup, warmup_init}; lorakit's own string spelling passes through."""
    sched = t.src.get("lr_schedule")
    if sched is None:
        return
    if not isinstance(sched, dict):
        t.set("lr_schedule", sched)
        return
    name, args = sched.get("name"), sched.get("arguments")
    if name not in _SCHEDULES:
        t.problem("lr_schedule.name", f"is {_show(name)}: lorakit has cosine_decay and linear_schedule "
                                      "(mlx's other schedules have no lorakit equivalent)")
        return
    shape = "[init, decay_steps, end]" if name == "cosine_decay" else "[init, end, steps]"
    sizes = (2, 3) if name == "cosine_decay" else (3,)
    if not isinstance(args, list) or len(args) not in sizes:
        t.problem("lr_schedule.arguments", f"must be {shape} for {name} (got {_show(args)})")
        return
    nums = [t.number(f"lr_schedule.arguments[{i}]", a) for i, a in enumerate(args)]
    if None in nums:
        return
    init, steps, end = (nums[0], nums[1], nums[2] if len(nums) == 3 else 0.0) if name == "cosine_decay" \
        else (nums[0], nums[2], nums[1])
    if init <= 0 or not 0 <= end <= init or steps < 1:
        t.problem("lr_schedule.arguments", f"({_show(args)}): lorakit decays from a rate > 0 to an end value "
                                           "between 0 and it, over at least one step")
        return
    t.set("lr_schedule", _SCHEDULES[name])
    _schedule_rate(t, init, end)
    warmup = t.number("lr_schedule.warmup", sched.get("warmup") or 0) or 0.0
    if warmup:
        t.set("warmup", int(warmup))
    _schedule_extent(t, name, steps, warmup)
    if sched.get("warmup_init") and (t.number("lr_schedule.warmup_init", sched["warmup_init"]) or 0) != 0:
        t.note("lr_schedule.warmup_init", f"({_show(sched['warmup_init'])}) has no lorakit setting: lorakit's "
                                          "warmup rises linearly from 0")
    for key in sorted(set(sched) - {"name", "arguments", "warmup", "warmup_init"}):
        t.note(f"lr_schedule.{key}", "is not read by mlx-lm or lorakit: ignored")


def _schedule_rate(t: _Translation, init: float, end: float) -> None:
    """mlx-lm takes the peak rate from the schedule's arguments, not from learning_rate."""
    given = t.src.get("learning_rate")
    if given is not None and not _same(given, init):
        t.note("learning_rate", f"({_show(given)}) is not used with an lr_schedule: the peak rate is "
                                f"lr_schedule.arguments[0] ({init:g}), as in mlx-lm")
    t.out["learning_rate"] = init
    t.set("min_lr_ratio", float(f"{end / init:.12g}"))


def _schedule_extent(t: _Translation, name: str, steps: float, warmup: float) -> None:
    """lorakit decays over the steps after warmup; say so when mlx-lm's decay would end elsewhere."""
    iters = t.src.get("iters", None if "epochs" in t.src else _DEFAULTS["iters"])
    iters_n = _to_float(iters)  # a bad iters is reported as --iters
    if iters_n is not None and iters_n - warmup == steps:
        return
    index = 1 if name == "cosine_decay" else 2
    after = f"iters - warmup = {iters_n - warmup:g}" if iters_n is not None else "iters - warmup"
    t.note(f"lr_schedule.arguments[{index}]", f"({steps:g} steps) cannot be kept: lorakit decays over the "
                                              f"steps after warmup ({after}) and reaches the end value on the last")


def _data(t: _Translation) -> None:
    """mask_prompt, the *_feature field names, hf_dataset."""
    if "mask_prompt" in t.src:
        t.set("train_on", "completions" if t.src["mask_prompt"] else "all")
    elif "train_on" not in t.src:
        t.filled.append("mask_prompt false (train_on all)")
        t.set("train_on", "all")
    renames = []
    for key, field in _FEATURES.items():
        value = t.src.get(key)
        if value in (None, field):
            continue
        renames.append(f"{field}={value}")
        if t.command != "prepare":
            t.note(key, f"({_show(value)}) is not read by `lorakit {t.command}`, whose data is prepared: "
                        f"`lorakit prepare RAW --config FILE` renames it (--field-map {field}={value})")
    if renames:
        t.set("field_map", renames)
    if t.src.get("hf_dataset"):
        t.problem("hf_dataset", "names a Hugging Face dataset: lorakit trains on local JSONL; save the dataset "
                                "as JSONL, run `lorakit prepare` on it and pass --data DIR")


def _resume(t: _Translation) -> None:
    """resume_adapter_file: mlx-lm loads those weights and starts a new run; lorakit continues a checkpoint."""
    path = t.src.get("resume_adapter_file")
    if not path:
        return
    ckpt = Path(str(path)).expanduser().parent
    if (ckpt / "checksums.json").is_file() and (ckpt / "trainer_state.json").is_file():
        t.set("resume_from", str(ckpt))
        t.note("resume_adapter_file", f"is a lorakit checkpoint's adapter: lorakit continues {ckpt} exactly "
                                      "(optimizer, schedule, data position too), where mlx-lm loads only weights")
        return
    t.problem("resume_adapter_file", f"({_show(path)}): lorakit cannot start a run from adapter weights alone; "
                                     "continue a lorakit run with --resume or resume_from: CHECKPOINT_DIR, or "
                                     "remove the key")


def _reporting(t: _Translation) -> None:
    """report_to, wandb, project_name, clear_cache_threshold, config."""
    for key in ("report_to", "wandb"):
        if t.src.get(key):
            t.note(key, f"({_show(t.src[key])}): lorakit reports to no service; the metrics are in "
                        "ADAPTER_PATH/metrics.jsonl and loss.svg")
    if t.src.get("project_name"):
        t.note("project_name", "names a wandb/swanlab project; lorakit reports to no service: ignored")
    if t.src.get("clear_cache_threshold"):
        t.note("clear_cache_threshold", "is not needed: lorakit does not clear MLX's cache between steps "
                                        "(--max-memory bounds memory)")
    if t.src.get("config"):
        t.note("config", "is ignored: a config file does not name another")


def _defaults(t: _Translation) -> None:
    """What the file leaves out takes mlx_lm.lora's defaults (one note lists them)."""
    for key, value in _DEFAULTS.items():
        if key in t.src or key in t.out or (key == "iters" and "epochs" in t.src):
            continue
        t.set(key, value)
        t.filled.append(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}")
    if t.filled:
        t.notes.append("mlx-lm config: what it leaves out takes mlx-lm's defaults, as mlx_lm.lora would: "
                       + ", ".join(t.filled))
