from .log import AuditLog, AuditWriteError

__all__ = ["AuditLog", "AuditWriteError"]
