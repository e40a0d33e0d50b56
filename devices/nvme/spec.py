"""NVMe 1.4 constants: register offsets and fields, opcodes, status codes, entry layouts.

Everything here is data: the model, the pure ring/PRP logic and the tests share one table
of numbers, so a status code or a bit position is written down exactly once (no magic
numbers at call sites).

Controller registers (BAR0, NVMe 1.4 section 3.1)::

    0x00  CAP     64  Controller Capabilities          RO
    0x08  VS      32  Version                          RO
    0x0C  INTMS   32  Interrupt Mask Set               RW1S (reads the mask)
    0x10  INTMC   32  Interrupt Mask Clear             RW1C (reads the mask)
    0x14  CC      32  Controller Configuration         RW
    0x1C  CSTS    32  Controller Status                RO (NSSRO RW1C)
    0x20  NSSR    32  NVM Subsystem Reset              RW (reads 0)
    0x24  AQA     32  Admin Queue Attributes           RW
    0x28  ASQ     64  Admin SQ Base Address            RW
    0x30  ACQ     64  Admin CQ Base Address            RW
    0x38  CMBLOC  32  Controller Memory Buffer Loc.    RO 0 (no CMB)
    0x3C  CMBSZ   32  Controller Memory Buffer Size    RO 0
    0x1000 + (2*qid)     * (4 << CAP.DSTRD)   SQ qid Tail Doorbell
    0x1000 + (2*qid + 1) * (4 << CAP.DSTRD)   CQ qid Head Doorbell

CAP::

    63    58 57 56 55   52 51   48 47    45 44 37 36  32 31     24 23 19 18 17 16 15         0
   +--------+-----+-------+-------+--------+-----+-----+---------+-----+--+-----+------------+
   |  rsvd  |CMBS |MPSMAX |MPSMIN | rsvd   | CSS |NSSRS| TO      |rsvd |AMS|CQR | MQES (0's) |
   +--------+-----+-------+-------+--------+-----+-----+---------+-----+--+-----+------------+
                                           (DSTRD is bits 35:32, NSSRS bit 36, CSS 44:37)

CC::

    31   24 23  20 19  16 15 14 13 11 10  7 6   4 3   1 0
   +-------+------+------+-----+-----+-----+-----+-----+--+
   | rsvd  |IOCQES|IOSQES | SHN | AMS | MPS | CSS | rsvd|EN|
   +-------+------+------+-----+-----+-----+-----+-----+--+

CSTS: RDY bit 0, CFS bit 1, SHST bits 3:2 (0 normal, 1 occurring, 2 complete), NSSRO bit 4.
"""

from __future__ import annotations

import enum
import struct

# ------------------------------------------------------------------ registers


class Reg(enum.IntEnum):
    CAP = 0x00
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28
    ACQ = 0x30
    CMBLOC = 0x38
    CMBSZ = 0x3C


DOORBELL_BASE = 0x1000
VERSION_1_4 = 0x0001_0400

CAP_MQES_SHIFT = 0
CAP_CQR = 1 << 16
CAP_TO_SHIFT = 24
CAP_DSTRD_SHIFT = 32
CAP_CSS_NVM = 1 << 37
CAP_MPSMIN_SHIFT = 48
CAP_MPSMAX_SHIFT = 52

CC_EN = 1 << 0
CC_CSS_SHIFT, CC_CSS_MASK = 4, 0x7
CC_MPS_SHIFT, CC_MPS_MASK = 7, 0xF
CC_AMS_SHIFT, CC_AMS_MASK = 11, 0x7
CC_SHN_SHIFT, CC_SHN_MASK = 14, 0x3
CC_IOSQES_SHIFT, CC_IOSQES_MASK = 16, 0xF
CC_IOCQES_SHIFT, CC_IOCQES_MASK = 20, 0xF
CC_WRITABLE = 0x00FF_FFF1

CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
CSTS_SHST_MASK = 0x3 << CSTS_SHST_SHIFT
CSTS_NSSRO = 1 << 4


class Shst(enum.IntEnum):
    NORMAL = 0
    OCCURRING = 1
    COMPLETE = 2


AQA_ASQS_MASK = 0xFFF
AQA_ACQS_SHIFT = 16
QUEUE_BASE_MASK = ~0xFFF & 0xFFFF_FFFF_FFFF_FFFF
NSSR_RESET_VALUE = 0x4E564D65  # "NVMe"

SQES_LOG2 = 6  # 64-byte submission entries
CQES_LOG2 = 4  # 16-byte completion entries
SQE_SIZE = 1 << SQES_LOG2
CQE_SIZE = 1 << CQES_LOG2

# ------------------------------------------------------------------ commands


class AdminOpcode(enum.IntEnum):
    DELETE_SQ = 0x00
    CREATE_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_CQ = 0x04
    CREATE_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    NS_MANAGEMENT = 0x0D
    FIRMWARE_COMMIT = 0x10
    FIRMWARE_DOWNLOAD = 0x11
    NS_ATTACHMENT = 0x15
    KEEP_ALIVE = 0x18
    DOORBELL_BUFFER_CONFIG = 0x7C
    FORMAT_NVM = 0x80


class IoOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_UNCORRECTABLE = 0x04
    COMPARE = 0x05
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09


class Cns(enum.IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NS_LIST = 0x02
    NS_DESCRIPTORS = 0x03
    CSI_NAMESPACE = 0x05
    CSI_CONTROLLER = 0x06


class FeatureId(enum.IntEnum):
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIG = 0x09
    WRITE_ATOMICITY = 0x0A
    ASYNC_EVENT_CONFIG = 0x0B
    TIMESTAMP = 0x0E
    KEEP_ALIVE_TIMER = 0x0F


class LogPage(enum.IntEnum):
    ERROR = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03


#: Dataset Management attribute: deallocate (CDW11 bit 2)
DSM_ATTR_DEALLOCATE = 1 << 2
DSM_RANGE_SIZE = 16
DSM_MAX_RANGES = 256

# ------------------------------------------------------------------ status codes

SCT_GENERIC = 0x0
SCT_COMMAND_SPECIFIC = 0x1
SCT_MEDIA = 0x2


def status(sct: int, sc: int) -> int:
    """The 15-bit Status Field (without the phase bit): DNR 14, M 13, SCT 11:9, SC 8:1 >> 1."""
    return (sct << 8) | sc


#: Do Not Retry: set on errors a retry cannot fix, as QEMU does.
DNR = 1 << 14


class Status(enum.IntEnum):
    """Status Field values (SCT << 8 | SC), DNR not included."""

    SUCCESS = status(SCT_GENERIC, 0x00)
    INVALID_OPCODE = status(SCT_GENERIC, 0x01)
    INVALID_FIELD = status(SCT_GENERIC, 0x02)
    CID_CONFLICT = status(SCT_GENERIC, 0x03)
    DATA_TRANSFER_ERROR = status(SCT_GENERIC, 0x04)
    ABORTED_POWER_LOSS = status(SCT_GENERIC, 0x05)
    INTERNAL_ERROR = status(SCT_GENERIC, 0x06)
    ABORTED_BY_REQUEST = status(SCT_GENERIC, 0x07)
    ABORTED_SQ_DELETION = status(SCT_GENERIC, 0x08)
    INVALID_NAMESPACE = status(SCT_GENERIC, 0x0B)
    INVALID_PRP_OFFSET = status(SCT_GENERIC, 0x13)
    LBA_OUT_OF_RANGE = status(SCT_GENERIC, 0x80)
    CAPACITY_EXCEEDED = status(SCT_GENERIC, 0x81)
    NAMESPACE_NOT_READY = status(SCT_GENERIC, 0x82)
    # command specific
    COMPLETION_QUEUE_INVALID = status(SCT_COMMAND_SPECIFIC, 0x00)
    INVALID_QUEUE_IDENTIFIER = status(SCT_COMMAND_SPECIFIC, 0x01)
    INVALID_QUEUE_SIZE = status(SCT_COMMAND_SPECIFIC, 0x02)
    ABORT_COMMAND_LIMIT_EXCEEDED = status(SCT_COMMAND_SPECIFIC, 0x03)
    ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED = status(SCT_COMMAND_SPECIFIC, 0x05)
    INVALID_FIRMWARE_SLOT = status(SCT_COMMAND_SPECIFIC, 0x06)
    INVALID_INTERRUPT_VECTOR = status(SCT_COMMAND_SPECIFIC, 0x08)
    INVALID_LOG_PAGE = status(SCT_COMMAND_SPECIFIC, 0x09)
    INVALID_FORMAT = status(SCT_COMMAND_SPECIFIC, 0x0A)
    INVALID_QUEUE_DELETION = status(SCT_COMMAND_SPECIFIC, 0x0C)
    FEATURE_NOT_SAVEABLE = status(SCT_COMMAND_SPECIFIC, 0x0D)
    FEATURE_NOT_CHANGEABLE = status(SCT_COMMAND_SPECIFIC, 0x0E)
    # media errors
    WRITE_FAULT = status(SCT_MEDIA, 0x80)
    UNRECOVERED_READ_ERROR = status(SCT_MEDIA, 0x81)


# ------------------------------------------------------------------ entries

#: Submission queue entry (64 bytes), the fields every command shares::
#:
#:   0  CDW0: opcode[7:0] fuse[9:8] psdt[15:14] cid[31:16]
#:   4  NSID
#:   8  CDW2, CDW3
#:  16  MPTR (8)
#:  24  PRP1 / SGL (8)   32  PRP2 (8)
#:  40  CDW10 .. CDW15 (6 x 4)
SQE = struct.Struct("<BBHI8xQQQ6I")
SQE_PSDT_SHIFT = 6  # in the flags byte (CDW0 bits 15:14)

#: Completion queue entry (16 bytes): DW0 result, DW1 reserved, SQ head, SQ id, CID,
#: status (bit 0 = phase tag).
CQE = struct.Struct("<IIHHHH")

# ------------------------------------------------------------------ async events

AER_TYPE_ERROR = 0
AER_TYPE_SMART = 1
AER_TYPE_NOTICE = 2
AER_INFO_NS_ATTR_CHANGED = 0x00
AER_LOG_CHANGED_NS_LIST = 0x04
