"""Command line: subcommands -> functions. `tuneforge --help` lists them."""

from __future__ import annotations

import argparse
import sys
import warnings

from .config import ConfigError, all_keys, load_config, notices

COMMANDS = {
    "train": "fine-tune a model: tuneforge train CONFIG.yaml [key=value ...]",
    "chat": "talk to a model (+ adapter): tuneforge chat [CONFIG.yaml] [key=value ...] [--query TEXT]",
    "data": "check and preview a dataset without training: tuneforge data CONFIG.yaml [key=value ...] [--show N]",
    "predict": "label texts or images with a trained classifier: tuneforge predict [CONFIG.yaml] [key=value ...] "
               "(--text TEXT ... | --file FILE) [--out FILE]",
    "export": "merge adapters into the model (Hugging Face folder; export_gguf: also GGUF + Ollama Modelfile): "
              "tuneforge export CONFIG.yaml [key=value ...]",
    "api": "serve the model (+ adapter) over an OpenAI-compatible HTTP API (API_HOST, API_PORT, API_KEY, "
           "API_MODEL_NAME): tuneforge api [CONFIG.yaml] [key=value ...]",
    "webui": "the browser UI: train, watch, chat and export without a YAML: tuneforge webui [--host 127.0.0.1] "
             "[--port 7860] [--output_root saves]",
    "eval": "score a model (+ adapter) on a multiple-choice benchmark: tuneforge eval CONFIG.yaml [key=value ...] "
            "[--compare key=value ...]",
}


def _keys_help() -> str:
    lines = ["keys (LLaMA-Factory names; give them in the YAML or as key=value):"]
    for group, keys in all_keys().items():
        lines.append(f"\n  {group}:")
        lines += [f"    {name:<32} {kind:<14} default: {default}" for name, kind, default in keys]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune pretrained models with one command "
                                     "and one flat YAML file.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, epilog=_keys_help(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("args", nargs="*", help="a CONFIG file (.yaml/.yml/.json) and/or key=value overrides")
        if name == "chat":
            p.add_argument("--query", help="answer this one message and exit (for scripts)")
            p.add_argument("--system", help="a system prompt")
        if name == "data":
            p.add_argument("--show", type=int, default=3, help="how many decoded examples to print")
            p.add_argument("--plot", default="token_lengths.png", help="where to write the length histogram")
        if name == "predict":
            p.add_argument("--text", action="append", default=[], help="a text (or image path) to label; repeatable")
            p.add_argument("--file", help="a .txt (one input per line), CSV/TSV/JSON/JSONL/Parquet with a text or "
                                          "image column (and optionally labels, to report accuracy)")
            p.add_argument("--out", help="write JSON lines here instead of printing them")
        if name == "webui":
            p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine "
                           "only; 0.0.0.0 opens the UI, and training on this machine, to the network)")
            p.add_argument("--port", type=int, default=7860)
            p.add_argument("--output_root", default="saves", help="the folder whose runs the UI lists")
        if name == "eval":
            p.add_argument("--compare", nargs="+", metavar="KEY=VALUE", help="also score the config with these "
                           "keys changed (e.g. adapter_name_or_path=saves/quickstart) and print the change")
    return parser


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _load(path, overrides, validate_for):
    cfg = load_config(path, overrides, validate_for=validate_for)
    for line in notices(cfg):
        print(f"tuneforge: {line}", file=sys.stderr)
    return cfg


def _quiet_library_bars() -> None:
    """transformers draws a bar for every load and save of weights (a fraction of a second each) around ours; our
    own bar and messages say what takes time. Hub downloads keep their bars: those can take minutes."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # this also turns off the hub's bars ...
    enable_progress_bars()  # ... which downloads still need


def main(argv: list[str] | None = None) -> int:
    from .data.registry import DataError
    from .models.load import ModelError

    # PEFT still calls a transformers method that transformers 5 deprecated; the notice is not the user's concern.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser = _parser()
    ns = parser.parse_args(argv)
    if not ns.command:
        parser.print_help()
        return 0
    path, overrides = _split_args(ns.args)
    _quiet_library_bars()
    try:
        if ns.command == "train":
            from .train import run_stage

            run_stage(_load(path, overrides, "train"))
        elif ns.command == "data":
            from .data.preview import preview

            cfg = _load(path, overrides, "chat")
            if not cfg.data.dataset:
                raise ConfigError("`dataset` is required: the data to check")
            preview(cfg, ns.show, ns.plot)
        elif ns.command == "predict":
            from .infer.classify import run_predict

            if not ns.text and not ns.file:
                raise ConfigError("predict needs --text TEXT or --file FILE")
            run_predict(_load(path, overrides, "chat"), ns.text, ns.file, ns.out)
        elif ns.command == "export":
            from .export import run_export

            run_export(_load(path, overrides, "export"))
        elif ns.command == "api":
            from .infer.api import serve

            serve(_load(path, overrides, "chat"))
        elif ns.command == "webui":
            from .webui import serve as serve_webui

            serve_webui(ns.host, ns.port, ns.output_root)
        elif ns.command == "eval":
            from .evaluate import run_comparison, run_eval

            cfg = _load(path, overrides, "eval")
            if ns.compare:
                run_comparison(cfg, _load(path, overrides + ns.compare, "eval"))
            else:
                run_eval(cfg)
        elif ns.command == "chat":
            from .infer.chat import one_shot, repl

            cfg = _load(path, overrides, "chat")
            if ns.query is not None:
                print(one_shot(cfg, ns.query, ns.system))
            else:
                repl(cfg, ns.system)
    except (ConfigError, DataError, ModelError, FileExistsError, FileNotFoundError) as err:
        print(f"tuneforge: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
