/*
 * cusetpm's glue to libfuse3's low-level API: one set of file callbacks served either
 * as a CUSE character device or as the file `tpmrm0` of a one-directory FUSE mount.
 *
 * What lives here rather than in Python: libfuse's structs (fuse_file_info has
 * bit-fields), the replies that need the callback's stack (open, poll), ioctl (a TPM
 * RM node has none: ENOTTY), flush, the FUSE directory, interrupt registration, and
 * the session's I/O so the loop can be stopped from any thread.
 *
 * Session setup, and why not cuse_lowlevel_setup(): that helper also parses a command
 * line, may daemonize, and calls fuse_set_signal_handlers(), which replaces the
 * daemon's SIGINT/SIGTERM/SIGHUP handlers with libfuse's (they only set the session's
 * exit flag, and Python's handlers would never run).  Instead we build the session
 * ourselves -- cuse_lowlevel_new() + open("/dev/cuse") -- and hand the descriptor to
 * libfuse with fuse_session_custom_io() (public API since 3.13; here 3.14), the one
 * supported way to set a session's fd without fuse_session_mount().  The FUSE mount
 * uses fuse_session_mount() and then the same custom I/O on its fd.  Our read hook
 * waits in poll() on the channel and an eventfd, so cusetpm_session_stop() ends the
 * loop promptly even when no request arrives; libfuse treats ENODEV from the read hook
 * as "channel gone" and leaves fuse_session_loop() with 0.  No signal is involved.
 */
#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>
#include <cuse_lowlevel.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "shim.h"
#include "callbacks.h"

#define NODE_INO 2
#define NODE_NAME "tpmrm0"
/* Attributes never change while mounted; one second keeps lookups cheap. */
#define ATTR_TIMEOUT 1.0
/* The file's size: the largest command a write takes (TPM_BUFSIZE).  Writes at position 0
 * (FOPEN_STREAM) up to this size do not extend the file, which the kernel requires before
 * it lets direct writes run in parallel. */
#define NODE_SIZE 4096

/* From the kernel's uapi <linux/fuse.h>; libfuse 3.14 has no fuse_file_info field for
 * them, so the shim sets them in the OPEN reply itself (see io_writev). */
#define CUSETPM_FOPEN_STREAM (1u << 4)
#define CUSETPM_FOPEN_PARALLEL_DIRECT_WRITES (1u << 6)
#define CUSETPM_PARALLEL_WRITES_MINOR 38 /* the protocol version that added the flag */

/* The wire layout of an OPEN reply (struct fuse_out_header, struct fuse_open_out). */
struct wire_out_header {
	uint32_t len;
	int32_t error;
	uint64_t unique;
};
struct wire_open_out {
	uint64_t fh;
	uint32_t open_flags;
	uint32_t padding;
};

struct cusetpm_session {
	struct fuse_session *se;
	void *userdata;         /* Python's handle, passed back to every callback */
	int wake_fd;            /* eventfd: readable once the loop must stop */
	int mounted;            /* FUSE: unmount on destroy */
	unsigned int proto_minor; /* FUSE: the protocol minor the kernel announced in INIT */
	unsigned int mode, uid, gid;
};

int cusetpm_shim_abi(void)
{
	return 3;
}

/* ---- session I/O: a read that can be woken, a plain writev ---- */

static ssize_t io_read(int fd, void *buf, size_t len, void *userdata)
{
	struct cusetpm_session *s = userdata;
	struct pollfd p[2] = {
		{ .fd = fd, .events = POLLIN },
		{ .fd = s->wake_fd, .events = POLLIN },
	};

	if (poll(p, 2, -1) < 0)
		return -1;      /* EINTR: libfuse retries */
	if (p[1].revents) {
		errno = ENODEV; /* libfuse: exit the loop quietly */
		return -1;
	}
	return read(fd, buf, len);
}

/* Set by file_open around its fuse_reply_open(): libfuse writes the reply on the calling
 * thread, through io_writev, before fuse_reply_open() returns. */
static __thread uint32_t open_reply_flags;

/* A FUSE node's blocking write waits in the daemon until the TPM has answered.  Without
 * FOPEN_PARALLEL_DIRECT_WRITES the kernel holds the inode lock all that time, so every
 * other descriptor's write on the node waits in the kernel, unseen by the RM's scheduler
 * and its session waiters.  libfuse 3.14 cannot ask for the flag: add it to the reply. */
static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata)
{
	const struct wire_out_header *h = iov[0].iov_base;
	struct wire_open_out open_out;
	struct iovec patched[2];

	(void)userdata;
	if (!open_reply_flags || count != 2 || iov[0].iov_len != sizeof(*h) || h->error != 0 ||
	    iov[1].iov_len != sizeof(open_out))
		return writev(fd, iov, count);
	memcpy(&open_out, iov[1].iov_base, sizeof(open_out));
	open_out.open_flags |= open_reply_flags;
	patched[0] = iov[0];
	patched[1].iov_base = &open_out;
	patched[1].iov_len = sizeof(open_out);
	return writev(fd, patched, 2);
}

static const struct fuse_custom_io session_io = {
	.read = io_read,
	.writev = io_writev,
};

/* ---- file operations shared by CUSE and FUSE ---- */

static struct cusetpm_session *req_session(fuse_req_t req)
{
	return fuse_req_userdata(req);
}

static void on_interrupt(fuse_req_t req, void *data)
{
	struct cusetpm_session *s = data;

	cusetpm_py_interrupt(s->userdata, req);
}

static void file_open(fuse_req_t req, struct fuse_file_info *fi)
{
	struct cusetpm_session *s = req_session(req);
	const struct fuse_ctx *ctx = fuse_req_ctx(req);
	int64_t fh = cusetpm_py_open(s->userdata, fi->flags, ctx->uid, ctx->gid, ctx->pid);

	if (fh < 0) {
		fuse_reply_err(req, (int)-fh);
		return;
	}
	fi->fh = (uint64_t)fh;
	/* Every read and write must reach us whole: no page cache, no file size. */
	fi->direct_io = 1;
	fi->keep_cache = 0;
	fi->nonseekable = 1;
	/* FUSE only (CUSE takes no inode lock on writes), where the kernel knows the flag. */
	if (s->mounted && s->proto_minor >= CUSETPM_PARALLEL_WRITES_MINOR)
		open_reply_flags = CUSETPM_FOPEN_STREAM | CUSETPM_FOPEN_PARALLEL_DIRECT_WRITES;
	/* If the opener is gone (its open was interrupted) no release will ever follow:
	 * release the file now so its space is closed. */
	if (fuse_reply_open(req, fi) != 0) {
		open_reply_flags = 0;
		cusetpm_py_release(s->userdata, NULL, fi->fh);
		return;
	}
	open_reply_flags = 0;
}

/* Read and write register the interrupt hook before Python sees the request: the
 * request is certainly alive here (nobody can have answered it yet), while Python may
 * hand it to the TPM worker, which can answer -- and free it -- at any moment. */
static void file_read(fuse_req_t req, size_t size, off_t off, struct fuse_file_info *fi)
{
	struct cusetpm_session *s = req_session(req);
	char out[CUSETPM_READ_MAX];
	int64_t r;

	(void)off; /* CUSE always passes 0: the read offset lives with the open file */
	fuse_req_interrupt_func(req, on_interrupt, s);
	r = cusetpm_py_read(s->userdata, req, fi->fh, size, fi->flags, out);
	if (r == CUSETPM_DEFERRED)
		return;
	if (r < 0)
		fuse_reply_err(req, (int)-r);
	else
		fuse_reply_buf(req, out, (size_t)r);
}

static void file_write(fuse_req_t req, const char *buf, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	struct cusetpm_session *s = req_session(req);
	int64_t r;

	(void)off;
	fuse_req_interrupt_func(req, on_interrupt, s);
	r = cusetpm_py_write(s->userdata, req, fi->fh, buf, size, fi->flags);
	if (r == CUSETPM_DEFERRED)
		return;
	if (r < 0)
		fuse_reply_err(req, (int)-r);
	else
		fuse_reply_write(req, (size_t)r);
}

static void file_flush(fuse_req_t req, struct fuse_file_info *fi)
{
	(void)fi; /* close() of one descriptor; the space lives until release */
	fuse_reply_err(req, 0);
}

static void file_release(fuse_req_t req, struct fuse_file_info *fi)
{
	cusetpm_py_release(req_session(req)->userdata, req, fi->fh);
}

static void file_poll(fuse_req_t req, struct fuse_file_info *fi, struct fuse_pollhandle *ph)
{
	unsigned int revents = cusetpm_py_poll(req_session(req)->userdata, fi->fh, ph);

	fuse_reply_poll(req, revents);
}

static void file_ioctl(fuse_req_t req, struct fuse_file_info *fi)
{
	(void)fi; /* /dev/tpmrm0 has no ioctls */
	fuse_reply_err(req, ENOTTY);
}

/* ---- CUSE ---- */

static void cuse_init_done(void *userdata)
{
	struct cusetpm_session *s = userdata;

	cusetpm_py_ready(s->userdata);
}

static void cuse_ioctl(fuse_req_t req, int cmd, void *arg, struct fuse_file_info *fi,
		       unsigned int flags, const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
	(void)cmd, (void)arg, (void)flags, (void)in_buf, (void)in_bufsz, (void)out_bufsz;
	file_ioctl(req, fi);
}

static const struct cuse_lowlevel_ops cuse_ops = {
	.init_done = cuse_init_done,
	.open = file_open,
	.read = file_read,
	.write = file_write,
	.flush = file_flush,
	.release = file_release,
	.ioctl = cuse_ioctl,
	.poll = file_poll,
};

/* ---- FUSE: a root directory holding the one file ---- */

static void fill_attr(const struct cusetpm_session *s, fuse_ino_t ino, struct stat *st)
{
	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	if (ino == FUSE_ROOT_ID) {
		st->st_mode = S_IFDIR | 0755;
		st->st_nlink = 2;
	} else {
		/* A regular file, not S_IFCHR: the kernel would route a device inode to a
		 * real driver by major:minor instead of to us. */
		st->st_mode = S_IFREG | (s->mode & 07777);
		st->st_nlink = 1;
		if (s->proto_minor >= CUSETPM_PARALLEL_WRITES_MINOR)
			st->st_size = NODE_SIZE; /* see file_open */
		st->st_uid = s->uid;
		st->st_gid = s->gid;
	}
}

static void fs_init(void *userdata, struct fuse_conn_info *conn)
{
	struct cusetpm_session *s = userdata;

	s->proto_minor = conn->proto_minor;
	cusetpm_py_ready(s->userdata);
}

static void fs_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fuse_entry_param e;

	if (parent != FUSE_ROOT_ID || strcmp(name, NODE_NAME) != 0) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	memset(&e, 0, sizeof(e));
	e.ino = NODE_INO;
	e.generation = 1;
	e.attr_timeout = ATTR_TIMEOUT;
	e.entry_timeout = ATTR_TIMEOUT;
	fill_attr(req_session(req), NODE_INO, &e.attr);
	fuse_reply_entry(req, &e);
}

static void fs_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;

	(void)fi;
	if (ino != FUSE_ROOT_ID && ino != NODE_INO) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	fill_attr(req_session(req), ino, &st);
	fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

static void fs_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	static const struct { const char *name; fuse_ino_t ino; mode_t type; } ents[] = {
		{ ".", FUSE_ROOT_ID, S_IFDIR },
		{ "..", FUSE_ROOT_ID, S_IFDIR },
		{ NODE_NAME, NODE_INO, S_IFREG },
	};
	char *buf;
	size_t used = 0;
	off_t i;

	(void)fi;
	if (ino != FUSE_ROOT_ID) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	buf = calloc(1, size ? size : 1);
	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	for (i = off; i >= 0 && i < (off_t)(sizeof(ents) / sizeof(ents[0])); i++) {
		struct stat st = { .st_ino = ents[i].ino, .st_mode = ents[i].type };
		size_t need = fuse_add_direntry(req, buf + used, size - used, ents[i].name,
						&st, i + 1);

		if (need > size - used)
			break;
		used += need;
	}
	fuse_reply_buf(req, buf, used);
	free(buf);
}

static void fs_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ino != NODE_INO) {
		fuse_reply_err(req, ino == FUSE_ROOT_ID ? EISDIR : ENOENT);
		return;
	}
	file_open(req, fi);
}

static void fs_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	(void)ino;
	file_read(req, size, off, fi);
}

static void fs_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
		     struct fuse_file_info *fi)
{
	(void)ino;
	file_write(req, buf, size, off, fi);
}

static void fs_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	file_flush(req, fi);
}

static void fs_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	(void)ino;
	file_release(req, fi);
}

static void fs_poll(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
		    struct fuse_pollhandle *ph)
{
	(void)ino;
	file_poll(req, fi, ph);
}

static void fs_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg,
		     struct fuse_file_info *fi, unsigned int flags, const void *in_buf,
		     size_t in_bufsz, size_t out_bufsz)
{
	(void)ino, (void)cmd, (void)arg, (void)flags, (void)in_buf, (void)in_bufsz,
		(void)out_bufsz;
	file_ioctl(req, fi);
}

static const struct fuse_lowlevel_ops fuse_ops = {
	.init = fs_init,
	.lookup = fs_lookup,
	.getattr = fs_getattr,
	.readdir = fs_readdir,
	.open = fs_open,
	.read = fs_read,
	.write = fs_write,
	.flush = fs_flush,
	.release = fs_release,
	.poll = fs_poll,
	.ioctl = fs_ioctl,
};

/* ---- session lifetime ---- */

static struct cusetpm_session *session_alloc(void *userdata)
{
	struct cusetpm_session *s = calloc(1, sizeof(*s));

	if (!s)
		return NULL;
	s->userdata = userdata;
	s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (s->wake_fd < 0) {
		free(s);
		return NULL;
	}
	return s;
}

static void session_free(struct cusetpm_session *s)
{
	int saved = errno;

	if (s->se) {
		/* After dropping root, unmounting would run `fusermount3 -u`, which refuses a
		 * mount root made; closing the channel is enough then: the mount was made with
		 * auto_unmount, so fusermount3's watcher (root) unmounts when the fd closes. */
		if (s->mounted && geteuid() == 0)
			fuse_session_unmount(s->se);
		fuse_session_destroy(s->se); /* closes the channel fd */
	}
	close(s->wake_fd);
	free(s);
	errno = saved;
}

struct cusetpm_session *cusetpm_cuse_new(const char *devname, void *userdata, int debug)
{
	char *argv[] = { "cusetpm", debug ? "-d" : NULL, NULL };
	struct fuse_args args = FUSE_ARGS_INIT(debug ? 2 : 1, argv);
	char devinfo[256];
	const char *dev_info_argv[] = { devinfo };
	struct cuse_info ci;
	struct cusetpm_session *s;
	int fd;

	if (snprintf(devinfo, sizeof(devinfo), "DEVNAME=%s", devname) >= (int)sizeof(devinfo)) {
		errno = ENAMETOOLONG;
		return NULL;
	}
	s = session_alloc(userdata);
	if (!s)
		return NULL;
	memset(&ci, 0, sizeof(ci));
	ci.dev_info_argc = 1;
	ci.dev_info_argv = dev_info_argv; /* copied by cuse_lowlevel_new */
	ci.flags = 0;                     /* restricted ioctls: we answer ENOTTY anyway */
	s->se = cuse_lowlevel_new(&args, &ci, &cuse_ops, s);
	fuse_opt_free_args(&args);
	if (!s->se) {
		errno = EINVAL;
		goto fail;
	}
	fd = open("/dev/cuse", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		goto fail;
	if (fuse_session_custom_io(s->se, &session_io, fd) != 0) {
		close(fd);
		errno = EIO;
		goto fail;
	}
	return s;
fail:
	session_free(s);
	return NULL;
}

struct cusetpm_session *cusetpm_fuse_new(const char *mountpoint, unsigned int mode,
					 unsigned int uid, unsigned int gid,
					 void *userdata, int debug)
{
	/* allow_other: users other than the daemon's may open the file, as the mode
	 * says; default_permissions: the kernel checks that mode. */
	char *argv[] = { "cusetpm", "-o",
			 "allow_other,default_permissions,auto_unmount,fsname=cusetpm,subtype=cusetpm",
			 debug ? "-d" : NULL, NULL };
	struct fuse_args args = FUSE_ARGS_INIT(debug ? 4 : 3, argv);
	struct cusetpm_session *s = session_alloc(userdata);

	if (!s)
		return NULL;
	s->mode = mode;
	s->uid = uid;
	s->gid = gid;
	s->se = fuse_session_new(&args, &fuse_ops, sizeof(fuse_ops), s);
	fuse_opt_free_args(&args);
	if (!s->se) {
		errno = EINVAL;
		goto fail;
	}
	if (fuse_session_mount(s->se, mountpoint) != 0) {
		errno = errno ? errno : EIO;
		goto fail;
	}
	s->mounted = 1;
	if (fuse_session_custom_io(s->se, &session_io, fuse_session_fd(s->se)) != 0) {
		errno = EIO;
		goto fail;
	}
	return s;
fail:
	session_free(s);
	return NULL;
}

int cusetpm_session_loop(struct cusetpm_session *s)
{
	return fuse_session_loop(s->se);
}

void cusetpm_session_stop(struct cusetpm_session *s)
{
	uint64_t one = 1;
	ssize_t r;

	fuse_session_exit(s->se);
	r = write(s->wake_fd, &one, sizeof(one));
	(void)r; /* EAGAIN means it is already signalled */
}

void cusetpm_session_destroy(struct cusetpm_session *s)
{
	session_free(s);
}

int cusetpm_session_fd(struct cusetpm_session *s)
{
	return fuse_session_fd(s->se);
}

/* ---- replies ---- */

int cusetpm_reply_err(void *req, int err)
{
	return fuse_reply_err(req, err);
}

int cusetpm_reply_write(void *req, size_t count)
{
	return fuse_reply_write(req, count);
}

int cusetpm_reply_buf(void *req, const char *buf, size_t size)
{
	return fuse_reply_buf(req, buf, size);
}

int cusetpm_poll_notify(void *ph)
{
	int r = fuse_lowlevel_notify_poll(ph);

	fuse_pollhandle_destroy(ph);
	return r;
}

void cusetpm_poll_destroy(void *ph)
{
	fuse_pollhandle_destroy(ph);
}
