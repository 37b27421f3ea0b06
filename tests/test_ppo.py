"""Stage ppo: its formulas against hand-computed values, and on the tiny random model a toy reward that rises, a LoRA
reward model that adds no second model, exact resume, and its config rules."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import read_log, run_training, train_config, write_jsonl
from tuneforge.config import ConfigError, build_config, validate
from tuneforge.train.losses import (adaptive_kl_coef, clipped_policy_loss, clipped_value_loss, generalised_advantages,
                                    kl_penalised_rewards, masked_whiten)

TOPICS = ["the sea", "a fox", "the weather", "two plus two", "French", "a poem", "the dog", "tools"]


def test_gae_matches_hand_computed_values():
    # one completion of 3 tokens and one of 2 (padded), gamma 1, lambda 0.95 (TRL's defaults)
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = generalised_advantages(rewards, values, mask, 1.0, 0.95)
    # row 0: delta_2 = 1 - 0.1 = 0.9; delta_1 = 0.1 - 0.2 = -0.1, A_1 = -0.1 + 0.95 x 0.9 = 0.755;
    # delta_0 = 0.2 - 0.5 = -0.3, A_0 = -0.3 + 0.95 x 0.755 = 0.41725.
    # row 1: the padded position counts as 0: delta_1 = -1 - 0.4 = -1.4; delta_0 = 0.5 + 0.4 - 0.3 = 0.6,
    # A_0 = 0.6 + 0.95 x -1.4 = -0.73
    expected = torch.tensor([[0.41725, 0.755, 0.9], [-0.73, -1.4, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)  # float32 rounding of a few additions
    assert torch.allclose(returns, expected + values * mask, atol=1e-6)


def test_kl_controller_and_penalised_rewards_match_hand_computed_values():
    # KL 9 against target 6: error 9/6 - 1 = 0.5, clipped to 0.2; 0.2 x (1 + 0.2 x 256 / 10000) = 0.201024
    assert adaptive_kl_coef(0.2, 9.0, 6.0, 256) == pytest.approx(0.201024, abs=1e-12)
    # KL 3 against 6: error -0.5 -> -0.2: 0.2 x (1 - 0.2 x 1000 / 10000) = 0.196
    assert adaptive_kl_coef(0.2, 3.0, 6.0, 1000) == pytest.approx(0.196, abs=1e-12)
    # KL 5.4: error -0.1, within the clip: 0.2 x (1 - 0.1 x 100 / 10000) = 0.1998
    assert adaptive_kl_coef(0.2, 5.4, 6.0, 100) == pytest.approx(0.1998, abs=1e-12)
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.5, -3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, 0.1)
    # kl = logp - ref: [0.5, -1, 0], [-0.5, 2, (pad) 0]; reward = -0.1 kl, + score at each row's last token
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [-0.5, 2.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [0.05, -1.2, 0.0]]), atol=1e-7)


def test_clipped_losses_and_whitening_match_a_hand_example():
    # ratios e^0.5 = 1.6487 (clipped to 1.2) and e^-0.5 = 0.6065 (clipped to 0.8)
    logps, old = torch.tensor([[0.0, -1.0]]), torch.tensor([[-0.5, -0.5]])
    loss, clipped = clipped_policy_loss(logps, old, torch.tensor([[1.0, 1.0]]), 0.2)
    # A = 1: -min(1.6487, 1.2) = -1.2 (clip active); -min(0.6065, 0.8) = -0.6065 (not)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.60653066]]), atol=1e-6)
    assert clipped.tolist() == [[True, False]]
    values, old_values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, -0.5]]), torch.tensor([[0.0, 1.0]])
    loss, clipped = clipped_value_loss(values, old_values, returns, 0.2)
    # token 0: v 1 clipped to 0.7: 0.5 x max(1, 0.49) = 0.5; token 1: v 0 clipped to -0.3: 0.5 x max(1, 1.69) = 0.845
    assert torch.allclose(loss, torch.tensor([[0.5, 0.845]]), atol=1e-6)
    assert clipped.tolist() == [[False, True]]
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, unbiased variance 1 over the three unmasked entries
    assert torch.allclose(masked_whiten(x, mask)[:, :3], torch.tensor([[-1.0, 0.0, 1.0]]), atol=1e-6)
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False)[:, :3], torch.tensor([[1.0, 2.0, 3.0]]), atol=1e-6)


# ---- on the tiny model ----

class _Scores(BaseHTTPRequestHandler):
    """The toy reward model behind reward_model_type api: how many letters `e` each completion holds."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert len(body["messages"]) == len(body["completions"]) == len(body["prompts"])
        scores = [float(c.count("e")) for c in body["completions"]]
        reply = json.dumps({"scores": scores}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def score_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scores)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/score"
    server.shutdown()
    server.server_close()


def _prompts(tmp_path: Path) -> str:
    return str(write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": f"Tell me about {t}."} for t in TOPICS]))


def _reward_adapter(model: str, folder: Path) -> str:
    """What a LoRA `stage: rm` run leaves in its output_dir, here or in LLaMA-Factory: an adapter and
    value_head.safetensors with TRL's names (random here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(model)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(folder)
    save_file({"v_head.summary.weight": torch.randn(1, base.config.hidden_size) * 0.1,
               "v_head.summary.bias": torch.zeros(1)},
              str(folder / "value_head.safetensors"))
    return str(folder)


def _ppo(model, data, reward_model, out, **overrides):
    values = dict(stage="ppo", reward_model=reward_model, finetuning_type="lora", lora_rank=8,
                  per_device_train_batch_size=4, max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=0,
                  learning_rate=3e-3, ppo_epochs=2, save_steps=1000)
    values.update(overrides)
    return train_config(model, data, out, **values)


def test_a_toy_reward_from_an_http_endpoint_rises(tiny_model, tmp_path, score_server):
    out = tmp_path / "out"
    results = run_training(_ppo(tiny_model, _prompts(tmp_path), score_server, out, reward_model_type="api",
                                finetuning_type="full", per_device_train_batch_size=8, learning_rate=5e-3,
                                lr_scheduler_type="constant", max_steps=80, ppo_epochs=4,
                                eval_dataset=_prompts(tmp_path), do_eval=True))
    log = read_log(out)
    rewards = [r["reward"] for r in log[::4]]  # one rollout every ppo_epochs steps
    # a random model writes about one `e` in 12 tokens; the policy learns to write more. Sampling makes single
    # rollouts noisy, so compare means of four with a wide margin. Measured with seeds 1 and 42, fused and unfused
    # AdamW, default and avx2 kernels, 1 or 2 threads: 0.59-0.81 -> 2.94-3.56. At learning rate 1e-2 the run was
    # chaotic: rounding alone (fused AdamW) turned 0.75 -> 4.1 into 0.75 -> 2.2 after the 9th rollout
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 1.5, rewards
    assert {"eval_reward", "eval_before_reward"} <= set(results)
    for key in ("kl", "kl_coef", "entropy", "policy_loss", "value_loss", "clip_fraction", "approx_kl",
                "response_length", "generation_tokens_per_second", "generation_time_share"):
        assert key in log[-1], key


class _ScoresThenSigterm(_Scores):
    """The toy scores; the first request also sends this process SIGTERM, as a cluster would during a rollout."""
    sent = False

    def do_POST(self):
        if not _ScoresThenSigterm.sent:
            _ScoresThenSigterm.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        super().do_POST()


def test_sigterm_inside_a_rollout_saves_where_the_run_can_resume(tiny_model, tmp_path):
    """ppo resumes only between rollouts (its buffer of completions is not checkpointed): a stop signal during the
    first rollout trains on through its 4 updates, saves there, and the re-run resumes. Before, it saved
    checkpoint-1, which the re-run refused as taken inside a rollout buffer."""
    from tuneforge.train.faults import Preempted

    server = ThreadingHTTPServer(("127.0.0.1", 0), _ScoresThenSigterm)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        values = _ppo(tiny_model, _prompts(tmp_path), f"http://127.0.0.1:{server.server_address[1]}/score",
                      tmp_path / "out", reward_model_type="api", max_steps=8, ppo_epochs=4, save_steps=4)
        with pytest.raises(Preempted, match="stopped by SIGTERM after step 4"):
            run_training(values)
        assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == ["checkpoint-4"]
        run_training(values)  # resumes
    finally:
        server.shutdown()
        server.server_close()
    assert [r["current_steps"] for r in read_log(tmp_path / "out")] == list(range(1, 9))


def test_the_first_update_of_a_rollout_sees_the_policy_that_sampled_it(tiny_model, tmp_path):
    """The rollout's log-probabilities are taken with dropout off, so training runs with dropout off too (TRL's
    default): else the first update of an unchanged policy would see a ratio other than 1. Measured with
    lora_dropout 0.3 on a continued adapter before: approx_kl 0.012 and a clip fraction of 0.19."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.3, init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), lora).save_pretrained(tmp_path / "sft")
    out = tmp_path / "out"
    run_training(_ppo(tiny_model, _prompts(tmp_path), _reward_adapter(tiny_model, tmp_path / "rm"), out,
                      max_steps=1, ppo_epochs=1, learning_rate=1e-9, lora_dropout=0.3,
                      adapter_name_or_path=str(tmp_path / "sft")))
    first = read_log(out)[0]
    assert first["approx_kl"] == 0 and first["clip_fraction"] == 0, first


def test_an_unreachable_scoring_server_is_one_clear_error():
    from tuneforge.models.load import ModelError
    from tuneforge.train.ppo import ApiReward

    class Tokenizer:
        def decode(self, ids):
            return "text"

    with pytest.raises(ModelError, match=r"reward_model http://127.0.0.1:9/score: no scores .*\{\"scores\""):
        ApiReward("http://127.0.0.1:9/score", Tokenizer())(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2),
                                                          ["p"], ["c"])


def test_lora_reward_model_adds_no_second_model(tiny_model, tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.train.ppo import setup

    cfg = build_config(_ppo(tiny_model, _prompts(tmp_path), _reward_adapter(tiny_model, tmp_path / "rm"),
                            tmp_path / "out"), source="test")
    validate(cfg, "train")
    module, reference, reward = setup(cfg, Accelerator(cpu=True), AutoTokenizer.from_pretrained(tiny_model))
    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    held = {id(p): p.numel() for part in (module, reward.head) for p in part.parameters()}
    adapters = sum(p.numel() for name, p in module.model.named_parameters() if "lora_" in name)
    heads = sum(p.numel() for p in module.value_head.parameters()) + sum(p.numel() for p in reward.head.parameters())
    assert reference is None  # the reference is the base with the adapters off
    assert sum(held.values()) == base + adapters + heads  # one base model: the policy's, with two adapters on it
    assert set(module.model.peft_config) == {"default", "reward"}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and not any(".reward." in n for n in trainable)


def test_full_ppo_with_a_separate_reward_model(tiny_model, tmp_path):
    """finetuning_type full: the reference is a frozen copy and reward_model_type full loads the reward model (here
    the rm adapter on its base) as a model of its own; the value head is saved beside the model."""
    out = tmp_path / "out"
    run_training(_ppo(tiny_model, _prompts(tmp_path), _reward_adapter(tiny_model, tmp_path / "rm"), out,
                      finetuning_type="full", reward_model_type="full", max_steps=2, ppo_epochs=1))
    assert (out / "model.safetensors").is_file() and (out / "ppo_value_head.safetensors").is_file()
    assert [r["current_steps"] for r in read_log(out)] == [1, 2] and read_log(out)[-1]["kl"] != 0


def test_quantised_separate_reward_model(tiny_model, tmp_path):
    """reward_model_quantization_bit: the reward_model_type full model is loaded 4-bit (LLaMA-Factory's key) and
    scores the rollouts; with the lora type there is no separate model to quantise, which is refused."""
    import bitsandbytes as bnb
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from tuneforge.train.ppo import setup

    values = _ppo(tiny_model, _prompts(tmp_path), _reward_adapter(tiny_model, tmp_path / "rm"), tmp_path / "out",
                  finetuning_type="full", reward_model_type="full", reward_model_quantization_bit=4)
    cfg = build_config(values, source="test")
    validate(cfg, "train")
    _, _, reward = setup(cfg, Accelerator(cpu=True), AutoTokenizer.from_pretrained(tiny_model))
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in reward.module.modules()) == 4 * 7
    run_training(dict(values, max_steps=1, ppo_epochs=1))
    assert read_log(tmp_path / "out")[-1]["current_steps"] == 1
    with pytest.raises(ConfigError, match="quantises a reward_model_type full model; the lora reward adapter sits on"):
        validate(build_config(dict(values, finetuning_type="lora", reward_model_type="lora")))


def test_rollout_log_probs_are_the_policys_in_training_precision(tiny_model, tmp_path):
    """With bf16 autocast, the rollout's old log-probs and values must come from the same computation as training's
    forward: then the first update of a rollout starts at probability ratio 1 and value change 0."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from tuneforge.train.grpo import encode_prompts
    from tuneforge.train.ppo import PPOSteps, policy_forward, setup

    cfg = build_config(_ppo(tiny_model, _prompts(tmp_path), _reward_adapter(tiny_model, tmp_path / "rm"),
                            tmp_path / "out", bf16=True), source="test")
    accelerator, tokenizer = Accelerator(cpu=True), AutoTokenizer.from_pretrained(tiny_model)
    module, reference, reward = setup(cfg, accelerator, tokenizer)
    prompts, _ = encode_prompts(cfg, tokenizer)
    source = PPOSteps(cfg, module, reference, reward, tokenizer, prompts, accelerator)
    buffer = source.rollout(prompts[:4])
    with source.precision.autocast(module.model), torch.no_grad():
        logps, _, values = policy_forward(module.model, module.split, module.value_head, buffer["input_ids"],
                                          buffer["attention_mask"], buffer["completion_mask"].shape[1])
    mask = buffer["completion_mask"].bool()
    # the same bf16 operations on the same rows give the same numbers; computed in float32 instead (a rollout outside
    # autocast), they differ by bf16's rounding (measured: 2e-3)
    assert (logps - buffer["old_logps"])[mask].abs().max() < 1e-5
    assert (values - buffer["old_values"])[mask].abs().max() < 1e-5


def test_resume_mid_run_gives_the_same_weights(tiny_model, tmp_path):
    """A checkpoint taken between rollouts holds the RNG, the KL coefficient and the score statistics: a resumed run
    samples and trains what the uninterrupted one did. The reward model is a LoRA adapter on the policy's base."""
    data, reward_model = _prompts(tmp_path), _reward_adapter(tiny_model, tmp_path / "rm")
    common = dict(max_steps=4, save_steps=2, lora_dropout=0.1, ppo_score_norm=True, ppo_whiten_rewards=True)
    run_training(_ppo(tiny_model, data, reward_model, tmp_path / "straight", **common))
    interrupted = tmp_path / "interrupted"
    run_training(_ppo(tiny_model, data, reward_model, interrupted, **common))
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_results.json", "all_results.json"):
        (interrupted / name).unlink()
    run_training(_ppo(tiny_model, data, reward_model, interrupted, **common))  # resumes from checkpoint-2 by itself
    for name in ("adapter_model.safetensors", "ppo_value_head.safetensors"):
        straight, resumed = load_file(tmp_path / "straight" / name), load_file(interrupted / name)
        # the same operations on the same numbers in the same process type: equal up to float32 rounding
        assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) < 1e-6, name
    assert [r["current_steps"] for r in read_log(interrupted)] == [1, 2, 3, 4]
    assert not (interrupted / "reward").exists()  # only the trained adapter is saved


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="needs torchrun")
def test_two_processes_train(tiny_model, tmp_path):
    """torchrun with 2 processes (gloo on CPU): each samples its own prompts, the KL and the score statistics are
    gathered from both (a collective that hangs or fails shows here), each scores its share of the evaluation
    prompts, and the run ends with one model."""
    values = _ppo(tiny_model, _prompts(tmp_path), _reward_adapter(tiny_model, tmp_path / "rm"), tmp_path / "ddp",
                  per_device_train_batch_size=2, max_steps=4, ppo_score_norm=True, eval_dataset=_prompts(tmp_path),
                  eval_strategy="steps", eval_steps=2, do_eval=True)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    ddp = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "tuneforge.cli", "train",
                          *[f"{k}={v}" for k, v in values.items()]], capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    log = [r for r in read_log(tmp_path / "ddp") if "kl" in r]
    assert [r["current_steps"] for r in log] == [1, 2, 3, 4] and log[-1]["kl"] != 0
    evals = [r for r in read_log(tmp_path / "ddp") if "eval_reward" in r]
    assert [r["current_steps"] for r in evals] == [2, 4]
    assert (tmp_path / "ddp" / "ppo_value_head.safetensors").is_file()


def test_llamafactory_ppo_yaml_is_accepted(tmp_path, tiny_model):
    rm = _reward_adapter(tiny_model, tmp_path / "rm")
    values = {"model_name_or_path": tiny_model, "reward_model": rm, "stage": "ppo", "do_train": True,
              "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "dataset": "identity",
              "template": "chatml", "cutoff_len": 2048, "max_samples": 1000, "overwrite_cache": True,
              "output_dir": "saves/ppo", "logging_steps": 10, "save_steps": 500, "plot_loss": True,
              "overwrite_output_dir": True, "report_to": "none", "per_device_train_batch_size": 1,
              "gradient_accumulation_steps": 8, "learning_rate": 1.0e-5, "num_train_epochs": 3.0,
              "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "ddp_timeout": 180000000,
              "max_new_tokens": 512, "top_k": 0, "top_p": 0.9, "reward_model_type": "lora", "ppo_buffer_size": 1,
              "ppo_epochs": 4, "ppo_score_norm": True, "ppo_target": 6.0, "ppo_whiten_rewards": True}
    validate(build_config(values, source="lf.yaml"), "train")


def test_ppo_options_are_checked_together(tmp_path):
    cfg = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "stage": "ppo", "do_train": True,
                        "finetuning_type": "full", "reward_model": str(tmp_path), "ppo_epochs": 3,
                        "save_steps": 10, "do_sample": False}, source="p.yaml")
    with pytest.raises(ConfigError) as caught:
        validate(cfg, "train")
    message = str(caught.value)
    assert message.startswith("p.yaml: 5 problems:"), message
    for part in ("reward_model_type lora puts the reward adapter on the policy's own base",
                 "is not a LoRA adapter (no adapter_config.json)", "has no value_head.safetensors",
                 "`save_steps` (10) must be a multiple of ppo_epochs x ppo_buffer_size (3)", "set `do_sample: true`"):
        assert part in message
    for values, expected in (({}, "stage ppo needs `reward_model`"),
                             ({"reward_model": "localhost:8000", "reward_model_type": "api"}, r"an http\(s\) URL"),
                             ({"reward_model": "x", "reward_model_type": "value"},
                              "`reward_model_type` must be one of"),
                             # the reward adapter would sit on PiSSA's residual, not on the base it was trained on
                             ({"reward_model": "x", "pissa_init": True}, "and pissa_init turns it into PiSSA's "
                              "residual: use reward_model_type full")):
        cfg = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "stage": "ppo",
                            "do_train": True, **values}, source="p.yaml")
        with pytest.raises(ConfigError, match=expected):
            validate(cfg, "train")
    sft = build_config({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "ppo_epochs": 2,
                        "do_train": True}, source="s")
    with pytest.raises(ConfigError, match="`ppo_epochs` applies to stage ppo only"):
        validate(sft, "train")
