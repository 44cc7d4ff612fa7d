"""The NBD endpoint QEMU's ``blockdev-backup`` writes into (issue 4), and read-only exports
of an archive's devices (``qmpbackup export``, issue 12; see :mod:`qmpbackup.nbd.read_path`).

QEMU connects as an NBD client (``blockdev-add driver=nbd server={type:unix,path:...}
export=NAME``); :class:`NbdServer` hands every write of an export to that export's
:class:`ExportConsumer` (for a backup: a :class:`qmpbackup.backup.assembler.ClusterAssembler`).

Protocol choices, all negotiated so that QEMU 7.2 and 10.0 work unchanged:

* fixed newstyle handshake with NO_ZEROES; options GO, INFO, EXPORT_NAME, ABORT, LIST;
  everything else (STRUCTURED_REPLY, EXTENDED_HEADERS, STARTTLS, META_CONTEXT, unknown)
  is answered NBD_REP_ERR_UNSUP, so clients use simple replies;
* block sizes: minimum 1, preferred 64 KiB, maximum 32 MiB (a larger request is a
  protocol violation);
* transmission flags HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES (no
  multi-conn, no fast zero, not read-only);
* write-only exports: READ, CACHE, BLOCK_STATUS, RESIZE are answered EINVAL.
"""

from qmpbackup.nbd.connection import MAX_REQUEST, PREFERRED_BLOCK, TRANSMISSION_FLAGS
from qmpbackup.nbd.errors import NbdConsumerError, NbdError, NbdProtocolError
from qmpbackup.nbd.export import Export, ExportConsumer, ExportSource
from qmpbackup.nbd.server import NbdServer, ServerState

__all__ = [
    "MAX_REQUEST",
    "PREFERRED_BLOCK",
    "TRANSMISSION_FLAGS",
    "Export",
    "ExportConsumer",
    "ExportSource",
    "NbdConsumerError",
    "NbdError",
    "NbdProtocolError",
    "NbdServer",
    "ServerState",
]
