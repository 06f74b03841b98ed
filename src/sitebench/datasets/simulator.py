"""A seeded multi-site trial simulator with known truth.

A sponsor runs it before enrolment to stress-test a biomarker against scanner
variability. Subjects are built from the MNI152 2009a template and tissue maps
that the nilearn wheel ships, each smoothly deformed, with a known age and group
effect on grey-matter (GM) volume. Each site's scanner then images them with its
own vendor contrast, intensity scale, bias field, Rician noise, slice thickness
and, where configured, incomplete coverage or a mid-study software upgrade.
Everything injected is written to ``truth.json`` so statistics can be checked
against it.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pandas as pd
from pydantic import Field, model_validator
from scipy import ndimage

from sitebench.config import StrictModel
from sitebench.datasets import manifest as mf
from sitebench.errors import SitebenchError
from sitebench.provenance import code_version, package_versions, sha256_file, utc_now

#: Label values in every simulated label map.
BACKGROUND, CSF, GM, WM = 0, 1, 2, 3
REFERENCE_COLUMN = "gm_volume_ml"
#: The subject's true brain volume (CSF + GM + WM inside the brain, ml): the reference of a brain-extraction model.
BRAIN_VOLUME_COLUMN = "brain_volume_ml"


class ScannerModel(StrictModel):
    name: str
    software: str
    field_strength: float = 3.0


class SequenceProfile(StrictModel):
    """The vendor's 3D T1w sequence as its scanner writes it into the DICOM header (ms, degrees)."""

    series_description: str
    repetition_time_ms: float = Field(gt=0)
    echo_time_ms: float = Field(gt=0)
    inversion_time_ms: float | None = None
    flip_angle_deg: float = Field(gt=0)
    scanning_sequence: str
    sequence_variant: str
    sequence_name: str
    pixel_bandwidth: float | None = None
    echo_train_length: int | None = None
    enhanced: bool = Field(False, description="written as one Enhanced MR multi-frame file, not a file per slice")


class VendorProfile(StrictModel):
    """Contrast and noise of one vendor's T1w sequence, WM intensity = 1."""

    name: str
    gm: float = Field(gt=0, lt=1, description="GM intensity relative to WM")
    csf: float = Field(gt=0, lt=1, description="CSF intensity relative to WM")
    snr: float = Field(gt=1, description="WM signal over noise sigma")
    models: list[ScannerModel]
    upgrade_software: str
    dicom_manufacturer: str = Field("", description="Manufacturer as the scanner writes it (default: name)")
    sequence: SequenceProfile | None = None


class UpgradeConfig(StrictModel):
    """A site's scanner software is upgraded mid-study: contrast and noise change with it."""

    site: str = "S07"
    at_fraction: float = Field(0.5, ge=0, le=1, description="when in the study period it happens")
    gm_shift: float = Field(0.05, description="added to GM/WM intensity ratio after the upgrade")
    noise_factor: float = Field(1.6, gt=0, description="noise sigma multiplier after the upgrade")


class CoverageConfig(StrictModel):
    """A site's technologist misses superior coverage on a share of scans; some are re-scanned."""

    site: str = "S12"
    missing_superior_mm: float = Field(20.0, ge=0)
    fraction: float = Field(0.75, ge=0, le=1, description="share of the site's scans that miss coverage")
    rescan_fraction: float = Field(0.6, ge=0, le=1,
                                   description="share of those re-acquired in the same session once the gate "
                                               "fails them")


class ProtocolDriftConfig(StrictModel):
    """A site's sequence drifts off protocol part-way through: a parameter changes, and contrast with it."""

    site: str = "S03"
    parameter: str = Field("RepetitionTime", pattern="^(RepetitionTime|FlipAngle)$")
    factor: float = Field(1.10, gt=0, description="the parameter is multiplied by this")
    at_fraction: float = Field(0.6, ge=0, le=1)
    gm_shift: float = Field(0.02, description="added to the GM/WM intensity ratio once drifted")


class UnmatchedConfig(StrictModel):
    """A site sends a series that no locked protocol matches (here: a 2D FLAIR sent to the T1w gate)."""

    site: str = "S09"
    series_description: str = "AX_T2_FLAIR"
    count: int = Field(1, ge=0)


class ScannerSwapConfig(StrictModel):
    """A site replaces its scanner part-way through (same vendor and model, a new serial number)."""

    site: str = "S16"
    at_fraction: float = Field(0.5, ge=0, le=1)


class SubjectEffects(StrictModel):
    reference_age: float = 70.0
    age_per_year: float = Field(-0.005, description="fractional change in GM volume per year of age")
    patient: float = Field(-0.06, description="fractional GM volume change, patient vs control")
    subject_sd: float = Field(0.03, ge=0, description="SD of unexplained fractional variation")
    age_range: tuple[float, float] = (55.0, 85.0)


class TrialConfig(StrictModel):
    """Everything that defines a simulated trial; the seed makes it reproducible."""

    name: str = "simulated-trial"
    seed: int = 0
    n_sites: int = Field(20, ge=1, le=99)
    scans_per_site: int = Field(10, ge=1)
    sessions_per_subject: int = Field(2, ge=1, le=4)
    voxel_mm: float = Field(2.0, gt=0)
    thick_slice_mm: float = Field(3.0, gt=0)
    thick_slice_every: int = Field(4, ge=0, description="every k-th site acquires thick slices; 0: none")
    two_scanner_every: int = Field(5, ge=0, description="every k-th site runs two scanners; 0: none")
    study_days: int = Field(360, ge=2)
    start_date: date = date(2026, 1, 5)
    site_gm_sd: float = Field(0.01, ge=0, description="SD of site deviation of the GM/WM ratio")
    scanner_gm_sd: float = Field(0.01, ge=0, description="SD of scanner-within-site deviation")
    bias_field_strength: float = Field(0.3, ge=0, description="log-amplitude of the smooth bias field")
    psf_sigma_voxels: float = Field(0.5, ge=0, description="Gaussian point-spread function: partial volume")
    deformation_mm: float = Field(3.0, ge=0)
    vendors: list[VendorProfile] = Field(default_factory=lambda: list(DEFAULT_VENDORS))
    upgrade: UpgradeConfig | None = Field(default_factory=UpgradeConfig)
    coverage: CoverageConfig | None = Field(default_factory=CoverageConfig)
    protocol_drift: ProtocolDriftConfig | None = Field(default_factory=ProtocolDriftConfig)
    unmatched: UnmatchedConfig | None = Field(default_factory=UnmatchedConfig)
    scanner_swap: ScannerSwapConfig | None = Field(default_factory=ScannerSwapConfig)
    effects: SubjectEffects = Field(default_factory=SubjectEffects)
    dicom: bool = Field(False, description="also write every scan as a DICOM series under dicom/")
    workers: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _events_inside_the_trial(self) -> "TrialConfig":
        """Default event sites follow ``n_sites`` (``--sites 6`` still has every event); explicit ones must fit."""
        for name in EVENTS:
            part = getattr(self, name)
            if part is None or int(part.site[1:]) <= self.n_sites:
                continue
            if name in self.model_fields_set:
                raise ValueError(f"{name}.site '{part.site}' is not one of the {self.n_sites} sites")
            object.__setattr__(self, name, part.model_copy(
                update={"site": f"S{(int(part.site[1:]) - 1) % self.n_sites + 1:02d}"}))
        return self


#: The trial's scripted events, each a config block with a ``site``.
EVENTS = ("upgrade", "coverage", "protocol_drift", "unmatched", "scanner_swap")


DEFAULT_VENDORS = (
    # each vendor's usual volumetric T1w: Siemens MPRAGE, GE IR-FSPGR (BRAVO), Philips 3D TFE (enhanced DICOM)
    VendorProfile(name="SIEMENS", gm=0.58, csf=0.20, snr=32.0, upgrade_software="syngo MR XA30",
                  models=[ScannerModel(name="Prisma", software="syngo MR E11"),
                          ScannerModel(name="Skyra", software="syngo MR E11")],
                  dicom_manufacturer="SIEMENS",
                  sequence=SequenceProfile(series_description="T1w_MPRAGE", repetition_time_ms=2300.0,
                                           echo_time_ms=2.98, inversion_time_ms=900.0, flip_angle_deg=9.0,
                                           scanning_sequence="GR\\IR", sequence_variant="SK\\SP\\MP",
                                           sequence_name="*tfl3d1_16ns", pixel_bandwidth=240.0,
                                           echo_train_length=1)),
    VendorProfile(name="GE", gm=0.72, csf=0.36, snr=28.0, upgrade_software="RX29.1",
                  models=[ScannerModel(name="DISCOVERY MR750", software="DV26.0_R03"),
                          ScannerModel(name="SIGNA Premier", software="RX28.0")],
                  dicom_manufacturer="GE MEDICAL SYSTEMS",
                  sequence=SequenceProfile(series_description="T1w_IR-FSPGR", repetition_time_ms=7.3,
                                           echo_time_ms=3.0, inversion_time_ms=400.0, flip_angle_deg=11.0,
                                           scanning_sequence="GR", sequence_variant="SS\\SP\\SK",
                                           sequence_name="efgre3d", pixel_bandwidth=244.1, echo_train_length=1)),
    VendorProfile(name="Philips", gm=0.48, csf=0.13, snr=36.0, upgrade_software="5.7.2",
                  models=[ScannerModel(name="Achieva dStream", software="5.3.1"),
                          ScannerModel(name="Ingenia", software="5.6.1", field_strength=1.5)],
                  dicom_manufacturer="Philips Medical Systems",
                  sequence=SequenceProfile(series_description="T1w_3D_TFE", repetition_time_ms=8.1,
                                           echo_time_ms=3.7, inversion_time_ms=1000.0, flip_angle_deg=8.0,
                                           scanning_sequence="GR", sequence_variant="SK\\MTC\\SS",
                                           sequence_name="T1TFE", pixel_bandwidth=191.0, echo_train_length=240,
                                           enhanced=True)),
)


# --------------------------------------------------------------------------- template


@dataclass(frozen=True)
class Template:
    """Tissue probability maps on the simulation grid (voxel_mm, cropped to the head)."""

    p_gm: np.ndarray
    p_wm: np.ndarray
    p_brain: np.ndarray
    affine: np.ndarray
    reference_gm_voxels: int


def _nilearn_data(name: str) -> Path:
    import nilearn.datasets

    path = Path(nilearn.datasets.__file__).parent / "data" / name
    if not path.exists():
        raise SitebenchError("template file missing from the nilearn wheel", path)
    return path


@lru_cache(maxsize=2)
def load_template(voxel_mm: float = 2.0) -> Template:
    """MNI152 2009a (as shipped by nilearn) block-averaged to ``voxel_mm`` and cropped."""
    t1 = nib.load(_nilearn_data("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    gm = np.asarray(nib.load(_nilearn_data("mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")).dataobj,
                    dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(_nilearn_data("mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")).dataobj,
                    dtype=np.float32) / 255.0
    brain = (np.asarray(t1.dataobj, dtype=np.float32) > 0.2 * 255).astype(np.float32)
    brain = np.maximum(brain, ((gm + wm) > 0.3).astype(np.float32))
    zoom = voxel_mm / float(t1.header.get_zooms()[0])
    maps = [ndimage.zoom(ndimage.uniform_filter(m, size=max(1, round(zoom))), 1 / zoom, order=1)
            for m in (gm, wm, brain)]
    affine = t1.affine.copy()
    affine[:3, :3] *= zoom
    # crop to the brain with a margin of 3 voxels
    coords = np.argwhere(maps[2] > 0.5)
    low = np.maximum(coords.min(0) - 3, 0)
    high = np.minimum(coords.max(0) + 4, maps[2].shape)
    # even sizes keep U-Net down/up-sampling exact
    high = low + ((high - low) // 4) * 4
    crop = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    maps = [np.ascontiguousarray(m[crop]) for m in maps]
    affine[:3, 3] += affine[:3, :3] @ low
    p_gm, p_wm, p_brain = maps
    reference = int(((p_brain > 0.5) & (p_gm >= 0.5) & (p_gm > p_wm)).sum())
    return Template(p_gm=p_gm, p_wm=p_wm, p_brain=p_brain, affine=affine, reference_gm_voxels=reference)


# --------------------------------------------------------------------------- subjects


@dataclass
class Subject:
    subject_id: str
    site: str
    age: float
    sex: str
    group: str
    gm_fraction: float
    labels: np.ndarray  # on the template grid
    gm_volume_ml: float
    brain_volume_ml: float = 0.0  # every labelled voxel, before any coverage is lost


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], order: int) -> np.ndarray:
    """A smooth random field in [-1, 1]: random weights on a low-order cosine basis.

    Separable bases keep this at a few tens of ms per volume, which matters for
    hundreds of scans; spline-upsampled noise costs ten times more.
    """
    weights = rng.standard_normal((order,) * 3) / (1.0 + np.add.outer(np.add.outer(*(np.arange(order),) * 2),
                                                                      np.arange(order)))
    bases = [np.cos(np.pi * np.outer(np.arange(order), (np.arange(n) + 0.5) / n)).astype(np.float32)
             for n in shape]
    field = np.einsum("ijk,ia,jb,kc->abc", weights.astype(np.float32), *bases, optimize=True)
    return field / max(float(np.abs(field).max()), 1e-6)


def make_subject(config: TrialConfig, template: Template, subject_id: str, site: str,
                 rng: np.random.Generator) -> Subject:
    eff = config.effects
    age = float(rng.uniform(*eff.age_range))
    sex = str(rng.choice(["F", "M"]))
    group = str(rng.choice(["control", "patient"]))
    fraction = (1.0 + eff.age_per_year * (age - eff.reference_age)
                + (eff.patient if group == "patient" else 0.0) + rng.normal(0.0, eff.subject_sd))
    shape = template.p_gm.shape
    amplitude = config.deformation_mm / config.voxel_mm
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    scale = float(rng.normal(1.0, 0.03))
    centre = [s / 2 for s in shape]
    coords = [centre[k] + (grid[k] - centre[k]) / scale + amplitude * _smooth_field(rng, shape, 5)
              for k in range(3)]
    warp = [ndimage.map_coordinates(m, coords, order=1, mode="constant") for m in
            (template.p_gm, template.p_wm, template.p_brain)]
    p_gm, p_wm, p_brain = warp
    brain = p_brain > 0.5
    wm = brain & (p_wm > p_gm) & (p_wm > 0.35)
    candidates = brain & ~wm & (p_gm > 0.02)
    target = int(round(fraction * template.reference_gm_voxels * scale ** 3))
    # GM is grown or thinned at its CSF side (the pial surface): candidates nearest WM are kept first,
    # so atrophy replaces outer cortex by CSF, as cortical thinning does, and stays visible in the image
    scores = np.where(candidates, p_gm + p_wm, -1.0).ravel()
    target = min(target, int(candidates.sum()))
    labels = np.zeros(shape, dtype=np.uint8)
    labels[brain] = CSF
    labels[wm] = WM
    top = np.argpartition(-scores, target - 1)[:target]
    labels.ravel()[top] = GM
    voxel_ml = config.voxel_mm ** 3 / 1000.0
    return Subject(subject_id=subject_id, site=site, age=round(age, 1), sex=sex, group=group,
                   gm_fraction=fraction, labels=labels, gm_volume_ml=float(target * voxel_ml),
                   brain_volume_ml=float((labels > 0).sum() * voxel_ml))


# --------------------------------------------------------------------------- sites and scanners


@dataclass
class Scanner:
    scanner_id: str
    site: str
    vendor: VendorProfile
    model: ScannerModel
    slice_mm: float
    intensity_scale: float
    gm_deviation: float  # site + scanner deviation of the GM/WM ratio
    snr: float
    missing_superior_mm: float
    upgrade_day: int | None
    serial_number: str = ""
    active_from_day: int = 0  # a replacement scanner is used from this study day ...
    active_until_day: int | None = None  # ... and the one it replaces until the day before


def plan_scanners(config: TrialConfig, rng: np.random.Generator) -> dict[str, list[Scanner]]:
    sites: dict[str, list[Scanner]] = {}
    site_ids = [f"S{i + 1:02d}" for i in range(config.n_sites)]
    for index, site in enumerate(site_ids):
        vendor = config.vendors[index % len(config.vendors)]
        site_dev = float(rng.normal(0, config.site_gm_sd))
        thick = config.thick_slice_every and index % config.thick_slice_every == config.thick_slice_every - 1
        n_scanners = 2 if (config.two_scanner_every and
                           index % config.two_scanner_every == config.two_scanner_every - 1) else 1
        scanners = []
        for k in range(n_scanners):
            model = vendor.models[(index // len(config.vendors) + k) % len(vendor.models)]
            upgrade_day = None
            if config.upgrade and config.upgrade.site == site and k == 0:
                upgrade_day = int(round(config.upgrade.at_fraction * config.study_days))
            missing = config.coverage.missing_superior_mm if (config.coverage and
                                                              config.coverage.site == site) else 0.0
            scanners.append(Scanner(
                scanner_id=f"{site}-{chr(ord('A') + k)}", site=site, vendor=vendor, model=model,
                slice_mm=config.thick_slice_mm if thick else config.voxel_mm,
                intensity_scale=float(rng.uniform(400, 1600)),
                gm_deviation=site_dev + float(rng.normal(0, config.scanner_gm_sd)),
                snr=float(vendor.snr * rng.uniform(0.85, 1.15)),
                missing_superior_mm=missing, upgrade_day=upgrade_day,
                serial_number=f"{41000 + 10 * index + k}"))
        sites[site] = scanners
    swap = config.scanner_swap
    if swap is not None and swap.site in sites:
        # its own stream, so adding the swap leaves every other draw of the trial as it was
        swap_rng = np.random.default_rng(np.random.SeedSequence([config.seed, 5]))
        old = sites[swap.site][0]
        day = int(round(swap.at_fraction * config.study_days))
        old.active_until_day = day
        if old.upgrade_day is not None and old.upgrade_day >= day:
            old.upgrade_day = None
        index = int(swap.site[1:]) - 1
        sites[swap.site].append(Scanner(
            scanner_id=f"{swap.site}-{chr(ord('A') + len(sites[swap.site]))}", site=swap.site, vendor=old.vendor,
            model=old.model, slice_mm=old.slice_mm, intensity_scale=float(swap_rng.uniform(400, 1600)),
            gm_deviation=old.gm_deviation + float(swap_rng.normal(0, config.scanner_gm_sd)),
            snr=float(old.vendor.snr * swap_rng.uniform(0.85, 1.15)), missing_superior_mm=old.missing_superior_mm,
            upgrade_day=None, serial_number=f"{41000 + 10 * index + 9}", active_from_day=day))
    return sites


@dataclass
class ScanPlan:
    scan_id: str
    subject_index: int
    session: str
    day: int
    scanner: Scanner
    minute: int = 8 * 60  # time of day the series was acquired, minutes after midnight
    missing_superior_mm: float = 0.0
    drifted: bool = False
    rescan_of: str | None = None


def acquire(config: TrialConfig, subject: Subject, scanner: Scanner, day: int,
            rng: np.random.Generator, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Image one subject on one scanner: returns image, label map, affine and what was injected.

    The image is rounded to whole numbers, as a scanner stores it (16-bit integers), so the
    NIfTI and the DICOM series written from it hold the same values.
    """
    upgraded = scanner.upgrade_day is not None and day >= scanner.upgrade_day
    up = config.upgrade
    gm_ratio = scanner.vendor.gm + scanner.gm_deviation + (up.gm_shift if upgraded and up else 0.0)
    noise_sigma = (1.0 / scanner.snr) * (up.noise_factor if upgraded and up else 1.0)
    lut = np.array([0.0, scanner.vendor.csf, gm_ratio, 1.0], dtype=np.float32)
    image = lut[subject.labels]
    if config.psf_sigma_voxels > 0:
        image = ndimage.gaussian_filter(image, config.psf_sigma_voxels)
    labels = subject.labels
    shape = image.shape
    bias = np.exp(config.bias_field_strength * _smooth_field(rng, shape, 4)).astype(np.float32)
    image = image * bias
    affine = affine.copy()
    if scanner.slice_mm > config.voxel_mm + 1e-6:
        ratio = scanner.slice_mm / config.voxel_mm
        image = ndimage.uniform_filter1d(image, size=max(2, int(round(ratio))), axis=2)
        new_z = int(math.floor(shape[2] / ratio))
        z = (np.arange(new_z) + 0.5) * ratio - 0.5
        image = ndimage.map_coordinates(image, np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), z,
                                                           indexing="ij"), order=1)
        labels = labels[:, :, np.clip(np.round(z).astype(int), 0, shape[2] - 1)]
        affine[:3, 3] += affine[:3, 2] * (0.5 * ratio - 0.5)
        affine[:3, 2] *= ratio
    if scanner.missing_superior_mm > 0:
        keep = image.shape[2] - int(round(scanner.missing_superior_mm / scanner.slice_mm))
        image, labels = image[:, :, :keep], labels[:, :, :keep]
    noise = rng.standard_normal((2,) + image.shape).astype(np.float32) * noise_sigma
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2) * scanner.intensity_scale
    image = np.clip(np.rint(image), 0, 65535)
    injected = {"upgraded": bool(upgraded), "gm_wm_ratio": round(float(gm_ratio), 6),
                "noise_sigma_rel": round(float(noise_sigma), 6)}
    return image.astype(np.float32), np.ascontiguousarray(labels), affine, injected


# --------------------------------------------------------------------------- the whole trial


@dataclass
class SimulatedTrial:
    """Where the simulated trial was written and what it holds."""

    out_dir: Path
    manifest_path: Path
    truth_path: Path
    manifest: pd.DataFrame
    truth: dict[str, Any]

    def summary(self) -> str:
        table = self.manifest
        return (f"{len(table)} scans, {table[mf.SUBJECT_ID].nunique()} subjects, "
                f"{table[mf.SITE].nunique()} sites, {table[mf.VENDOR].nunique()} vendors -> "
                f"{self.manifest_path}")


def _plan(config: TrialConfig) -> tuple[dict[str, list[Scanner]], list[tuple[str, int, str]], list[ScanPlan]]:
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1]))
    sites = plan_scanners(config, rng)
    # the scripted events draw from their own stream, so switching one off leaves the rest of the trial as it was
    events = np.random.default_rng(np.random.SeedSequence([config.seed, 4]))
    drift = config.protocol_drift
    drift_day = int(round(drift.at_fraction * config.study_days)) if drift else None
    subjects: list[tuple[str, int, str]] = []  # (subject_id, site index, site)
    scans: list[ScanPlan] = []
    for site_index, (site, scanners) in enumerate(sites.items()):
        n_subjects = math.ceil(config.scans_per_site / config.sessions_per_subject)
        made = 0
        for j in range(n_subjects):
            subject_id = f"sub-{site}{j + 1:03d}"
            subjects.append((subject_id, site_index, site))
            first = int(rng.integers(0, max(1, config.study_days - 90 * (config.sessions_per_subject - 1))))
            for s in range(config.sessions_per_subject):
                if made == config.scans_per_site:
                    break
                day = min(first + 90 * s, config.study_days - 1)
                active = [sc for sc in scanners if sc.active_from_day <= day
                          and (sc.active_until_day is None or day < sc.active_until_day)]
                pick = int(rng.integers(0, len(scanners)))
                scanner = scanners[pick] if scanners[pick] in active else active[pick % len(active)]
                plan = ScanPlan(scan_id=f"{subject_id}_ses-{s + 1}", subject_index=len(subjects) - 1,
                                session=f"ses-{s + 1}", day=day, scanner=scanner,
                                minute=int(events.integers(8 * 60, 17 * 60)),
                                drifted=bool(drift and drift.site == site and day >= drift_day))
                scans.append(plan)
                made += 1
                coverage = config.coverage
                if coverage and coverage.site == site and coverage.missing_superior_mm > 0:
                    if events.random() < coverage.fraction:
                        plan.missing_superior_mm = coverage.missing_superior_mm
                        if events.random() < coverage.rescan_fraction:
                            scans.append(ScanPlan(scan_id=f"{plan.scan_id}_rescan", subject_index=plan.subject_index,
                                                  session=plan.session, day=day, scanner=scanner,
                                                  minute=plan.minute + 25, drifted=plan.drifted,
                                                  rescan_of=plan.scan_id))
    # the story's mid-study events happen between each site's own scan days (see _event_day)
    up = config.upgrade
    if up is not None and up.site in sites:
        scanner = next((sc for sc in sites[up.site] if sc.upgrade_day is not None), None)
        day = _event_day([p for p in scans if p.scanner is scanner], up.at_fraction)
        if scanner is not None and day is not None:
            scanner.upgrade_day = day
    if drift is not None and drift.site in sites:
        site_scans = [p for p in scans if p.scanner.site == drift.site]
        day = _event_day(site_scans, drift.at_fraction)
        for plan in site_scans if day is not None else []:
            plan.drifted = plan.day >= day
    swap = config.scanner_swap
    if swap is not None and swap.site in sites:
        _place_swap(sites[swap.site], [p for p in scans if p.scanner.site == swap.site], swap.at_fraction)
    return sites, subjects, scans


def _event_day(site_scans: list[ScanPlan], at_fraction: float) -> int | None:
    """The study day of a site's mid-study event: the site's scan day at ``at_fraction`` of its scan days,
    with at least one scan day before it and one on or after it.

    An event on a fixed study day can fall before a site's first scan or after its last (a
    small trial scans each site on a few days only), and then no scan shows it: the gate
    cannot see an upgrade, a drift or a swap without a series from before it. None (the
    configured day stands) with fewer than two scan days.
    """
    days = sorted({p.day for p in site_scans})
    if len(days) < 2:
        return None
    return days[min(max(1, int(round(at_fraction * len(days)))), len(days) - 1)]


def _place_swap(scanners: list[Scanner], site_scans: list[ScanPlan], at_fraction: float) -> None:
    """Put the scanner swap between the site's own scan days (:func:`_event_day`)."""
    old, new = scanners[0], scanners[-1]
    day = _event_day(site_scans, at_fraction)
    if new is old or day is None:
        return
    old.active_until_day, new.active_from_day = day, day
    if old.upgrade_day is not None and old.upgrade_day >= day:
        old.upgrade_day = None
    for plan in site_scans:
        if plan.scanner is old and plan.day >= day:
            plan.scanner = new
        elif plan.scanner is new and plan.day < day:
            plan.scanner = old


#: Given and family names of the synthetic patients (PHI-shaped on purpose, so its handling is exercised).
_GIVEN = ("ALMA", "BRUNO", "CELIA", "DARIO", "EDITH", "FELIX", "GRETA", "HUGO", "INES", "JONAS", "KARLA", "LEON")
_FAMILY = ("ABERNATHY", "BALDWIN", "CARRINGTON", "DELACROIX", "ELLSWORTH", "FAIRWEATHER", "GALLOWAY",
           "HARTIGAN", "IVERSON", "JANKOWSKI", "KILBRIDE", "LINDQVIST")


def synthetic_identity(config: TrialConfig, subject_index: int, age: float, sex: str) -> dict[str, str]:
    """The patient identifiers the simulated scanner writes: name, ID and birth date (never real)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 6, subject_index]))
    birth = config.start_date - timedelta(days=int(round(age * 365.25)) + int(rng.integers(0, 300)))
    return {"PatientName": f"{_FAMILY[int(rng.integers(len(_FAMILY)))]}^{_GIVEN[int(rng.integers(len(_GIVEN)))]}"
                           f"^Q{int(rng.integers(100, 999))}",
            "PatientID": f"MRN{int(rng.integers(10**7, 10**8))}", "PatientBirthDate": birth.strftime("%Y%m%d"),
            "PatientSex": sex}


def _series_header(config: TrialConfig, plan: ScanPlan, scanner: Scanner, software: str, identity: dict[str, str],
                   kind: str = "scan") -> Any:
    """The DICOM header the site's scanner writes for one series (``kind``: scan or unmatched)."""
    from sitebench.datasets.dicom_export import SeriesHeader, simulated_uid

    vendor = scanner.vendor
    seq = vendor.sequence
    if seq is None:
        raise SitebenchError(f"vendor {vendor.name} has no sequence profile: it cannot be written as DICOM")
    drift = config.protocol_drift
    tr, flip = seq.repetition_time_ms, seq.flip_angle_deg
    if plan.drifted and drift:
        tr = tr * drift.factor if drift.parameter == "RepetitionTime" else tr
        flip = flip * drift.factor if drift.parameter == "FlipAngle" else flip
    when = datetime.combine(config.start_date + timedelta(days=plan.day), datetime.min.time()) \
        + timedelta(minutes=plan.minute + (12 if kind == "unmatched" else 0))
    study = plan.scan_id.removesuffix("_rescan")
    fields: dict[str, Any] = dict(
        series_description=seq.series_description, protocol_name=seq.series_description,
        repetition_time_ms=round(tr, 4), echo_time_ms=seq.echo_time_ms, inversion_time_ms=seq.inversion_time_ms,
        flip_angle_deg=round(flip, 3), scanning_sequence=seq.scanning_sequence,
        sequence_variant=seq.sequence_variant, sequence_name=seq.sequence_name, mr_acquisition_type="3D",
        pixel_bandwidth=seq.pixel_bandwidth, echo_train_length=seq.echo_train_length, enhanced=seq.enhanced,
        series_number=3 if plan.rescan_of is None else 4)
    if kind == "unmatched":
        fields.update(series_description=config.unmatched.series_description if config.unmatched else "AX_T2_FLAIR",
                      protocol_name="AX T2 FLAIR", repetition_time_ms=9000.0, echo_time_ms=81.0,
                      inversion_time_ms=2500.0, flip_angle_deg=150.0, scanning_sequence="SE\\IR",
                      sequence_variant="SK\\SP\\MP", sequence_name="*tir2d1_16", mr_acquisition_type="2D",
                      enhanced=False, series_number=5, echo_train_length=16)
    return SeriesHeader(
        manufacturer=vendor.dicom_manufacturer or vendor.name, model=scanner.model.name, software_versions=software,
        device_serial_number=scanner.serial_number, station_name=f"{scanner.site}MR{scanner.scanner_id[-1]}",
        institution_name=f"Site {scanner.site} Hospital", field_strength=scanner.model.field_strength,
        patient_name=identity["PatientName"], patient_id=identity["PatientID"],
        patient_birth_date=identity["PatientBirthDate"], patient_sex=identity["PatientSex"],
        study_uid=simulated_uid(config.seed, "study", study), series_uid=simulated_uid(config.seed, "series", plan.scan_id, kind),
        frame_of_reference_uid=simulated_uid(config.seed, "frame", study), acquisition_datetime=when,
        accession_number="A" + simulated_uid(config.seed, "accession", study).rsplit(".", 1)[-1][-8:], **fields)


def _write_dicom(out_dir: str, plan: ScanPlan, header: Any, image: np.ndarray, affine: np.ndarray,
                 kind: str) -> dict[str, Any]:
    from sitebench.datasets.dicom_export import write_series

    rel = Path("dicom") / plan.scanner.site / f"{plan.scan_id}{'_' + kind if kind != 'scan' else ''}"
    files = write_series(image, affine, header, Path(out_dir) / rel)
    return {"scan_id": plan.scan_id if kind == "scan" else f"{plan.scan_id}_{kind}", "kind": kind,
            "site": plan.scanner.site, "scanner_id": plan.scanner.scanner_id, "dicom_dir": rel.as_posix(),
            "n_files": len(files), "study_uid": header.study_uid, "series_uid": header.series_uid,
            "acquired": header.acquisition_datetime.isoformat(), "rescan_of": plan.rescan_of or "",
            "enhanced": bool(header.enhanced)}


def _flair_like(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 2D-looking axial series from the same head: every other slice, contrast inverted (CSF dark)."""
    picked = image[:, :, ::2]
    flair = np.clip(np.rint(picked.max() - picked), 0, 65535).astype(np.float32)
    out = affine.copy()
    out[:3, 2] *= 2
    return flair, out


def _simulate_subject(args: tuple[TrialConfig, str, str, int, list[ScanPlan], str]) -> list[dict[str, Any]]:
    config, subject_id, site, subject_index, plans, out_dir = args
    template = load_template(config.voxel_mm)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 2, subject_index]))
    subject = make_subject(config, template, subject_id, site, rng)
    identity = synthetic_identity(config, subject_index, subject.age, subject.sex)
    rows = []
    for plan in plans:
        session = int(plan.session.split("-")[1])
        entropy = [config.seed, 3, subject_index, session] + ([1] if plan.rescan_of else [])
        scan_rng = np.random.default_rng(np.random.SeedSequence(entropy))
        scanner = plan.scanner
        imaged = replace(scanner, missing_superior_mm=plan.missing_superior_mm,
                         gm_deviation=scanner.gm_deviation + (config.protocol_drift.gm_shift
                                                              if plan.drifted and config.protocol_drift else 0.0))
        image, labels, affine, injected = acquire(config, subject, imaged, plan.day, scan_rng, template.affine)
        image_rel = Path("images") / f"{plan.scan_id}_T1w.nii.gz"
        label_rel = Path("labels") / f"{plan.scan_id}_dseg.nii.gz"
        img = nib.Nifti1Image(image, affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, Path(out_dir) / image_rel)
        nib.save(nib.Nifti1Image(labels, affine), Path(out_dir) / label_rel)
        software = scanner.vendor.upgrade_software if injected["upgraded"] else scanner.model.software
        dicom: list[dict[str, Any]] = []
        if config.dicom:
            dicom.append(_write_dicom(out_dir, plan, _series_header(config, plan, scanner, software, identity),
                                      image, affine, "scan"))
            unmatched = config.unmatched
            if unmatched and unmatched.site == site and plan.rescan_of is None and plan.session == "ses-1" \
                    and int(subject_id[-3:]) <= unmatched.count:
                flair, flair_affine = _flair_like(image, affine)
                dicom.append(_write_dicom(out_dir, plan, _series_header(config, plan, scanner, software, identity,
                                                                        "unmatched"),
                                          flair, flair_affine, "unmatched"))
        rows.append({
            mf.SCAN_ID: plan.scan_id, mf.SUBJECT_ID: subject.subject_id, mf.SESSION: plan.session,
            mf.SITE: site, mf.SCANNER_ID: scanner.scanner_id, mf.VENDOR: scanner.vendor.name,
            mf.SCANNER_MODEL: scanner.model.name, mf.SOFTWARE_VERSION: software,
            mf.FIELD_STRENGTH: scanner.model.field_strength,
            mf.ACQUISITION_DATE: (config.start_date + timedelta(days=plan.day)).isoformat(),
            mf.IMAGE_PATH: image_rel.as_posix(), mf.IMAGE_SHA256: sha256_file(Path(out_dir) / image_rel),
            mf.LABEL_PATH: label_rel.as_posix(), mf.LABEL_SHA256: sha256_file(Path(out_dir) / label_rel),
            mf.AGE: subject.age, mf.SEX: subject.sex, mf.GROUP: subject.group,
            REFERENCE_COLUMN: round(subject.gm_volume_ml, 3),
            BRAIN_VOLUME_COLUMN: round(subject.brain_volume_ml, 3),
            "slice_thickness_mm": scanner.slice_mm,
            "_truth": {"scan_id": plan.scan_id, "gm_fraction": round(subject.gm_fraction, 6),
                       "gm_volume_ml": round(subject.gm_volume_ml, 3),
                       "brain_volume_ml": round(subject.brain_volume_ml, 3),
                       "label_gm_volume_ml": round(float((labels == GM).sum()) *
                                                   float(abs(np.linalg.det(affine[:3, :3]))) / 1000, 3),
                       "missing_superior_mm": plan.missing_superior_mm, "rescan_of": plan.rescan_of,
                       "protocol_drift": plan.drifted, "serial_number": scanner.serial_number,
                       "acquired": (datetime.combine(config.start_date + timedelta(days=plan.day),
                                                     datetime.min.time())
                                    + timedelta(minutes=plan.minute)).isoformat(),
                       **injected},
            "_dicom": dicom, "_identity": (subject.subject_id, identity),
        })
    return rows


def simulate_trial(config: TrialConfig, out_dir: str | Path,
                   progress: Callable[[int, int], None] | None = None) -> SimulatedTrial:
    """Write images, label maps, ``manifest.csv`` and ``truth.json`` under ``out_dir``.

    With ``config.dicom`` every scan is also a DICOM series under ``dicom/<site>/``, listed
    with its UIDs in ``dicom_series.csv`` (in acquisition order), and the synthetic patient
    identifiers the scanner wrote are in ``identifiers.json``: what a test greps for, to show
    that none of them leaves the gate.
    """
    out = Path(out_dir)
    if (out / "manifest.csv").exists():
        raise SitebenchError("a simulated trial is already here; choose a new --out", out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    sites, subjects, scans = _plan(config)
    by_subject: dict[int, list[ScanPlan]] = {}
    for plan in scans:
        by_subject.setdefault(plan.subject_index, []).append(plan)
    jobs = [(config, sid, site, i, by_subject.get(i, []), str(out)) for i, (sid, _, site) in enumerate(subjects)
            if by_subject.get(i)]
    load_template(config.voxel_mm)  # warm the cache before forking
    rows: list[dict[str, Any]] = []
    done = 0
    if config.workers > 1:
        with ProcessPoolExecutor(max_workers=config.workers) as pool:
            for result in pool.map(_simulate_subject, jobs, chunksize=2):
                rows.extend(result)
                done += len(result)
                if progress:
                    progress(done, len(scans))
    else:
        for job in jobs:
            result = _simulate_subject(job)
            rows.extend(result)
            done += len(result)
            if progress:
                progress(done, len(scans))
    per_scan_truth = [row.pop("_truth") for row in rows]
    series = [entry for row in rows for entry in row.pop("_dicom")]
    identities = dict(row.pop("_identity") for row in rows)
    table = pd.DataFrame(rows).sort_values(mf.SCAN_ID).reset_index(drop=True)
    truth = _truth_document(config, sites, per_scan_truth)
    if config.dicom:
        index = pd.DataFrame(series).sort_values(["acquired", "scan_id"]).reset_index(drop=True)
        index.to_csv(out / DICOM_INDEX, index=False)
        (out / IDENTIFIERS).write_text(json.dumps(identities, indent=2))
        truth["dicom"] = {"index": DICOM_INDEX, "identifiers": IDENTIFIERS, "series": len(index),
                          "files": int(index["n_files"].sum()),
                          "enhanced_vendors": sorted(v.name for v in config.vendors if v.sequence and v.sequence.enhanced)}
    manifest_path = mf.write_manifest(table, out / "manifest.csv")
    truth_path = out / "truth.json"
    truth_path.write_text(json.dumps(truth, indent=2, default=str))
    return SimulatedTrial(out_dir=out, manifest_path=manifest_path, truth_path=truth_path,
                          manifest=table, truth=truth)


#: What a DICOM-writing trial lists beside its manifest: every series in acquisition order, and the identifiers.
DICOM_INDEX = "dicom_series.csv"
IDENTIFIERS = "identifiers.json"


def _first(scans: list[dict[str, Any]], test: Callable[[dict[str, Any]], bool]) -> str | None:
    hits = sorted((s for s in scans if test(s)), key=lambda s: (s["acquired"], s["scan_id"]))
    return hits[0]["scan_id"] if hits else None


def _events_truth(config: TrialConfig, sites: dict[str, list[Scanner]],
                  per_scan: list[dict[str, Any]]) -> dict[str, Any]:
    """Each scripted event, where it happens and the first scan it shows in (what the gate must catch, and when)."""
    site_of = {s["scan_id"]: s["scan_id"].split("-")[1][:3] for s in per_scan}
    events: dict[str, Any] = {}
    if config.upgrade:
        site = config.upgrade.site
        events["software_upgrade"] = {"site": site, "first_scan": _first(per_scan, lambda s: s["upgraded"]),
                                      "to": next((sc.vendor.upgrade_software for sc in sites[site]), None)}
    if config.coverage:
        site = config.coverage.site
        short = [s["scan_id"] for s in per_scan if s["missing_superior_mm"] > 0]
        events["coverage_loss"] = {"site": site, "missing_superior_mm": config.coverage.missing_superior_mm,
                                   "scans": sorted(short),
                                   "rescans": {s["scan_id"]: s["rescan_of"] for s in per_scan if s["rescan_of"]}}
    if config.protocol_drift:
        drift = config.protocol_drift
        events["protocol_drift"] = {"site": drift.site, "parameter": drift.parameter, "factor": drift.factor,
                                    "first_scan": _first(per_scan, lambda s: s["protocol_drift"]),
                                    "scans": sorted(s["scan_id"] for s in per_scan if s["protocol_drift"])}
    if config.unmatched:
        events["unmatched_series"] = {"site": config.unmatched.site,
                                      "series_description": config.unmatched.series_description,
                                      "count": config.unmatched.count if config.dicom else 0}
    if config.scanner_swap:
        site = config.scanner_swap.site
        new = next((sc for sc in sites[site] if sc.active_from_day > 0), None)
        on_new = (lambda s: new is not None and site_of[s["scan_id"]] == site
                  and s["serial_number"] == new.serial_number)
        before = [s for s in per_scan if site_of[s["scan_id"]] == site and not on_new(s)]
        # the gate can only see a swap when the old scanner sent something first
        events["scanner_swap"] = {"site": site, "new_scanner": new.scanner_id if new else None,
                                  "first_scan": _first(per_scan, on_new) if before else None,
                                  "scans_before": len(before)}
    return events


def _truth_document(config: TrialConfig, sites: dict[str, list[Scanner]],
                    per_scan: list[dict[str, Any]]) -> dict[str, Any]:
    reference_vendor = config.vendors[0].name
    return {
        "description": "Every effect the simulator injected. GM/WM ratio is GM intensity over WM intensity "
                       "before bias field and noise; vendor effects are differences from the reference vendor.",
        "created_utc": utc_now(),
        "config": json.loads(config.model_dump_json()),
        "code_version": code_version(),
        "packages": package_versions(("numpy", "scipy", "nibabel", "nilearn", "pydicom")),
        "template": "MNI152 ICBM 2009a symmetric (nilearn wheel), tissue maps block-averaged",
        "reference_vendor": reference_vendor,
        "vendor_gm_wm_ratio": {v.name: v.gm for v in config.vendors},
        "vendor_effect_on_gm_wm_ratio": {v.name: round(v.gm - config.vendors[0].gm, 6)
                                         for v in config.vendors[1:]},
        "upgrade": None if config.upgrade is None else {
            "site": config.upgrade.site, "gm_wm_ratio_shift": config.upgrade.gm_shift,
            "noise_factor": config.upgrade.noise_factor,
            "date": (config.start_date + timedelta(days=next(
                (sc.upgrade_day for sc in sites.get(config.upgrade.site, []) if sc.upgrade_day is not None),
                int(round(config.upgrade.at_fraction * config.study_days))))).isoformat()},
        "coverage": None if config.coverage is None else config.coverage.model_dump(),
        "events": _events_truth(config, sites, per_scan),
        "subject_effects": config.effects.model_dump(),
        "site_gm_wm_ratio_sd": config.site_gm_sd,
        "scanner_gm_wm_ratio_sd": config.scanner_gm_sd,
        "scanners": [{"scanner_id": s.scanner_id, "site": s.site, "vendor": s.vendor.name,
                      "model": s.model.name, "slice_mm": s.slice_mm,
                      "intensity_scale": round(s.intensity_scale, 3),
                      "gm_wm_ratio_deviation": round(s.gm_deviation, 6), "snr": round(s.snr, 3),
                      "missing_superior_mm": s.missing_superior_mm,
                      "upgrade_day": s.upgrade_day, "active_from_day": s.active_from_day,
                      "active_until_day": s.active_until_day} for scanners in sites.values() for s in scanners],
        "scans": sorted(per_scan, key=lambda r: r["scan_id"]),
    }


def load_trial_config(path: str | Path | None = None, **overrides: Any) -> TrialConfig:
    """The trial config from YAML (or defaults), with command-line overrides on top.

    Default event sites follow ``n_sites`` (see :class:`TrialConfig`); a YAML file's own
    choices are kept, and an impossible one is an error naming the file and the key.
    """
    from sitebench.config import load_yaml, parse_config

    data: dict[str, Any] = load_yaml(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(data, TrialConfig, path or "trial settings")
