"""Model packages (weights + manifest) and the network configurations they use."""

from diffugts.models.configs import CONFIGS, get_config
from diffugts.models.package import ModelPackage, open_package, write_package

__all__ = ["CONFIGS", "ModelPackage", "get_config", "open_package", "write_package"]
