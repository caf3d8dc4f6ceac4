"""The results file's layout: every group and dataset name, unit and path, in one
place that the writers (runtime, evaluation) and the readers (inspection,
tools/report.py, the benchmarks) share.

``results.h5`` plus one part file per role. Each rank writes only its own part,
opening it just long enough to append, so a crash of any rank leaves every file
readable. ``results.h5`` is written once by rank 0 and links the parts with HDF5
external links, so plain h5py (``f["clients/c0/rounds/loss_local"]``) and h5dump
read it; ``collafuse-hpc bundle`` copies it into one self-contained file::

    results.h5            attrs: schema="collafuse-results", schema_version, config (YAML),
                          package_version, torch_version, seed, roles (YAML), created
      /server             -> parts/server_0.h5
      /servers/<rank>     -> parts/server_<rank>.h5, each further replica (server.count > 1)
      /clients/<id>       -> parts/client_<id>.h5
      /records/<n>        one per invocation that wrote into the run, n = 0, 1, ... in order:
                          attrs command (train | resume | sample | evaluate), argv, started,
                          finished ("" while it runs or if it failed; a stop's totals say by
                          what), checkpoint_round (the
                          set it started from or used), settings (YAML: the keys that differ
                          from the training config), totals (YAML)
      /records/<n>/metrics  an evaluate record's metrics (layout of /metrics below)
      /metrics            soft link (relative) to the newest evaluation's records/<n>/metrics
    part file             attrs: role, rank, host, pid, (client_id, t_c, cut_ratio)
      /rounds/round       int64 [R], the round index: the dimension scale of every column
      /rounds/<metric>    float64 [R], one row per logged round; attr ``units``; clients:
                          took_part (run.clients_per_round), no loss_server when c = 1;
                          servers: clients (how many sent), a row only for rounds some
                          client sent to (an idle server, all its clients at c = 1, has none)
      /records/<n>/samples/images      uint8 [n, C, H, W] the collaborative samples of
                                       train/resume/sample record n (clients); attrs say how
      /records/<n>/samples/x_handover  float32 [n, C, H, W] what the server returned at the cut
      /records/<n>/summary             attrs: that invocation's totals and rates; a client's
                                       images_sent, messages_sent, bytes_sent are over the
                                       run (as /audit's), invocation_<those> this invocation's
      /samples            soft link (relative) to the newest records/<n>/samples (images, x_handover)
      /audit/<field>      int64 [M] one row per message that left the client, over all
                          runs of this output folder: round, kind (wire.Kind value),
                          images, t_c, nbytes. Append-only: a round trained again after a
                          resume has a row each time it was sent, each ``sample`` its
                          request. attrs hold the totals images_sent, messages_sent,
                          bytes_sent (audit_totals; the checkpoint's count where it is more)
      /summary            attrs: training totals and rates of this role, summed over the
                          training invocations (train and each resume; ``invocations``);
                          sample and evaluate never change it

Schema version 2 (before records) kept /samples, /summary and /metrics as plain groups,
written over by each invocation; the readers take both layouts (no history in v2). A later
``sample`` moves a v2 part's /samples to records/v2/samples, a later training its /summary
to records/v2/summary (counted in /summary as one training invocation).
    /metrics              attrs: extractor, checkpoint_round, created, units
      /<client id>|pooled/<set>   attrs: fid, kid_mean, kid_std (NaN: every KID subset was the
                                  whole of both sets), images, real_images
                                  dataset images: uint8 [<=64, C, H, W], the first scored images
      /<client id>/disclosure     attrs: t_c, snr, mse, psnr_db, ssim, dims, mu_per_release,
                                  releases, mu_composed, reading, images
      /<client id>/attack         attrs: recon_{public,own}_{psnr_db,ssim,fid}, public_model,
                                  link_{pixel,feature}_top{1,5}, link_candidates, chance_top{1,5}
                                  (evaluation/attacks.py); releases and each figure at that
                                  many releases per image, <figure>_releases; each recon_* and
                                  link_* figure with [_low|_high], its 95% interval over
                                  images (link_pixel_top1_releases_low, ...; link_*: Wilson
                                  score, recon_*: bootstrap, FID's only with the classifier
                                  extractor; none for eval.bootstrap 0)
      /<client id>|pooled/membership  attrs: mia_<model>_{auc,tpr_at_1fpr}[_low|_high] (model:
                                  server, client, federated), members, draws, models
                                  (evaluation/privacy.py); a set's attrs also copy_rate_{pixel,feature}
      /<client id>/compute        attrs: evaluation.compute.client_compute's fields (absent with eval.compute false)
"""

from __future__ import annotations

import math
import os

import h5py
import numpy as np
import yaml

from collafuse_hpc.data.shard import SCHEMA as SHARD_SCHEMA

SCHEMA = "collafuse-results"
SCHEMA_VERSION = 3  # 2: ``units`` attributes, the round dimension scale; 3: records
INDEX = "results.h5"
PARTS = "parts"
SERVER, SERVERS, CLIENTS = "server", "servers", "clients"
ROUNDS, AUDIT, SUMMARY, METRICS, RECORDS = "rounds", "audit", "summary", "metrics", "records"
SAMPLES, HANDOVER = "samples/images", "samples/x_handover"  # the newest, through the /samples link
ROUND = "round"  # the column every row group is indexed by
BUNDLED = "bundled_from"  # a bundle's attribute: the results.h5 it was made from
V2 = "v2"  # records/v2: what a file of schema version 2 held at /samples and /summary, moved aside

# the image sets evaluate scores, in report order (evaluation/evaluate.py says what each is)
SETS = ("collaborative", "cut", "server_at_cut", "server_alone", "client_alone", "global")

COLUMN_UNITS = {  # by column name, or by its first word (loss_local -> loss)
    "round": "index",
    "loss": "mean squared error",
    "time": "s",
    "images_per_s": "images/s",
    "nbytes": "bytes",
    "bytes": "bytes",
    "images": "count",
    "kind": "wire.Kind value",
    "t_c": "step",
    "took_part": "1 if the client was drawn for the round, else 0",
    "clients": "count",
}
METRIC_UNITS = (
    "fid: squared feature distance; kid_mean/kid_std: MMD^2 (unbiased, cubic kernel); mse: per pixel in [-1, 1]; "
    "psnr_db: dB for data range 2; ssim: mean SSIM in [-1, 1]; snr: abar/(1-abar); mu_*: Gaussian DP mu; "
    "*_flops: floating-point operations per image; *_s: seconds; recon_*: reconstructions from x_c against the "
    "originals; link_*_top*: fraction of released x_c whose source is among the k nearest training images; "
    "*_releases: the same with each image's releases averaged; mia_*_auc: ROC AUC of the loss attack (0.5: chance); "
    "mia_*_tpr_at_1fpr: members flagged at 1% of non-members flagged; copy_rate_*: share of samples nearer a "
    "training image than the 5th percentile of held-out images; *_low/*_high: the 95% interval of * (bootstrap; "
    "link_*: Wilson score; copy_rate_*: the span of both)"
)


def units(column: str) -> str:
    """The ``units`` attribute of a row column."""
    return COLUMN_UNITS.get(column, COLUMN_UNITS.get(column.split("_")[0], ""))


def record_key(n: int | str, group: str = "") -> str:
    """``records/<n>`` or, with ``group``, ``records/<n>/<group>``."""
    return f"{RECORDS}/{n}" + (f"/{group}" if group else "")


def record_numbers(f: h5py.Group) -> list[int]:
    """The record numbers of a results or part file, in order ([] for schema v2)."""
    return sorted(int(n) for n in f.get(RECORDS, {}) if n.isdigit())  # not records/v2


def audit_totals(role: h5py.Group) -> dict[str, int]:
    """What a client's audit rows count as sent (a role's part or its group in results.h5;
    zeros when it has none)."""
    audit = role.get(AUDIT, {})
    column = {name: audit[name][()] if name in audit else np.zeros(0, np.int64) for name in ("images", "nbytes")}
    sent = {"images_sent": int(column["images"].sum()), "messages_sent": len(column["images"])}
    return {**sent, "bytes_sent": int(column["nbytes"].sum())}


RECENT = 0.1  # a role's recent loss: the mean over the last 10% of its rows, in the end-of-run log and inspect


def recent_rows(rows: int) -> int:
    """How many of a role's last ``rows`` rows its recent loss is the mean of (at least
    one): the one definition, so that the log and inspect give the same number."""
    return max(1, int(rows * RECENT))


def recent_mean(tail) -> float:
    """The mean of the finite values of ``tail`` (a role's last recent_rows rows of a
    column); NaN when none is."""
    tail = np.asarray(tail, dtype=float)
    return float(np.nanmean(tail)) if np.isfinite(tail).any() else math.nan


def plain_attrs(g: h5py.Group | h5py.Dataset) -> dict:
    """``g``'s attributes as plain Python values (numpy scalars unwrapped)."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in g.attrs.items()}


def index_path(output_dir: str) -> str:
    return os.path.join(output_dir, INDEX)


def results_of(path: str) -> str | None:
    """The results file that ``path`` stands for: a run folder's results.h5, or ``path``
    itself when it is an HDF5 file; None for anything else (a config file)."""
    if os.path.isdir(path):
        return index_path(path)
    return path if h5py.is_hdf5(path) else None


def role_key(client_id: str | None, server_rank: int = 0) -> str:
    """Where a role's part is linked in results.h5: ``server`` (the first server, where
    readers of one server look), ``servers/<rank>`` (a further replica) or ``clients/<id>``."""
    if client_id is not None:
        return f"{CLIENTS}/{client_id}"
    return SERVER if server_rank == 0 else f"{SERVERS}/{server_rank}"


def part_path(output_dir: str, client_id: str | None, server_rank: int = 0) -> str:
    """A role's part file: ``parts/server_<rank>.h5`` or ``parts/client_<id>.h5``."""
    name = f"server_{server_rank}.h5" if client_id is None else f"client_{client_id}.h5"
    return os.path.join(output_dir, PARTS, name)


PART_ERRORS = (KeyError, RuntimeError, OSError)  # h5py's errors opening or reading a part missing or damaged


def lost_part(results: str, part: str, key: str = "", left_out: list[str] | None = None) -> str:
    """Why the part file ``part`` of role ``key`` (as results.h5 at ``results`` links it)
    could not be read. ``left_out``: ``results`` is a bundle, which holds its parts'
    content instead of links, and these are the roles it was made without
    (:func:`bundle_left_out`)."""
    if left_out is not None:
        if key in left_out:
            return "left out of this bundle: it could not be read when the bundle was made"
        return "damaged inside this bundle; a copy or a full disk may have cut it short"
    path = os.path.join(os.path.dirname(results), part)
    if os.path.islink(path) and not os.path.exists(path):
        return f"a link to {os.readlink(path)!r}, which is missing"
    if os.path.lexists(path):
        return "damaged: HDF5 cannot read it whole; a copy or a full disk may have cut it short"
    return "the rank never started or its file was lost"


def bundle_left_out(f: h5py.File) -> list[str] | None:
    """The roles a bundle was made without (its missing_parts); None for a run's results.h5."""
    return yaml.safe_load(f.attrs.get("missing_parts", "[]")) or [] if BUNDLED in f.attrs else None


def open_results(path: str) -> h5py.File:
    """Open a results file for reading, without HDF5's file lock (a reader must never
    make a training rank fail); ValueError saying what the file is otherwise (not
    HDF5, a client shard, another HDF5 file, a damaged results file)."""
    hint = "pass the results.h5 in a run's output_dir"
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        if "locking flag values don't match" not in str(e):
            if h5py.is_hdf5(path) or os.path.basename(path) == INDEX:  # HDF5's signature or a run's name: damaged
                raise _damaged(path, e if os.path.getsize(path) else OSError("the file is empty")) from None
            raise ValueError(f"{path!r} is not a readable HDF5 file ({e}); {hint}") from None
        f = h5py.File(path, "r")  # this process already has it open with HDF5's lock
    try:
        _check(f, path, hint)
    except ValueError:
        f.close()
        raise
    return f


def _damaged(path: str, error: Exception, near: str = "/", bundled: bool = False) -> ValueError:
    """The error of a results file that HDF5 or YAML cannot read at ``near``."""
    cause = str(error.args[0] if isinstance(error, KeyError) and error.args else error).splitlines()
    parts = "" if bundled else "; the part files in parts/ are separate and keep each role's rounds, samples and audit"
    return ValueError(
        f"{path!r} is damaged at {near} ({cause[0] if cause else type(error).__name__}): a copy or a full disk "
        f"may have cut it short. Restore it from a copy (a bundle made by collafuse-hpc bundle is one){parts}"
    )


# the attributes holding YAML, and what each holds when set ("" reads as None: a record not finished)
YAML_SHAPES = {"config": dict, "roles": dict, "settings": dict, "totals": dict, "ignored": dict, "missing_parts": list}
INDEX_ERRORS = (KeyError, RuntimeError, OSError, TypeError, ValueError, yaml.YAMLError, RecursionError)


def _check(f: h5py.File, path: str, hint: str) -> None:
    """ValueError unless ``f`` is a results file that reads whole: every group, dataset,
    attribute and YAML attribute of the file itself, and every soft link resolves. Not
    the roles: the parts its external links point to, or in a bundle the copies of them,
    which each reader names per role. A damaged index would otherwise fail in whichever
    reader reached the damage first, with HDF5's or YAML's traceback. What is read is
    small (records, metrics, 64 images a set): milliseconds."""
    where, bundled = ["/"], False
    try:
        schema, bundled = f.attrs.get("schema"), BUNDLED in f.attrs
        if schema == SCHEMA:
            where[0] = "/ (attribute config)"
            if not isinstance(_yaml(f, "config"), dict):
                raise KeyError("it holds no config")
            where[0] = "/ (attribute roles)"
            roles = _yaml(f, "roles") or {}
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in roles.items()):
                raise TypeError("its roles are not role keys and part files")
            _walk(f, "/", set(roles), where)
    except INDEX_ERRORS as e:
        raise _damaged(path, e, where[0], bundled) from None
    if schema != SCHEMA:
        what = (
            "a client shard (made by collafuse-hpc prepare)"
            if schema == SHARD_SCHEMA
            else f"an HDF5 file with schema {schema!r}"
        )
        raise ValueError(f"{path!r} is {what}, not a collafuse-hpc results file; {hint}")


def _yaml(obj: h5py.Group | h5py.Dataset, key: str):
    """The YAML attribute ``key`` of ``obj``, parsed: TypeError when it is not text or not
    of its shape (YAML_SHAPES); None when absent or empty."""
    if key not in obj.attrs:
        return None
    value = obj.attrs[key]
    if not isinstance(value, str | bytes):
        raise TypeError(f"a {type(value).__name__}, not YAML text")
    parsed = yaml.safe_load(value)
    if parsed is not None and not isinstance(parsed, YAML_SHAPES[key]):
        raise TypeError(f"YAML of a {type(parsed).__name__}, not of a {YAML_SHAPES[key].__name__}")
    return parsed


def open_role(f: h5py.File, key: str) -> h5py.Group:
    """Role ``key`` of the results file ``f`` (its part file, through results.h5's link, or
    its copy in a bundle), its groups, dataset headers and attributes read (not its data):
    PART_ERRORS where it is missing or damaged, which the readers catch per role
    (:func:`lost_role` says why). h5py's ``get`` takes a damaged group for a missing one:
    a reader would show the role with no rows."""
    role = f[key]
    try:
        _walk(role, role.name, set(), ["/"], data=False)
    except (ValueError, TypeError) as e:  # a garbled name: undecodable, or bytes
        raise RuntimeError(f"damaged: {e}") from None
    return role


def lost_role(f: h5py.File, key: str, part: str) -> str:
    """The line naming role ``key`` of the results file ``f``, whose part file ``part``
    could not be read (:func:`open_role`), and why."""
    return f"{key}: part file {part} ({lost_part(f.filename, part, key, bundle_left_out(f))})"


def _walk(obj: h5py.Group | h5py.Dataset, name: str, roles: set[str], where: list[str], data: bool = True) -> None:
    """Read ``obj`` (at ``name``) and what it holds (datasets' ``data`` too), setting
    ``where`` to each object and attribute before it is read, so that the error names
    the damaged one."""
    for key in list(obj.attrs):
        where[0] = f"{name} (attribute {key})"
        if not isinstance(key, str):  # h5py gives a garbled name as bytes; readers look names up as text
            raise TypeError(f"an attribute name that is not text: {key!r}")
        obj.attrs[key]
        if key in YAML_SHAPES:
            _yaml(obj, key)
    where[0] = name
    if isinstance(obj, h5py.Dataset):
        if data:
            obj[()]
        return
    _ = "images" in obj  # a lookup by name, as readers make, reads what listing may not (an empty group's heap)
    soft = []
    for key in list(obj):
        child = f"{name.rstrip('/')}/{key}"
        where[0] = child
        link = obj.get(key, getlink=True)
        if link is None:  # h5py's get says None where the lookup itself failed
            raise KeyError("a link HDF5 cannot look up")
        if isinstance(link, h5py.SoftLink):  # /metrics, /samples: the newest record's, read where they point
            soft.append((key, child, link.path))
        elif isinstance(link, h5py.HardLink) and child.lstrip("/") not in roles:  # parts: each reader names its own
            _walk(obj[key], child, roles, where, data)
    for key, child, target in soft:  # after the objects, so that a damaged target is named as itself
        where[0] = child
        if obj.get(key) is None:
            raise KeyError(f"a link to {target!r}, which is missing")
