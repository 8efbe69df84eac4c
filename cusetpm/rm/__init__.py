"""The resource manager: spaces, the TPM worker, sessions, regapping, policy.

Read `manager.py` (threads, spaces, FIFO order) and then `execute.py` (what happens to one
command) top to bottom.
"""

from cusetpm.rm.config import RMConfig
from cusetpm.rm.errors import RMError
from cusetpm.rm.manager import ResourceManager
from cusetpm.rm.space import Space

__all__ = ["RMConfig", "RMError", "ResourceManager", "Space"]
