"""qlorakit: QLoRA fine-tuning on small hardware.

The frozen base model is stored in 4-bit (NF4 with double quantization by default) and trained through
small LoRA adapters; see DESIGN.md for the layout. Importing this package is cheap: it loads neither
torch nor any submodule.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("qlorakit")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
