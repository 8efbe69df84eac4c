"""Exceptions of the wire layer: every malformed input raises one of these, nothing else."""


class TPMParseError(ValueError):
    """A command, response or structure that does not follow the TPM 2.0 wire format."""


class TruncatedError(TPMParseError):
    """The buffer ends before a field it must contain."""


class SizeMismatchError(TPMParseError):
    """A size field disagrees with the bytes present (header size, authorizationSize, ...)."""


class BadTagError(TPMParseError):
    """A tag is neither TPM_ST_NO_SESSIONS nor TPM_ST_SESSIONS (or does not fit the content)."""


class TooManySessionsError(TPMParseError):
    """An authorization area with more sessions than TPM 2.0 allows (3)."""
