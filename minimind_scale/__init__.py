"""minimind_scale: one trainer for MiniMind-family chat models, from a laptop CPU to many GPUs."""
__version__ = "0.1.0"

from .registry import StageSpec, register_stage  # noqa: E402  (the public plugin API)
from .config import TrainConfig  # noqa: E402
from .losses import LossOutput  # noqa: E402

__all__ = ["StageSpec", "register_stage", "TrainConfig", "LossOutput", "__version__"]
