"""A simulated 3-D scan written as a real DICOM MR series, as a scanner would send it.

:func:`write_series` writes one volume either as classic MR Image Storage (one Part 10 file per
slice) or as one Enhanced MR Image Storage file (multi-frame, with its functional groups), with
the acquisition headers a scanner writes (:class:`SeriesHeader`), so the upload-time QC gate,
dcm2niix and any PACS read it as they read real data.

Geometry: ``affine`` maps NIfTI voxel indices (i, j, k) to RAS+ world mm. DICOM is LPS, so the
world is flipped in x and y. The array's third axis is the slice axis: slice k is one file
(classic) or frame k+1 (enhanced), InstanceNumber / InStackPositionNumber k+1, at
ImagePositionPatient = LPS position of voxel (0, 0, k). In a slice, the DICOM column index is
array axis i and the row index is array axis j (the dcm2niix convention: NIfTI i = column), so

* ImageOrientationPatient = (LPS direction of axis i, LPS direction of axis j);
* PixelSpacing = (row spacing, column spacing) = (|axis j|, |axis i|);
* Rows = shape[1], Columns = shape[0]; the stored frame k is ``image[:, :, k].T``;
* SliceThickness = SpacingBetweenSlices = |axis k| (contiguous slices).

What readers then build: a reader that stacks slices along the normal of the image plane
(row cosine x column cosine), as ``sitebench.qc.dicom_files.series_nifti`` does, gets the voxel
grid (j, i, k) of a right-handed input affine (its array is ``image.transpose(1, 0, 2)`` with
axes i and j of the affine swapped; same world positions), and (j, i, reversed k) of a
left-handed one. Brought to the closest canonical orientation (``nibabel.as_closest_canonical``)
both equal the input. The in-plane axes must be orthogonal and the slice axis perpendicular to
them (a sheared grid has no DICOM image plane); anything else (oblique, any voxel size, fewer
slices at the same positions) is written as is.

Speed: classic series are written from pre-encoded bytes: the header elements common to every
slice are encoded once per series by pydicom, and each file is those bytes with its own
SOPInstanceUID, InstanceNumber, ImagePositionPatient, SliceLocation and pixels spliced in at
their places (tag order), so a file costs one join and one write (about 0.3-0.5 ms for 80x96).
The enhanced file is written the same way: pydicom encodes the header and the shared functional
groups, and each frame's per-frame group is the common bytes with its position and in-stack
number spliced in (about 15-20 ms for 80 frames). pydicom reads every file written here and
writes it back byte for byte unchanged (the tests check it).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from sitebench.errors import SitebenchError

__all__ = ["SeriesHeader", "simulated_uid", "write_series", "MR_IMAGE_STORAGE", "ENHANCED_MR_IMAGE_STORAGE",
           "GYROMAGNETIC_MHZ_PER_T"]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
#: 1H gyromagnetic ratio / 2 pi (CODATA 2018), for ImagingFrequency = gamma * B0
GYROMAGNETIC_MHZ_PER_T = 42.577478518
_IMPLEMENTATION_VERSION = "SITEBENCH_SIM"


@dataclass(frozen=True)
class SeriesHeader:
    """What a real scanner writes into every file of one series (plain data; units as DICOM: ms, degrees, T)."""

    manufacturer: str            # e.g. "SIEMENS", "GE MEDICAL SYSTEMS", "Philips Medical Systems"
    model: str                   # ManufacturerModelName
    software_versions: str
    device_serial_number: str
    station_name: str
    institution_name: str
    field_strength: float        # MagneticFieldStrength, T
    series_description: str
    protocol_name: str
    repetition_time_ms: float
    echo_time_ms: float
    inversion_time_ms: float | None
    flip_angle_deg: float
    scanning_sequence: str       # e.g. "GR\\IR" (backslash-separated multi-value)
    sequence_variant: str        # e.g. "SK\\SP\\MP"
    sequence_name: str           # SequenceName (PulseSequenceName in enhanced files), e.g. "*tfl3d1_16ns"
    mr_acquisition_type: str     # "3D"
    patient_name: str            # synthetic identifiers, PHI-shaped on purpose
    patient_id: str
    patient_birth_date: str      # YYYYMMDD
    patient_sex: str             # "F" / "M"
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    acquisition_datetime: datetime  # study/series/acquisition/content dates and times derive from it
    series_number: int
    accession_number: str = ""
    enhanced: bool = False       # True: one Enhanced MR Image Storage file (multi-frame); False: one file per slice
    pixel_bandwidth: float | None = None
    echo_train_length: int | None = None


def simulated_uid(*parts: object) -> str:
    """A deterministic DICOM UID from the given parts (pydicom.uid.generate_uid with entropy_srcs),
    so a seeded trial writes the same UIDs every time."""
    from pydicom.uid import generate_uid

    if not parts:
        raise SitebenchError("simulated_uid needs at least one part (a random UID would not be reproducible)")
    return str(generate_uid(entropy_srcs=[repr(p) if not isinstance(p, str) else p for p in parts]))


# --------------------------------------------------------------------------- value formatting
def _ds(value: float) -> str:
    """A DS string (at most 16 characters) keeping as many digits as fit; tiny float noise is 0."""
    from pydicom.valuerep import format_number_as_ds

    value = float(value)
    if abs(value) < 1e-9:
        return "0"
    if value == round(value) and abs(value) < 1e15:
        return str(int(round(value)))
    text = format_number_as_ds(value)
    return text[:-2] if text.endswith(".0") else text


def _ds_multi(values) -> list[str]:
    return [_ds(v) for v in values]


def _date(when: datetime) -> str:
    return when.strftime("%Y%m%d")


def _time(when: datetime) -> str:
    return when.strftime("%H%M%S.%f")


def _multi(text: str) -> list[str] | str:
    parts = [p for p in str(text).split("\\")]
    return parts if len(parts) > 1 else parts[0]


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class _Geometry:
    row_cosine: np.ndarray      # LPS direction of increasing column index (array axis i)
    column_cosine: np.ndarray   # LPS direction of increasing row index (array axis j)
    normal: np.ndarray
    pixel_spacing: tuple[float, float]  # (row spacing = |axis j|, column spacing = |axis i|)
    slice_mm: float
    positions: np.ndarray       # (n_slices, 3) LPS position of voxel (0, 0, k)


def _geometry(affine: np.ndarray, n_slices: int) -> _Geometry:
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise SitebenchError(f"affine must be a finite 4x4 matrix, not shape {affine.shape}")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    axes = lps[:3, :3]
    sizes = np.linalg.norm(axes, axis=0)
    if np.any(sizes <= 1e-6):
        raise SitebenchError("affine has a zero-length voxel axis")
    unit = axes / sizes
    if abs(float(unit[:, 0] @ unit[:, 1])) > 1e-4:
        raise SitebenchError("affine's in-plane axes are not orthogonal: no DICOM image plane")
    normal = np.cross(unit[:, 0], unit[:, 1])
    if abs(abs(float(normal @ unit[:, 2])) - 1.0) > 1e-4:
        raise SitebenchError("affine's slice axis is not perpendicular to the image plane (a sheared grid)")
    positions = (lps @ np.vstack([np.zeros((2, n_slices)), np.arange(n_slices), np.ones(n_slices)]))[:3].T
    return _Geometry(row_cosine=unit[:, 0], column_cosine=unit[:, 1], normal=normal,
                     pixel_spacing=(float(sizes[1]), float(sizes[0])), slice_mm=float(sizes[2]),
                     positions=positions)


def _pixels(image: np.ndarray) -> np.ndarray:
    """(slices, rows = axis j, columns = axis i) little-endian uint16, checked."""
    image = np.asarray(image)
    if image.ndim != 3 or min(image.shape) < 1:
        raise SitebenchError(f"image must be a 3-D array, not shape {image.shape}")
    if max(image.shape[:2]) > 65535:
        raise SitebenchError(f"in-plane size {image.shape[:2]} exceeds DICOM Rows/Columns (65535)")
    if image.dtype.kind == "f":
        if not np.all(np.isfinite(image)):
            raise SitebenchError("image holds NaN or infinite values")
        rounded = np.rint(image)
        if not np.array_equal(rounded, image):
            raise SitebenchError("image holds non-integer values (round it before writing DICOM)")
        image = rounded
    elif image.dtype.kind not in "iub":
        raise SitebenchError(f"image must be numeric, not {image.dtype}")
    low, high = (float(image.min()), float(image.max()))
    if low < 0 or high > 65535:
        raise SitebenchError(f"image values {low:g}..{high:g} do not fit unsigned 16 bits")
    return np.ascontiguousarray(image.astype("<u2").transpose(2, 1, 0))


# --------------------------------------------------------------------------- the common header
def _common(header: SeriesHeader, geometry: _Geometry, pixels: np.ndarray, enhanced: bool):
    """The dataset elements shared by every file of the series (classic) or the one file (enhanced)."""
    from pydicom.dataset import Dataset

    n_slices, rows, columns = pixels.shape
    when = header.acquisition_datetime
    high = int(pixels.max())
    bits_stored = 12 if high < 4096 else 16
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE" if enhanced else "ND"]
    ds.InstanceCreationDate = _date(when)
    ds.InstanceCreationTime = _time(when)
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE if enhanced else MR_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = _date(when)
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = _time(when)
    if enhanced:
        ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S.%f")
    else:
        ds.AcquisitionDate = _date(when)
        ds.AcquisitionTime = _time(when)
    ds.AccessionNumber = header.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = header.manufacturer
    ds.InstitutionName = header.institution_name
    ds.ReferringPhysicianName = ""
    ds.StationName = header.station_name
    ds.SeriesDescription = header.series_description
    ds.ManufacturerModelName = header.model
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = header.patient_birth_date
    ds.PatientSex = header.patient_sex
    ds.BodyPartExamined = "BRAIN"
    ds.MRAcquisitionType = header.mr_acquisition_type
    if not enhanced:  # MR Image module (C.8.3.1); enhanced files keep these in the functional groups
        ds.ScanningSequence = _multi(header.scanning_sequence)
        ds.SequenceVariant = _multi(header.sequence_variant)
        ds.ScanOptions = ""
        ds.SequenceName = header.sequence_name
        ds.AngioFlag = "N"
        ds.SliceThickness = _ds(geometry.slice_mm)
        ds.RepetitionTime = _ds(header.repetition_time_ms)
        ds.EchoTime = _ds(header.echo_time_ms)
        if header.inversion_time_ms is not None:
            ds.InversionTime = _ds(header.inversion_time_ms)
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = _ds(round(GYROMAGNETIC_MHZ_PER_T * header.field_strength, 6))
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = "1"
        ds.SpacingBetweenSlices = _ds(geometry.slice_mm)
        ds.EchoTrainLength = "" if header.echo_train_length is None else str(int(header.echo_train_length))
        if header.pixel_bandwidth is not None:
            ds.PixelBandwidth = _ds(header.pixel_bandwidth)
    ds.MagneticFieldStrength = _ds(header.field_strength)
    ds.DeviceSerialNumber = header.device_serial_number
    ds.SoftwareVersions = header.software_versions
    ds.ProtocolName = header.protocol_name
    if not enhanced:
        ds.FlipAngle = _ds(header.flip_angle_deg)
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = header.study_uid
    ds.SeriesInstanceUID = header.series_uid
    ds.StudyID = ""
    ds.SeriesNumber = str(int(header.series_number))
    ds.AcquisitionNumber = "1"
    if not enhanced:
        ds.ImageOrientationPatient = _ds_multi([*geometry.row_cosine, *geometry.column_cosine])
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    if not enhanced:
        ds.ImagesInAcquisition = str(n_slices)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    if not enhanced:
        ds.PixelSpacing = _ds_multi(geometry.pixel_spacing)
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if not enhanced:
        low = int(pixels.min())
        ds.WindowCenter = _ds((low + high) / 2)
        ds.WindowWidth = _ds(max(1, high - low))
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
    return ds


def _file_meta(sop_class: str, sop_instance: str):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = _EXPLICIT_VR_LE
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    return meta


# --------------------------------------------------------------------------- byte-level encoding
def _encode(element) -> bytes:
    """One data element, explicit VR little endian, as pydicom writes it."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_data_element(buffer, element)
    return buffer.getvalue()


def _short(group: int, element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _ui(group: int, element: int, uid: str) -> bytes:
    return _short(group, element, b"UI", uid.encode("ascii"), b"\x00")


_SOP_INSTANCE, _INSTANCE_NUMBER, _POSITION, _SLICE_LOCATION, _PIXEL_DATA = (
    0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)
_VARIABLE = (_SOP_INSTANCE, _INSTANCE_NUMBER, _POSITION, _SLICE_LOCATION, _PIXEL_DATA)


class _ClassicWriter:
    """Pre-encoded pieces of one classic series: each file is fixed bytes with its own values between."""

    def __init__(self, common) -> None:
        from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

        fixed = {int(el.tag): _encode(el) for el in common}
        tags = sorted([*fixed, *_VARIABLE])
        self.pieces: list[bytes | int] = []  # bytes, or the tag whose per-file value goes there
        run: list[bytes] = []
        for tag in tags:
            if tag in fixed:
                run.append(fixed[tag])
            else:
                self.pieces.append(b"".join(run))
                self.pieces.append(tag)
                run = []
        self.pieces.append(b"".join(run))
        # file meta (PS3.10 7.1): group length, then the elements; only the instance UID varies
        self.meta_head = (struct.pack("<HH2s2xI", 0x0002, 0x0001, b"OB", 2) + b"\x00\x01" +
                          _ui(0x0002, 0x0002, MR_IMAGE_STORAGE))
        self.meta_tail = (_ui(0x0002, 0x0010, _EXPLICIT_VR_LE) + _ui(0x0002, 0x0012, PYDICOM_IMPLEMENTATION_UID) +
                          _short(0x0002, 0x0013, b"SH", _IMPLEMENTATION_VERSION.encode(), b" "))

    def file_bytes(self, sop_uid: str, number: int, position: np.ndarray, location: float,
                   pixels: bytes) -> bytes:
        instance = _ui(0x0002, 0x0003, sop_uid)
        length = len(self.meta_head) + len(instance) + len(self.meta_tail)
        values = {
            _SOP_INSTANCE: _ui(0x0008, 0x0018, sop_uid),
            _INSTANCE_NUMBER: _short(0x0020, 0x0013, b"IS", str(number).encode(), b" "),
            _POSITION: _short(0x0020, 0x0032, b"DS", "\\".join(_ds_multi(position)).encode(), b" "),
            _SLICE_LOCATION: _short(0x0020, 0x1041, b"DS", _ds(location).encode(), b" "),
            _PIXEL_DATA: struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", len(pixels)) + pixels,
        }
        out = [b"\x00" * 128, b"DICM", struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, length),
               self.meta_head, instance, self.meta_tail]
        out += [values[p] if isinstance(p, int) else p for p in self.pieces]
        return b"".join(out)


def _write_classic(pixels: np.ndarray, geometry: _Geometry, header: SeriesHeader, out: Path) -> list[Path]:
    writer = _ClassicWriter(_common(header, geometry, pixels, enhanced=False))
    files = []
    for k in range(pixels.shape[0]):
        position = geometry.positions[k]
        data = writer.file_bytes(simulated_uid(header.series_uid, k), k + 1, position,
                                 float(position @ geometry.normal), pixels[k].tobytes())
        path = out / f"IM_{k + 1:05d}.dcm"
        with open(path, "wb") as handle:
            handle.write(data)
        files.append(path)
    return files


# --------------------------------------------------------------------------- enhanced MR
def _item(**values):
    from pydicom.dataset import Dataset

    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _sequence_head(tag: int) -> bytes:
    return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, b"SQ", 0xFFFFFFFF)


def _sequence_bytes(tag: int, item_content: bytes) -> bytes:
    """A sequence of one undefined-length item holding the encoded elements ``item_content``."""
    return _sequence_head(tag) + _ITEM + item_content + _ITEM_END + _SEQUENCE_END


def _encode_sequence(tag: int, item) -> bytes:
    return _sequence_bytes(tag, b"".join(_encode(el) for el in item))


def _write_enhanced(pixels: np.ndarray, geometry: _Geometry, header: SeriesHeader, out: Path) -> list[Path]:
    """One Enhanced MR Image Storage file (PS3.3 A.36.2): the acquisition in the shared functional
    groups, each frame's position and place in the stack in its per-frame group."""
    import pydicom
    from pydicom.sequence import Sequence

    n_slices, rows, columns = pixels.shape
    ds = _common(header, geometry, pixels, enhanced=True)
    sop_uid = simulated_uid(header.series_uid, "enhanced")
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = "1"
    ds.NumberOfFrames = str(n_slices)
    scanning = {p.strip().upper() for p in header.scanning_sequence.split("\\")}
    variant = {p.strip().upper() for p in header.sequence_variant.split("\\")}
    inversion = header.inversion_time_ms is not None or "IR" in scanning
    echo = ("BOTH" if {"GR", "SE"} <= scanning else "SPIN" if "SE" in scanning else "GRADIENT")
    when = header.acquisition_datetime
    stamp = when.strftime("%Y%m%d%H%M%S.%f")
    # Enhanced MR Image module (C.8.13.1) with the MR Image Description / Common CT and MR Image
    # Description macros (C.8.13.3, C.8.16.2), and the MR Image and Spectroscopy Instance macro (C.8.13.2)
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "UNKNOWN"
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    # MR Pulse Sequence module (C.8.13.4): required for ORIGINAL images
    ds.PulseSequenceName = header.sequence_name
    ds.EchoPulseSequence = echo
    if echo in ("SPIN", "BOTH"):
        ds.MultipleSpinEcho = "NO"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.ArterialSpinLabelingContrast = "NONE"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "YES" if "EP" in scanning else "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL" if "SK" in variant else "SINGLE"
    ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = 1
    # Acquisition Context module (C.7.6.14): Type 2, empty
    ds.AcquisitionContextSequence = Sequence()
    # Multi-frame Dimension module (C.7.6.17): stack, then position in the stack
    dimension_uid = simulated_uid(header.series_uid, "dimension-organization")
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=dimension_uid)])
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = Sequence([
        _item(DimensionOrganizationUID=dimension_uid, DimensionIndexPointer=0x00209056,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="Stack ID"),
        _item(DimensionOrganizationUID=dimension_uid, DimensionIndexPointer=0x00209057,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="In-Stack Position Number")])

    spoiled = "SP" in variant
    timing = dict(RepetitionTime=_ds(header.repetition_time_ms), FlipAngle=_ds(header.flip_angle_deg),
                  EchoTrainLength=str(int(header.echo_train_length or 1)),
                  RFEchoTrainLength=int(header.echo_train_length or 1) if echo != "GRADIENT" else 0,
                  GradientEchoTrainLength=int(header.echo_train_length or 1) if echo == "GRADIENT" else 0,
                  GradientOutputType="PER_NERVE_STIM", GradientOutput=0.5,
                  OperatingModeSequence=Sequence([_item(OperatingModeType="GRADIENT", OperatingMode="IEC_NORMAL")]),
                  SpecificAbsorptionRateSequence=Sequence([_item(SpecificAbsorptionRateDefinition="IEC_HEAD",
                                                                 SpecificAbsorptionRateValue=0.1)]))
    modifier = dict(InversionRecovery="YES" if inversion else "NO", FlowCompensation="NONE",
                    Spoiling="RF_AND_GRADIENT" if spoiled else "NONE", T2Preparation="NO",
                    SpectrallySelectedExcitation="NONE", SpatialPresaturation="NONE", PartialFourier="NO",
                    ParallelAcquisition="NO")
    if inversion:
        modifier["InversionTimes"] = [float(header.inversion_time_ms or 0.0)]
    imaging = dict(MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
                   TransmitterFrequency=round(GYROMAGNETIC_MHZ_PER_T * header.field_strength, 6))
    if header.pixel_bandwidth is not None:
        imaging["PixelBandwidth"] = _ds(header.pixel_bandwidth)
    shared = _item(
        PixelMeasuresSequence=Sequence([_item(SliceThickness=_ds(geometry.slice_mm),
                                              PixelSpacing=_ds_multi(geometry.pixel_spacing),
                                              SpacingBetweenSlices=_ds(geometry.slice_mm))]),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=_ds_multi(
            [*geometry.row_cosine, *geometry.column_cosine]))]),
        FrameAnatomySequence=Sequence([_item(AnatomicRegionSequence=Sequence([_item(
            CodeValue="12738006", CodingSchemeDesignator="SCT", CodeMeaning="Brain")]), FrameLaterality="U")]),
        PixelValueTransformationSequence=Sequence([_item(RescaleIntercept="0", RescaleSlope="1", RescaleType="US")]),
        MRTimingAndRelatedParametersSequence=Sequence([_item(**timing)]),
        MRFOVGeometrySequence=Sequence([_item(InPlanePhaseEncodingDirection="ROW",
                                              MRAcquisitionFrequencyEncodingSteps=rows,
                                              MRAcquisitionPhaseEncodingStepsInPlane=columns,
                                              **({"MRAcquisitionPhaseEncodingStepsOutOfPlane": n_slices}
                                                 if header.mr_acquisition_type == "3D" else {}),
                                              PercentSampling="100", PercentPhaseFieldOfView="100")]),
        MREchoSequence=Sequence([_item(EffectiveEchoTime=float(header.echo_time_ms))]),
        MRModifierSequence=Sequence([_item(**modifier)]),
        MRImagingModifierSequence=Sequence([_item(**imaging)]),
        MRAveragesSequence=Sequence([_item(NumberOfAverages="1")]),
        MRSpatialSaturationSequence=Sequence(),
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frame_type = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    duration_ms = float(header.repetition_time_ms) * rows  # nominal: one TR per phase line
    # per-frame groups: encoded once by pydicom for the values all frames share, each frame's
    # position and place in the stack spliced in (sequences and items of undefined length, PS3.5 7.5)
    frame_type_bytes = _encode_sequence(0x00189226, _item(
        FrameType=frame_type, PixelPresentation="MONOCHROME", VolumetricProperties="VOLUME",
        VolumeBasedCalculationTechnique="NONE", ComplexImageComponent="MAGNITUDE", AcquisitionContrast="UNKNOWN"))
    content_head = b"".join(_encode(el) for el in _item(
        FrameAcquisitionDateTime=stamp, FrameReferenceDateTime=stamp, FrameAcquisitionDuration=duration_ms,
        StackID="1"))
    content_tail = _encode(_item(FrameAcquisitionNumber=1)["FrameAcquisitionNumber"])
    frames = []
    for k in range(n_slices):
        content = (content_head + struct.pack("<HH2sHI", 0x0020, 0x9057, b"UL", 4, k + 1) + content_tail +
                   struct.pack("<HH2sHII", 0x0020, 0x9157, b"UL", 8, 1, k + 1))
        position = _short(0x0020, 0x0032, b"DS", "\\".join(_ds_multi(geometry.positions[k])).encode(), b" ")
        frames.append(_ITEM + frame_type_bytes + _sequence_bytes(0x00209111, content) +
                      _sequence_bytes(0x00209113, position) + _ITEM_END)
    per_frame = _sequence_head(0x52009230) + b"".join(frames) + _SEQUENCE_END
    ds.AcquisitionDuration = round(duration_ms / 1000.0, 3)
    ds.file_meta = _file_meta(ENHANCED_MR_IMAGE_STORAGE, sop_uid)
    ds.preamble = b"\x00" * 128
    buffer = io.BytesIO()  # everything before (5200,9230): the per-frame groups and pixels follow
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True, little_endian=True, implicit_vr=False)
    data = pixels.tobytes()
    path = out / "IM_00001.dcm"
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue())
        handle.write(per_frame)
        handle.write(struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", len(data)))
        handle.write(data)
    return [path]


# --------------------------------------------------------------------------- entry point
def write_series(image: np.ndarray, affine: np.ndarray, header: SeriesHeader, out_dir: str | Path) -> list[Path]:
    """Write ``image`` (3-D, integer-valued float or int array, values >= 0, fits uint16) with
    NIfTI (RAS+) ``affine`` as a DICOM series in ``out_dir``; return the files in instance order.

    Classic (``header.enhanced`` False): MR Image Storage, one file per slice ``IM_00001.dcm``...,
    slice k (third array axis) as InstanceNumber k+1. Enhanced: one Enhanced MR Image Storage file
    ``IM_00001.dcm`` with frame k+1 = slice k. Existing files of the same names are overwritten.
    See the module docstring for the geometry.
    """
    pixels = _pixels(image)
    geometry = _geometry(affine, pixels.shape[0])
    for name, value in (("series_uid", header.series_uid), ("study_uid", header.study_uid),
                        ("frame_of_reference_uid", header.frame_of_reference_uid)):
        if not value or len(value) > 64 or not all(c.isdigit() or c == "." for c in value):
            raise SitebenchError(f"header.{name} is not a DICOM UID")
    if not isinstance(header.acquisition_datetime, datetime):
        raise SitebenchError("header.acquisition_datetime must be a datetime")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if header.enhanced:
        return _write_enhanced(pixels, geometry, header, out)
    return _write_classic(pixels, geometry, header, out)
