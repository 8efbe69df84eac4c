/*
 * Callbacks implemented in Python (cffi `extern "Python+C"`, see build_shim.py) and
 * called by shim.c from the session loop thread.  Plain C prototypes: build_shim.py
 * wraps this file in an `extern "Python+C" { ... }` block for the cdef.
 *
 * `userdata` is the handle given to cusetpm_cuse_new/cusetpm_fuse_new.
 */

/* CUSE: the device node exists (CUSE_INIT answered).  FUSE: FUSE_INIT arrived. */
void cusetpm_py_ready(void *userdata);

/* A new open file: returns its file handle (>= 0) or a negative errno. */
int64_t cusetpm_py_open(void *userdata, int flags, uint32_t uid, uint32_t gid, uint32_t pid);

/* read/write: `flags` are the file's current f_flags (O_NONBLOCK may change with fcntl).
 * The answer most requests get at once comes back as the return value and the shim sends
 * it after Python returns (one call into Python per request, and the reply's writev runs
 * without the GIL): read returns the byte count it copied to `out` (at most
 * CUSETPM_READ_MAX), write the count to report; both a negative errno; or
 * CUSETPM_DEFERRED: Python keeps `req` and answers it later with cusetpm_reply_*. */
int64_t cusetpm_py_read(void *userdata, void *req, uint64_t fh, size_t size, int flags,
                        char *out);
int64_t cusetpm_py_write(void *userdata, void *req, uint64_t fh, const char *buf, size_t size,
                         int flags);

/* Returns the revents; keeps `ph` (may be NULL) until it calls cusetpm_poll_notify or
 * cusetpm_poll_destroy on it. */
unsigned int cusetpm_py_poll(void *userdata, uint64_t fh, void *ph);

/* The file is closed for good; Python answers `req` once the space is gone.  req is
 * NULL when the opener vanished before its open was answered (nothing to answer). */
void cusetpm_py_release(void *userdata, void *req, uint64_t fh);

/* The client was signalled while `req` (a read or write) waits for its reply.  Called
 * with libfuse's request lock held: do not register interrupts from here. */
void cusetpm_py_interrupt(void *userdata, void *req);
