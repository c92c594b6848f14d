"""dsv3: the DeepSeek-V3 model, its training system and its inference system, in PyTorch."""

from dsv3.checkpoint import load_pretrained, save_pretrained
from dsv3.config import ConfigError, ModelConfig
from dsv3.model.transformer import LossOutput, Transformer

__all__ = ["ConfigError", "LossOutput", "ModelConfig", "Transformer", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"
