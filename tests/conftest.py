"""Shared fixtures: a tiny byte-level BPE tokenizer with a ChatML chat template and a tiny random Llama,
both built here (no downloads), plus helpers to write data and run training in-process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from pathlib import Path

# The suite checks CPU numerics (CI's machine has no GPU): its tolerances, dtype defaults and in-process Accelerators
# are the CPU's. On a machine with a GPU the suite still runs on the CPU, and test_cuda.py runs `tuneforge`
# processes on the GPU with the variable as it was. Set before torch first asks CUDA what it has.
# pytest-xdist's workers inherit the emptied variable, so the value found first travels in a variable of its own.
_FOUND = os.environ.setdefault("TUNEFORGE_SUITE_CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
GPU_VISIBLE = None if _FOUND == "unset" else _FOUND
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Who are you? I am a helpful assistant made by a small team.",
    "Tell me about the weather today. It is sunny and warm.", "What is two plus two? Two plus two is four.",
    "Translate hello into French. Bonjour.", "Write a short poem about the sea. Waves roll in and out again.",
    "system user assistant tool observation function call", "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOP",
]


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", bos_token="<|im_start|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_llama(folder: Path, vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def test_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tuneforge-cache")


@pytest.fixture(autouse=True)
def isolated_cache(test_cache, monkeypatch):
    """Tests cache tokenised data in a folder of their own, never in the user's ~/.cache/tuneforge."""
    monkeypatch.setenv("TUNEFORGE_CACHE", str(test_cache))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(folder)
    build_llama(folder, len(tokenizer))
    return str(folder)


# The bundled SmolLM2 converts to a safetensors folder in the cache `make demo` uses too: once per machine, rather
# than once per test session (half a minute). Tests that load it by its alias set TUNEFORGE_CACHE to this.
SHARED_CACHE = str(Path.home() / ".cache" / "tuneforge")


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The folder of the bundled SmolLM2-135M-Instruct, converted in SHARED_CACHE."""
    from tuneforge.models.load import resolve_model_path

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNEFORGE_CACHE", SHARED_CACHE)
        return resolve_model_path("smollm2-135m-instruct")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def alpaca_rows(n: int = 24) -> list[dict]:
    """Variable-length instruction data with a learnable pattern."""
    rows = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        rows.append({"instruction": f"What is {a} plus {b}?" + " Please answer." * (i % 4),
                     "input": "", "output": f"{a} plus {b} is {a + b}." + " Sure." * (i % 3)})
    return rows


@pytest.fixture
def alpaca_file(tmp_path) -> str:
    return str(write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows()))


def train_config(model: str, data: str, out: Path, **overrides) -> dict:
    values = dict(model_name_or_path=model, dataset=data, template="chatml", output_dir=str(out), stage="sft",
                  do_train=True, finetuning_type="lora", cutoff_len=64, per_device_train_batch_size=4,
                  learning_rate=1e-3, max_steps=8, logging_steps=1, save_steps=1000, seed=1, report_to="none")
    values.update(overrides)
    return values


def run_training(values: dict):
    from tuneforge.config import build_config, validate
    from tuneforge.train import run_stage

    cfg = build_config(values, source="test")
    validate(cfg, "train")
    return run_stage(cfg)


def train_here(args: list[str]) -> subprocess.CompletedProcess:
    """`tuneforge train ARGS` in this process, through the command line's own parsing and error handling, its
    output captured: a one-process run (the reference for sharded runs, a config that must run) without the five
    seconds a new interpreter spends importing torch, transformers and PEFT."""
    from tuneforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", *args])
    return subprocess.CompletedProcess(["train", *args], code, out.getvalue(), err.getvalue())


# Numeric comparisons in this suite must hold on every CPU our machines and users have (Intel AMX, AMD AVX512-BF16,
# plain AVX2) and for any thread count: float32 sums come out in a different order there. Each tolerance says why
# it is the size it is; `make test-numerics` (one thread; ATen, oneDNN and MKL capped at avx2) shows other
# kernels' numerics here.

# trainer_log.jsonl rounds losses to 4 decimals, so two equal losses a float-noise apart can land on neighbouring
# roundings, 1e-4 apart; 1.5e-4 allows that and nothing more.
LOGGED_LOSS = 1.5e-4


def relative_update_gap(start: dict, a: dict, b: dict) -> float:
    """|update_a - update_b| / |update_a| over all tensors: how far two runs' weight changes differ, as a share of
    how far the weights moved. Adam divides by sqrt(v), so a weight whose gradient is ~0 can move by a rate-sized
    step on float32 noise alone: runs compare as a whole update, not weight by weight."""
    gap = sum(((a[k] - b[k]).double() ** 2).sum() for k in a) ** 0.5
    moved = sum(((a[k] - start[k]).double() ** 2).sum() for k in a) ** 0.5
    return (gap / moved).item()


# Sharded and unsharded runs of one global batch (tests/test_fsdp.py, test_deepspeed.py): reductions sum in
# another order than one process does, measured 5e-6 to 8e-6 of a full fine-tuning update and 5e-7 of LoRA's B
# matrices; 2e-3 is the accumulation test's rule. Rows going to the wrong process, or a loss normalised per process
# or per micro-batch instead of over the step, move the update by percents.
SHARDED_GAP = 2e-3


def check_same_lora_run(base: str, sharded: Path, one: Path) -> None:
    """Two LoRA runs with evaluation, one sharded across processes and one in one process, trained and evaluated
    alike; the sharded run's adapter loads in plain PEFT."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = (load_file(run / "adapter_model.safetensors") for run in (sharded, one))
    lora_b = {k: v for k, v in b.items() if "lora_B" in k}  # lora_A does not move from its random start by much
    assert relative_update_gap({k: 0 * v for k, v in lora_b.items()}, {k: a[k] for k in lora_b}, lora_b) < SHARDED_GAP
    sharded_eval, one_eval = (json.loads((run / "eval_results.json").read_text()) for run in (sharded, one))
    # measured equal to all 16 digits; counting the second process's padding batch measured 4e-6 off (this barely
    # trained model gives every row a per-token loss near log(vocab)), so 1e-6
    assert sharded_eval["eval_loss"] == pytest.approx(one_eval["eval_loss"], rel=1e-6)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(sharded)))  # as a user does for added tokens
    PeftModel.from_pretrained(model, sharded)


def gate_problems(tmp_path: Path, **keys) -> str:
    """The config gate's refusal of a minimal training config with `keys` added."""
    from tuneforge.config import ConfigError, build_config, validate

    values = {"model_name_or_path": "m", "dataset": "d", "output_dir": str(tmp_path / "o"), "do_train": True, **keys}
    with pytest.raises(ConfigError) as err:
        validate(build_config(values, source="x.yaml"))
    return str(err.value)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line.strip()]


def learned_spans(row: dict) -> list[list[int]]:
    """The runs of trained tokens (label == input id; every other label is -100) in an encoded row."""
    spans, current = [], []
    for token, label in zip(row["input_ids"], row["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])
