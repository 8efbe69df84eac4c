"""How to reach a TPM: libtpms in process, swtpm over a socket, a kernel /dev/tpmN."""
