/*
 * The C API of cusetpm's libfuse3 shim, as Python sees it (cffi cdef) and as shim.c
 * implements it.  Keep this file cdef-parsable: no preprocessor, no libfuse types.
 * Requests (fuse_req_t) and poll handles (struct fuse_pollhandle *) cross into Python
 * as `void *` so the header needs no libfuse declarations.
 *
 * A request handed to Python must be answered exactly once with one of the
 * cusetpm_reply_* functions, from any thread (libfuse serialises its writes to the
 * channel).  Open and poll are answered by the shim from the Python callback's
 * return value, because their reply needs the callback's stack (fuse_file_info).
 */

struct cusetpm_session;

/* Bumped whenever the Python side must change with the shim. */
int cusetpm_shim_abi(void);

/* A read or write callback's return value meaning "answered later" (errnos are > -4096). */
#define CUSETPM_DEFERRED -1073741824
/* The room a read callback has for its answer: a TPM response is at most 4096 bytes. */
#define CUSETPM_READ_MAX 4096

/* A CUSE device /dev/<devname>.  userdata is passed back to every callback.
 * Returns NULL (and logs through fuse_log) on failure; errno is set. */
struct cusetpm_session *cusetpm_cuse_new(const char *devname, void *userdata, int debug);

/* A FUSE mount at `mountpoint` with one regular file `tpmrm0` (mode/uid/gid are the
 * file's attributes; the kernel enforces them: default_permissions, allow_other). */
struct cusetpm_session *cusetpm_fuse_new(const char *mountpoint, unsigned int mode,
                                         unsigned int uid, unsigned int gid,
                                         void *userdata, int debug);

/* Serve requests until cusetpm_session_stop() or the kernel ends the channel.
 * Blocks: call it from a dedicated thread.  Returns 0, or a negative errno. */
int cusetpm_session_loop(struct cusetpm_session *s);

/* Make cusetpm_session_loop() return soon.  Safe from any thread and from a signal
 * handler (one write() to an eventfd).  Replies can still be sent afterwards. */
void cusetpm_session_stop(struct cusetpm_session *s);

/* Unmount (FUSE) or close /dev/cuse (the CUSE device disappears), then free.
 * Call only after cusetpm_session_loop() returned and no reply is pending. */
void cusetpm_session_destroy(struct cusetpm_session *s);

/* The channel's file descriptor (for diagnostics). */
int cusetpm_session_fd(struct cusetpm_session *s);

/* Replies; each returns 0 or a negative errno (the kernel may have dropped the request). */
int cusetpm_reply_err(void *req, int err);
int cusetpm_reply_write(void *req, size_t count);
int cusetpm_reply_buf(void *req, const char *buf, size_t size);

/* Wake the poller behind `ph` and free the handle. */
int cusetpm_poll_notify(void *ph);
/* Free a poll handle without waking anybody (a newer handle replaces it, or release). */
void cusetpm_poll_destroy(void *ph);
