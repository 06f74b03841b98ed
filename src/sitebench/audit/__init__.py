"""Append-only, hash-chained and (with a key) MAC-chained audit trail of QC-gate decisions: who, what, when, why.

A ground-floor package: it imports only ``sitebench.errors``, ``sitebench.provenance`` and
``sitebench.durable``. :class:`SqlAuditHead` imports SQLAlchemy only when one is made.
"""

from sitebench.audit.head import AuditHead, SqlAuditHead
from sitebench.audit.trail import (
    AuditRecord,
    AuditTrail,
    AuditVerification,
    RepairResult,
    compute_mac,
    create_audit_key,
    load_audit_key,
    repair_trail,
    verify_trail,
)

__all__ = ["AuditTrail", "AuditRecord", "AuditVerification", "RepairResult", "AuditHead", "SqlAuditHead",
           "verify_trail", "repair_trail", "create_audit_key", "load_audit_key", "compute_mac"]
