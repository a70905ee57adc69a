"""`python -m minimind_scale ...`: every registered stage is a subcommand, plus the tool commands.

A user's mistake ends with exit code 2 and one readable message, never a traceback.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path

from minimind_scale.config import build_config, describe_fields, did_you_mean, load_yaml, parse_flags
from minimind_scale.errors import PeerLost, RunFailed, UserError
from minimind_scale.training import registry

# Tool commands: name -> (module, config class, run function, one-line help). Imported lazily.
TOOLS: dict[str, tuple[str, str, str, str]] = {
    "train-tokenizer": ("minimind_scale.models.tokenizer_train", "TrainTokenizerConfig", "run",
                        "train a ByteLevel BPE tokenizer with the ChatML chat template"),
    "chat": ("minimind_scale.inference.chat", "ChatConfig", "run",
             "talk to a trained model (or one answer with --prompt)"),
    "serve": ("minimind_scale.inference.serve", "ServeConfig", "run",
              "an OpenAI-compatible HTTP server (streaming, reasoning, tool calls) with a web chat page"),
    "eval": ("minimind_scale.inference.evaluate", "EvalConfig", "run",
             "loss, perplexity and token count of a model on a data set (JSON)"),
    "eval-tools": ("minimind_scale.inference.eval_tools", "EvalToolsConfig", "run",
                   "play agent tasks with real tool calls (a tools .py file); pass rate as JSON"),
    "demo": ("minimind_scale.training.demo", "DemoConfig", "run",
             "tokenizer -> pretrain -> SFT on the bundled demo data, then chat"),
    "export": ("minimind_scale.export.command", "ExportConfig", "run",
               "a checkpoint (plain or ZeRO, LoRA merged) or model -> a Hugging Face directory or a GGUF file"),
    "import-minimind": ("minimind_scale.models.import_minimind", "ImportMinimindConfig", "run",
                        "a MiniMind .pth state dict -> a Hugging Face model directory"),
    "plot": ("minimind_scale.training.plot", "PlotConfig", "run",
             "loss / lr / tokens-per-second curves of one or more runs -> loss.png"),
}


def _quiet_third_parties() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda_quick() else "cuda")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight loading/saving bars: noise at these sizes
    # Tied embeddings make save_state warn on every checkpoint that the shared lm_head was dropped;
    # it is re-tied on load, which the resume tests verify.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


def _has_cuda_quick() -> bool:
    import torch

    return torch.cuda.is_available()


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop `--local_rank=N` / `--local_rank N`, which the deepspeed launcher appends; LOCAL_RANK says the
    same."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
            continue
        name = tok.split("=", 1)[0].replace("-", "_")
        if name == "__local_rank":
            skip = "=" not in tok
            continue
        out.append(tok)
    return out


def pop_option(argv: list[str], name: str, multiple: bool = False) -> tuple[list[str], list[str]]:
    """Remove `--name v [v ...]` from argv, returning (values, rest)."""
    values, rest, i = [], [], 0
    keys = {f"--{name}", f"--{name.replace('_', '-')}"}
    while i < len(argv):
        key, eq, val = argv[i].partition("=")
        if key in keys:
            found = [val] if eq else []
            i += 1
            while not eq and i < len(argv) and not argv[i].startswith("--"):
                found.append(argv[i])
                i += 1
                if not multiple:
                    break
            if not any(found):
                raise UserError(f"{key} needs a value")
            values += found
            continue
        rest.append(argv[i])
        i += 1
    return values, rest


def top_help() -> str:
    lines = ["usage: python -m minimind_scale COMMAND [--config run.yaml] [--field value ...]", "", "training stages:"]
    for spec in registry.stages():
        alias = f" (alias {', '.join(spec.aliases)})" if spec.aliases else ""
        lines.append(f"  {spec.name:<16} {spec.help}{alias}")
    lines += ["", "tools:",
              f"  {'prepare STAGE':<16} tokenise and cache a stage's data; prints the data set's directory"]
    lines += [f"  {name:<16} {t[3]}" for name, t in TOOLS.items()]
    lines += ["", "`python -m minimind_scale COMMAND --help` lists every field with its type, default and meaning.",
              "Stage plugins: --plugin FILE.py, $MINIMIND_SCALE_PLUGINS, or the `minimind_scale.stages` entry point "
              "group."]
    return "\n".join(lines)


def _config_for(cls, argv: list[str], command: str):
    if "--help" in argv or "-h" in argv:
        doc = inspect.cleandoc(cls.__doc__ or "")
        print(f"usage: python -m minimind_scale {command} [--config run.yaml] [--field value ...]\n")
        if doc:
            print(doc + "\n")
        print(describe_fields(cls))
        raise SystemExit(0)
    config_file, argv = pop_option(argv, "config")
    flags = parse_flags(argv, cls)
    return build_config(cls, flags, config_file[0] if config_file else None)


def run_stage(name: str, argv: list[str], plugins: list[str]) -> None:
    spec = registry.get_stage(name)
    cfg = _config_for(spec.config, argv, name)
    # The plugin files this run loaded, so that its config.yaml re-runs with --config alone.
    cfg.plugin = list(dict.fromkeys(cfg.plugin + plugins))
    from minimind_scale.training.checkpoint import newest_checkpoint
    from minimind_scale.training.distributed import LaunchEnv, peer_failures_as_errors
    from minimind_scale.training.engine import train

    with peer_failures_as_errors(LaunchEnv.from_environ().world_size, lambda: newest_checkpoint(Path(cfg.out_dir))):
        train(spec, cfg)


def run_prepare(argv: list[str], plugins: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        raise UserError("usage: python -m minimind_scale prepare STAGE [--field value ...]")
    spec = registry.get_stage(argv[0])
    cfg = _config_for(spec.config, argv[1:], f"prepare {spec.name}")
    from minimind_scale.data.prepare import prepare_dataset
    from minimind_scale.models.build import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    dataset, path, report = prepare_dataset(spec, cfg, tokenizer, log=lambda m: print(m, file=sys.stderr))
    print(f"{len(dataset)} rows, columns {dataset.column_names}", file=sys.stderr)
    print(path)


def run_tool(name: str, argv: list[str]) -> None:
    module, cls_name, fn_name, _ = TOOLS[name]
    mod = importlib.import_module(module)
    cfg = _config_for(getattr(mod, cls_name), argv, name)
    getattr(mod, fn_name)(cfg)


def config_file_plugins(argv: list[str]) -> list[str]:
    """The `plugin` list of a `--config` file: its stage may live in one, so it must load before the stage is
    looked up."""
    config_file, _ = pop_option(argv, "config")
    if not config_file:
        return []
    listed = load_yaml(config_file[0]).get("plugin") or []
    return [listed] if isinstance(listed, str) else [str(p) for p in listed]


def dispatch(argv: list[str]) -> str | None:
    """Run the command in argv; returns its name (None for the top-level help)."""
    argv = strip_launcher_args(argv)
    plugins, argv = pop_option(argv, "plugin")  # one file per --plugin; repeat the flag for more
    registry.discover(config_file_plugins(argv) + plugins)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(top_help())
        return None
    command, rest = argv[0], argv[1:]
    if command == "prepare":
        run_prepare(rest, plugins)
    elif command in TOOLS:
        run_tool(command, rest)
    elif registry.is_stage(command):
        run_stage(command, rest, plugins)
    else:
        names = registry.all_names() + list(TOOLS) + ["prepare"]
        raise UserError(f"unknown command '{command}'{did_you_mean(command, names)}. Run with --help for the list.")
    return command


def main(argv: list[str] | None = None) -> None:
    _quiet_third_parties()
    try:
        command = dispatch(sys.argv[1:] if argv is None else argv)
        if command == "prepare" and argv is None:
            _exit_now()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        _shutdown_process_group()
        raise SystemExit(2) from None
    except PeerLost as e:
        print(f"error: {e}", file=sys.stderr)
        # With a member gone, tearing the process group down would wait for it forever.
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        _shutdown_process_group()
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    _shutdown_process_group()


def _exit_now() -> None:
    """End the process at once, skipping the interpreter's teardown: after `prepare` that teardown (freeing
    torch's, transformers' and datasets' module state and every object, one by one) takes over a second and
    leaves nothing to do. Everything `prepare` makes is already on disk: each cache entry is published by an
    atomic rename once complete (publish.py), its worker pools are joined, and no process group was started;
    only the standard streams still buffer output, so they are flushed first. Only when this process is the
    command (`main()` reading sys.argv): called in-process with an argv list, as the tests do, it returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _shutdown_process_group() -> None:
    # Avoids a rare abort at interpreter exit after gloo/NCCL runs.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
