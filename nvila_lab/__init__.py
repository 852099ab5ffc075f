__version__ = "0.0.1"

import logging as _logging


class _QuietImportNoise(_logging.Filter):
    """Two harmless messages transformers triggers on import when torchao is installed (it is, for the FP8 parity
    tests): torchao's 'Failed to load ... _C_*.so' for each GPU-only kernel library on a CPU, and torch's note that
    torchao's Enum subclasses need no pytree registration. Everything else passes."""
    def filter(self, record: _logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Failed to load") or "is an Enum subclass and is now natively supported" in msg)


_logging.getLogger("torchao").addFilter(_QuietImportNoise())
_logging.getLogger("torch.utils._pytree").addFilter(_QuietImportNoise())
