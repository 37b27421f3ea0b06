import json
import math
import shutil

import pytest
import torch
from conftest import LOGGED_LOSS, alpaca_rows, read_log, relative_update_gap, run_training, train_config, \
    write_jsonl
from safetensors.torch import load_file

PT_TEXT = "\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog {i % 5} times." for i in range(40))


@pytest.mark.parametrize("stage", ["pt", "sft"])
@pytest.mark.parametrize("kind", ["full", "freeze", "lora"])
def test_each_stage_and_method_learns(tiny_model, alpaca_file, tmp_path, stage, kind):
    data = alpaca_file
    if stage == "pt":
        data = str(tmp_path / "corpus.txt")
        (tmp_path / "corpus.txt").write_text(PT_TEXT)
    lr = {"full": 3e-3, "freeze": 3e-3, "lora": 2e-2}[kind]
    out = tmp_path / "out"
    run_training(train_config(tiny_model, data, out, stage=stage, finetuning_type=kind, learning_rate=lr, max_steps=20,
                              lr_scheduler_type="constant", freeze_trainable_layers=2, freeze_extra_modules="lm_head"))
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.3, losses  # at least 0.3 nats lower
    expected = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    assert (out / expected).is_file() and (out / "tokenizer_config.json").is_file()
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 20 and results["train_loss"] > 0


def test_freeze_trains_only_the_chosen_layers(tiny_model, alpaca_file, tmp_path):
    out = tmp_path / "out"
    run_training(train_config(tiny_model, alpaca_file, out, finetuning_type="freeze", freeze_trainable_layers=-1,
                              freeze_trainable_modules="mlp", freeze_extra_modules="embed_tokens", max_steps=2))
    before, after = load_file(f"{tiny_model}/model.safetensors"), load_file(out / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {n for n in before if n.startswith("model.layers.0.mlp.") or "embed_tokens" in n}


def _weights(folder):
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(folder / name)


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_accumulation_equals_a_big_batch(tiny_model, tmp_path, kind):
    """Gradient accumulation over 4 padded micro-batches must train like one batch of 8: the same loss
    normalisation (sum over target tokens / target tokens of the whole accumulated batch)."""
    data = str(write_jsonl(tmp_path / "var.jsonl", alpaca_rows(32)))  # lengths vary, so batches carry padding
    splits = {"big": dict(per_device_train_batch_size=8),
              "acc": dict(per_device_train_batch_size=2, gradient_accumulation_steps=4)}

    def train(name, steps=4, **options):
        run_training(train_config(tiny_model, data, tmp_path / name, finetuning_type=kind, max_steps=steps,
                                  logging_steps=1, lr_scheduler_type="constant", **options))
        log = read_log(tmp_path / name)
        return _weights(tmp_path / name), [r["loss"] for r in log], [r["grad_norm"] for r in log]

    start, *_ = train("start", learning_rate=0.0)  # the same seeded initial weights both runs start from
    # 1. SGD: an update is the accumulated gradient times the rate, so the weight changes compare the gradients.
    # Both runs sum the same per-token terms in another order, which is float32 noise: measured at most 2.3e-6 of
    # the update (AMD EPYC with its AVX512 kernels and with avx2 kernels, 1 and 2 threads). A normalisation error
    # (each micro-batch divided by its own token count) measured 0.09 (full) and 0.33 (LoRA). 1e-4 sits between.
    sgd = {name: train(f"sgd-{name}", optim="sgd", learning_rate=0.5, max_grad_norm=0, **split)
           for name, split in splits.items()}
    assert relative_update_gap(start, sgd["big"][0], sgd["acc"][0]) < 1e-4
    assert sgd["big"][1] == pytest.approx(sgd["acc"][1], abs=LOGGED_LOSS)
    # the logged grad_norm (transformers' key) is the norm of the step's whole gradient: the same under accumulation,
    # and for one SGD step without clipping |update| / rate. The log rounds to 4 decimals (up to 5e-5 off); 1e-4
    # leaves room for the float32 subtraction that gives the update
    assert sgd["big"][2] == pytest.approx(sgd["acc"][2], abs=LOGGED_LOSS)
    one = train("sgd-one", steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0, **splits["acc"])
    assert one[2] == [pytest.approx((sum(((one[0][k] - start[k]).double() ** 2).sum() for k in start) ** 0.5 / 0.5)
                                    .item(), abs=1e-4)]
    # 2. AdamW, the default, amplifies that noise (see relative_update_gap): measured at most 4.9e-5 of the update
    # (LoRA, whose B starts at 0 so A's first gradients are tiny; full: 1.5e-6); the normalisation error: 0.15.
    adam = {name: train(f"adam-{name}", learning_rate=1e-3, **split) for name, split in splits.items()}
    assert relative_update_gap(start, adam["big"][0], adam["acc"][0]) < 2e-3
    assert adam["big"][1] == pytest.approx(adam["acc"][1], abs=LOGGED_LOSS)


def test_resume_mid_epoch_is_exact(tiny_model, tmp_path):
    data = str(write_jsonl(tmp_path / "var.jsonl", alpaca_rows(16)))  # 4 steps per epoch: step 6 is mid-epoch 2
    common = dict(max_steps=10, save_steps=2, save_total_limit=2, lora_dropout=0.1, lr_scheduler_type="cosine",
                  warmup_steps=2)
    run_training(train_config(tiny_model, data, tmp_path / "straight", **common))
    interrupted = tmp_path / "interrupted"
    run_training(train_config(tiny_model, data, interrupted, **common))
    assert sorted(p.name for p in interrupted.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    # make it as if the run had stopped right after step 6
    for name in ("checkpoint-8", "adapter_model.safetensors", "adapter_config.json", "train_results.json",
                 "all_results.json"):
        path = interrupted / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert json.loads((interrupted / "checkpoint-6" / "trainer_state.json").read_text())["step_in_epoch"] == 2
    run_training(train_config(tiny_model, data, interrupted, **common))  # resumes from checkpoint-6 by itself
    # The resumed run repeats the same operations in the same order on the same machine: bit-identical (measured
    # 0.0). A wrong batch, RNG or optimizer state shows as a rate-sized (1e-3) difference.
    assert _max_diff(_weights(tmp_path / "straight"), _weights(interrupted)) < 1e-6
    log = read_log(interrupted)
    assert [r["current_steps"] for r in log] == list(range(1, 11))


def test_adapter_loads_in_plain_peft_with_the_same_logits(tiny_model, alpaca_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.config import build_config
    from tuneforge.infer.engine import Engine

    out = tmp_path / "out"
    run_training(train_config(tiny_model, alpaca_file, out, max_steps=3, lora_target="q_proj,v_proj,down_proj",
                              additional_target="lm_head"))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out)).eval()
    engine = Engine(build_config({"model_name_or_path": tiny_model, "adapter_name_or_path": str(out)}))
    assert engine.template.name == "chatml"  # taken from the adapter's tuneforge_config.yaml
    ids = torch.tensor([engine.prompt_ids([{"role": "user", "content": "What is 2 plus 3?"}])])
    with torch.no_grad():
        reference, ours = plain(ids).logits, engine.model(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
    # the engine folds the adapter into the weights, PEFT adds it layer by layer: the same sums in another order,
    # measured 2.4e-7 (avx2 kernels, one thread: the same) at logits below 1; 1e-5 allows float32's rounding
    assert torch.allclose(reference, ours, atol=1e-5)
    assert not torch.allclose(reference, base, atol=1e-3)  # the adapter really changed the model
    # LLaMA-Factory's adapter_folder: the adapter sits in that sub-folder of adapter_name_or_path
    cfg = build_config({"model_name_or_path": tiny_model, "adapter_name_or_path": str(tmp_path),
                        "adapter_folder": "out"})
    assert (cfg.model.adapter_name_or_path, cfg.model.adapter_folder) == (str(out), None)
    # as in LLaMA-Factory, the reference's adapters sit in the same sub-folder
    ref = build_config({"adapter_name_or_path": str(tmp_path), "ref_model_adapters": str(tmp_path),
                        "adapter_folder": "out"})
    assert ref.finetune.ref_model_adapters == str(out)
    with torch.no_grad():
        assert torch.equal(Engine(cfg).model(ids).logits, ours)


def test_split_special_tokens_trains_and_stays_with_the_adapter(tiny_model, tmp_path):
    from tuneforge.config import build_config
    from tuneforge.infer.engine import Engine

    rows = [{"instruction": f"Repeat <|im_end|> {i}", "input": "", "output": f"<|im_end|> {i}"} for i in range(8)]
    data, out = write_jsonl(tmp_path / "data.jsonl", rows), tmp_path / "out"
    run_training(train_config(tiny_model, str(data), out, max_steps=1, split_special_tokens=True))
    engine = Engine(build_config({"model_name_or_path": tiny_model, "adapter_name_or_path": str(out)}))
    assert engine.tokenizer.split_special_tokens  # from the adapter's run config
    # the saved tokenizer stays plain: its chat template's markers remain special tokens in any tool
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out)
    start = saved.convert_tokens_to_ids("<|im_start|>")
    assert saved.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)["input_ids"][0] == start
    end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert engine.prompt_ids([{"role": "user", "content": "Say <|im_end|>"}]).count(end) == 1  # the template's


def test_adapter_folder_without_a_local_adapter_path_is_refused():
    from tuneforge.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="`adapter_folder` names a sub-folder of each adapter_name_or_path folder, "
                                          "which is unset"):
        build_config({"adapter_folder": "sub"})
    with pytest.raises(ConfigError, match="`adapter_folder`: adapter_name_or_path owner/lora is no local folder"):
        build_config({"adapter_name_or_path": "owner/lora", "adapter_folder": "sub"})


def test_output_dir_is_protected(tiny_model, alpaca_file, tmp_path):
    out = tmp_path / "out"
    run_training(train_config(tiny_model, alpaca_file, out, max_steps=1))
    with pytest.raises(FileExistsError, match="already holds a trained model"):
        run_training(train_config(tiny_model, alpaca_file, out, max_steps=1))
    (out / "train_results.json").unlink()  # as a run killed while writing its model leaves it, with no checkpoint
    with pytest.raises(FileExistsError, match="stopped before they were complete .* overwrite_output_dir: true"):
        run_training(train_config(tiny_model, alpaca_file, out, max_steps=1))
    run_training(train_config(tiny_model, alpaca_file, out, max_steps=2, overwrite_output_dir=True))
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 2


def test_eval_early_stopping_predict_and_plot(tiny_model, alpaca_file, tmp_path):
    out = tmp_path / "out"
    results = run_training(train_config(
        tiny_model, alpaca_file, out, val_size=0.25, eval_strategy="steps", eval_steps=2, early_stopping_steps=1,
        learning_rate=5.0, max_steps=30, do_eval=True, do_predict=True, predict_with_generate=True, do_sample=False,
        max_new_tokens=8, plot_loss=True, compute_accuracy=True))
    evals = [r for r in read_log(out) if "eval_loss" in r]
    assert results["global_step"] < 30 and len(evals) >= 2  # a huge learning rate makes eval loss rise: stop early
    assert evals[-1]["eval_loss"] >= min(e["eval_loss"] for e in evals[:-1])
    assert {"eval_loss", "eval_perplexity", "eval_accuracy", "predict_bleu-4", "predict_rouge-l"} <= set(results)
    predictions = [json.loads(l) for l in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and {"prompt", "predict", "label"} <= set(predictions[0])
    assert (out / "training_loss.png").is_file() and (out / "training_eval_loss.png").is_file()


@pytest.mark.parametrize("strategy, delay, steps, evaluated", [
    ("steps", 4, 8, [0, 4, 6, 8]), ("epoch", 2, 12, [0, 12]), ("epoch", 1, 8, [0, 6, 8])])
def test_eval_on_start_and_eval_delay(tiny_model, alpaca_file, tmp_path, strategy, delay, steps, evaluated):
    """HF's eval_on_start evaluates the starting weights (the loss of the untrained model, logged at step 0);
    eval_delay holds evaluations back for its steps (eval_strategy steps) or epochs (epoch). Training evaluates its
    last step under either strategy, the end of its last epoch or a step inside one."""
    out = tmp_path / "out"
    run_training(train_config(tiny_model, alpaca_file, out, val_size=0.25, eval_strategy=strategy, eval_steps=2,
                              eval_delay=delay, eval_on_start=True, max_steps=steps, per_device_train_batch_size=3))
    evals = [r for r in read_log(out) if "eval_loss" in r]
    assert [r["current_steps"] for r in evals] == evaluated  # 18 training rows in batches of 3: 6 steps an epoch
    from tuneforge.config import build_config, notices

    assert "note: `eval_on_start` evaluates before training's first step; without do_train it has no effect" in \
        notices(build_config(train_config(tiny_model, alpaca_file, out, eval_on_start=True, do_train=False)))
    assert evals[0]["eval_loss"] > evals[-1]["eval_loss"]  # before any step: the highest loss


@pytest.mark.parametrize("load_best", [False, True])
def test_final_weights_are_evaluated_once(tiny_model, alpaca_file, tmp_path, monkeypatch, load_best):
    """eval_strategy evaluates the last step; do_eval's evaluation after training reuses that instead of running
    again, unless load_best_model_at_end put other weights back."""
    import tuneforge.train.evaluation as evaluation

    calls = []
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    out = tmp_path / "out"
    # a huge constant learning rate makes the eval loss rise again (5.81, 5.61, 5.99): the best is not the last
    results = run_training(train_config(tiny_model, alpaca_file, out, val_size=0.25, eval_strategy="steps",
                                        eval_steps=2, max_steps=6, learning_rate=30.0, lr_scheduler_type="constant",
                                        do_eval=True, load_best_model_at_end=load_best))
    evals = [r["eval_loss"] for r in read_log(out) if "eval_loss" in r]
    assert len(evals) == 3 and min(evals) < evals[-1]
    assert len(calls) == 3 + load_best  # steps 2, 4, 6, and the restored best model's once more
    # the log rounds to 4 decimals; the restored best model evaluates to what it did at its step
    assert results["eval_loss"] == pytest.approx(min(evals) if load_best else evals[-1], abs=5e-5)
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] == results["eval_loss"]


def test_bf16_and_gradient_checkpointing_keep_results(tiny_model, alpaca_file, tmp_path):
    common = dict(max_steps=3, lr_scheduler_type="constant")
    run_training(train_config(tiny_model, alpaca_file, tmp_path / "plain", **common))
    run_training(train_config(tiny_model, alpaca_file, tmp_path / "ckpt", gradient_checkpointing=True, **common))
    run_training(train_config(tiny_model, alpaca_file, tmp_path / "bf16", bf16=True, **common))
    plain, ckpt, bf16 = ([r["loss"] for r in read_log(tmp_path / name)] for name in ("plain", "ckpt", "bf16"))
    assert ckpt == pytest.approx(plain, abs=LOGGED_LOSS)  # checkpointing recomputes the same forward
    # bf16 keeps 8 mantissa bits (0.4% per rounding): allow 1% of the ~6-nat loss (measured 3e-4 apart); a bf16
    # path that computed something else would be far off
    assert bf16 == pytest.approx(plain, abs=0.05) and bf16 != plain  # autocast really ran in bf16


def test_epochs_warmup_and_epoch_checkpoints(tiny_model, alpaca_file, tmp_path):
    out = tmp_path / "out"
    # 24 examples, batch 4 x accumulation 2 -> 3 steps per epoch; 2 epochs -> 6 steps, warm-up ceil(0.5 * 6) = 3
    results = run_training(train_config(tiny_model, alpaca_file, out, max_steps=-1, num_train_epochs=2,
                                        gradient_accumulation_steps=2, warmup_ratio=0.5, save_strategy="epoch",
                                        lr_scheduler_type="constant_with_warmup", learning_rate=1e-3))
    log = read_log(out)
    assert results["global_step"] == 6 and [r["epoch"] for r in log][-1] == 2.0
    # the schedule is Python float arithmetic, the same everywhere: pytest.approx's default (1e-6 relative) suffices
    # each line logs the rate its step used, as transformers' Trainer does: the first warm-up step's is 0
    assert [r["lr"] for r in log] == pytest.approx([0, 1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3])
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]  # the end of training saves to out itself


def test_warmup_steps_below_one_is_a_share_of_the_steps():
    """transformers 5 reads warmup_steps below 1 as that share of all steps, rounded up (it dropped warmup_ratio,
    which LLaMA-Factory's configs still set and which stays)."""
    from tuneforge.options import TrainArgs
    from tuneforge.train.schedules import build_scheduler

    def rates(**keys) -> list[float]:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = build_scheduler(optimizer, TrainArgs(lr_scheduler_type="linear", **keys), total_steps=10)
        out = []
        for _ in range(10):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    assert rates(warmup_steps=0.25) == rates(warmup_ratio=0.25) == rates(warmup_steps=3) != rates()


def test_group_by_length_batches_rows_of_about_the_same_length():
    from tuneforge.options import TrainArgs
    from tuneforge.train.checkpoint import TrainerState
    from tuneforge.train.steps import RowSteps, epoch_batches

    lengths = torch.randint(1, 200, (403,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [{"id": i, "input_ids": [0] * n, "labels": [0] * n} for i, n in enumerate(lengths)]

    def epoch(group: bool, epoch: int = 0, rank: int = 0, world: int = 1) -> list[list[int]]:
        t = TrainArgs(per_device_train_batch_size=4, gradient_accumulation_steps=2, group_by_length=group)
        source = RowSteps(rows, t, collator=lambda batch: [row["id"] for row in batch], shuffle=True, rank=rank,
                          world=world)
        steps = source.steps(TrainerState(epoch=epoch))
        return [micro for _ in range(source.steps_per_epoch) for micro in next(steps)]

    def padding(batches) -> int:
        return sum(len(batch) * max(lengths[i] for i in batch) - sum(lengths[i] for i in batch) for batch in batches)

    grouped = epoch(True)
    assert sorted(i for batch in grouped for i in batch) == list(range(len(rows)))  # every row once
    assert max(lengths) in [lengths[i] for i in grouped[0]]  # the longest row comes first
    # sorted within groups of 100 rows (403 // 16 = 25 batches of 4): neighbours differ by about 2 in length, where
    # 4 random rows of 1..199 pad by about 120 positions each; a tenth is far above the first, far below the second
    assert padding(grouped) < padding(epoch(False)) / 10
    assert grouped == epoch(True) and grouped != epoch(True, epoch=1)  # the same every run, shuffled every epoch
    shares = [epoch(True, rank=rank, world=2) for rank in (0, 1)]  # each process gets a half of the global batches
    assert len(shares[0]) == len(shares[1]) and {i for share in shares for b in share for i in b} == set(range(403))
    assert padding(shares[0] + shares[1]) < padding(epoch(False)) / 10
    # unshuffled, 8 rows in batches of 2: four groups of one batch (at least four groups), each sorted longest first,
    # and the group holding the longest row moved to the front
    assert epoch_batches(8, 2, 0, 0, False, lengths=[1, 2, 3, 4, 5, 6, 7, 8]) == [[7, 6], [1, 0], [3, 2], [5, 4]]
    from tuneforge.config import ConfigError  # an image classifier's rows have no length to group by

    with pytest.raises(ConfigError, match="these rows hold no tokens"):
        RowSteps([{"image": "a.png", "label": 0}] * 8, TrainArgs(group_by_length=True), None, shuffle=True)


def test_last_step_spreads_its_rows_over_the_micro_batches():
    # 13 rows, batch 4 x accumulation 2: the epoch's last step has 5 rows, split [2, 3] rather than [4, 1] (a
    # compiled model would compile again for a micro-batch of one row); every row still comes once per epoch
    from tuneforge.options import TrainArgs
    from tuneforge.train.checkpoint import TrainerState
    from tuneforge.train.steps import RowSteps

    rows = [{"id": i} for i in range(13)]
    t = TrainArgs(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    source = RowSteps(rows, t, collator=lambda batch: [row["id"] for row in batch], shuffle=True)
    steps = source.steps(TrainerState())
    epoch = [next(steps) for _ in range(source.steps_per_epoch)]
    assert [[len(micro) for micro in step] for step in epoch] == [[4, 4], [2, 3]]  # was [[4, 4], [4, 1]]
    assert sorted(i for step in epoch for micro in step for i in micro) == list(range(13))


def test_dataloader_drop_last_leaves_out_an_incomplete_last_batch():
    from tuneforge.config import ConfigError
    from tuneforge.options import TrainArgs
    from tuneforge.train.checkpoint import TrainerState
    from tuneforge.train.steps import RowSteps

    def epochs(world: int, drop_last: bool) -> list[list[list[int]]]:
        """Each process's two epochs of micro-batches over 13 rows, batches of 4."""
        t = TrainArgs(per_device_train_batch_size=4, dataloader_drop_last=drop_last)
        out = []
        for rank in range(world):
            source = RowSteps([{"id": i} for i in range(13)], t, collator=lambda batch: [row["id"] for row in batch],
                              shuffle=True, rank=rank, world=world)
            state = TrainerState()
            steps, mine = source.steps(state), []
            for _ in range(2):
                mine.append([next(steps)[0] for _ in range(source.steps_per_epoch)])
                state.epoch += 1  # as the loop's end_of_epoch
            out.append(mine)
        return out

    [one] = epochs(1, drop_last=True)
    assert [[len(batch) for batch in epoch] for epoch in one] == [[4, 4, 4]] * 2  # not [4, 4, 4, 1]
    assert all(len({i for batch in epoch for i in batch}) == 12 for epoch in one)
    assert {i for batch in one[0] for i in batch} != {i for batch in one[1] for i in batch}  # each epoch drops another
    assert [len(epoch) for epoch in epochs(1, drop_last=False)[0]] == [4, 4]
    two = epochs(2, drop_last=True)  # a global batch of 8: one step an epoch, no row topped up from the epoch's start
    assert [len(epoch) for epoch in two[0]] == [1, 1] and len({*two[0][0][0], *two[1][0][0]}) == 8
    with pytest.raises(ConfigError, match="the 13 training rows do not fill one batch of 16"):
        epochs(4, drop_last=True)


def test_logging_strategy(tiny_model, alpaca_file, tmp_path):
    """HF's logging_strategy, with logging_first_step: every logging_steps steps or each epoch's end (24 rows in
    batches of 4: 6 steps an epoch), and training's last step under either; `no` logs none but the first."""
    from tuneforge.config import build_config, notices

    train_loss = {}
    for strategy, logged in (("steps", [1, 4, 8, 10]), ("epoch", [1, 6, 10]), ("no", [1])):
        out = tmp_path / strategy
        values = train_config(tiny_model, alpaca_file, out, max_steps=10, logging_steps=4, logging_first_step=True,
                              logging_strategy=strategy, plot_loss=True)
        train_loss[strategy] = run_training(values)["train_loss"]
        assert [r["current_steps"] for r in read_log(out)] == logged
        drawn = "note: `plot_loss` draws the logged training losses, and `logging_strategy: no` logs none"
        assert (drawn in notices(build_config(values))) == (strategy == "no")
    # every step's loss counts in train_loss, logged or not: the same training, summed in other groups (float32)
    assert train_loss["epoch"] == pytest.approx(train_loss["steps"], rel=1e-5)
    assert train_loss["no"] == pytest.approx(train_loss["steps"], rel=1e-5)


def test_intervals_below_one_are_shares_of_the_run(tiny_model, alpaca_file, tmp_path):
    """HF's rule for logging_steps, eval_steps and save_steps below 1: that share of the run's steps, rounded up.
    10 steps: 0.25 logs every 3rd step (and the last), 0.5 evaluates and saves every 5th."""
    out = tmp_path / "out"
    run_training(train_config(tiny_model, alpaca_file, out, max_steps=10, logging_steps=0.25, save_steps=0.5,
                              val_size=0.25, eval_strategy="steps", eval_steps=0.5))
    assert [r["current_steps"] for r in read_log(out) if "loss" in r] == [3, 6, 9, 10]
    assert [r["current_steps"] for r in read_log(out) if "eval_loss" in r] == [5, 10]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5"]


def test_a_resumed_run_counts_the_unlogged_steps_in_train_loss(tiny_model, alpaca_file, tmp_path):
    """A checkpoint between log lines (here: none at all) holds the losses of the steps since the last one."""
    common = dict(max_steps=6, save_steps=3, logging_strategy="no", lr_scheduler_type="constant")
    straight = run_training(train_config(tiny_model, alpaca_file, tmp_path / "straight", **common))
    interrupted = tmp_path / "interrupted"
    run_training(train_config(tiny_model, alpaca_file, interrupted, **common))
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_results.json", "all_results.json"):
        (interrupted / name).unlink()  # as if it had stopped after checkpoint-3
    resumed = run_training(train_config(tiny_model, alpaca_file, interrupted, **common))
    # the same steps, their losses summed in two groups instead of one (float32): ~1e-7 apart; without the
    # checkpoint's share, train_loss would be the mean of steps 4-6 alone, ~0.1 lower
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)


def test_data_seed_orders_the_rows_and_seed_the_rest():
    from tuneforge.options import TrainArgs
    from tuneforge.train.checkpoint import TrainerState
    from tuneforge.train.steps import RowSteps

    def order(**seeds) -> list[int]:
        source = RowSteps([{"id": i} for i in range(16)], TrainArgs(per_device_train_batch_size=4, **seeds),
                          collator=lambda batch: [row["id"] for row in batch], shuffle=True)
        steps = source.steps(TrainerState())
        return [i for _ in range(2 * source.steps_per_epoch) for micro in next(steps) for i in micro]  # 2 epochs

    assert order(seed=1, data_seed=7) == order(seed=2, data_seed=7) == order(seed=7)
    assert order(seed=1, data_seed=7) != order(seed=1)


def test_torch_profiler_writes_a_trace_of_the_active_step(tiny_model, alpaca_file, tmp_path):
    """enable_torch_profiler with LLaMA-Factory's schedule (wait 1, warm up 1, record 1): one Chrome trace, of the
    third step, holding the operators that ran in it."""
    out = tmp_path / "out"
    run_training(train_config(tiny_model, alpaca_file, out, max_steps=4, enable_torch_profiler=True,
                              profiler_with_stack=False))
    traces = list((out / "profiler" / "rank_0").glob("*.pt.trace.json"))
    assert len(traces) == 1, traces
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert "ProfilerStep#2" in names and not {"ProfilerStep#1", "ProfilerStep#3"} & names
    assert any(name.startswith("aten::mm") or name.startswith("aten::addmm") for name in names)


def test_torch_profiler_refuses_a_schedule_that_records_nothing(tiny_model, alpaca_file, tmp_path):
    from tuneforge.config import ConfigError, build_config, validate

    cfg = build_config(train_config(tiny_model, alpaca_file, tmp_path / "o", enable_torch_profiler=True,
                                    profiler_active_steps=0))
    with pytest.raises(ConfigError, match="`profiler_active_steps` counts steps: it must be >= 1; got 0"):
        validate(cfg, "train")


def test_effective_tokens_per_second(tiny_model, alpaca_file, tmp_path):
    """include_effective_tokens_per_second: train_results.json reports the run's trained non-padding tokens per
    second of train_runtime, as LLaMA-Factory does; one epoch trains every row's tokens once."""
    from transformers import AutoTokenizer

    from tuneforge.config import build_config
    from tuneforge.data import prepare_lm_data

    values = train_config(tiny_model, alpaca_file, tmp_path, max_steps=-1, num_train_epochs=1,
                          include_effective_tokens_per_second=True)
    results = run_training(values)
    rows = prepare_lm_data(build_config(values), AutoTokenizer.from_pretrained(tiny_model)).train
    tokens = sum(len(row["input_ids"]) for row in rows)
    # train_runtime is rounded to 0.01 s in the results (this run takes well under a second), the rate to 0.01
    rate, runtime = results["effective_tokens_per_sec"], results["train_runtime"]
    assert abs(rate * runtime - tokens) <= rate * 0.005 + 0.01 * runtime
    assert "effective_tokens_per_sec" not in run_training(train_config(tiny_model, alpaca_file, tmp_path / "off"))


@pytest.mark.parametrize("context", ["spawn", "fork"])
def test_worker_processes_collate_the_same_batches(tiny_model, alpaca_file, tmp_path, monkeypatch, context):
    """dataloader_num_workers with HF's worker options: the batches (so the weights) are those the training process
    collates itself, over an epoch boundary (6 steps an epoch)."""
    from torch.utils.data import DataLoader

    from tuneforge.train import steps

    common = dict(max_steps=8, lr_scheduler_type="constant")
    run_training(train_config(tiny_model, alpaca_file, tmp_path / "main", **common))
    made = []

    class Recorded(DataLoader):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(steps, "DataLoader", Recorded)
    run_training(train_config(tiny_model, alpaca_file, tmp_path / "workers", dataloader_num_workers=2,
                              dataloader_prefetch_factor=3, dataloader_multiprocessing_context=context, **common))
    assert len(made) == 2  # a loader an epoch, each with the options
    assert all((k["num_workers"], k["prefetch_factor"], k["multiprocessing_context"]) == (2, 3, context) for k in made)
    # the same rows, collated the same way, trained by the same process: bit-identical (measured 0.0)
    assert _max_diff(_weights(tmp_path / "main"), _weights(tmp_path / "workers")) == 0


def _cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


def _warm(factor):
    return lambda s: s / 2 if s < 2 else factor(s)  # linear warmup over the first 2 steps


# the rate factor after step s of T = 6 with 2 warmup steps, written from each schedule's definition (transformers'
# docstrings)
SCHEDULES = {
    "cosine_with_min_lr": ({"min_lr_rate": 0.1}, _warm(lambda s: 0.1 + 0.9 * _cosine((s - 2) / 4))),
    "cosine_with_restarts": ({"num_cycles": 2}, _warm(lambda s: _cosine((2 * (s - 2) / 4) % 1) if s < 6 else 0.0)),
    "polynomial": ({"power": 2, "lr_end": 1e-4},
                   _warm(lambda s: ((1e-3 - 1e-4) * (1 - (s - 2) / 4) ** 2 + 1e-4) / 1e-3)),
    # from min_lr_ratio up over 2 warmup steps, 2 stable (6 - 2 - 2), 2 cosine decay steps down to min_lr_ratio
    "warmup_stable_decay": ({"num_decay_steps": 2, "min_lr_ratio": 0.1},
                            lambda s: 0.1 + 0.9 * (s / 2 if s < 2 else 1.0 if s < 4 else _cosine((s - 4) / 2) if s < 6
                                                   else 0.0)),
    "inverse_sqrt": ({"timescale": 4}, _warm(lambda s: 1 / math.sqrt((s + 4 - 2) / 4))),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_hugging_face_schedules_and_their_arguments(tiny_model, alpaca_file, tmp_path, name):
    kwargs, factor = SCHEDULES[name]
    run_training(train_config(tiny_model, alpaca_file, tmp_path, max_steps=6, warmup_steps=2, learning_rate=1e-3,
                              lr_scheduler_type=name, lr_scheduler_kwargs=kwargs))
    # each line logs the rate its step used (before the scheduler's step), as transformers' Trainer does
    expected = [1e-3 * factor(s) for s in range(6)]
    assert [r["lr"] for r in read_log(tmp_path)] == pytest.approx(expected, rel=1e-9)  # float64 arithmetic


def test_schedule_arguments_are_checked_before_training(tmp_path):
    from conftest import gate_problems

    assert "`lr_scheduler_kwargs` {'num_cycle': 2} do not fit `lr_scheduler_type: cosine_with_restarts`: " \
           "get_cosine_with_hard_restarts_schedule_with_warmup() got an unexpected keyword argument 'num_cycle'" \
           in gate_problems(tmp_path, lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycle": 2})
    assert "One of min_lr or min_lr_rate should be set" in gate_problems(tmp_path,
                                                                       lr_scheduler_type="cosine_with_min_lr")
    assert "`lr_scheduler_type: constant` takes no lr_scheduler_kwargs" in gate_problems(
        tmp_path, lr_scheduler_type="constant", lr_scheduler_kwargs={"num_cycles": 2})
    assert "`lr_scheduler_type: reduce_lr_on_plateau` lowers the rate when an evaluation metric stops improving, " \
           "which is not built" in gate_problems(tmp_path, lr_scheduler_type="reduce_lr_on_plateau")
    assert "not JSON" in gate_problems(tmp_path, lr_scheduler_type="polynomial", lr_scheduler_kwargs="{power: 2")
