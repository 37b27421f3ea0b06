"""Command line: subcommands -> functions. `tuneforge --help` lists them."""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import textwrap
import warnings

from . import __version__
from .cmdline import split_command_line
from .config import ConfigError, all_keys, load_config, notices
from .train.faults import TrainingStopped


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
    "expand": "LLaMA Pro block expansion (LLaMA-Factory's scripts/llama_pro.py): tuneforge expand [CONFIG.yaml] "
              "model_name_or_path=MODEL --num_expand N --out FOLDER",
}


PRECEDENCE = ("Config keys come from an optional CONFIG file (.yaml/.yml/.json) and the command line, in any order "
              "and in any of LLaMA-Factory's forms: key=value, --key value, --key=value, and bare --flag for a "
              "true boolean. The file is read first, then the command line's keys override it; when a key is "
              "given twice on the command line, the later one wins.")


def _keys_help() -> str:
    lines = ["keys (LLaMA-Factory names; give them in the YAML, as key=value or as --key value):"]
    for group, keys in all_keys().items():
        lines.append(f"\n  {group}:")
        lines += [f"    {name:<32} {kind:<14} default: {default}" for name, kind, default in keys]
    return "\n".join(lines)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, dict[str, argparse.Action]]]:
    """The parser and, per command, its own flags (everything else on a command line is a config key)."""
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune pretrained models with one command "
                                     "and one flat YAML file.")
    parser.add_argument("--version", action="version", version=f"tuneforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    own: dict[str, dict[str, argparse.Action]] = {}
    for name, text in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text + "\n\n" + textwrap.fill(PRECEDENCE, 100),
                           usage="%(prog)s [CONFIG] [--KEY VALUE | KEY=VALUE | --FLAG ...] [options below]",
                           epilog=_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
        flags = []
        if name == "chat":
            flags.append(p.add_argument("--query", help="answer this one message and exit (for scripts)"))
            flags.append(p.add_argument("--system", help="a system prompt"))
        if name == "data":
            flags.append(p.add_argument("--show", type=int, default=3, help="how many decoded examples to print"))
            flags.append(p.add_argument("--plot", default="token_lengths.png",
                                        help="where to write the length histogram"))
            flags.append(p.add_argument("--fill", metavar="NAME=VALUE,...", help="fill {{NAME}} placeholders in the "
                                        "data's text (the same as the key fill_placeholders, which train reads)"))
        if name == "predict":
            flags.append(p.add_argument("--text", action="append", default=[],
                                        help="a text (or image path) to label; repeatable"))
            flags.append(p.add_argument("--file", help="a .txt (one input per line), CSV/TSV/JSON/JSONL/Parquet with "
                                        "a text or image column (and optionally labels, to report accuracy)"))
            flags.append(p.add_argument("--out", help="write JSON lines here instead of printing them"))
        if name == "webui":
            flags.append(p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this "
                                        "machine only; 0.0.0.0 opens the UI, and training on this machine, to the "
                                        "network)"))
            flags.append(p.add_argument("--port", type=int, default=7860))
            flags.append(p.add_argument("--output_root", default="saves", help="the folder whose runs the UI lists"))
        if name == "eval":
            flags.append(p.add_argument("--compare", nargs="+", metavar="KEY=VALUE", help="also score the config "
                                        "with these keys changed (e.g. adapter_name_or_path=saves/quickstart) and "
                                        "print the change"))
        if name == "expand":
            flags.append(p.add_argument("--num_expand", type=int, required=True, help="new blocks to insert, one "
                                        "after each of this many equal groups of layers"))
            flags.append(p.add_argument("--out", required=True, help="a new folder for the expanded model"))
        own[name] = {option: action for action in flags for option in action.option_strings}
    sub.add_parser("version", help="print tuneforge's version")
    sub.add_parser("env", help="versions of tuneforge and the libraries it runs on, the CPU and its matrix units, "
                   "threads and CUDA devices (paste it into bug reports)")
    return parser, own


def _split_own_flags(args: list[str], own: dict[str, argparse.Action]) -> tuple[list[str], list[str]]:
    """(the command's own flags with their values, the config's file and keys), in any order."""
    mine, config, i = [], [], 0
    while i < len(args):
        item = args[i]
        action = own.get(item.split("=", 1)[0])
        if item in ("-h", "--help") or (action and "=" in item):
            mine.append(item)
        elif action:
            count = len(args) if action.nargs == "+" else 1  # "+": the values up to the next --flag
            values = list(itertools.takewhile(lambda a: not a.startswith("--"), args[i + 1:i + 1 + count]))
            mine += [item, *values]
            i += len(values)
        else:
            config.append(item)
        i += 1
    return mine, config


def _load(path, overrides, validate_for):
    cfg = load_config(path, overrides, validate_for=validate_for)
    if os.environ.get("RANK", "0") == "0":  # one process of a torchrun or accelerate launch says them
        for line in notices(cfg):
            print(f"tuneforge: {line}", file=sys.stderr)
    return cfg


# DTensor's caches that keep device meshes (and so process groups) alive, as torch 2.13 names them: (module,
# attribute path of the function that empties one). Other torch versions may lack some: those are skipped
_DTENSOR_CACHES = (("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
                   ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
                   ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
                   ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"))


def _leave_process_group() -> None:
    """Close torch.distributed's process groups, and join gloo's worker threads, before the interpreter exits.

    A gloo worker that drops the last reference to a collective's tensors during interpreter shutdown needs the
    GIL, the interpreter ends that thread, and the unwinding aborts the rank ("terminate called without an active
    exception", after a finished run). destroy_process_group joins those workers only when nothing else holds the
    process group: DTensor's caches keep FSDP's device meshes, and each mesh its process groups, so they are
    emptied first (and train.common.make_accelerator keeps torch.distributed.nn from holding the default group).
    docs/distributed.md has the measurements; tests/test_fsdp.py checks that no gloo thread is left."""
    import gc
    import importlib

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if "torch.distributed.tensor" in sys.modules:  # only what was used holds anything
        for module, path in _DTENSOR_CACHES:
            try:
                target = importlib.import_module(module)
            except ImportError:
                continue
            for name in path.split("."):
                target = getattr(target, name, None)
            if callable(target):
                target()
        gc.collect()  # FSDP's module state holds its meshes in reference cycles
    dist.destroy_process_group()


def _quiet_library_bars() -> None:
    """transformers draws a bar for every load and save of weights (a fraction of a second each) around ours; our
    own bar and messages say what takes time. Hub downloads keep their bars: those can take minutes."""
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # this also turns off the hub's bars ...
    enable_progress_bars()  # ... which downloads still need
    # bitsandbytes (imported by PEFT) warns at import that it could not download an optional CPU kernel from the
    # hub; it then uses its built-in one, so the warning says nothing the user can act on
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _run(ns, path, overrides: list[str], config: list[str]) -> None:
    """Command `ns.command` on the config at `path` (or none) with `overrides`; its errors reach main, which words
    them."""
    if ns.command == "train":
        from .train import run_stage

        run_stage(_load(path, overrides, "train"))
        _leave_process_group()
    elif ns.command == "data":
        from .data.preview import preview

        cfg = _load(path, overrides + ([f"fill_placeholders={ns.fill}"] if ns.fill else []), "chat")
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

        if config:  # the UI's forms make the configs; a key here would be silently unused
            raise ConfigError(f"webui takes no config file or keys (got {' '.join(config)}); set them in its forms")
        serve_webui(ns.host, ns.port, ns.output_root)
    elif ns.command == "eval":
        from .evaluate import run_comparison, run_eval

        cfg = _load(path, overrides, "eval")
        if ns.compare:
            run_comparison(cfg, _load(path, overrides + ns.compare, "eval"))
        else:
            run_eval(cfg)
    elif ns.command == "expand":
        from .models.expand import expand

        print(expand(_load(path, overrides, "chat").model.model_name_or_path, ns.out, ns.num_expand))
    elif ns.command == "chat":
        from .infer.chat import one_shot, repl

        cfg = _load(path, overrides, "chat")
        if ns.query is not None:
            print(one_shot(cfg, ns.query, ns.system))
        else:
            repl(cfg, ns.system)


def main(argv: list[str] | None = None) -> int:
    from .data.registry import DataError
    from .models.load import ModelError

    # PEFT still calls a transformers method that transformers 5 deprecated; the notice is not the user's concern.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    parser, own = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in own else None
    mine, config = _split_own_flags(argv[1:], own[command]) if command else ([], [])
    ns = parser.parse_args([command, *mine] if command else argv)
    if ns.command == "version":
        print(f"tuneforge {__version__}")
        return 0
    if ns.command == "env":
        from .machine import environment

        print(environment())
        return 0
    if not ns.command:
        parser.print_help()
        return 0
    _quiet_library_bars()
    from .machine import map_large_allocations

    map_large_allocations()  # a lower peak memory for training, at no measured cost (see its docstring)
    try:
        path, overrides = split_command_line(config)
        _run(ns, path, overrides, config)
    except (ConfigError, DataError, ModelError, FileExistsError, FileNotFoundError) as err:
        print(f"tuneforge: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:  # preempted, non-finite values, a failed save: each has its exit code
        print(f"tuneforge: stopped: {err}", file=sys.stderr)
        return err.exit_code
    return 0


def entry() -> int:
    """The `tuneforge` command. Training first starts again under tcmalloc when the system has it
    (machine.training_allocator says why); main() alone, as tests call it, keeps the process's allocator."""
    from .machine import training_allocator

    if sys.argv[1:2] == ["train"]:
        try:
            environment = training_allocator(os.environ)
        except ValueError as err:
            print(f"tuneforge: error: {err}", file=sys.stderr)
            return 2
        if environment is not None:
            os.execve(sys.executable, sys.orig_argv, environment)
        _start_torchrun_if_asked()
    code = main()
    if sys.argv[1:2] == ["train"]:
        from .launch import report_exit_code

        report_exit_code(code, os.environ)
    return code


def _start_torchrun_if_asked() -> None:
    """Run torchrun and exit with its processes' code when LLaMA-Factory's launch variables (or several GPUs) ask
    for several processes (launch.py); torchrun then starts this command once per process."""
    from .launch import LaunchError, launched, supervise, torchrun_command, torchrun_environment

    gpus = 0
    if not launched(os.environ):
        import torch

        gpus = torch.cuda.device_count()
    try:
        launch = torchrun_command(sys.argv[2:], os.environ, gpus)
    except LaunchError as err:
        print(f"tuneforge: error: {err}", file=sys.stderr)
        sys.exit(2)
    if launch is None:
        return
    try:  # a config error once here, rather than once from every process after torchrun has started them
        load_config(*split_command_line(sys.argv[2:]), validate_for="train")
    except (ConfigError, FileNotFoundError) as err:
        print(f"tuneforge: error: {err}", file=sys.stderr)
        sys.exit(2)
    command, line = launch
    print(line, file=sys.stderr, flush=True)
    sys.exit(supervise(command, torchrun_environment(os.environ, gpus, len(os.sched_getaffinity(0)))))


if __name__ == "__main__":
    sys.exit(entry())
