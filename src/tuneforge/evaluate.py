"""`tuneforge eval`: multiple-choice benchmarks in the MMLU / C-Eval / CMMLU layout, and before/after comparisons.

A question becomes a chat under the model's own template: the solved dev-split examples are earlier user/assistant
turns, the question is the last user turn, and the prediction is whichever option letter (A-D) gets the highest
next-token logit after the assistant header (as LLaMA-Factory's evaluator does), or with `scoring: option` whichever
option's text is the likeliest answer (`cloze`: the same, with the question asked bare, its options not listed). The task layout is documented in docs/evaluation.md.
"""

from __future__ import annotations

import csv
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import ConfigError
from .data.collate import left_pad
from .data.registry import DataError
from .data.templates import tokenize_pieces
from .models.adapters import check_adapter_paths

CHOICES = ("A", "B", "C", "D")
SPLIT_FOLDERS = {"dev": "dev", "val": "val", "validation": "val", "test": "test"}
HUB_TASKS = ("mmlu", "cmmlu", "ceval")  # names LLaMA-Factory fetches from the hub; here they need a local copy


def check(cfg) -> list[str]:
    """Problems with the evaluation options (config.validate adds them to the generic ones)."""
    e, out = cfg.evaluation, []
    if not e.task:
        out.append("`task` is required: a task folder and split under task_dir, e.g. `task: basics_test`")
    elif "_" not in e.task:
        out.append(f"`task` is <folder>_<split> (e.g. basics_test, mmlu_test, ceval_validation); got {e.task!r}")
    if e.n_shot < 0 or e.batch_size < 1:
        out.append(f"`n_shot` must be at least 0 and `batch_size` at least 1; got {e.n_shot} and {e.batch_size}")
    return out


@dataclass(frozen=True)
class Wording:
    """LLaMA-Factory's eval_template: a subject line before the first question, option lines, the answer cue."""

    system: str
    choice: str
    answer: str


WORDING = {
    "en": Wording("The following are multiple choice questions (with answers) about {subject}.\n\n",
                  "\n{choice}. {content}", "\nAnswer:"),
    "zh": Wording("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
                  "\n{choice}. {content}", "\n答案："),
}


@dataclass
class Subject:
    key: str  # the CSV file stem, e.g. high_school_physics
    name: str  # how the prompt names it
    category: str
    questions: list[dict]  # rows with question, A, B, C, D, answer
    dev: list[dict]  # where few-shot examples come from


# ---------------------------------------------------------------- task folders


def split_task(task: str) -> tuple[str, str]:
    """`mmlu_test` -> ("mmlu", "test"); the split is the part after the last underscore."""
    name, split = task.rsplit("_", 1)
    if split not in SPLIT_FOLDERS:
        raise ConfigError(f"task `{task}`: the split after the last underscore must be one of "
                          f"{', '.join(SPLIT_FOLDERS)}; got {split!r}")
    return name, split


def task_folder(task_dir: str, task: str) -> Path:
    name, _ = split_task(task)
    folder = Path(task_dir) / name
    if folder.is_dir():
        if not (folder / "mapping.json").is_file():
            raise DataError(f"{folder} has no mapping.json (subject -> {{\"name\", \"category\"}}); see "
                            "docs/evaluation.md for the task layout")
        zips = list(folder.glob("*.zip"))
        if zips and not any((folder / sub).is_dir() for sub in ("dev", "val", "test", "data")):
            raise DataError(f"{folder} holds {zips[0].name} but no split folders: unzip it in place "
                            f"(cd {folder} && unzip {zips[0].name})")
        return folder
    if name in HUB_TASKS:
        raise DataError(f"task `{task}`: no folder {folder}, and tuneforge does not download benchmarks: copy "
                        f"LLaMA-Factory's evaluation/{name} folder to {folder} (and unzip its {name}.zip inside it), "
                        f"or set task_dir to the folder that holds your copy of {name}/")
    found = sorted(p.parent.name for p in Path(task_dir).glob("*/mapping.json"))
    have = f"task folders in {task_dir}: {', '.join(found)}" if found else f"{task_dir} holds no task folders"
    raise DataError(f"task `{task}`: no folder {folder} ({have}); `task` is <folder>_<split> under `task_dir`")


def _csv_path(folder: Path, split: str, subject: str) -> Path | None:
    """The CSV of one subject and split: C-Eval names it <split>/<subject>_<split>.csv, CMMLU <split>/<subject>.csv,
    extracted MMLU data/<split>/<subject>_<split>.csv."""
    sub = SPLIT_FOLDERS[split]
    for path in (folder / sub / f"{subject}_{sub}.csv", folder / sub / f"{subject}.csv",
                 folder / "data" / sub / f"{subject}_{sub}.csv"):
        if path.is_file():
            return path
    return None


def read_questions(path: Path) -> list[dict]:
    """Rows of question, A, B, C, D, answer. With a header row (any column order, case ignored, other columns
    such as id or explanation skipped), or without one (MMLU's six columns in that order)."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle))
    wanted = ["question", *[c.lower() for c in CHOICES], "answer"]
    header = [cell.strip().lower() for cell in rows[0]] if rows else []
    if "question" in header and "answer" in header:
        missing = [name for name in wanted if name not in header]
        if missing:
            raise DataError(f"{path}: the header has no column {missing[0]!r}; expected question, A, B, C, D, answer")
        columns, first = [header.index(name) for name in wanted], 2
    else:
        columns, first = list(range(6)), 1
    questions = []
    for number, row in enumerate(rows[first - 1:], start=first):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(columns):
            raise DataError(f"{path} row {number}: {len(row)} columns; expected question, A, B, C, D, answer")
        record = dict(zip(["question", *CHOICES, "answer"], (row[i].strip() for i in columns)))
        if record["answer"].upper() not in CHOICES:
            raise DataError(f"{path} row {number}: answer {record['answer']!r} is not one of A, B, C, D (C-Eval's "
                            "test split hides its answers: evaluate its validation split instead)")
        record["answer"] = record["answer"].upper()
        questions.append(record)
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def load_task(task_dir: str, task: str, n_shot: int) -> list[Subject]:
    folder = task_folder(task_dir, task)
    _, split = split_task(task)
    try:
        mapping = json.loads((folder / "mapping.json").read_text(encoding="utf-8"))
        entries = [(key, value["name"], value["category"]) for key, value in mapping.items()]
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as err:
        raise DataError(f"{folder / 'mapping.json'}: expected {{\"subject\": {{\"name\": ..., \"category\": ...}}}} "
                        f"({type(err).__name__}: {err})") from None
    subjects = []
    for key, name, category in entries:
        path = _csv_path(folder, split, key)
        if path is None:
            raise DataError(f"{folder}: subject `{key}` (from mapping.json) has no {split} file, e.g. "
                            f"{folder / SPLIT_FOLDERS[split] / f'{key}_{SPLIT_FOLDERS[split]}.csv'}")
        dev_path = _csv_path(folder, "dev", key) if n_shot else None
        if n_shot and dev_path is None:
            raise DataError(f"{folder}: n_shot {n_shot} needs the dev split of `{key}` "
                            f"({folder / 'dev' / f'{key}_dev.csv'}); add it or set n_shot: 0")
        subjects.append(Subject(key, name, category, read_questions(path),
                                read_questions(dev_path) if dev_path else []))
    return subjects


# ---------------------------------------------------------------- prompts


def format_question(row: dict, wording: Wording) -> str:
    options = "".join(wording.choice.format(choice=c, content=row[c]) for c in CHOICES)
    return row["question"] + options + wording.answer


def build_messages(row: dict, shots: list[dict], subject_name: str, wording: Wording,
                   scoring: str = "letter") -> list[dict]:
    """Solved examples as earlier turns (answered by letter, or by the option's text with scoring: option or cloze),
    then the question; the subject line opens the first user message. With cloze, each question is asked bare: no
    subject line, no listed options (the options are only scored as answers)."""
    def ask(question_row: dict) -> str:  # cloze: the bare question, as a user would ask it in a chat
        return question_row["question"] if scoring == "cloze" else format_question(question_row, wording)

    messages = []
    for shot in shots:
        answer = shot["answer"] if scoring == "letter" else shot[shot["answer"]]
        messages += [{"role": "user", "content": ask(shot)}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": ask(row)})
    if scoring != "cloze":
        messages[0]["content"] = wording.system.format(subject=subject_name) + messages[0]["content"]
    return messages


def pick_shots(subject: Subject, n_shot: int, seed: int, index: int, split: str) -> list[dict]:
    """A seeded sample of dev examples for question `index`: the same for every run with the same seed, so a
    before/after comparison shows both models the same examples. A dev question is never its own example."""
    pool = [row for i, row in enumerate(subject.dev) if not (split == "dev" and i == index)]
    return random.Random(f"{seed}:{subject.key}:{index}").sample(pool, min(n_shot, len(pool)))


def question_ids(engine, subject: Subject, index: int, cfg, split: str) -> tuple[list[int], bool]:
    """Token ids of one question's prompt, and whether examples were dropped to fit cutoff_len."""
    e = cfg.evaluation
    shots = pick_shots(subject, e.n_shot, cfg.train.seed, index, split)
    for keep in range(len(shots), -1, -1):
        messages = build_messages(subject.questions[index], shots[:keep], subject.name, WORDING[e.lang], e.scoring)
        ids = engine.prompt_ids(messages)
        if len(ids) <= cfg.data.cutoff_len:
            return ids, keep < len(shots)
    return ids[len(ids) - cfg.data.cutoff_len:], True  # even alone it is too long: keep its end (options, cue)


def choice_token_ids(tokenizer) -> list[int]:
    """The token each option letter is when it opens the answer."""
    ids = [tokenizer.encode(letter, add_special_tokens=False)[-1] for letter in CHOICES]
    if len(set(ids)) != len(ids):
        raise DataError("the tokenizer maps two option letters (A-D) to the same token; it cannot be scored")
    return ids


def _padded_inputs(rows: list[list[int]], pad_id: int, device) -> dict:
    ids, mask, positions = left_pad(rows, pad_id)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


@torch.inference_mode()
def choice_logits(model, prompts: list[list[int]], choice_ids: list[int], pad_id: int, batch_size: int) -> torch.Tensor:
    """[questions, 4]: each option letter's next-token logit after each prompt. Prompts are left-padded, so only
    the last position's logits are computed."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        logits = model(**_padded_inputs(prompts[start: start + batch_size], pad_id, device), logits_to_keep=1).logits[:, -1]
        out.append(logits[:, choice_ids].float().cpu())
    return torch.cat(out)


def option_ids(engine, row: dict) -> list[list[int]]:
    """Each option's text as the template writes an assistant answer (with its end-of-turn text), as token ids."""
    tokenizer, out = engine.tokenizer, []
    for letter in CHOICES:
        chat = [{"role": "user", "content": "?"}, {"role": "assistant", "content": row[letter]}]
        out.append(tokenize_pieces(tokenizer, engine.template.pieces(tokenizer, chat, None)[-1:])[0])
    return out


@torch.inference_mode()
def option_scores(model, prompts: list[list[int]], options: list[list[list[int]]], pad_id: int,
                  batch_size: int) -> torch.Tensor:
    """[questions, 4]: the log-probability of each option's tokens after its question's prompt (their sum, like
    lm-evaluation-harness's `acc`). Rows are left-padded as in choice_logits; only the positions that predict option
    tokens get logits."""
    device = next(model.parameters()).device
    rows = [(prompt, answer) for prompt, answers in zip(prompts, options) for answer in answers]
    out = []
    for start in range(0, len(rows), batch_size * len(CHOICES)):
        chunk = rows[start: start + batch_size * len(CHOICES)]
        keep = max(len(a) for _, a in chunk) + 1
        inputs = _padded_inputs([prompt + answer for prompt, answer in chunk], pad_id, device)
        logits = model(**inputs, logits_to_keep=keep).logits.float().log_softmax(-1).cpu()
        for i, (_, answer) in enumerate(chunk):  # the last `keep` positions: the last one predicts nothing
            predicted = logits[i, keep - len(answer) - 1: keep - 1]
            out.append(predicted.gather(-1, torch.tensor(answer)[:, None]).sum())
    return torch.stack(out).view(-1, len(CHOICES))


# ---------------------------------------------------------------- scores


def _accuracy(correct: list[bool]) -> dict:
    return {"accuracy": 100 * sum(correct) / len(correct), "count": len(correct)}


def score(subjects: list[Subject], predictions: list[list[str]]) -> dict:
    """Overall, per-category and per-subject accuracy (percent), with each subject's predictions."""
    per_subject, per_category, everything = {}, {}, []
    for subject, letters in zip(subjects, predictions):
        correct = [p == q["answer"] for p, q in zip(letters, subject.questions)]
        per_subject[subject.key] = {"name": subject.name, "category": subject.category, **_accuracy(correct),
                                    "predictions": "".join(letters)}
        per_category.setdefault(subject.category, []).extend(correct)
        everything += correct
    return {**_accuracy(everything), "categories": {c: _accuracy(v) for c, v in per_category.items()},
            "subjects": per_subject}


def subject_scores(engine, subject: Subject, cfg, split: str) -> tuple[torch.Tensor, int]:
    """[questions, 4] option scores (higher: more likely the answer) and how many prompts lost examples to fit."""
    e, pad = cfg.evaluation, engine.tokenizer.pad_token_id
    prompts = [question_ids(engine, subject, index, cfg, split) for index in range(len(subject.questions))]
    cut = sum(was_cut for _, was_cut in prompts)
    prompts = [ids for ids, _ in prompts]
    if e.scoring in ("option", "cloze"):
        options = [option_ids(engine, row) for row in subject.questions]
        return option_scores(engine.model, prompts, options, pad, e.batch_size), cut
    return choice_logits(engine.model, prompts, choice_token_ids(engine.tokenizer), pad, e.batch_size), cut


def evaluate(cfg, engine, subjects: list[Subject]) -> dict:
    """Score every question of the task with the engine's model; returns the results dict (see score)."""
    e = cfg.evaluation
    started = time.perf_counter()
    _, split = split_task(e.task)
    predictions, cut = [], 0
    for subject in tqdm(subjects, desc="eval", unit="subject"):
        scores, subject_cut = subject_scores(engine, subject, cfg, split)
        predictions.append([CHOICES[i] for i in scores.argmax(-1).tolist()])
        cut += subject_cut
    results = score(subjects, predictions)
    results.update(task=e.task, model=cfg.model.model_name_or_path, adapter=cfg.model.adapter_name_or_path,
                   template=cfg.data.template, n_shot=e.n_shot, lang=e.lang, scoring=e.scoring, seed=cfg.train.seed,
                   shots_cut_to_fit=cut, seconds=round(time.perf_counter() - started, 1))
    return results


# ---------------------------------------------------------------- reports


def _rows(results: dict) -> list[tuple[str, dict]]:
    rows = [("Average", results)]
    rows += [(f"  {name}", value) for name, value in results["categories"].items()]
    rows += [(f"    {key}", value) for key, value in results["subjects"].items()]
    return rows


def format_table(results: dict) -> str:
    lines = [f"{results['task']}, {results['n_shot']}-shot, {results['lang']}, by {results['scoring']}: "
             f"{results['model']}"
             + (f" + {results['adapter']}" if results["adapter"] else ""), f"{'':<32}{'accuracy':>10}{'questions':>11}"]
    lines += [f"{label:<32}{value['accuracy']:>10.2f}{value['count']:>11}" for label, value in _rows(results)]
    if results["shots_cut_to_fit"]:
        lines.append(f"note: {results['shots_cut_to_fit']} questions had fewer examples to fit cutoff_len")
    return "\n".join(lines)


def comparison(before: dict, after: dict) -> dict:
    """After minus before, in accuracy points, overall, per category and per subject."""
    def diff(a, b):
        return round(b["accuracy"] - a["accuracy"], 4)

    return {"accuracy": diff(before, after),
            "categories": {c: diff(v, after["categories"][c]) for c, v in before["categories"].items()},
            "subjects": {s: diff(v, after["subjects"][s]) for s, v in before["subjects"].items()}}


def format_comparison(before: dict, after: dict) -> str:
    lines = [f"{'':<32}{'before':>10}{'after':>10}{'change':>10}"]
    for (label, a), (_, b) in zip(_rows(before), _rows(after)):
        lines.append(f"{label:<32}{a['accuracy']:>10.2f}{b['accuracy']:>10.2f}{b['accuracy'] - a['accuracy']:>+10.2f}")
    return "\n".join(lines)


def _guard_save_dir(save_dir: str | None) -> None:
    if save_dir and Path(save_dir).exists():
        raise ConfigError(f"save_dir {save_dir} already exists; results are never overwritten: choose a new "
                          "save_dir or remove that folder")


def _save(folder: Path, results: dict, table: str) -> None:
    folder.mkdir(parents=True, exist_ok=False)
    (folder / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "results.log").write_text(table + "\n", encoding="utf-8")


def _run_one(cfg, subjects: list[Subject]) -> dict:
    from .infer.engine import Engine

    return evaluate(cfg, Engine(cfg), subjects)


def _load(cfg) -> list[Subject]:
    """The task's questions, read (and checked) before any model is loaded."""
    e = cfg.evaluation
    return load_task(e.task_dir, e.task, e.n_shot)


def run_eval(cfg) -> dict:
    """`tuneforge eval CONFIG`: score, print the table, save it to save_dir (when set)."""
    _guard_save_dir(cfg.evaluation.save_dir)
    results = _run_one(cfg, _load(cfg))
    table = format_table(results)
    print(table)
    if cfg.evaluation.save_dir:
        _save(Path(cfg.evaluation.save_dir), results, table)
        print(f"[tuneforge] results in {cfg.evaluation.save_dir}")
    return results


def run_comparison(before_cfg, after_cfg) -> dict:
    """`tuneforge eval CONFIG --compare key=value ...`: both runs, then the change per category and subject.
    Results go to save_dir (from the first config) as before/, after/ and comparison.json."""
    for key in ("task", "task_dir", "n_shot", "lang", "scoring"):
        if getattr(before_cfg.evaluation, key) != getattr(after_cfg.evaluation, key):
            raise ConfigError(f"--compare changes `{key}`; both runs must answer the same questions the same way "
                              "(compare a model, an adapter or a template instead)")
    save_dir = before_cfg.evaluation.save_dir
    if after_cfg.evaluation.save_dir != save_dir:
        raise ConfigError("--compare changes `save_dir`; give it before --compare (it holds both runs: before/, "
                          "after/ and comparison.json)")
    _guard_save_dir(save_dir)
    for cfg in (before_cfg, after_cfg):  # a wrong path should not surface only after the first run
        check_adapter_paths(cfg.model.adapter_name_or_path)
    subjects, runs = _load(before_cfg), []
    for label, cfg in (("before", before_cfg), ("after", after_cfg)):
        runs.append(_run_one(cfg, subjects))
        print(f"{label}: {format_table(runs[-1])}\n")
    table = format_comparison(*runs)
    print(table)
    change = {"before": runs[0], "after": runs[1], "change": comparison(*runs)}
    if save_dir:
        for label, results in zip(("before", "after"), runs):
            _save(Path(save_dir) / label, results, format_table(results))
        (Path(save_dir) / "comparison.json").write_text(json.dumps(change, indent=2, ensure_ascii=False) + "\n",
                                                        encoding="utf-8")
        (Path(save_dir) / "comparison.log").write_text(table + "\n", encoding="utf-8")
        print(f"[tuneforge] results in {save_dir}")
    return change
