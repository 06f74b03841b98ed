r"""Image-quality metrics (IQMs) of a reconstructed structural (T1w) volume.

Definitions follow MRIQC's "IQMs for structural images" (Esteban et al. 2017),
with the simplifications listed here. ``mu``/``sigma`` are the mean and sample
standard deviation of the intensities inside a mask.

* ``snr_{csf,gm,wm}`` = mu_t / sigma_t within the tissue; ``snr_total`` is their mean.
* ``snrd_total`` (Dietrich) = mean over tissues of mu_t / sigma_noise, with
  sigma_noise = std(air) * sqrt(2 / (4 - pi)): the air is Rayleigh distributed
  (magnitude of zero signal) and this turns its std into the Gaussian noise sigma.
* ``cnr`` = |mu_GM - mu_WM| / sqrt(sigma_air^2 + sigma_GM^2 + sigma_WM^2), sigma_air
  the raw std of the air voxels (as MRIQC passes it).
* ``cjv`` = (sigma_WM + sigma_GM) / |mu_WM - mu_GM|.
* ``efc`` = entropy focus criterion on the whole image, with b_j = x_j / sqrt(sum x^2),
  E = -sum b_j ln b_j, divided by the maximum entropy E_max = -ln(1/sqrt(N)) * sqrt(N)
  (all N voxels equally bright), so 0 < EFC <= 1; negatives are clipped to 0.
* ``fber`` = mean(|x|^2 in head mask) / mean(|x|^2 in air). MRIQC uses medians,
  which are 0 on zero-filled backgrounds; here means over the *nonzero* air voxels.
* ``fwhm_{x,y,z}`` (mm): AFNI 3dFWHMx classic estimate within the head mask. For each
  axis, the first differences d between neighbouring voxels that are both in the mask
  give the lag-1 autocorrelation rho = 1 - var(d) / (2 var(x)); for a Gaussian
  autocorrelation FWHM = sqrt(-2 ln 2 / ln rho) voxels, times the voxel size.
  ``fwhm_avg`` is their geometric mean (AFNI's "combined" value). No detrending.
* ``qi_1`` (simplified Mortamet QI1): fraction of air voxels that are artefactual.
  The noise sigma is estimated robustly from the median of the nonzero air voxels
  (Rayleigh: median = sigma sqrt(2 ln 2)); voxels above the Rayleigh threshold whose
  exceedance probability is 1e-4 (about 4.3 sigma) are kept when they survive a
  3x3x3 binary opening (isolated noise spikes do not). MRIQC additionally uses a
  "hat" mask above the nasion-cerebellum plane and a chi-square fit; neither is
  done here.
* ``wm2max`` = median(WM) / 99.95th percentile of the whole image.

Masks. Tissue masks come from a supplied label map (default CSF=1, GM=2, WM=3) or,
without one, from a 3-class Gaussian mixture (scikit-learn) on the head voxels,
classes ordered by mean intensity (T1w: CSF < GM < WM); when the head mask is
head-sized (equivalent-sphere radius > 85 mm, i.e. not skull-stripped) the mixture
is fitted on voxels deeper than 20 mm only, a crude stand-in for skull stripping
(no N4 bias correction either, so tissue sigmas, and so SNR/CJV, are pessimistic
compared with MRIQC's FAST-based values). The head mask is an Otsu
threshold of the log intensities, its largest connected component, morphological
closing and hole filling;
the air (background) is everything outside the head mask dilated by 3 voxels.

Zero-filled backgrounds (common on GE): exact zeros in the air are ignored by all
background statistics. When (almost) no nonzero air voxel is left, the
background-based metrics (``snrd_total``, ``fber``, ``qi_1``) are None with a note,
and ``cnr`` is computed without the air term (also noted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from sitebench.errors import SitebenchError

METRIC_KEYS = ("snr_csf", "snr_gm", "snr_wm", "snr_total", "snrd_total", "cnr", "cjv", "efc", "fber",
               "fwhm_x", "fwhm_y", "fwhm_z", "fwhm_avg", "qi_1", "wm2max")
DEFAULT_LABELS = {"csf": 1, "gm": 2, "wm": 3}
TISSUES = ("csf", "gm", "wm")
RAYLEIGH_TO_SIGMA = math.sqrt(2.0 / (4.0 - math.pi))  # std(Rayleigh) * this = Gaussian sigma
BACKGROUND_DILATION = 3  # voxels between head mask and air mask
MIN_AIR_VOXELS = 100
QI1_TAIL_P = 1e-4
GMM_MAX_SAMPLES = 50_000  # a 1-D, 3-class mixture is well determined by far fewer
WHOLE_HEAD_RADIUS_MM = 85.0  # equivalent-sphere radius above which the mask is a whole head, not a brain
SCALP_RIM_MM = 20.0  # outer rim of a whole head left out of the tissue mixture


@dataclass
class ImageQuality:
    metrics: dict[str, float | None]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "notes": list(self.notes)}

    def summary(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3g}"

        keys = ("snr_total", "snrd_total", "cnr", "cjv", "efc", "fber", "fwhm_avg", "qi_1", "wm2max")
        text = ", ".join(f"{k}={fmt(self.metrics.get(k))}" for k in keys)
        if self.notes:
            text += f" ({len(self.notes)} note{'s' if len(self.notes) != 1 else ''}: " + "; ".join(self.notes) + ")"
        return text


# --------------------------------------------------------------------------- masks

def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D array (maximises the between-class variance)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(np.percentile(values, 99.9))
    if hi <= lo:
        hi = float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    between[(w0 == 0) | (w1 == 0)] = 0
    return float(edges[int(np.argmax(between)) + 1])


COARSE_ABOVE_VOXELS = 4_000_000  # masks of larger volumes are shaped on a 2x coarser grid


def coarse_factor(shape: tuple[int, ...]) -> int:
    """Grid step for mask morphology: 2 for large volumes, where it is most of the cost."""
    return 2 if int(np.prod(shape)) > COARSE_ABOVE_VOXELS else 1


def _upsample(mask: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour upsampling of a coarse mask back onto the full grid."""
    if factor == 1:
        return mask
    for axis in range(3):
        mask = np.repeat(mask, factor, axis=axis)
    return np.ascontiguousarray(mask[: shape[0], : shape[1], : shape[2]])


def head_mask(image: np.ndarray) -> np.ndarray:
    """Otsu threshold (of log intensities), largest connected component, closing, hole filling.

    Otsu on raw intensities of a T1w image tends to split WM from the rest and drop dark
    outer tissue; on log(1 + x - min) it separates the noise floor from all tissue.
    """
    shifted = np.asarray(image, dtype=np.float64) - float(np.min(image))
    log_img = np.log1p(shifted)
    mask = log_img > otsu_threshold(log_img)
    # largest component first, so closing cannot bridge the head to a ghost or artefact
    lab, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        mask = lab == int(np.argmax(sizes))
    struct = ndimage.generate_binary_structure(3, 1)
    mask = ndimage.binary_closing(mask, struct, iterations=2, border_value=0)
    # fill holes: background components that do not touch the volume's faces (much faster than
    # ndimage.binary_fill_holes, which dilates from the border one voxel per iteration)
    outside, _ = ndimage.label(~mask)
    faces = np.unique(np.concatenate([outside[[0, -1]].ravel(), outside[:, [0, -1]].ravel(),
                                      outside[:, :, [0, -1]].ravel()]))
    return ~np.isin(outside, faces[faces > 0])


def air_mask(head: np.ndarray, dilation: int = BACKGROUND_DILATION) -> np.ndarray:
    """Everything outside the head mask dilated by ``dilation`` voxels."""
    if dilation > 0:
        head = ndimage.binary_dilation(head, ndimage.generate_binary_structure(3, 1), iterations=dilation)
    return ~head


def gmm_tissues(image: np.ndarray, head: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Three-class Gaussian mixture on head voxels; classes sorted by mean (CSF < GM < WM)."""
    from sklearn.mixture import GaussianMixture

    values = image[head].astype(np.float64)
    rng = np.random.default_rng(seed)
    sample = values if values.size <= GMM_MAX_SAMPLES else rng.choice(values, GMM_MAX_SAMPLES, replace=False)
    # one k-means++ start: on 1-D intensities restarts land on the same optimum and triple the cost
    gmm = GaussianMixture(n_components=3, init_params="k-means++", n_init=1, random_state=seed, max_iter=200)
    gmm.fit(sample.reshape(-1, 1))
    order = np.argsort(gmm.means_.ravel())
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if values.size > 65_536 and hi - lo < 65_536 and np.array_equal(values, np.rint(values)):
        # integer intensities (DICOM): classify each distinct level once, then look it up
        levels = np.arange(lo, hi + 1.0)
        offsets = (values - lo).astype(np.int64)
        pred = gmm.predict(levels.reshape(-1, 1))[offsets]
    else:
        pred = gmm.predict(values.reshape(-1, 1))
    out = {}
    for name, comp in zip(TISSUES, order):
        m = np.zeros(image.shape, dtype=bool)
        m[head] = pred == comp
        out[name] = m
    return out


# --------------------------------------------------------------------------- metrics

def efc(image: np.ndarray) -> float | None:
    """Entropy focus criterion normalised by its maximum (MRIQC)."""
    x = np.asarray(image).ravel()
    n = x.size
    positive = x[x > 0].astype(np.float64)  # negatives count as 0, and 0 * log 0 = 0
    b_max = math.sqrt(float(np.dot(positive, positive)))
    if n < 2 or b_max <= 0:
        return None
    b = positive / b_max
    entropy = -float(np.dot(b, np.log(b)))
    e_max = -math.sqrt(n) * math.log(1.0 / math.sqrt(n))
    return entropy / e_max


def fwhm_afni(image: np.ndarray, mask: np.ndarray, voxel_mm: tuple[float, float, float]
              ) -> tuple[list[float | None], float | None]:
    """AFNI 3dFWHMx (classic) smoothness per axis in mm, and the geometric mean."""
    x = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    vals = x[mask]
    out: list[float | None] = []
    if vals.size < 10:
        return [None, None, None], None
    var = float(np.var(vals, ddof=1, dtype=np.float64))
    for axis in range(3):
        if x.shape[axis] < 2 or var <= 0:
            out.append(None)
            continue
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        both = mask[tuple(lo)] & mask[tuple(hi)]
        d = x[tuple(hi)][both] - x[tuple(lo)][both]
        if d.size < 10:
            out.append(None)
            continue
        rho = 1.0 - float(np.var(d, ddof=1, dtype=np.float64)) / (2.0 * var)
        if not 0.0 < rho < 1.0:
            out.append(None)
            continue
        out.append(math.sqrt(-2.0 * math.log(2.0) / math.log(rho)) * float(voxel_mm[axis]))
    good = [v for v in out if v is not None]
    avg = float(np.exp(np.mean(np.log(good)))) if len(good) == 3 else None
    return out, avg


def qi1(image: np.ndarray, air_nonzero: np.ndarray) -> tuple[float | None, float | None]:
    """Simplified QI1: artefactual fraction of (nonzero) air voxels; also returns the threshold."""
    vals = np.abs(image[air_nonzero]).astype(np.float64)
    if vals.size < MIN_AIR_VOXELS:
        return None, None
    sigma = float(np.median(vals)) / math.sqrt(2.0 * math.log(2.0))
    if sigma <= 0:
        return None, None
    thr = sigma * math.sqrt(-2.0 * math.log(QI1_TAIL_P))
    hot = (np.abs(image) > thr) & air_nonzero
    if not hot.any():
        return 0.0, thr
    # the opening only changes voxels near hot ones: run it on their bounding box (plus margin)
    box = tuple(slice(max(int(i.min()) - 2, 0), int(i.max()) + 3) for i in np.nonzero(hot))
    opened = _open_cube3(hot[box])
    return float(opened.sum()) / float(vals.size), thr


def _open_cube3(mask: np.ndarray) -> np.ndarray:
    """Binary opening by a 3x3x3 cube (outside counts as 0), done as separable 1-D min/max filters.

    Same result as ``ndimage.binary_opening(mask, np.ones((3, 3, 3)))``, several times faster:
    erosion and dilation by a box factor into one pass per axis.
    """
    out = mask.astype(np.uint8)
    for axis in range(3):
        out = ndimage.minimum_filter1d(out, 3, axis=axis, mode="constant", cval=0)
    for axis in range(3):
        out = ndimage.maximum_filter1d(out, 3, axis=axis, mode="constant", cval=0)
    return out.astype(bool)


def _stats(image: np.ndarray, mask: np.ndarray) -> tuple[float, float, int]:
    v = image[mask].astype(np.float64)
    if v.size < 2:
        return float("nan"), float("nan"), int(v.size)
    return float(v.mean()), float(v.std(ddof=1)), int(v.size)


def _finite(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------- entry points

def image_quality(image: np.ndarray, voxel_mm: tuple[float, float, float],
                  labels: np.ndarray | None = None,
                  label_values: dict[str, int] | None = None) -> ImageQuality:
    """Compute the IQMs of one structural volume (see the module docstring for definitions)."""
    img = np.asarray(image)
    if img.ndim == 4 and img.shape[3] == 1:
        img = img[..., 0]
    if img.ndim != 3:
        raise SitebenchError(f"image quality needs a 3-D volume, got shape {img.shape}")
    if min(img.shape) < 3:
        raise SitebenchError(f"image quality needs at least 3 voxels per axis, got shape {img.shape}")
    if len(voxel_mm) < 3 or not all(math.isfinite(float(v)) and float(v) > 0 for v in list(voxel_mm)[:3]):
        raise SitebenchError(f"voxel size must be three positive numbers, got {voxel_mm}")
    voxel = tuple(float(v) for v in list(voxel_mm)[:3])
    notes: list[str] = []
    img = img.astype(np.float32)
    bad = ~np.isfinite(img)
    if bad.any():
        notes.append(f"{int(bad.sum())} non-finite voxels set to 0")
        img = np.where(bad, 0.0, img)
    if float(img.max()) <= float(img.min()):
        raise SitebenchError("image is constant: no image-quality metrics can be computed")
    if (img < 0).any():
        notes.append(f"{int((img < 0).sum())} negative voxels (clipped to 0 for EFC only)")

    metrics: dict[str, float | None] = {k: None for k in METRIC_KEYS}
    # masks are shaped on a coarser grid for large volumes (morphology dominates the cost);
    # every statistic is still taken over full-resolution voxels
    step = coarse_factor(img.shape)
    coarse_head = head_mask(img[::step, ::step, ::step])
    head = _upsample(coarse_head, step, img.shape)
    air = _upsample(air_mask(coarse_head, math.ceil(BACKGROUND_DILATION / step)), step, img.shape)
    if step > 1:
        notes.append(f"head and air masks shaped on a {step}x coarser grid")

    # tissues
    if labels is not None:
        lab = np.asarray(labels)
        if lab.ndim == 4 and lab.shape[3] == 1:
            lab = lab[..., 0]
        if lab.shape != img.shape:
            raise SitebenchError(f"label map shape {lab.shape} does not match image shape {img.shape}")
        values = dict(DEFAULT_LABELS)
        if label_values:
            unknown = set(label_values) - set(TISSUES)
            if unknown:
                raise SitebenchError(f"unknown tissue names in label_values: {sorted(unknown)} "
                                     f"(expected {list(TISSUES)})")
            values.update(label_values)
        tissues = {t: lab == values[t] for t in TISSUES}
        source = "supplied label map"
    else:
        region = head
        source = "3-class Gaussian mixture on head voxels"
        radius = (3.0 * float(head.sum()) * float(np.prod(voxel)) / (4.0 * math.pi)) ** (1.0 / 3.0)
        if radius > WHOLE_HEAD_RADIUS_MM:
            # the 20 mm rim is a crude stand-in for skull stripping: a 2x coarser grid again is enough
            rim_step = 2 * step
            depth = ndimage.distance_transform_edt(coarse_head[::2, ::2, ::2],
                                                   sampling=tuple(v * rim_step for v in voxel))
            core = _upsample(depth > SCALP_RIM_MM, rim_step, img.shape) & head
            if core.sum() >= 1000:
                region = core
                source = (f"3-class Gaussian mixture on head voxels deeper than {SCALP_RIM_MM:g} mm "
                          "(scalp and skull rim left out)")
        tissues = gmm_tissues(img, region)
    notes_src = f"tissue masks from {source}"

    stats: dict[str, tuple[float, float, int]] = {}
    for t in TISSUES:
        mu, sd, n = _stats(img, tissues[t])
        if n < 10:
            notes.append(f"{t.upper()} mask has {n} voxels: its metrics are None")
            continue
        stats[t] = (mu, sd, n)
        metrics[f"snr_{t}"] = _finite(mu / sd) if sd > 0 else None

    snrs = [metrics[f"snr_{t}"] for t in TISSUES]
    if all(s is not None for s in snrs):
        metrics["snr_total"] = float(np.mean(snrs))

    # background
    n_air = int(air.sum())
    air_nz = air & (img != 0)
    n_air_nz = int(air_nz.sum())
    sigma_air: float | None = None
    if n_air == 0:
        notes.append("no background (air) voxels outside the head mask: background-based metrics are None")
    elif n_air_nz < max(MIN_AIR_VOXELS, int(0.01 * n_air)):
        notes.append(f"background is zero-filled ({n_air - n_air_nz} of {n_air} air voxels are exactly 0): "
                     "snrd_total, fber and qi_1 are None and cnr omits the air noise term")
    else:
        if n_air_nz < n_air:
            frac = 1.0 - n_air_nz / n_air
            if frac >= 0.01:
                notes.append(f"{100 * frac:.1f}% of air voxels are exactly 0 (zero-filled): "
                             "background statistics use the nonzero air voxels only")
        air_vals = img[air_nz]
        sigma_air = float(np.std(air_vals, ddof=1))
        if sigma_air <= 0:
            sigma_air = None
            notes.append("background has no variance: background-based metrics are None")

    if sigma_air is not None:
        sigma_noise = sigma_air * RAYLEIGH_TO_SIGMA
        if len(stats) == 3:
            metrics["snrd_total"] = _finite(np.mean([stats[t][0] / sigma_noise for t in TISSUES]))
        fg_energy = float(np.mean(np.square(img[head], dtype=np.float64))) if head.any() else float("nan")
        bg_energy = float(np.mean(np.square(img[air_nz], dtype=np.float64)))
        metrics["fber"] = _finite(fg_energy / bg_energy) if bg_energy > 0 else None
        metrics["qi_1"], _ = qi1(img, air_nz)

    if "gm" in stats and "wm" in stats:
        (mu_g, sd_g, _), (mu_w, sd_w, _) = stats["gm"], stats["wm"]
        air_term = sigma_air ** 2 if sigma_air is not None else 0.0
        denom = math.sqrt(air_term + sd_g ** 2 + sd_w ** 2)
        metrics["cnr"] = _finite(abs(mu_g - mu_w) / denom) if denom > 0 else None
        diff = abs(mu_w - mu_g)
        metrics["cjv"] = _finite((sd_w + sd_g) / diff) if diff > 0 else None
        if mu_w <= mu_g:
            notes.append("WM is not brighter than GM: not a T1w contrast, or the tissue masks are wrong")

    metrics["efc"] = _finite(efc(img))
    (fx, fy, fz), favg = fwhm_afni(img, head, voxel)  # type: ignore[misc]
    metrics["fwhm_x"], metrics["fwhm_y"], metrics["fwhm_z"], metrics["fwhm_avg"] = fx, fy, fz, favg
    if tissues["wm"].sum() > 0:
        p = float(np.percentile(img, 99.95))
        metrics["wm2max"] = _finite(float(np.median(img[tissues["wm"]])) / p) if p > 0 else None

    notes.insert(0, notes_src)
    return ImageQuality(metrics=metrics, notes=notes)


def image_quality_nifti(path: str | Path, labels_path: str | Path | None = None,
                        label_values: dict[str, int] | None = None) -> ImageQuality:
    """Load a NIfTI volume (and optionally its label map) and compute its IQMs."""
    import nibabel as nib

    path = Path(path)
    try:
        nii = nib.load(str(path))
        data = np.asarray(nii.dataobj, dtype=np.float32)
        zooms = tuple(float(z) for z in nii.header.get_zooms()[:3])
    except FileNotFoundError:
        raise SitebenchError("file not found", path) from None
    except Exception as exc:  # nibabel raises many kinds
        raise SitebenchError(f"cannot read as NIfTI: {exc}", path) from None
    labels = None
    if labels_path is not None:
        try:
            labels = np.asarray(nib.load(str(labels_path)).dataobj)
        except Exception as exc:
            raise SitebenchError(f"cannot read label map: {exc}", labels_path) from None
    try:
        return image_quality(data, zooms, labels=labels, label_values=label_values)
    except SitebenchError as exc:
        raise SitebenchError(str(exc), path) from None
