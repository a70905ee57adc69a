"""Old module paths keep importing: plugins written against the flat layout (`minimind_scale.batching`, ...) still load.

Each old path is an alias of the module that now holds that code. An old module whose code was split by job is
served by a read-only view over the modules that hold its parts (`SPLIT`). The three old modules whose names are
now packages (`data`, `losses`, `models`) are served by those packages' re-exports.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

MOVED = {
    "actor_critic": "rl.actor_critic",
    "agent_data": "agent.records",
    "attention": "models.attention",
    "batching": "data.batching",
    "callbacks": "training.callbacks",
    "checkpoint": "training.checkpoint",
    "chunked_loss": "losses.chunked",
    "context": "training.context",
    "datacache": "data.cache",
    "demo": "training.demo",
    "demo_data": "data.demo_data",
    "distillation": "losses.distillation",
    "distributed": "training.distributed",
    "engine": "training.engine",
    "eval_tools": "inference.eval_tools",
    "evaluate": "inference.evaluate",
    "flops": "training.flops",
    "import_minimind": "models.import_minimind",
    "loader": "data.loader",
    "metrics": "training.metrics",
    "online_config": "rl.config",
    "optimization": "training.optimization",
    "packing": "data.packing",
    "plot": "training.plot",
    "policy_losses": "losses.policy",
    "ppo_losses": "losses.ppo",
    "preemption": "training.preemption",
    "preference": "losses.preference",
    "prompts": "rl.prompts",
    "publish": "data.publish",
    "record_draws": "data.record_draws",
    "registry": "training.registry",
    "reply_parser": "chat.reply_parser",
    "reward_model": "rl.reward_model",
    "reward_model_loss": "losses.reward_model",
    "rows": "data.rows",
    "run": "training.run",
    "sampling": "rl.sampling",
    "scoring": "rl.scoring",
    "serve": "inference.serve",
    "serve_app": "inference.serve_app",
    "serve_schema": "inference.serve_schema",
    "serve_worker": "inference.serve_worker",
    "telemetry": "training.telemetry",
    "tokenizer_train": "models.tokenizer_train",
    "tool_worker": "agent.tool_worker",
    "trajectory": "agent.trajectory",
    "yarn": "models.yarn",
}

# old module -> the modules its public names now live in, searched in order
SPLIT = {
    "conversation": ("chat.messages", "chat.template", "chat.encoding", "chat.markup"),
    "reward_funcs": ("rl.reward_funcs", "rl.reward_builtins", "rl.reward_scoring"),
    "tools": ("agent.tools", "chat.tool_calls"),
    "generate": ("inference.chat", "inference.loading"),
}


class _SplitModule(types.ModuleType):
    """An old module's names, looked up in the modules that now hold them."""

    def __init__(self, name: str, parts: tuple[str, ...]):
        super().__init__(name, f"moved: see {', '.join(parts)}")
        self._parts = [importlib.import_module(f"minimind_scale.{part}") for part in parts]

    def __getattr__(self, attr: str):
        for part in self._parts:
            if hasattr(part, attr):
                return getattr(part, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        if isinstance(self.target, tuple):
            return _SplitModule(spec.name, self.target)
        return importlib.import_module(f"minimind_scale.{self.target}")

    def exec_module(self, module) -> None:
        pass  # the target module ran when it was imported


class _MovedModules(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        target = MOVED.get(name) or SPLIT.get(name)
        if package != "minimind_scale" or target is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(target))


def install_moved_modules() -> None:
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
