"""medsig: adapt SigLIP-family vision-language models to medical images."""

from medsig.errors import ConfigError, DataError, ImageError, MedsigError, SpecError
from medsig.progress import quiet_library_bars

quiet_library_bars()  # no Hugging Face bars in logs (not a terminal)

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "ImageError", "MedsigError", "SpecError", "__version__"]
