"""File operations of the device node (CUSE, or a FUSE mount) on top of the resource manager."""
