"""medsig: adapt SigLIP-family vision-language models to medical images."""

from medsig.errors import ConfigError, DataError, ImageError, MedsigError, SpecError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "ImageError", "MedsigError", "SpecError", "__version__"]
