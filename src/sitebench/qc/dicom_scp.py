"""DICOM Storage SCP (pynetdicom) in front of :class:`sitebench.qc.intake.IntakeService`.

Each site's scanners / PACS are known by their *calling* AE titles (the sender's
identity, as PACS whitelists do); an association from an unknown title, or one that calls
another AE title than this gate's, is rejected and audited. Every C-STORE is stored and
recorded before its success status is returned: the raw encoded dataset is kept as
received (no decode and re-encode).

Limits (``dicom:`` in the intake YAML): at most ``max_associations`` at once; a bare TCP
connect that sends no association request is dropped after ``acse_timeout`` seconds (the
ARTIM timer, PS3.8 9.1.5), an idle association after ``network_timeout``; a file over
``max_file_mb`` is answered A700 (out of resources) and never stored.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from sitebench.qc.intake import DicomListener, IntakeService

__all__ = ["start_storage_scp"]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_PROCESSING_FAILURE = 0xC210


def start_storage_scp(service: "IntakeService", listener: "DicomListener") -> Any:
    """Start a threaded Storage SCP; returns the server (``.shutdown()`` stops it)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    ae = AE(ae_title=listener.ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.require_calling_aet = sorted(service.ae_sites)
    ae.require_called_aet = True  # an association must call this gate by its own AE title
    ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs
    ae.maximum_associations = listener.max_associations
    ae.network_timeout = listener.network_timeout
    ae.acse_timeout = listener.acse_timeout
    ae.dimse_timeout = listener.dimse_timeout
    transfers: dict[int, str] = {}

    def transfer_of(event) -> str:
        key = id(event.assoc)
        if key not in transfers:
            calling = str(event.assoc.requestor.ae_title).strip()
            transfers[key] = service.begin_transfer(service.ae_sites[calling], "dicom", calling)
        return transfers[key]

    def on_store(event) -> int:
        transfer = transfer_of(event)
        data = event.encoded_dataset(include_meta=True)
        if len(data) > service.max_file_bytes:
            service.refuse(transfer, len(data), f"file of {len(data)} bytes exceeds the "
                                                 f"{service.max_file_bytes}-byte limit")
            return STATUS_OUT_OF_RESOURCES
        try:
            service.receive(data, transfer)
        except Exception as exc:  # noqa: BLE001 - not stored: tell the sender, keep serving
            logging.getLogger("sitebench.qc.intake").error("C-STORE not stored: %s", exc)
            return STATUS_PROCESSING_FAILURE
        return STATUS_SUCCESS

    def on_end(event, how: str) -> None:
        transfer = transfers.pop(id(event.assoc), None)
        if transfer is not None:
            service.end_transfer(transfer, how)

    def on_rejected(event) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        if calling in service.ae_sites:
            why = f"called AE title is not this gate's ({listener.ae_title})"
        else:
            why = "calling AE title is not registered to any site"
        service.reject_association(calling, why)

    handlers = [(evt.EVT_C_STORE, on_store),
                (evt.EVT_RELEASED, lambda e: on_end(e, "association released")),
                (evt.EVT_ABORTED, lambda e: on_end(e, "association aborted")),
                (evt.EVT_REJECTED, on_rejected)]
    return ae.start_server((listener.host, listener.port), block=False, evt_handlers=handlers)
