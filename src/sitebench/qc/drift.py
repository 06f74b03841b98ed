"""Scanner drift against a qualified baseline, and per-site image-quality outliers.

Drift (:class:`DriftMonitor`)
-----------------------------
Series parameters are the flat BIDS-keyed dicts of
:func:`sitebench.qc.dicom_params.read_series` (``SeriesParameters.parameters``
or ``.to_dict()``) or dcm2niix sidecars.

*Scanner key* (:func:`scanner_key`): ``Manufacturer|DeviceSerialNumber`` when
the series carries a ``DeviceSerialNumber``, else
``Manufacturer|StationName`` when it carries a ``StationName``, else
``Manufacturer|ManufacturersModelName``. The model is deliberately *not* part
of the key when a serial number / station name identifies the physical
scanner: otherwise a model upgrade of the same machine (Prisma -> Prisma_fit)
would open a new scanner with a fresh baseline and could never be reported as
``model`` drift. ``read_series`` never extracts serial number / station name
(they are PHI-profile attributes), so with its output the key is
manufacturer + model and a model change starts a new scanner.

*Baseline*: per (site, scanner) the FIRST series whose verdict status is
``"pass"`` becomes the qualified baseline and is never replaced. Series
arriving before it (warn / fail / undetermined) raise nothing.

*Comparison*: every later series, whatever its verdict, is compared key by key
with the baseline. Numbers are equal within 1e-6 relative (1e-9 absolute near
zero); lists / dicts elementwise; strings exactly. Keys on one side only are
reported with ``change="appeared"`` / ``"disappeared"`` (the missing side's
value is ``None``).

Ignored keys (:data:`IGNORED_KEYS`): per-series identity and bookkeeping
(UIDs, ``n_files``, anything starting with ``_`` such as ``_missing`` /
``_phi_attributes_present``, dates and times, series / acquisition numbers,
converter version), every PS3.15 PHI attribute name (the scanner identity
keys among them are already in the scanner key), and per-exam adjustments
that dcm2niix sidecars carry but that are not protocol (SAR, TxRefAmp,
ShimSetting, TablePosition, ImagingFrequency, ConsistencyInfo, BidsGuess,
ImageComments, StudyDescription), and the exam's slice prescription
(NumberOfSlices, SliceCoverageMM, MaxSliceStepMM: the protocol's coverage and
slice-gap rules judge those on every series, so a technologist's short coverage
is a deviation of that series, not scanner drift). ``SeriesDescription`` and
``ProtocolName`` ARE compared (``parameter`` events).

*One acquisition, whatever its DICOM format*: keys whose value depends on
whether the series was saved as classic or enhanced MR DICOM
(:data:`sitebench.qc.protocol.FORMAT_DEPENDENT_KEYS`) are compared in their
:func:`sitebench.qc.protocol.comparable` view, as the protocol rules compare
them (ScanningSequence "GR\\EP" and "EP" are one value), and AcquisitionMatrix
appearing or disappearing is no event (enhanced MR images have none, PS3.3
C.8.13): a site that switches its export to enhanced DICOM changes no protocol.

*Reference baseline*: :meth:`DriftMonitor.qualify` makes a reference series
qualified outside the gate (``sitebench qc check --baseline``) the baseline of
its scanner, whatever any verdict says; an existing baseline is never replaced.

*Kinds*: ``SoftwareVersions`` -> ``software``; ``ManufacturersModelName`` ->
``model``; ``ReceiveCoilName`` / ``CoilString`` / ``ReceiveCoilActiveElements``
-> ``coil``; anything else -> ``parameter``, EXCEPT that when the series'
``SoftwareVersions`` differs from the baseline, every non-model, non-coil
difference (e.g. Siemens VE11 -> XA ``SequenceName`` -> ``PulseSequenceName``,
``InversionTime`` -> ``InversionTimes``) is tagged ``software`` as following
the upgrade. Model and coil keep their kinds (hardware).

*New scanner*: a scanner first seen at a site that already has a qualified
scanner for the same kind of series (a replacement, or a scanner added) raises
one ``scanner`` event on its first series, whatever its verdict; it then
qualifies its own baseline as above.

*Once only*: an event for the same (site, scanner, parameter, observed value)
is raised the first time it is seen, never again.

The monitor's whole memory is a JSON-able dict (``.state``) so the gate can
persist it with ``json.dumps`` and reload it with ``DriftMonitor(state)``.

Site history (:class:`SiteHistory`, :func:`robust_z`)
-----------------------------------------------------
``robust_z = (value - median) / (1.4826 * MAD)``; ``None`` with fewer than
:data:`MIN_HISTORY` (5) history values or when MAD is 0 (more than half the
history identical: no robust scale, so no z is claimed rather than an
infinite one).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from sitebench.errors import SitebenchError
from sitebench.provenance import jsonable, utc_now
from sitebench.qc.dicom_params import PARSER_VERSION, PHI_KEYWORDS, keys_added_since
from sitebench.qc.protocol import FORMAT_DEPENDENT_KEYS, same_comparable

__all__ = ["DriftEvent", "DriftMonitor", "SiteHistory", "robust_z", "scanner_key",
           "IGNORED_KEYS", "MIN_HISTORY", "MAD_SCALE", "REL_TOL"]

REL_TOL = 1e-6
ABS_TOL = 1e-9
MIN_HISTORY = 5
MAD_SCALE = 1.4826
VERDICT_STATUSES = ("pass", "warn", "fail", "undetermined")
STATE_VERSION = 1

IGNORED_KEYS: frozenset[str] = frozenset({
    # identity / bookkeeping
    "SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
    "n_files", "SeriesNumber", "AcquisitionNumber", "InstanceNumber",
    "ConversionSoftware", "ConversionSoftwareVersion",
    # dates / times
    "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime", "ContentDate",
    "ContentTime", "SeriesDate", "SeriesTime", "StudyDate", "StudyTime",
    "InstanceCreationDate", "InstanceCreationTime",
    # per-exam adjustments / free text in dcm2niix sidecars
    "SAR", "TxRefAmp", "ShimSetting", "TablePosition", "ImagingFrequency",
    "ConsistencyInfo", "BidsGuess", "ImageComments", "StudyDescription",
    # the exam's slice prescription: judged on every series by the protocol's coverage and slice-gap
    # rules; as drift, each short-coverage series was reported a second time, as a scanner change
    "NumberOfSlices", "SliceCoverageMM", "MaxSliceStepMM",
}) | frozenset(PHI_KEYWORDS)

_KIND_OF = {"SoftwareVersions": "software", "ManufacturersModelName": "model",
            "ReceiveCoilName": "coil", "CoilString": "coil",
            "ReceiveCoilActiveElements": "coil"}


def _ignored(key: str) -> bool:
    return key.startswith("_") or key in IGNORED_KEYS


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def scanner_key(parameters: Mapping[str, Any]) -> str:
    """``Manufacturer|serial-or-station`` if known, else ``Manufacturer|model`` (see module doc)."""
    maker = _text(parameters.get("Manufacturer")) or "unknown"
    ident = _text(parameters.get("DeviceSerialNumber")) or _text(parameters.get("StationName"))
    if not ident:
        ident = _text(parameters.get("ManufacturersModelName")) or "unknown"
    return f"{maker}|{ident}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=ABS_TOL)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@dataclass
class DriftEvent:
    """One difference between a series and its scanner's qualified baseline."""

    site: str
    scanner: str
    series_uid: str
    parameter: str
    baseline: Any
    observed: Any
    kind: str  # software | model | coil | parameter | scanner
    change: str  # changed | appeared | disappeared
    first_seen: str
    baseline_series_uid: str = ""

    def to_dict(self) -> dict:
        return jsonable(asdict(self))

    def __str__(self) -> str:
        return (f"DRIFT[{self.kind}] {self.site} {self.scanner} {self.parameter} {self.change}: "
                f"{self.baseline!r} -> {self.observed!r} (series {self.series_uid})")


class DriftMonitor:
    """Per (site, scanner) qualified baselines and once-only drift events."""

    def __init__(self, state: dict | None = None) -> None:
        if state is None:
            state = {"version": STATE_VERSION, "baselines": {}, "seen": []}
        if not isinstance(state, dict) or not isinstance(state.get("baselines"), dict) \
                or not isinstance(state.get("seen"), list):
            raise SitebenchError("drift monitor state is not a {'baselines': {...}, 'seen': [...]} dict")
        self._state = json.loads(json.dumps(jsonable(state)))  # private copy
        self._seen = set(self._state["seen"])

    @property
    def state(self) -> dict:
        self._state["seen"] = sorted(self._seen)
        return self._state

    def baseline(self, site: str, scanner: str) -> dict | None:
        """The qualified baseline's parameters, or ``None`` if none yet."""
        entry = self._state["baselines"].get(site, {}).get(scanner)
        return None if entry is None else dict(entry["parameters"])

    def baseline_series_uid(self, site: str, scanner: str) -> str | None:
        entry = self._state["baselines"].get(site, {}).get(scanner)
        return None if entry is None else entry["series_uid"]

    def observe(self, site: str, parameters: dict, verdict_status: str, series_uid: str,
                when: str | None = None, series_type: str | None = None) -> list[DriftEvent]:
        """Record one series; return the drift events it raises for the first time.

        ``series_type`` (the matched protocol's name) keeps one baseline per kind of series
        on a scanner, so a T2 is never compared with the T1 that qualified first.
        """
        if not isinstance(site, str) or not site.strip():
            raise SitebenchError("drift: site must be a non-empty string")
        if verdict_status not in VERDICT_STATUSES:
            raise SitebenchError(f"drift: verdict status {verdict_status!r} is not one of "
                                 f"{', '.join(VERDICT_STATUSES)}")
        if not isinstance(parameters, Mapping):
            raise SitebenchError("drift: parameters must be a dict")
        params = {k: v for k, v in jsonable(dict(parameters)).items() if not _ignored(k)}
        scanner = scanner_key(parameters) + (f"|{series_type}" if series_type else "")
        per_site = self._state["baselines"].setdefault(site, {})
        entry = per_site.get(scanner)
        if entry is None:
            events = self._new_scanner(site, scanner, per_site, series_type, str(series_uid), when)
            if verdict_status == "pass":
                per_site[scanner] = {"series_uid": str(series_uid), "parameters": params,
                                     "qualified": when or utc_now(), "parser_version": PARSER_VERSION}
            elif not per_site:
                del self._state["baselines"][site]
            return events

        base = entry["parameters"]
        self._adopt_new_keys(entry, params)
        software_changed = not _same(base.get("SoftwareVersions"), params.get("SoftwareVersions"))
        stamp = when or utc_now()
        events: list[DriftEvent] = []
        for key in sorted(set(base) | set(params)):
            in_base, in_new = key in base, key in params
            if in_base and in_new and _same(base[key], params[key]):
                continue
            if key in FORMAT_DEPENDENT_KEYS:
                if in_base and in_new and same_comparable(key, base[key], params[key]):
                    continue  # the same value once the DICOM format is folded out
                if key == "AcquisitionMatrix" and in_base != in_new:
                    continue  # absent from enhanced MR images: a change of format, not of acquisition
            b, o = base.get(key), params.get(key)
            change = "changed" if in_base and in_new else ("appeared" if in_new else "disappeared")
            kind = _KIND_OF.get(key, "parameter")
            if kind == "parameter" and software_changed:
                kind = "software"
            token = json.dumps([site, scanner, key, change, o], sort_keys=True)
            if token in self._seen:
                continue
            self._seen.add(token)
            events.append(DriftEvent(site=site, scanner=scanner, series_uid=str(series_uid),
                                     parameter=key, baseline=b, observed=o, kind=kind,
                                     change=change, first_seen=stamp,
                                     baseline_series_uid=entry["series_uid"]))
        return events


    @staticmethod
    def _adopt_new_keys(entry: dict, params: dict) -> None:
        """A baseline read by an older parser lacks the keys later versions extract: the first
        series compared with it fills them in (listed under ``adopted``), so a sitebench upgrade
        reports no parameter as having appeared. Keys the old parser did read stay compared."""
        version = int(entry.get("parser_version", 1))
        if version >= PARSER_VERSION:
            return
        new_keys = keys_added_since(version)
        adopted = sorted(k for k in params if k in new_keys and k not in entry["parameters"])
        for key in adopted:
            entry["parameters"][key] = params[key]
        if adopted:
            entry["adopted"] = sorted(set(entry.get("adopted", [])) | set(adopted))
        entry["parser_version"] = PARSER_VERSION

    def qualify(self, site: str, parameters: dict, series_uid: str, when: str | None = None,
                series_type: str | None = None) -> str:
        """Make a reference series the qualified baseline of its scanner at ``site``; returns the scanner key.

        For a baseline qualified outside the gate (a reference series a physicist names, e.g.
        ``sitebench qc check --baseline``). An existing baseline for that scanner is kept: a
        baseline is never replaced.
        """
        if not isinstance(site, str) or not site.strip():
            raise SitebenchError("drift: site must be a non-empty string")
        if not isinstance(parameters, Mapping):
            raise SitebenchError("drift: baseline parameters must be a dict")
        scanner = scanner_key(parameters) + (f"|{series_type}" if series_type else "")
        per_site = self._state["baselines"].setdefault(site, {})
        if scanner not in per_site:
            params = {k: v for k, v in jsonable(dict(parameters)).items() if not _ignored(k)}
            # a `qc inspect --json` record says which parser read it; one without the field is older
            per_site[scanner] = {"series_uid": str(series_uid), "parameters": params,
                                 "qualified": when or utc_now(),
                                 "parser_version": int(parameters.get("_parser_version") or 1)}
        return scanner

    def _new_scanner(self, site: str, scanner: str, per_site: dict, series_type: str | None, series_uid: str,
                     when: str | None) -> list[DriftEvent]:
        """A scanner first seen at a site that already has a qualified scanner for this kind of series.

        A replaced or added scanner (a new serial number) gets a fresh baseline, so no parameter
        can drift against the old one; the change of scanner itself is the event (kind
        ``scanner``), raised once, on the new scanner's first series whatever its verdict.
        """
        suffix = f"|{series_type}" if series_type else ""
        others = sorted(key for key in per_site if key != scanner and (not suffix or key.endswith(suffix)))
        if not others:
            return []
        token = json.dumps([site, scanner, "scanner", "appeared"], sort_keys=True)
        if token in self._seen:
            return []
        self._seen.add(token)
        return [DriftEvent(site=site, scanner=scanner, series_uid=series_uid, parameter="scanner",
                           baseline=", ".join(others), observed=scanner, kind="scanner", change="appeared",
                           first_seen=when or utc_now(), baseline_series_uid=per_site[others[0]]["series_uid"])]


# --------------------------------------------------------------------------- site history


def robust_z(history: Sequence[float], value: float) -> float | None:
    """``(value - median) / (1.4826 * MAD)``; None with < 5 finite history values or MAD == 0."""
    values = sorted(float(v) for v in history
                    if v is not None and math.isfinite(float(v)))
    if len(values) < MIN_HISTORY or value is None or not math.isfinite(float(value)):
        return None
    med = _median(values)
    mad = _median(sorted(abs(v - med) for v in values))
    if mad == 0:
        return None
    return (float(value) - med) / (MAD_SCALE * mad)


def _median(sorted_values: list[float]) -> float:
    n = len(sorted_values)
    mid = n // 2
    return sorted_values[mid] if n % 2 else 0.5 * (sorted_values[mid - 1] + sorted_values[mid])


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars
        except (TypeError, ValueError):
            return None
    value = float(value)
    return value if math.isfinite(value) else None


class SiteHistory:
    """Per-site lists of image-quality metric values; flags robust-z outliers."""

    def __init__(self, state: dict | None = None) -> None:
        if state is None:
            state = {"version": STATE_VERSION, "sites": {}}
        if not isinstance(state, dict) or not isinstance(state.get("sites"), dict):
            raise SitebenchError("site history state is not a {'sites': {...}} dict")
        self._state = json.loads(json.dumps(jsonable(state)))

    @property
    def state(self) -> dict:
        return self._state

    def history(self, site: str, metric: str) -> list[float]:
        return list(self._state["sites"].get(site, {}).get(metric, []))

    def flag(self, site: str, metrics: Mapping[str, Any], threshold: float = 3.5) -> list[dict]:
        """Metrics whose |robust z| > threshold against the site's previous values.

        The new (finite) values are appended to the history afterwards, flagged
        or not; non-numeric / non-finite values are skipped entirely.
        """
        if not isinstance(site, str) or not site.strip():
            raise SitebenchError("site history: site must be a non-empty string")
        per_site = self._state["sites"].setdefault(site, {})
        flagged: list[dict] = []
        for metric in sorted(metrics):
            value = _finite(metrics[metric])
            if value is None:
                continue
            past = per_site.get(metric, [])
            z = robust_z(past, value)
            if z is not None and abs(z) > threshold:
                med = _median(sorted(past))
                mad = _median(sorted(abs(v - med) for v in past))
                flagged.append({"site": site, "metric": metric, "value": value, "z": z,
                                "median": med, "mad": mad, "n_history": len(past),
                                "threshold": threshold})
        for metric in sorted(metrics):
            value = _finite(metrics[metric])
            if value is not None:
                per_site.setdefault(metric, []).append(value)
        return flagged
