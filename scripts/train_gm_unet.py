"""Train the two shipped versions of the GM U-Net on simulated scans from ONE vendor.

    python scripts/train_gm_unet.py --out src/sitebench/models/bundles

v1 sees the training vendor's contrast only. v2 sees the same scans with
cross-vendor intensity augmentation (histogram shifts, gamma, bias field, noise),
so the demo can show whether augmentation buys robustness at unseen vendors.
Training data come from a seed the demo never uses, so test scans are unseen.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sitebench.datasets.simulator import DEFAULT_VENDORS, TrialConfig, simulate_trial
from sitebench.models.bundle import GM_UNET_NETWORK_DEF, GM_UNET_PREPROCESSING, write_bundle
from sitebench.provenance import code_version, package_versions, utc_now

TRAIN_SEED = 1000
TRAIN_VENDOR = "SIEMENS"


def training_transforms(augment: bool):
    from monai import transforms as T

    steps = [
        T.LoadImaged(keys=["image", "label"]),
        T.EnsureChannelFirstd(keys=["image", "label"]),
        T.Lambdad(keys="label", func=lambda x: (x == 2).float()),
        T.ScaleIntensityRangePercentilesd(keys="image", lower=1, upper=99, b_min=0.0, b_max=1.0, clip=False),
        T.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
    ]
    if augment:
        steps += [
            T.RandBiasFieldd(keys="image", prob=0.5, coeff_range=(0.0, 0.2)),
            T.RandHistogramShiftd(keys="image", prob=0.8, num_control_points=(4, 8)),
            T.RandAdjustContrastd(keys="image", prob=0.5, gamma=(0.6, 1.6)),
            T.ScaleIntensityRangePercentilesd(keys="image", lower=1, upper=99, b_min=0.0, b_max=1.0, clip=False),
            T.RandGaussianNoised(keys="image", prob=0.5, std=0.04),
        ]
    # whole volumes, padded as at inference: instance-norm statistics then match inference
    steps.append(T.DivisiblePadd(keys=["image", "label"], k=4, method="end"))
    steps.append(T.EnsureTyped(keys=["image", "label"], dtype=torch.float32))
    return T.Compose(steps)


def train(data: list[dict], augment: bool, iterations: int, seed: int) -> tuple[dict, list[float]]:
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism
    from monai.bundle import ConfigParser

    set_determinism(seed)
    network = ConfigParser({"net": GM_UNET_NETWORK_DEF}).get_parsed_content("net")
    dataset = CacheDataset(data, training_transforms(augment), cache_rate=1.0, progress=False)
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=0, drop_last=True)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam(network.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=iterations)
    losses: list[float] = []
    step = 0
    network.train()
    while step < iterations:
        for batch in loader:
            optimiser.zero_grad()
            loss = loss_fn(network(batch["image"]), batch["label"])
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(float(loss))
            step += 1
            if step % 50 == 0:
                print(f"  step {step}/{iterations} loss {np.mean(losses[-50:]):.4f}", flush=True)
            if step >= iterations:
                break
    return network.state_dict(), losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("src/sitebench/models/bundles"))
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--scans-per-site", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(2)
    vendor = next(v for v in DEFAULT_VENDORS if v.name == TRAIN_VENDOR)
    config = TrialConfig(name="gm-unet-training", seed=TRAIN_SEED, n_sites=args.sites,
                         scans_per_site=args.scans_per_site, sessions_per_subject=1, vendors=[vendor],
                         upgrade=None, coverage=None, thick_slice_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        trial = simulate_trial(config, tmp)
        data = [{"image": str(Path(tmp) / r.image_path), "label": str(Path(tmp) / r.label_path)}
                for r in trial.manifest.itertuples()]
        for version, augment in (("1.0.0", False), ("2.0.0", True)):
            start = time.time()
            print(f"training gm-unet {version} (augment={augment}) on {len(data)} {TRAIN_VENDOR} scans")
            state, losses = train(data, augment, args.iterations, seed=TRAIN_SEED)
            metadata = {
                "name": "gm-unet",
                "version": version,
                "description": "3D U-Net segmenting grey matter on T1w; trained on simulated "
                               f"{TRAIN_VENDOR} scans only" + (" with cross-vendor intensity augmentation"
                                                                if augment else ""),
                "changelog": {version: "augmented" if augment else "single-vendor baseline"},
                "monai_version": __import__("monai").__version__,
                "pytorch_version": torch.__version__,
                "network_data_format": {
                    "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": 1,
                                         "spatial_shape": ["4*n", "4*n", "4*n"], "dtype": "float32"}},
                    "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                                         "channel_def": {"0": "other", "1": "grey matter"}}},
                },
                "sitebench": {
                    "gm_channel": 1,
                    "training": {
                        "vendor": TRAIN_VENDOR, "augmentation": augment, "seed": TRAIN_SEED,
                        "iterations": args.iterations, "scans": len(data),
                        "final_loss": round(float(np.mean(losses[-50:])), 5),
                        "seconds": round(time.time() - start, 1), "trained_utc": utc_now(),
                        "code_version": code_version(), "packages": package_versions(("torch", "monai")),
                    },
                },
            }
            digest = write_bundle(args.out / f"gm_unet_v{version[0]}", state, GM_UNET_NETWORK_DEF,
                                  GM_UNET_PREPROCESSING, metadata)
            print(f"  wrote {args.out / f'gm_unet_v{version[0]}'} sha256={digest} "
                  f"({time.time() - start:.0f} s, final loss {metadata['sitebench']['training']['final_loss']})")
    (args.out / "README.md").write_text(
        "# Built-in GM U-Net bundles\n\nMONAI bundles written by `scripts/train_gm_unet.py`. "
        "Each `configs/metadata.json` records the SHA-256 of `models/model.pt` and how it was trained.\n")


if __name__ == "__main__":
    main()
