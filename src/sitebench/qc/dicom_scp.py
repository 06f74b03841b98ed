"""DICOM Storage SCP (pynetdicom) in front of :class:`sitebench.qc.intake.IntakeService`.

Each site's scanners / PACS are known by their *calling* AE titles (the sender's
identity, as PACS whitelists do); an association from an unknown title, or one that calls
another AE title than this gate's, is rejected and audited. Every C-STORE is stored and
recorded before its success status is returned: the raw encoded dataset is kept as
received (no decode and re-encode).

A calling AE title is only a name the sender picks, so where a site lists ``dicom_peers`` the
peer's address must be in one of them too: an association from elsewhere is aborted as soon as it
is established and audited, and any C-STORE on it is refused (0124, not authorised) and never
stored. With ``dicom.tls`` the listener speaks TLS (PS3.15 B.1) and, by default, requires a client
certificate signed by the trial's CA (``client_ca``): pynetdicom's ``ssl_context``.

Limits (``dicom:`` in the intake YAML): at most ``max_associations`` at once; a bare TCP
connect that sends no association request is dropped after ``acse_timeout`` seconds (the
ARTIM timer, PS3.8 9.1.5), an idle association after ``network_timeout``; a file over
``max_file_mb`` is answered A700 (out of resources) and never stored.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import ssl

    from sitebench.qc.intake import DicomListener, IntakeService

__all__ = ["start_storage_scp"]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_PROCESSING_FAILURE = 0xC210
STATUS_NOT_AUTHORISED = 0x0124  # PS3.7 C.4.2: Refused, not authorized


def tls_context(tls) -> "ssl.SSLContext":
    """Server-side TLS for the Storage SCP: the gate's certificate, client certificates checked
    against the trial CA (TLS 1.2 or later)."""
    import ssl

    from sitebench.errors import SitebenchError

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
        context.load_verify_locations(cafile=str(tls.client_ca))
    except (OSError, ssl.SSLError) as exc:
        raise SitebenchError(f"DICOM TLS: cannot load certificate, key or CA ({exc})", tls.certificate) from None
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    return context


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
    refused: set[int] = set()  # associations from an address not registered to their site

    def site_of(event) -> str:
        return service.ae_sites[str(event.assoc.requestor.ae_title).strip()]

    def on_established(event) -> None:
        site, address = site_of(event), str(event.assoc.requestor.address)
        if not service.peer_allowed(site, address):
            refused.add(id(event.assoc))
            service.reject_association(str(event.assoc.requestor.ae_title).strip(),
                                       f"peer address {address} is not one of site {site}'s dicom_peers")
            event.assoc.abort()

    def transfer_of(event) -> str:
        key = id(event.assoc)
        if key not in transfers:
            calling = str(event.assoc.requestor.ae_title).strip()
            transfers[key] = service.begin_transfer(service.ae_sites[calling], "dicom", calling)
        return transfers[key]

    def on_store(event) -> int:
        if id(event.assoc) in refused:  # judged once, when the association was established
            return STATUS_NOT_AUTHORISED
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
        refused.discard(id(event.assoc))
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

    handlers = [(evt.EVT_ESTABLISHED, on_established), (evt.EVT_C_STORE, on_store),
                (evt.EVT_RELEASED, lambda e: on_end(e, "association released")),
                (evt.EVT_ABORTED, lambda e: on_end(e, "association aborted")),
                (evt.EVT_REJECTED, on_rejected)]
    ssl_context = tls_context(listener.tls) if listener.tls is not None else None
    return ae.start_server((listener.host, listener.port), block=False, evt_handlers=handlers,
                           ssl_context=ssl_context)
