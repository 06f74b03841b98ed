"""``sitebench simulate``: a seeded simulated trial; ``sitebench simulate sweep``: tolerances from the biomarker.

``sitebench simulate --out DIR [--config FILE]`` writes a trial as it always did. The optional
sub-action ``sweep`` images the same simulated subjects at deviations of one acquisition
parameter, scores model versions at each, and prints the largest tolerated deviation as a
suggested rule for the locked protocol (see :mod:`sitebench.sweep`).
"""

from __future__ import annotations

import argparse

from sitebench.cli._common import add_json, print_json, say
from sitebench.errors import SitebenchError

#: plain ``simulate`` options (dest, default): they belong before ``sweep`` and mean nothing after it
_TRIAL_OPTIONS = (("out", None), ("config", None), ("sites", None), ("scans_per_site", None), ("seed", None),
                  ("workers", None), ("no_progress", False))
PARAMETER_CHOICES = ("slice_thickness", "noise", "coverage_loss", "contrast")


def cmd_simulate(args: argparse.Namespace) -> int:
    if args.out is None:
        args.simulate_parser.error("the following arguments are required: --out")
    from sitebench.datasets.simulator import load_trial_config, simulate_trial
    from sitebench.pipeline import progress_bar

    config = load_trial_config(args.config, n_sites=args.sites, scans_per_site=args.scans_per_site,
                               seed=args.seed, workers=args.workers)
    trial = simulate_trial(config, args.out, progress=progress_bar(not args.no_progress,
                                                                     config.n_sites * config.scans_per_site,
                                                                     "simulating scans"))
    print(trial.summary())
    print(f"truth: {trial.truth_path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    given = [f"--{dest.replace('_', '-')}" for dest, default in _TRIAL_OPTIONS if getattr(args, dest) != default]
    if given:
        raise SitebenchError(f"options given before 'sweep' ({', '.join(given)}) belong to plain 'simulate'; put sweep options "
                             "after 'sweep' (see: sitebench simulate sweep --help)")
    from sitebench.sweep import run_sweep

    models = [m.strip() for m in args.sweep_models.split(",") if m.strip()] if args.sweep_models else None
    if args.sweep_models is not None and not models:
        raise SitebenchError("--models: name at least one model version, e.g. classical,builtin:gm_unet_v1")
    result = run_sweep(args.parameter, args.sweep_out, levels=args.levels, n_subjects=args.subjects,
                       models=models, margin=args.margin, seed=args.sweep_seed, n_boot=args.bootstrap,
                       vendor=args.vendor, workers=args.sweep_workers, progress=not args.sweep_no_progress,
                       log=say)
    if not args.no_plot:
        figure = result.plot()
        path = result.out_dir / "error_vs_deviation.png"
        figure.savefig(path, bbox_inches="tight", metadata={"Software": None})
        from sitebench.reports.figures import pyplot

        pyplot().close(figure)
        say(f"figure: {path}")
    if args.json:
        print_json(result.to_dict())
    else:
        print(result.summary())
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("simulate", help="simulate a multi-site trial with known truth (or: simulate sweep)",
                         description="Write images, label maps, manifest.csv and truth.json for a seeded "
                                     "simulated trial. 'sitebench simulate sweep' instead derives protocol "
                                     "tolerances from the biomarker.")
    sim.add_argument("--out", help="new output folder (required without 'sweep')")
    sim.add_argument("--config", help="trial settings YAML (see configs/trial_demo.yaml)")
    sim.add_argument("--sites", type=int, help="override: number of sites")
    sim.add_argument("--scans-per-site", type=int, help="override: scans per site")
    sim.add_argument("--seed", type=int, help="override: seed")
    sim.add_argument("--workers", type=int, help="override: worker processes")
    sim.add_argument("--no-progress", action="store_true")
    sim.set_defaults(func=cmd_simulate, simulate_parser=sim)
    actions = sim.add_subparsers(dest="simulate_action", metavar="[sweep]", required=False)

    sweep = actions.add_parser(
        "sweep", help="vary one acquisition parameter and suggest a protocol tolerance per model version",
        description="Image the same seeded simulated subjects at deviations of ONE acquisition parameter from "
                    "the protocol, score each model version at each level with the benchmark runner, and print "
                    "the largest deviation whose mean error has its 90%% CI inside the equivalence margin, as "
                    "a rule in the locked protocol's YAML syntax.",
        epilog="Levels are deviations from the protocol (0 = the protocol): slice_thickness in mm added; "
               "noise as extra noise sigma (1 = twice the noise); coverage_loss in mm lost at the top "
               "(whole 2 mm slices); contrast as a TR change in %% (mapped to a GM/WM intensity shift).")
    sweep.add_argument("--parameter", required=True, choices=PARAMETER_CHOICES, help="what to vary")
    sweep.add_argument("--levels", help="comma-separated deviations, e.g. 0,10,20,30 (default per parameter)")
    sweep.add_argument("--subjects", type=int, default=8, help="simulated subjects (default 8)")
    sweep.add_argument("--models", dest="sweep_models",
                       help="comma-separated model sources (default: classical,builtin:gm_unet_v1,"
                            "builtin:gm_unet_v2)")
    sweep.add_argument("--margin", type=float, default=50.0, help="equivalence margin in ml (default 50)")
    sweep.add_argument("--out", dest="sweep_out", default="sitebench-sweep",
                       help="output folder; the sweep goes into OUT/PARAMETER (default ./sitebench-sweep)")
    sweep.add_argument("--seed", dest="sweep_seed", type=int, default=0, help="subjects and bootstrap seed")
    sweep.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates per level (default 2000)")
    sweep.add_argument("--vendor", help="whose contrast and SNR the protocol scanner has (default SIEMENS)")
    sweep.add_argument("--workers", dest="sweep_workers", type=int, default=1,
                       help="worker processes for scoring (default 1: inline, fastest on a few cores)")
    sweep.add_argument("--no-plot", action="store_true", help="do not write error_vs_deviation.png")
    sweep.add_argument("--no-progress", dest="sweep_no_progress", action="store_true", help="no progress bar")
    add_json(sweep, "the sweep (table, tolerances, provenance)")
    sweep.set_defaults(func=cmd_sweep)
