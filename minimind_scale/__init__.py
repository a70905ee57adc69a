"""minimind_scale: one trainer for MiniMind-family chat models, from a laptop CPU to many GPUs."""
__version__ = "0.1.0"

# The public plugin API: a stage is a StageSpec; a plugin file registers stages and callbacks.
from .callbacks import Callback, register_callback
from .config import TrainConfig
from .context import StageContext, StageState
from .losses import LossOutput
from .registry import StageSpec, register_stage

__all__ = ["Callback", "LossOutput", "StageContext", "StageSpec", "StageState", "TrainConfig", "__version__",
           "register_callback", "register_stage"]
