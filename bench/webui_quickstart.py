"""The quickstart as a user does it in the browser, on the real bundled model: `tuneforge webui`, load the
quickstart recipe, start, wait for the run, chat with the result, export it with a q8_0 GGUF. No YAML is touched.

    .venv/bin/python bench/webui_quickstart.py [--out /tmp/webui-quickstart]

Needs Debian's chromium (`make browser`). Prints the run's last progress line, the chat answer, the export result
and the wall time of each part; screenshots go to --out.
"""

import argparse
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/webui-quickstart")
    parser.add_argument("--port", type=int, default=7871)
    args = parser.parse_args()
    out, port = Path(args.out), args.port
    server = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "webui", "--port", str(port), "--output_root",
                               str(out / "saves")])
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/api/meta")
            break
        except OSError:
            time.sleep(0.5)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url)
            page.wait_for_selector("#recipe option[value=quickstart]", state="attached")
            page.select_option("#recipe", "quickstart")
            page.click("#load-recipe")
            page.wait_for_function("document.getElementById('train-model_name_or_path').value != ''")
            page.fill("#train-output_dir", str(out / "saves" / "quickstart"))
            start = time.time()
            page.click("#start")
            page.wait_for_selector("#run-status:text-is('finished')", timeout=3_600_000)
            print(f"train: {time.time() - start:.0f} s; {page.inner_text('#run-progress')}", flush=True)
            page.screenshot(path=str(out / "train.png"), full_page=True)

            page.click(".tab[data-tab=chat]")
            page.fill("#chat-model_name_or_path", "smollm2-135m-instruct")
            page.fill("#chat-adapter_name_or_path", str(out / "saves" / "quickstart"))
            page.uncheck("#gen-do_sample")
            page.fill("#gen-max_new_tokens", "48")
            page.click("#chat-load")
            page.wait_for_selector("#chat-loaded:has-text('loaded')", timeout=600_000)
            page.fill("#chat-input", "Who are you?")
            start = time.time()
            page.click("#chat-send")
            answer = page.wait_for_selector(".msg.assistant[data-done=true]", timeout=600_000)
            print(f"chat: {time.time() - start:.1f} s, {answer.get_attribute('data-chunks')} streamed pieces: "
                  f"{answer.inner_text()}", flush=True)
            page.screenshot(path=str(out / "chat.png"), full_page=True)

            page.click(".tab[data-tab=export]")
            page.fill("#export-model_name_or_path", "smollm2-135m-instruct")
            page.fill("#export-adapter_name_or_path", str(out / "saves" / "quickstart"))
            page.fill("#export-export_dir", str(out / "saves" / "merged"))
            page.select_option("#export-export_gguf", "q8_0")
            start = time.time()
            page.click("#export-run")
            page.wait_for_selector("#export-result:has-text('exported to'), #export-result:has-text('failed')",
                                   timeout=900_000)
            print(f"export: {time.time() - start:.0f} s; {page.inner_text('#export-result')}", flush=True)
            page.screenshot(path=str(out / "export.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
