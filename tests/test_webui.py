"""The web UI's server side: a form becomes the config the CLI would run, bad input gets the CLI's messages next to
the field, and a run started from the UI is a real `tuneforge train` process whose progress the UI reads."""

import json
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from conftest import alpaca_rows, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def test_a_recipe_through_the_form_is_the_config_the_cli_runs():
    from tuneforge.config import flat_config, load_config
    from tuneforge.webui import forms

    recipe = ROOT / "examples" / "quickstart.yaml"
    form = forms.recipe_values(recipe)
    checked = forms.check(form, forms.TRAIN_KEYS, "train")
    assert checked.ok, (checked.errors, checked.general)
    from tuneforge.config import build_config

    assert flat_config(build_config(yaml.safe_load(checked.yaml))) == flat_config(load_config(str(recipe)))


def test_form_values_at_their_defaults_stay_out_of_the_yaml():
    from tuneforge.webui import forms

    checked = forms.check({"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "stage": "sft",
                           "learning_rate": "5e-05", "bf16": False, "lora_rank": "16"}, forms.TRAIN_KEYS, "train")
    # do_train is always written: the config's default is false (LLaMA-Factory's), the form's is true
    assert checked.values == {"model_name_or_path": "m", "do_train": True, "dataset": "d", "output_dir": "o",
                              "lora_rank": 16}


def test_bad_input_gets_the_cli_message_next_to_its_field(tmp_path):
    from tuneforge.config import ConfigError, load_config
    from tuneforge.webui import forms

    form = {"model_name_or_path": "m", "dataset": "d", "output_dir": "o", "stage": "dpo", "packing": True,
            "learning_rate": "fast", "extra": "pref_loss: foo"}
    checked = forms.check(form, forms.TRAIN_KEYS, "train")
    assert checked.errors["learning_rate"] == "`learning_rate` expects float, got 'fast'"
    # the same config through the CLI's gate: each message the form shows is one the CLI gives
    path = tmp_path / "c.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\nstage: dpo\npacking: true\npref_loss: foo\n")
    with pytest.raises(ConfigError) as cli:
        load_config(str(path))
    assert checked.errors["packing"] in str(cli.value) and checked.general[0] in str(cli.value)
    assert forms.check({**form, "extra": "lora_rnk: 3"}, forms.TRAIN_KEYS, "train").errors["extra"] == \
        "unknown key `lora_rnk`; did you mean lora_rank?"
    missing = forms.check({"dataset": "d"}, forms.TRAIN_KEYS, "train").errors
    assert set(missing) >= {"model_name_or_path", "output_dir"}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder as a user's: data/ with a dataset_info.json registry; runs go to saves/."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "tiny.jsonl", alpaca_rows(16))
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.jsonl"}}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def wait_for(predicate, seconds: float = 120.0):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("timed out")


def test_a_run_started_from_the_ui_trains_and_reports(tiny_model, workdir):
    from tuneforge.webui import create_app

    client = TestClient(create_app(workdir / "saves"))
    assert client.get("/api/datasets", params={"dataset_dir": "data"}).json() == ["tiny"]
    form = {"model_name_or_path": tiny_model, "template": "chatml", "dataset": "tiny", "cutoff_len": "64",
            "max_steps": "6", "logging_steps": "1", "save_steps": "1000", "learning_rate": "1e-3",
            "per_device_train_batch_size": "4", "output_dir": "saves/run1"}
    bad = client.post("/api/runs", json={**form, "max_steps": "six"})
    assert bad.status_code == 400 and bad.json()["errors"] == {"max_steps": "`max_steps` expects int, got 'six'"}
    assert client.post("/api/runs", json=form).status_code == 200
    detail = wait_for(lambda: (d := client.get("/api/runs/run1").json())["status"] != "running" and d)
    assert detail["status"] == "finished", detail["console"]
    assert [r["current_steps"] for r in detail["records"] if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert yaml.safe_load(detail["yaml"])["max_steps"] == 6
    assert not list((workdir / "saves" / "run1").glob("*.webui")), "the UI's own files stay out of output_dir"
    assert [r["name"] for r in client.get("/api/runs").json()] == ["run1"]
    clash = client.post("/api/runs", json={**form, "output_dir": "elsewhere/run1"})  # would hide saves/run1
    assert clash.status_code == 409 and "already has a run named run1" in clash.json()["general"][0]
    assert not (workdir / "elsewhere").exists()
    assert client.get("/api/runs").json()[0]["output_dir"] == str((workdir / "saves" / "run1").resolve())
    again = client.post("/api/runs/run1/resume")
    assert again.status_code == 200  # a finished run: train refuses to overwrite it, the UI shows why
    detail = wait_for(lambda: (d := client.get("/api/runs/run1").json())["status"] != "running" and d)
    assert any("already holds a trained model" in line for line in detail["console"])


def test_chat_streams_an_answer_and_export_reports_its_result(tiny_model, workdir):
    from tuneforge.webui import create_app

    client = TestClient(create_app(workdir / "saves"))
    assert client.post("/api/chat", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 400
    loaded = client.post("/api/chat/load", json={"model_name_or_path": tiny_model, "template": "chatml"})
    assert loaded.json() == {"template": "chatml"}
    settings = {"do_sample": False, "max_new_tokens": "8"}
    with client.stream("POST", "/api/chat", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "settings": settings}) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    from tuneforge.config import build_config
    from tuneforge.infer.engine import Engine

    engine = Engine(build_config({"model_name_or_path": tiny_model, "template": "chatml", "do_sample": False,
                                  "max_new_tokens": 8}))
    assert text.strip() == engine.chat([{"role": "user", "content": "hi"}])  # the CLI's answer, streamed
    bad = client.post("/api/chat", json={"messages": [], "settings": {"temperature": "hot"}})
    assert bad.status_code == 400 and "temperature" in bad.json()["errors"]
    result = client.post("/api/export", json={"model_name_or_path": tiny_model, "template": "chatml",
                                              "export_dir": "merged"}).json()
    assert result["ok"], result["error"]
    assert "model.safetensors" in result["files"] and result["size_mb"] > 0


def test_stop_saves_a_checkpoint_and_resume_finishes_the_run(tiny_model, workdir):
    from tuneforge.webui import create_app

    client = TestClient(create_app(workdir / "saves"))
    form = {"model_name_or_path": tiny_model, "template": "chatml", "dataset": "tiny", "cutoff_len": "64",
            "max_steps": "200", "logging_steps": "1", "save_steps": "1000", "output_dir": "saves/long"}
    assert client.post("/api/runs", json=form).status_code == 200
    wait_for(lambda: len(client.get("/api/runs/long").json()["records"]) >= 3)
    assert client.post("/api/runs/long/stop").status_code == 200
    stopped = wait_for(lambda: (d := client.get("/api/runs/long").json())["status"] != "running" and d)
    assert stopped["status"] == "stopped" and stopped["returncode"] == 75, stopped["console"]  # 75: preempted, saved
    step = stopped["step"]
    assert (workdir / "saves" / "long" / f"checkpoint-{step}").is_dir() and step < 200
    assert client.post("/api/runs/long/resume").status_code == 200
    done = wait_for(lambda: (d := client.get("/api/runs/long").json())["status"] != "running" and d, seconds=300)
    assert done["status"] == "finished", done["console"]
    assert [r["current_steps"] for r in done["records"] if "loss" in r] == list(range(1, 201))
