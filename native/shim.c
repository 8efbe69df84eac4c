#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>
#include "shim.h"

/* Bumped whenever the Python side must change with the shim. */
int cusetpm_shim_abi(void)
{
	return 1;
}
