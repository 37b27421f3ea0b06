"""Stages rm, dpo and kto on a tiny random model: they train, learn a learnable preference, and keep their data
rules."""

import json

import pytest
import torch
from conftest import LOGGED_LOSS, read_log, run_training, train_config, write_jsonl
from safetensors.torch import load_file

from tuneforge.data.registry import DataError

TOPICS = ["the sea", "a cat", "the moon", "bread", "a train", "music", "rain", "a garden", "winter", "a river",
          "the city", "coffee", "a book", "the wind", "a bridge", "snow"]


def preference_rows(start: int, count: int) -> list[dict]:
    """Chosen answers always open with 'Sure' and stay on topic; rejected ones open with 'Sorry'."""
    rows = []
    for i in range(start, start + count):
        topic = TOPICS[i % len(TOPICS)]
        rows.append({"instruction": f"Tell me something about {topic} ({i}).", "input": "",
                     "chosen": f"Sure! Here is a fact about {topic}.", "rejected": f"Sorry, I will not talk about {topic}."})
    return rows


@pytest.fixture
def pref_data(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", preference_rows(0, 48))
    write_jsonl(tmp_path / "heldout.jsonl", preference_rows(100, 16))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "pairs": {"file_name": "train.jsonl", "ranking": True},
        "heldout": {"file_name": "heldout.jsonl", "ranking": True}}))
    return tmp_path


def _config(tiny_model, data_dir, out, stage, **overrides):
    values = train_config(tiny_model, "pairs", out, stage=stage, dataset_dir=str(data_dir), eval_dataset="heldout",
                          max_steps=30, learning_rate=1e-2, lr_scheduler_type="constant", per_device_train_batch_size=8,
                          eval_strategy="steps", eval_steps=30, do_eval=True)
    values.update(overrides)
    return values


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_dpo_learns_the_preference(tiny_model, pref_data, tmp_path, kind):
    out = tmp_path / "out"
    lr = 1e-2 if kind == "lora" else 1e-3
    results = run_training(_config(tiny_model, pref_data, out, "dpo", finetuning_type=kind, learning_rate=lr,
                                   pref_beta=0.5))
    log = [r for r in read_log(out) if "loss" in r]
    assert log[-1]["loss"] < log[0]["loss"] - 0.2
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"} <= set(log[0])
    assert results["eval_rewards/accuracies"] >= 0.9  # held-out pairs


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo", "orpo", "simpo"])
def test_every_pref_loss_trains(tiny_model, pref_data, tmp_path, loss):
    out = tmp_path / "out"
    results = run_training(_config(tiny_model, pref_data, out, "dpo", pref_loss=loss, max_steps=15, pref_beta=0.5,
                                   pref_ftx=0.1 if loss == "sigmoid" else 0.0,
                                   dpo_label_smoothing=0.1 if loss == "sigmoid" else 0.0))
    log = [r for r in read_log(out) if "loss" in r]
    assert log[-1]["loss"] < log[0]["loss"], (loss, [r["loss"] for r in log])
    assert results["eval_rewards/accuracies"] >= 0.75


def test_lora_dpo_holds_no_second_model(tiny_model, pref_data, tmp_path):
    from tuneforge.config import build_config
    from tuneforge.train.common import make_accelerator, prepare_model, reference_model
    from tuneforge.train.dpo import PreferenceLoss

    cfg = build_config(_config(tiny_model, pref_data, tmp_path / "o", "dpo"))
    model = prepare_model(cfg, make_accelerator(cfg.train))
    module = PreferenceLoss(model, cfg.finetune, reference_model(cfg, torch.device("cpu")))
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    assert module.reference == [] and sum(p.numel() for p in module.parameters()) < 1.2 * base
    full = build_config(_config(tiny_model, pref_data, tmp_path / "o", "dpo", finetuning_type="full"))
    assert reference_model(full, torch.device("cpu")) is not None  # full fine-tuning needs a frozen copy


def test_reward_model_learns_and_reloads(tiny_model, pref_data, tmp_path):
    out = tmp_path / "rm"
    results = run_training(_config(tiny_model, pref_data, out, "rm", learning_rate=3e-3))
    assert results["eval_accuracy"] >= 0.9
    assert (out / "adapter_model.safetensors").is_file()
    # TRL's names, which LLaMA-Factory's ppo and predict load (with strict=False: other names would be ignored)
    assert set(load_file(out / "value_head.safetensors")) == {"v_head.summary.weight", "v_head.summary.bias"}
    # the saved reward model scores the held-out pairs the same way when loaded again
    again = run_training(_config(tiny_model, pref_data, tmp_path / "scores", "rm", do_train=False,
                                 adapter_name_or_path=str(out), do_predict=True, eval_strategy="no"))
    assert again["eval_accuracy"] == results["eval_accuracy"]  # same weights, same kernels: the same scores
    scores = [json.loads(line) for line in (tmp_path / "scores" / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(scores) == 16 and sum(s["chosen"] > s["rejected"] for s in scores) / 16 == again["predict_accuracy"]
    # training on from the reward model goes on from its value head too, as in LLaMA-Factory (not from a new one)
    run_training(_config(tiny_model, pref_data, tmp_path / "more", "rm", adapter_name_or_path=str(out),
                         learning_rate=1e-12, max_steps=1, eval_strategy="no", do_eval=False))
    before, after = load_file(out / "value_head.safetensors"), load_file(tmp_path / "more" / "value_head.safetensors")
    assert all(torch.allclose(before[k], after[k], atol=1e-9) for k in before)  # one step at 1e-12 moves it < 1e-11


def test_a_value_head_saved_under_the_older_names_loads():
    from tuneforge.train.rm import ValueHead

    head = ValueHead(4)
    head.load_state_dict({"weight": torch.ones(1, 4), "bias": torch.full((1,), 2.0)})  # tuneforge before 2026-11-25
    assert head(torch.ones(1, 4)).item() == 6.0


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_kto_trains(tiny_model, tmp_path, kind):
    rows = []
    for i, row in enumerate(preference_rows(0, 40)):
        good = i % 3 != 0
        rows.append({"instruction": row["instruction"], "input": "", "output": row["chosen" if good else "rejected"],
                     "label": good})
    write_jsonl(tmp_path / "kto.jsonl", rows)
    (tmp_path / "dataset_info.json").write_text(json.dumps({"kto": {"file_name": "kto.jsonl",
                                                                    "columns": {"kto_tag": "label"}}}))
    out = tmp_path / "out"
    run_training(train_config(tiny_model, "kto", out, stage="kto", dataset_dir=str(tmp_path), finetuning_type=kind,
                              max_steps=15, learning_rate=1e-2 if kind == "lora" else 1e-3,
                              lr_scheduler_type="constant", per_device_train_batch_size=8, pref_beta=0.5))
    log = [r for r in read_log(out) if "loss" in r]
    margins = [r["rewards/margins"] for r in log if "rewards/margins" in r]  # steps with both kinds of answer
    assert log[-1]["loss"] < log[0]["loss"] and margins[-1] > margins[0]


def test_kto_rewards_are_means_over_their_own_answers():
    """KTO's desirable and undesirable answers are each a share of a step: each reward is averaged over its own
    answers (TRL's and LLaMA-Factory's rewards/chosen, rewards/rejected), not over the whole step."""
    from tuneforge.train.steps import metric_means

    # 4 examples: 3 desirable (rewards summing to 0.6), 1 undesirable (-0.2); KL summed as batch KL x examples
    sums = {"rewards/chosen": 0.6, "rewards/rejected": -0.2, "count/chosen": 3, "count/rejected": 1, "kl": 0.4}
    assert metric_means(sums, 4) == pytest.approx(
        {"rewards/chosen": 0.2, "rewards/rejected": -0.2, "kl": 0.1, "rewards/margins": 0.4})
    # an interval without undesirable answers reports no mean for them (rather than a 0)
    assert metric_means({"rewards/chosen": 0.6, "rewards/rejected": 0.0, "count/chosen": 3, "count/rejected": 0},
                        3) == pytest.approx({"rewards/chosen": 0.2})


def test_stages_refuse_the_wrong_kind_of_data(tiny_model, pref_data, alpaca_file, tmp_path):
    with pytest.raises(DataError, match="stage `dpo` needs ranking data"):
        run_training(train_config(tiny_model, alpaca_file, tmp_path / "a", stage="dpo"))
    with pytest.raises(DataError, match="is ranking \\(preference\\) data, which stage `sft` cannot use"):
        run_training(train_config(tiny_model, "pairs", tmp_path / "b", dataset_dir=str(pref_data)))
    with pytest.raises(DataError, match="stage kto needs a desirable/undesirable flag"):
        run_training(train_config(tiny_model, alpaca_file, tmp_path / "c", stage="kto"))
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing written before the data validated


def test_precomputed_reference_gives_the_same_training(tiny_model, pref_data, tmp_path):
    common = dict(finetuning_type="full", learning_rate=1e-3, max_steps=3, eval_strategy="no", do_eval=False)
    run_training(_config(tiny_model, pref_data, tmp_path / "live", "dpo", **common))
    run_training(_config(tiny_model, pref_data, tmp_path / "pre", "dpo", precompute_ref_log_probs=True, **common))
    live, pre = ([r["loss"] for r in read_log(tmp_path / name)] for name in ("live", "pre"))
    # precomputed and live reference log-probs come from batches padded differently (float32 noise, ~1e-6), and
    # the logged losses are rounded
    assert pre == pytest.approx(live, abs=LOGGED_LOSS)


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_dpo_and_kto_train_with_dropout_off(tiny_model, pref_data, tmp_path, capsys, stage):
    """As LLaMA-Factory's trainers do (TRL's disable_dropout): dropout would make the policy's log-probabilities
    noisy against the reference's. A run with lora_dropout trains as one without, and says so."""
    from safetensors.torch import load_file

    if stage == "kto":
        rows = [{"instruction": r["instruction"], "output": r["chosen" if i % 2 else "rejected"], "tag": i % 2 == 1}
                for i, r in enumerate(preference_rows(0, 16))]
        write_jsonl(pref_data / "kto.jsonl", rows)
        info = json.loads((pref_data / "dataset_info.json").read_text())
        (pref_data / "dataset_info.json").write_text(json.dumps(
            {**info, "kto": {"file_name": "kto.jsonl", "columns": {"kto_tag": "tag"}}}))
    common = dict(max_steps=2, eval_strategy="no", do_eval=False, eval_dataset=None,
                  dataset="kto" if stage == "kto" else "pairs")
    weights = []
    for name, dropout in (("plain", 0.0), ("dropout", 0.3)):
        run_training(_config(tiny_model, pref_data, tmp_path / name, stage, lora_dropout=dropout, **common))
        weights.append(load_file(tmp_path / name / "adapter_model.safetensors"))
    # the same operations either way (an identity in place of each dropout layer): equal
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert "dropout is off in this stage (TRL's default; LLaMA-Factory's for dpo and kto), so `lora_dropout` and " \
           "the model's dropout of 0.3 have no effect" in capsys.readouterr().out


def test_reward_model_full_finetuning(tiny_model, pref_data, tmp_path):
    out = tmp_path / "rm-full"
    results = run_training(_config(tiny_model, pref_data, out, "rm", finetuning_type="full", learning_rate=1e-3,
                                   max_steps=20))
    log = [r for r in read_log(out) if "loss" in r]
    assert log[-1]["loss"] < log[0]["loss"] and results["eval_accuracy"] >= 0.9
    assert (out / "value_head.safetensors").is_file() and (out / "model.safetensors").is_file()


def test_reward_model_full_finetuning_resumes(tiny_model, pref_data, tmp_path):
    """A full model's checkpoint holds the value head beside the model's own files; resuming reads each into its
    place (it once read every *.safetensors as the model's and refused the head's keys)."""
    out = tmp_path / "rm-full"
    settings = dict(finetuning_type="full", learning_rate=1e-3, max_steps=4, save_steps=2, eval_steps=4)
    run_training(_config(tiny_model, pref_data, out, "rm", **settings))
    for name in ("model.safetensors", "value_head.safetensors", "train_results.json", "all_results.json"):
        (out / name).unlink()  # as if stopped after the step-2 checkpoint
    run_training(_config(tiny_model, pref_data, out, "rm", **settings))
    assert [r["current_steps"] for r in read_log(out) if "loss" in r] == [1, 2, 3, 4]
    assert (out / "value_head.safetensors").is_file()


def test_ld_dpo_weighs_the_longer_answers_extra_tokens_by_ld_alpha(tiny_model, pref_data, tmp_path):
    """LD-DPO: of each pair, the tokens past the shorter answer's count weigh ld_alpha in the policy's log-probability
    (here chosen answers are 3 and 5 target tokens, their rejected ones 4 and 2). Checked against the per-token
    log-probabilities of the model's own logits; then a run with it learns the preference."""
    from tuneforge.config import build_config
    from tuneforge.models.load import load_base_model
    from tuneforge.train.losses import decoder_and_head, sequence_log_probs

    model = load_base_model(build_config({"model_name_or_path": tiny_model}, source="test").model)
    lengths = [3, 5, 4, 2]  # chosen 1, chosen 2, rejected 1, rejected 2
    input_ids = torch.arange(5, 5 + 4 * 9).reshape(4, 9) % 300
    labels = torch.full_like(input_ids, -100)
    for row, n in enumerate(lengths):
        labels[row, 2: 2 + n] = input_ids[row, 2: 2 + n]
    with torch.no_grad():
        sums, counts = sequence_log_probs(model, decoder_and_head(model), input_ids, labels, ld_alpha=0.25)
        token_logps = model(input_ids=input_ids).logits[:, :-1].float().log_softmax(-1).gather(
            -1, input_ids[:, 1:, None]).squeeze(-1)
    shared = [3, 2, 3, 2]  # min(3, 4) and min(5, 2), for both rows of each pair
    expected = [token_logps[row, 1: 1 + shared[row]].sum() + 0.25 * token_logps[row, 1 + shared[row]: 1 + n].sum()
                for row, n in enumerate(lengths)]
    assert counts.tolist() == lengths
    # the same float32 log-probabilities summed in another order: ~1e-6 of sums of ~20
    assert sums.tolist() == pytest.approx([e.item() for e in expected], rel=1e-5)

    out = tmp_path / "out"
    results = run_training(_config(tiny_model, pref_data, out, "dpo", pref_beta=0.5, ld_alpha=0.5))
    assert results["eval_rewards/accuracies"] >= 0.9


def test_bco_term_learns_and_keeps_its_baseline_across_resume(tiny_model, pref_data, tmp_path):
    """pref_bco_weight mixes BCO into DPO: the run learns the preference, the saved baseline is the mean of the
    steps' mean rewards (one micro-batch a step here), and a run resumed from a checkpoint ends where the
    uninterrupted one does, baseline included."""
    from safetensors.torch import load_file

    settings = dict(pref_beta=0.5, pref_bco_weight=1.0, finetuning_type="full", learning_rate=1e-3, max_steps=8,
                    save_steps=4, eval_steps=8)
    out = tmp_path / "straight"
    results = run_training(_config(tiny_model, pref_data, out, "dpo", **settings))
    assert results["eval_rewards/accuracies"] >= 0.9
    log = [r for r in read_log(out) if "loss" in r]
    saved = load_file(out / "bco_baseline.safetensors")
    assert saved["count"].item() == 8
    # logged rewards are rounded to 4 decimals: their mean is within 1e-4 of the exact one
    expected = sum((r["rewards/chosen"] + r["rewards/rejected"]) / 2 for r in log) / len(log)
    assert saved["mean"].item() == pytest.approx(expected, abs=1e-4)

    resumed = tmp_path / "resumed"
    run_training(_config(tiny_model, pref_data, resumed, "dpo", **settings))
    for name in ("model.safetensors", "bco_baseline.safetensors", "train_results.json", "all_results.json"):
        (resumed / name).unlink()  # as if stopped after the step-4 checkpoint
    run_training(_config(tiny_model, pref_data, resumed, "dpo", **settings))
    a, b = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    # the same operations in the same order on the same machine: measured 0.0; a baseline restarted at 0 on resume
    # changes the BCO gradient and moves weights by about the rate, 1e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert load_file(resumed / "bco_baseline.safetensors")["mean"].item() == saved["mean"].item()


def test_bco_needs_a_reference(tiny_model, pref_data, tmp_path):
    from tuneforge.config import ConfigError, build_config, validate

    with pytest.raises(ConfigError, match="pref_bco_weight` classifies rewards measured against the reference"):
        validate(build_config(_config(tiny_model, pref_data, tmp_path / "o", "dpo", pref_loss="simpo",
                                      pref_bco_weight=0.5)), "train")


def test_quantised_reference_model(tiny_model, pref_data, tmp_path):
    """ref_model_quantization_bit loads `ref_model` 4-bit (LLaMA-Factory's key); without it the reference is in full
    precision even when the policy is QLoRA's. DPO trains against it."""
    import bitsandbytes as bnb

    from tuneforge.config import ConfigError, build_config, validate
    from tuneforge.train.common import reference_model

    def linear4bit(model) -> int:
        return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())

    quantised = _config(tiny_model, pref_data, tmp_path / "q", "dpo", ref_model=tiny_model,
                        ref_model_quantization_bit=4, max_steps=2, do_eval=False, eval_strategy="no")
    assert linear4bit(reference_model(build_config(quantised), torch.device("cpu"))) == 4 * 7  # every projection of the 4 layers
    qlora = dict(quantised, ref_model_quantization_bit=None, quantization_bit=4)
    assert linear4bit(reference_model(build_config(qlora), torch.device("cpu"))) == 0
    run_training(quantised)
    assert len(read_log(tmp_path / "q")) == 2
    with pytest.raises(ConfigError, match="quantises `ref_model`, which is unset"):
        validate(build_config(dict(quantised, ref_model=None)))
