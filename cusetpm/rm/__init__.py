"""The resource manager: spaces, the TPM worker, sessions, regapping, policy."""
