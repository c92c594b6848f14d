"""Model configuration (DESIGN §3.1): the validated `ModelConfig`, its Hugging Face translation, the
named presets, and the typed-field helpers every config dataclass shares.

- dsv3.config.model: `ModelConfig`, its derived sizes, parameter counts and validation;
- dsv3.config.hf: to and from the `config.json` of the released checkpoints;
- dsv3.config.presets: `PRESETS` (tiny, small, v3-mini, 16b, 671b);
- dsv3.config.fields: `ConfigError`, key=value parsing and type checks of config fields.

Everything public is importable from `dsv3.config`, as before the split.
"""

from dsv3.config.fields import ConfigError, check_known_fields, check_typed, parse_typed
from dsv3.config.model import ModelConfig
from dsv3.config.presets import PRESETS

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "check_known_fields", "check_typed", "parse_typed"]
