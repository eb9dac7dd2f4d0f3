from .log import AuditLog, AuditWriteError
from .redact import redact, redact_arguments
from .settings import AuditSettings, Fsync

__all__ = ["AuditLog", "AuditSettings", "AuditWriteError", "Fsync", "redact", "redact_arguments"]
