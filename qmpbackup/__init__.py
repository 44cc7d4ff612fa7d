"""qmpbackup: live backups of QEMU VMs as Proxmox VMA archives.

Library code only logs through ``logging.getLogger(__name__)``; the CLI decides
where log records go, so importing the package never prints anything.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
