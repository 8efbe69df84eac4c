"""cusetpm: a TPM 2.0 resource manager served as a CUSE character device."""

__version__ = "0.1.0"
