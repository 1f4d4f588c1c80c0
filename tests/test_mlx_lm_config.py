"""mlx-lm's own LoRA YAML read by `lorakit train --config` as mlx_lm.lora reads it (lorakit/mlx_lm_config.py):
every key mapped to the lorakit setting with the same meaning, noted (one line, naming it) when lorakit does
it differently, or refused with exit 2 naming it when following it would train something else."""

import json

import pytest
from typer.testing import CliRunner

from lorakit.cli.app import app
from lorakit.errors import UserError
from lorakit.settings import load_settings

# mlx-lm's examples/lora_config.yaml as published (github.com/ml-explore/mlx-lm, mlx_lm/examples/; MIT License,
# Copyright © 2023-2024 Apple Inc.; the file has no header of its own), verbatim.
EXAMPLE = """\
# The path to the local model directory or Hugging Face repo.
model: "mlx_model"

# Whether or not to train (boolean)
train: true

# The fine-tuning method: "lora", "dora", or "full".
fine_tune_type: lora

# The training-mode: "normal", or "dpo"
training_mode: normal 

# The Optimizer with its possible inputs
optimizer: adamw
# optimizer_config:
#   adamw:
#     betas: [0.9, 0.98]
#     eps: 1e-6
#     weight_decay: 0.05
#     bias_correction: true

# Directory with {train, valid, test}.jsonl files
data: "/path/to/training/data"

# The PRNG seed
seed: 0

# Number of layers to fine-tune
num_layers: 16

# Minibatch size.
batch_size: 4

# Iterations to train for.
iters: 1000

# Number of validation batches, -1 uses the entire validation set.
val_batches: 25

# Adam learning rate.
learning_rate: 1e-5

# Number of training steps between loss reporting.
steps_per_report: 10

# Number of training steps between validations.
steps_per_eval: 200

# Load path to resume training with the given adapter weights.
resume_adapter_file: null

# Save/load path for the trained adapter weights.
adapter_path: "adapters"

# Save the model every N iterations.
save_every: 100

# Evaluate on the test set after training
test: false

# Number of test set batches, -1 uses the entire test set.
test_batches: 100

# Maximum sequence length.
max_seq_length: 2048

# Use gradient checkpointing to reduce memory use.
grad_checkpoint: false

# LoRA parameters can only be specified in a config file
lora_parameters:
  # The layer keys to apply LoRA to.
  # These will be applied for the last lora_layers
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.0

# Schedule can only be specified in a config file, uncomment to use.
#lr_schedule:
#  name: cosine_decay
#  warmup: 100 # 0 for no warmup
#  warmup_init: 1e-7 # 0 if not specified
#  arguments: [1e-5, 1000, 1e-7] # passed to scheduler

#hf_dataset:
#  name: "billsum"
#  train_split: "train[:1000]"
#  valid_split: "train[-100:]"
#  prompt_feature: "text"
#  completion_feature: "summary"
# For ORPO training
#  prompt_feature: "prompt"
#  system_feature: "system"
#  chosen_feature: "chosen"
#  rejected_feature: "rejected"
#  preference_score_feature: "preference_score"
"""


def uncommented(text: str, *blocks: str) -> str:
    """The example with its commented-out blocks (`optimizer_config`, `lr_schedule`) switched on."""
    lines, prefix = [], None
    for line in text.splitlines():
        for lead in ("# ", "#"):
            if any(line.startswith(lead + block + ":") for block in blocks):
                prefix = lead
        if prefix and line.startswith(prefix):
            line = line[len(prefix):]
        elif not line.startswith("#"):
            prefix = None
        lines.append(line)
    return "\n".join(lines) + "\n"


def write(tmp_path, text, name="lora_config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def notes_about(notes):
    return [n.split("'")[1] for n in notes if n.startswith("mlx-lm key '")]


def test_the_example_loads_with_its_values(tmp_path):
    settings, notes = load_settings("train", {}, write(tmp_path, EXAMPLE))
    assert (settings.model, str(settings.data), str(settings.adapter_path)) == (
        "mlx_model", "/path/to/training/data", "adapters")
    assert (settings.fine_tune_type, settings.optimizer, settings.seed, settings.num_layers) == (
        "lora", "adamw", 0, 16)
    assert (settings.batch_size, settings.iters, settings.val_batches, settings.learning_rate) == (4, 1000, 25, 1e-5)
    assert (settings.steps_per_report, settings.steps_per_eval, settings.save_every) == (10, 200, 100)
    assert (settings.max_seq_length, settings.grad_checkpoint, settings.resume_from) == (2048, False, None)
    assert (settings.lora_rank, settings.lora_alpha, settings.lora_dropout) == (8, 160.0, 0.0)  # scale 20
    assert settings.target_modules == ["self_attn.q_proj", "self_attn.v_proj"]
    assert settings.train_on == "all"  # mask_prompt left out: mlx-lm trains on every token
    assert settings.weight_decay == 0.01  # mlx's AdamW default
    assert notes_about(notes) == ["test_batches"]
    assert notes[-1].startswith("mlx-lm config: what it leaves out takes mlx-lm's defaults")
    assert "weight_decay 0.01" in notes[-1] and "mask_prompt false" in notes[-1]


def test_the_example_with_its_optimizer_and_schedule_blocks(tmp_path):
    text = uncommented(EXAMPLE, "optimizer_config", "lr_schedule")
    assert "\noptimizer_config:\n  adamw:\n    betas: [0.9, 0.98]\n" in text and "\nlr_schedule:\n  name:" in text
    settings, notes = load_settings("train", {}, write(tmp_path, text))
    assert settings.weight_decay == 0.05
    assert (settings.lr_schedule, settings.learning_rate, settings.warmup) == ("cosine", 1e-5, 100)
    assert settings.min_lr_ratio == pytest.approx(0.01)  # the schedule's end value, 1e-7 of 1e-5
    assert notes_about(notes) == ["test_batches", "optimizer_config.adamw.betas", "optimizer_config.adamw.eps",
                                  "optimizer_config.adamw.bias_correction", "lr_schedule.arguments[1]",
                                  "lr_schedule.warmup_init"]
    text = "\n".join(notes)
    assert "lorakit's AdamW keeps betas [0.9, 0.999]" in text and "keeps eps 1e-08" in text
    assert "(1000 steps)" in text and "iters - warmup = 900" in text and "warmup_init' (1e-7)" in text


def test_a_schedule_that_fits_the_run_is_kept_without_a_note(tmp_path):
    text = ("train: true\nmodel: m\ndata: d\niters: 300\nlr_schedule:\n  name: linear_schedule\n  warmup: 20\n"
            "  arguments: [2e-4, 2e-5, 280]\n")
    settings, notes = load_settings("train", {}, write(tmp_path, text))
    assert (settings.lr_schedule, settings.learning_rate, settings.warmup) == ("linear", 2e-4, 20)
    assert settings.min_lr_ratio == pytest.approx(0.1)
    assert notes_about(notes) == []


def test_every_key_mlx_lm_reads_is_handled():
    """Each of mlx_lm.lora's CONFIG_DEFAULTS keys and flags (the installed mlx-lm's) is one it accepts."""
    lora = pytest.importorskip("mlx_lm.lora")
    from lorakit.mlx_lm_config import _CONSUMED
    from lorakit.settings import TrainSettings

    keys = set(lora.CONFIG_DEFAULTS) | {a.dest for a in lora.build_parser()._actions if a.dest != "help"}
    assert keys - _CONSUMED - set(TrainSettings.model_fields) == set()


def test_mlx_lm_defaults_load_as_they_are(tmp_path):
    lora = pytest.importorskip("mlx_lm.lora")
    settings, notes = load_settings("train", {}, write(tmp_path, json.dumps(lora.CONFIG_DEFAULTS)))
    assert (settings.iters, settings.learning_rate, settings.num_layers, settings.optimizer) == (1000, 1e-5, 16, "adam")
    assert (settings.lora_alpha, settings.train_on, settings.weight_decay) == (160.0, "all", 0.0)
    assert notes_about(notes) == ["train", "test_batches"]  # its train: false (lorakit train trains anyway)


def test_what_a_short_mlx_lm_file_leaves_out_takes_mlx_lm_defaults(tmp_path):
    path = write(tmp_path, "model: m\ndata: d\nlora_parameters: {rank: 16}\n")
    settings, notes = load_settings("train", {"learning_rate": 3e-4}, path)
    assert (settings.iters, settings.num_layers, settings.steps_per_eval) == (1000, 16, 200)
    assert (settings.lora_rank, settings.lora_alpha, settings.learning_rate) == (16, 320.0, 3e-4)  # flag wins
    assert notes == [("mlx-lm config: what it leaves out takes mlx-lm's defaults, as mlx_lm.lora would: "
                      "lora_parameters.scale 20.0, lora_parameters.dropout 0.0, optimizer adam, "
                      "mask_prompt false (train_on all), iters 1000, learning_rate 1e-05, num_layers 16, "
                      "steps_per_eval 200")]


def test_other_mlx_lm_keys_map_or_note(tmp_path):
    text = """
model: m
data: d
lora_layers: 4
mask_prompt: true
fine_tune_type: full
optimizer: SGD
optimizer_config: {sgd: {weight_decay: 0.1, momentum: 0.9}, adamw: {weight_decay: 0.2}}
report_to: wandb
project_name: p
clear_cache_threshold: 1000000
test: true
prompt_feature: question
completion_feature: completion
group_size: 4
"""
    settings, notes = load_settings("train", {}, write(tmp_path, text))
    assert (settings.num_layers, settings.train_on, settings.optimizer, settings.weight_decay) == (
        4, "completions", "sgd", 0.1)
    assert notes_about(notes) == ["test", "group_size", "fine_tune_type", "optimizer_config.adamw",
                                  "optimizer_config.sgd.momentum", "prompt_feature", "report_to", "project_name",
                                  "clear_cache_threshold"]
    assert "--field-map prompt=question" in "\n".join(notes)
    prepare, prepare_notes = load_settings("prepare", {"inputs": ["raw.jsonl"], "out": "o"},
                                           write(tmp_path, text))
    assert prepare.field_map == ["prompt=question"] and prepare_notes == []


def test_adafactor_says_how_it_differs(tmp_path):
    _, notes = load_settings("train", {}, write(tmp_path, "model: m\ndata: d\ntrain: true\noptimizer: adafactor\n"))
    assert [n for n in notes if "relative_step" in n and "scale_parameter" not in n]
    assert notes_about(notes) == ["optimizer", "optimizer"]


def test_keys_mlx_lm_itself_ignores_are_noted(tmp_path):
    text = ("model: m\ndata: d\ntrain: true\nlora_parameters: {rank: 4, scale: 2.0, alpha: 16, bias: none}\n"
            "lr_schedule: {name: cosine_decay, arguments: [1e-4, 1000], warmup: 0, cycle: 2}\n")
    settings, notes = load_settings("train", {}, write(tmp_path, text))
    assert (settings.lora_alpha, settings.min_lr_ratio, settings.learning_rate) == (8.0, 0.0, 1e-4)
    assert notes_about(notes) == ["lora_parameters.alpha", "lora_parameters.bias", "lr_schedule.cycle"]


def test_a_lorakit_checkpoint_resumes(tmp_path):
    ckpt = tmp_path / "adapters" / "checkpoints" / "step-000010"
    ckpt.mkdir(parents=True)
    for name in ("checksums.json", "trainer_state.json", "adapters.safetensors"):
        (ckpt / name).write_text("{}")
    text = f"model: m\ndata: d\ntrain: true\nresume_adapter_file: {ckpt / 'adapters.safetensors'}\n"
    settings, notes = load_settings("train", {}, write(tmp_path, text))
    assert settings.resume_from == ckpt and "resume_adapter_file" in notes_about(notes)


def test_what_lorakit_cannot_do_is_refused_together_naming_each_key(tmp_path):
    text = """
model: m
data: d
train: true
training_mode: dpo
hf_dataset: {path: billsum}
optimizer: adam
optimizer_config: {adam: {weight_decay: 0.1}}
lr_schedule: {name: exponential_decay, arguments: [1e-4, 0.99]}
resume_adapter_file: elsewhere/adapters.safetensors
lora_parameters: {rank: 8, alpha: 16}
"""
    with pytest.raises(UserError) as e:
        load_settings("train", {}, write(tmp_path, text))
    message = str(e.value)
    for key in ("training_mode", "hf_dataset", "optimizer_config.adam.weight_decay", "lr_schedule.name",
                "resume_adapter_file", "lora_parameters.alpha"):
        assert f"mlx-lm key '{key}'" in message
    assert e.value.exit_code == 2 and "is \"dpo\"" in message and len(message.splitlines()) == 7
    with pytest.raises(UserError, match="mlx-lm key 'optimizer' is \"muon\""):
        load_settings("train", {}, write(tmp_path, "model: m\ndata: d\ntrain: true\noptimizer: muon\n"))
    with pytest.raises(UserError, match=r"lr_schedule.arguments' must be \[init, decay_steps, end\]"):
        load_settings("train", {}, write(tmp_path, "train: true\nlr_schedule: {name: cosine_decay, arguments: [1]}\n"))


def test_unknown_keys_are_still_errors_in_an_mlx_lm_file(tmp_path):
    with pytest.raises(UserError, match="unknown key 'itres'; did you mean 'iters'"):
        load_settings("train", {}, write(tmp_path, "model: m\ndata: d\ntrain: true\nitres: 5\n"))


def test_train_flag_and_train_section_are_told_apart(tmp_path):
    path = write(tmp_path, "model: m\ndata: d\ntrain: {lora_rank: 4}\n")
    settings, notes = load_settings("train", {}, path)
    assert settings.lora_rank == 4 and notes == [] and settings.iters is None  # lorakit's own file: no mlx-lm defaults
    settings, notes = load_settings("eval", {}, write(tmp_path, EXAMPLE))
    assert (settings.model, settings.batch_size, settings.train_on, notes) == ("mlx_model", 4, "all", [])
    _, notes = load_settings("train", {}, write(tmp_path, "model: m\ndata: d\ntrain: false\n"))
    assert notes_about(notes) == ["train"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": ["Yes.", "No.", "Maybe later."][i % 3]}]} for i in range(8)]
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    return path


def test_lorakit_train_runs_the_example(tiny_model, data, tmp_path, monkeypatch):
    """`lorakit train --config lora_config.yaml` with the example as published; the tiny model has 2 blocks, so
    its num_layers 16 is refused, as mlx_lm.lora refuses it, until a flag overrides it."""
    monkeypatch.chdir(tmp_path)
    config = write(tmp_path, uncommented(EXAMPLE, "optimizer_config", "lr_schedule"))
    args = ["train", "--config", str(config), "--model", str(tiny_model), "--data", str(data), "--iters", "1"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--num-layers 16" in refused.stderr
    result = CliRunner().invoke(app, args + ["--num-layers", "-1", "--json"])
    assert result.exit_code == 0, result.stderr
    assert "optimizer_config.adamw.betas" in result.stderr and "test_batches" in result.stderr
    saved = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert saved["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert saved["lora_parameters"]["scale"] == 20.0 and saved["lora_parameters"]["rank"] == 8
    s = saved["lorakit"]["settings"]
    assert (s["optimizer"], s["weight_decay"], s["lr_schedule"], s["train_on"], s["iters"]) == (
        "adamw", 0.05, "cosine", "all", 1)


def test_lora_layers_that_is_not_a_number_is_named(tmp_path):
    with pytest.raises(UserError, match="mlx-lm key 'lora_layers' must be a whole number of blocks"):
        load_settings("train", {}, write(tmp_path, "model: m\ndata: d\nlora_layers: all\n"))
