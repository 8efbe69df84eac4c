"""TPM 2.0 wire format: constants, command/response parsing, builders.

Imports nothing else of cusetpm.
"""
