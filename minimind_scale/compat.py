"""Old module paths keep importing: plugins written against the flat layout (`minimind_scale.batching`, ...) still load.

Each old path is an alias of the module that now holds that code; the three old modules whose names are now
packages (`data`, `losses`, `models`) are served by those packages' re-exports.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "actor_critic": "rl.actor_critic",
    "agent_data": "agent.records",
    "attention": "models.attention",
    "batching": "data.batching",
    "callbacks": "training.callbacks",
    "checkpoint": "training.checkpoint",
    "chunked_loss": "losses.chunked",
    "context": "training.context",
    "conversation": "chat.conversation",
    "datacache": "data.cache",
    "demo": "training.demo",
    "demo_data": "data.demo_data",
    "distillation": "losses.distillation",
    "distributed": "training.distributed",
    "engine": "training.engine",
    "eval_tools": "inference.eval_tools",
    "evaluate": "inference.evaluate",
    "export": "models.export",
    "flops": "training.flops",
    "generate": "inference.chat",
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
    "reward_funcs": "rl.rewards",
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
    "tools": "agent.tools",
    "trajectory": "agent.trajectory",
    "yarn": "models.yarn",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        pass  # the target module ran when it was imported


class _MovedModules(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != "minimind_scale" or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(f"minimind_scale.{MOVED[name]}"))


def install_moved_modules() -> None:
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
