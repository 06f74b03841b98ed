"""Append-only, hash-chained audit trail of QC-gate decisions: who, what, when, why.

A ground-floor package: it imports only ``sitebench.errors`` and ``sitebench.provenance``.
"""

from sitebench.audit.trail import AuditRecord, AuditTrail, AuditVerification, verify_trail

__all__ = ["AuditTrail", "AuditRecord", "AuditVerification", "verify_trail"]
