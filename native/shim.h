/* Declarations shared by the C shim and its cffi cdef. Keep this file cdef-parsable. */
int cusetpm_shim_abi(void);
