"""`tuneforge webui`: a small FastAPI app and one plain HTML/JS page (no CDN, no build step; the machines it runs on
may be offline). Training and export run as `tuneforge` subprocesses; chat loads the model in this process.

Why not Gradio: FastAPI and uvicorn are already tuneforge's API server, so the UI adds no dependency, and a page
that polls a JSON endpoint keeps working on a busy 2-core laptop where a long-lived websocket session can stall.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from fastapi import APIRouter, Body, FastAPI, HTTPException
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from ..config import build_config
from . import forms
from .runs import Runs

STATIC = Path(__file__).parent / "static"
EXAMPLES = Path("examples")  # the recipes the train form can start from, relative to where the UI runs


class ChatSession:
    """One loaded model (+ adapter) for the chat tab; one answer at a time, as on a laptop there is one CPU."""

    def __init__(self):
        self.engine = None
        self.lock = threading.Lock()

    def load(self, values: dict) -> str:
        from ..infer.engine import Engine

        with self.lock:
            self.engine = None  # free the old model before loading the next
            self.engine = Engine(build_config(values, source="chat form"))
        return self.engine.template.name

    def stream(self, messages: list[dict], system: str | None, settings: dict):
        if self.engine is None:
            raise HTTPException(400, "load a model first")
        generate = copy.copy(self.engine.cfg.generate)
        for key, value in settings.items():
            setattr(generate, key, value)

        def pieces():
            with self.lock:
                saved, self.engine.cfg.generate = self.engine.cfg.generate, generate
                try:
                    yield from self.engine.stream(messages, system)
                finally:
                    self.engine.cfg.generate = saved

        return pieces()


def _run_command(command: str, config_yaml: str, *flags: str) -> dict:
    """`tuneforge COMMAND` on a form's YAML, as a subprocess; `{tmp}` in a flag is a scratch folder."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{command}.yaml"
        path.write_text(config_yaml, encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "tuneforge.cli", command, str(path),
                               *(f.format(tmp=tmp) for f in flags)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
    return {"ok": done.returncode == 0, "output": done.stdout, "error": done.stderr.strip()[-2000:]}


def _checked_or_400(form: dict, keys: tuple[str, ...], command: str) -> forms.Checked:
    checked = forms.check(form, keys, command)
    if not checked.ok:
        raise HTTPException(400, {"errors": checked.errors, "general": checked.general})
    return checked


def create_app(output_root: Path) -> FastAPI:
    runs = Runs(output_root)
    app = FastAPI(title="tuneforge webui", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.router.on_shutdown.append(runs.shutdown)
    for routes in (_form_routes(output_root), _run_routes(runs), _chat_routes(ChatSession())):
        app.include_router(routes)

    @app.exception_handler(HTTPException)
    async def http_error(_, err: HTTPException):
        detail = err.detail if isinstance(err.detail, dict) else {"errors": {}, "general": [str(err.detail)]}
        return JSONResponse(detail, status_code=err.status_code)

    return app


def _form_routes(output_root: Path) -> APIRouter:
    """The page, the forms' descriptions and checks, the data preview and export."""
    router = APIRouter()

    @router.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @router.get("/api/meta")
    def meta():
        from ..models.load import BUNDLED, BUNDLED_FOLDERS

        recipes = sorted(p.stem for p in EXAMPLES.glob("*.yaml")) if EXAMPLES.is_dir() else []
        return {"train": forms.describe(forms.TRAIN_KEYS), "chat": forms.describe(forms.CHAT_KEYS),
                "generate": forms.describe(forms.GENERATE_KEYS), "export": forms.describe(forms.EXPORT_KEYS),
                "aliases": [*BUNDLED, *BUNDLED_FOLDERS], "recipes": recipes, "output_root": str(output_root)}

    @router.get("/api/recipe/{name}")
    def recipe(name: str):
        path = EXAMPLES / f"{name}.yaml"
        if "/" in name or not path.is_file():
            raise HTTPException(404, f"no recipe {name} in {EXAMPLES}/")
        return forms.recipe_values(path)

    @router.get("/api/datasets")
    def datasets(dataset_dir: str = "data"):
        import json

        info = Path(dataset_dir) / "dataset_info.json"
        if not info.is_file():
            raise HTTPException(400, f"dataset_dir {dataset_dir} has no dataset_info.json")
        try:
            return sorted(json.loads(info.read_text(encoding="utf-8")))
        except json.JSONDecodeError as err:
            raise HTTPException(400, f"{info} line {err.lineno}: not valid JSON: {err.msg}") from None

    @router.post("/api/check/{form}")
    def check(form: str, values: dict = Body(...)):
        keys, command = {"train": (forms.TRAIN_KEYS, "train"), "chat": (forms.CHAT_KEYS, "chat"),
                         "export": (forms.EXPORT_KEYS, "export")}[form]
        checked = forms.check(values, keys, command)
        return {"yaml": checked.yaml, "errors": checked.errors, "general": checked.general}

    @router.post("/api/preview")
    def preview(values: dict = Body(...)):
        """The `tuneforge data` view of the form's dataset: counts, lengths and examples with trained tokens."""
        checked = _checked_or_400(values, forms.TRAIN_KEYS, "train")
        return _run_command("data", checked.yaml, "--show", "3", "--plot", "{tmp}/lengths.png")

    @router.post("/api/export")
    def export(values: dict = Body(...)):
        """Runs `tuneforge export` and reports where the result is and how big."""
        checked = _checked_or_400(values, forms.EXPORT_KEYS, "export")
        done = _run_command("export", checked.yaml)
        folder = Path(checked.values["export_dir"])
        files = [p for p in folder.rglob("*") if p.is_file()] if done["ok"] else []
        return {**done, "path": str(folder.resolve()), "files": sorted(str(p.relative_to(folder)) for p in files),
                "size_mb": round(sum(p.stat().st_size for p in files) / 2**20, 1)}

    return router


def _run_routes(runs: Runs) -> APIRouter:
    """Training runs: start, list, watch, stop and resume."""
    router = APIRouter()

    @router.post("/api/runs")
    def start(values: dict = Body(...)):
        checked = _checked_or_400(values, forms.TRAIN_KEYS, "train")
        try:
            run = runs.start(Path(checked.values["output_dir"]).resolve(), checked.yaml)
        except RuntimeError as err:
            raise HTTPException(409, str(err)) from None
        return run.summary()

    @router.get("/api/runs")
    def list_runs():
        return runs.all()

    @router.get("/api/runs/{name}")
    def run_detail(name: str):
        run = runs.find(name)
        if run is None:
            raise HTTPException(404, f"no run {name}")
        config = run.side / "config.yaml"
        return {**run.summary(), "records": run.records(), "console": run.console_tail(),
                "yaml": config.read_text(encoding="utf-8") if config.is_file() else None}

    @router.get("/api/runs/{name}/plot")
    def plot(name: str):
        run = runs.find(name)
        if run is None or not (run.output_dir / "training_loss.png").is_file():
            raise HTTPException(404, f"run {name} has no loss plot")
        return FileResponse(run.output_dir / "training_loss.png")

    @router.post("/api/runs/{name}/{action}")
    def control(name: str, action: str):
        if action not in ("stop", "resume"):
            raise HTTPException(404, f"no action {action}")
        try:
            return (runs.stop(name) if action == "stop" else runs.resume(name)).summary()
        except RuntimeError as err:
            raise HTTPException(409, str(err)) from None

    return router


def _chat_routes(chat: ChatSession) -> APIRouter:
    """The chat tab: load a model, stream answers."""
    router = APIRouter()

    @router.post("/api/chat/load")
    def chat_load(values: dict = Body(...)):
        checked = _checked_or_400(values, forms.CHAT_KEYS, "chat")
        try:
            return {"template": chat.load(checked.values)}
        except (OSError, ValueError) as err:  # missing files; ConfigError, ModelError and DataError are ValueErrors
            raise HTTPException(400, {"errors": {}, "general": [str(err)]}) from None

    @router.post("/api/chat")
    def chat_answer(body: dict = Body(...)):
        settings = forms.check(body.get("settings") or {}, forms.GENERATE_KEYS, "chat")
        if settings.errors:
            raise HTTPException(400, {"errors": settings.errors, "general": []})
        from ..config import GenerateArgs

        fields = {f.name for f in dataclasses.fields(GenerateArgs)}
        values = {k: v for k, v in settings.values.items() if k in fields}
        return StreamingResponse(chat.stream(body.get("messages") or [], body.get("system") or None, values),
                                 media_type="text/plain; charset=utf-8")

    return router


def serve(host: str, port: int, output_root: str) -> None:
    import uvicorn

    root = Path(output_root)
    print(f"[tuneforge] web UI at http://{host}:{port} (runs under {root.resolve()}); Ctrl+C stops it and its runs",
          flush=True)
    uvicorn.run(create_app(root), host=host, port=port, log_level="warning")

