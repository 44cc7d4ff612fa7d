"""NBD wire constants and struct layouts (fixed newstyle; numbers from the NBD protocol spec).

Everything on the wire is big-endian. Only what the server and the test client use is here;
the names follow the spec without the ``NBD_`` prefix.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

# Handshake magics.
NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9

# Transmission magics.
REQUEST_MAGIC: Final = 0x25609513
EXTENDED_REQUEST_MAGIC: Final = 0x21E41C71
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# Handshake flags (server, u16) and client flags (u32).
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1

# Option haggling limits: an option payload larger than this is a protocol violation.
MAX_OPTION_LENGTH: Final = 4096
MAX_EXPORT_NAME: Final = 4096  # the spec's limit for names and other strings

# Padding after the NBD_OPT_EXPORT_NAME reply unless NO_ZEROES was agreed.
EXPORT_NAME_PADDING: Final = 124


class Opt(enum.IntEnum):
    """Option numbers of the handshake phase."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_FLAG_ERROR: Final = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types; those with bit 31 set are errors."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_FLAG_ERROR | 1
    ERR_POLICY = REP_FLAG_ERROR | 2
    ERR_INVALID = REP_FLAG_ERROR | 3
    ERR_PLATFORM = REP_FLAG_ERROR | 4
    ERR_TLS_REQD = REP_FLAG_ERROR | 5
    ERR_UNKNOWN = REP_FLAG_ERROR | 6
    ERR_SHUTDOWN = REP_FLAG_ERROR | 7
    ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
    ERR_TOO_BIG = REP_FLAG_ERROR | 9
    ERR_EXT_HEADER_REQD = REP_FLAG_ERROR | 10


class Info(enum.IntEnum):
    """Information types of NBD_OPT_INFO / NBD_OPT_GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TFlag(enum.IntFlag):
    """Transmission flags (u16) sent with the export's size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class CmdFlag(enum.IntFlag):
    """Command flags (u16) of a transmission request."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class Cmd(enum.IntEnum):
    """Transmission commands (u16)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


REPLY_FLAG_DONE: Final = 1 << 0


class ReplyType(enum.IntEnum):
    """Structured reply chunk types (u16); those with bit 15 set are error chunks."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


# The ``base:allocation`` metadata context: its namespace, its name, its status bits.
META_BASE_NAMESPACE: Final = "base:"
META_BASE_ALLOCATION: Final = "base:allocation"
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1
MAX_EXTENTS: Final = 1 << 20  # descriptors per BLOCK_STATUS chunk the spec asks us not to exceed


class Errno(enum.IntEnum):
    """Error values of a reply (the spec's fixed numbers, not the host's errno)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# Struct layouts.
SERVER_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
INFO_EXPORT = struct.Struct(">HQH")  # Info.EXPORT, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # Info.BLOCK_SIZE, minimum, preferred, maximum
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
OFFSET_HOLE = struct.Struct(">QI")  # offset, hole size
ERROR_CHUNK = struct.Struct(">IH")  # error, message length
EXTENT = struct.Struct(">II")  # length, status flags
U64 = struct.Struct(">Q")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
