"""The web UI in a real browser (Debian's chromium, headless, driven by Playwright without a browser download): fill
the train form, start, watch the loss chart fill and the run finish, chat with the result, export it.

Screenshots go to the test's temporary folder, and also to $TUNEFORGE_SCREENSHOTS when set (docs/webui.md's
pictures come from `TUNEFORGE_SCREENSHOTS=docs/images/webui make test-browser`).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import alpaca_rows, write_jsonl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`make test` installs "
                                "it with apt-get when it runs as root; else `apt-get install chromium`)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def webui(tmp_path):
    """`tuneforge webui` as a user starts it, in a folder with a dataset registry."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "tiny.jsonl", alpaca_rows(24))
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.jsonl"}}))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "webui", "--port", str(port)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/api/meta", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise AssertionError(server.stdout.read().decode())
            time.sleep(0.3)
    yield url, tmp_path
    server.terminate()
    server.wait(timeout=30)


def shoot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    if os.environ.get("TUNEFORGE_SCREENSHOTS"):
        folder = Path(os.environ["TUNEFORGE_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / f"{name}.png", folder / f"{name}.png")


def test_train_watch_chat_export_in_a_browser(webui, tiny_model):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, folder = webui
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # root in CI: no sandbox
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        page.wait_for_selector("#train-dataset option[value=tiny]", state="attached")
        page.fill("#train-model_name_or_path", tiny_model)
        page.select_option("#train-template", "chatml")
        page.select_option("#train-dataset", "tiny")
        for key, value in {"cutoff_len": "64", "max_steps": "abc", "logging_steps": "1", "learning_rate": "1e-3",
                           "per_device_train_batch_size": "4", "save_steps": "1000", "output_dir": "saves/run1"}.items():
            page.fill(f"#train-{key}", value)
        page.click("#start")  # a bad value: the CLI's message appears next to its field, nothing starts
        page.wait_for_selector("#train-err-max_steps:has-text('expects int')")
        page.fill("#train-max_steps", "40")
        page.click("#preview")
        page.wait_for_selector("#preview-out mark", timeout=120_000)  # trained tokens are marked
        page.click("#start")
        page.wait_for_selector("#loss-chart circle.pt", timeout=120_000)
        page.wait_for_selector("#run-status:text-is('finished')", timeout=180_000)
        assert page.locator("#loss-chart circle.pt").count() == 40
        assert "step 40 / 40" in page.inner_text("#run-progress")
        shoot(page, folder, "train")

        page.click(".tab[data-tab=runs]")
        page.wait_for_selector("#runs-table tbody tr:has-text('run1'):has-text('finished')")
        shoot(page, folder, "runs")

        page.click(".tab[data-tab=chat]")
        page.fill("#chat-model_name_or_path", tiny_model)
        page.fill("#chat-adapter_name_or_path", "saves/run1")
        page.uncheck("#gen-do_sample")
        page.fill("#gen-max_new_tokens", "24")
        page.click("#chat-load")
        page.wait_for_selector("#chat-loaded:has-text('loaded')", timeout=120_000)
        page.fill("#chat-input", "What is 3 plus 4?")
        page.click("#chat-send")
        answer = page.wait_for_selector(".msg.assistant[data-done=true]", timeout=120_000)
        assert answer.inner_text().strip() and int(answer.get_attribute("data-chunks")) >= 1
        shoot(page, folder, "chat")

        page.click(".tab[data-tab=export]")
        page.fill("#export-model_name_or_path", tiny_model)
        page.fill("#export-adapter_name_or_path", "saves/run1")
        page.fill("#export-export_dir", "saves/run1-merged")
        page.click("#export-run")
        page.wait_for_selector("#export-result:has-text('exported to')", timeout=180_000)
        shoot(page, folder, "export")
        browser.close()
    assert (folder / "saves" / "run1-merged" / "model.safetensors").is_file()
