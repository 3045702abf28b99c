"""Thin wrappers over RobustBench's own data loaders and ``robustbench.eval.benchmark``.

They add what RobustBench itself leaves to a network connection: before anything is called,
the data set is looked for where RobustBench will look, and a missing or altered copy gives an
error that says where we looked and how to get the files -- instead of a download attempt
that fails deep inside torchvision on a machine without internet.  Dataset and threat-model
names are checked against RobustBench's own enums, with the allowed values in the message.

RobustBench is imported only through :func:`rb_labelrefine.compat.robustbench.import_robustbench`,
so ``benchmark`` runs AutoAttack through the same backend as
:func:`rb_labelrefine.evaluation.run_autoattack` (the classic-interface adapter over pyautoattack
unless the GitHub ``autoattack`` is installed).

Security note: RobustBench loads CIFAR through torchvision, which unpickles the batch files
with full ``pickle`` after checking their MD5 against the official archive -- safe for genuine
files, which is why this module refuses files whose checksum does not match rather than
bypassing the check.  (``rb_labelrefine.data.load_cifar`` reads the same files without
executing pickle code, for training.)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..compat.robustbench import classic_autoattack, import_robustbench
from ..data.errors import CorruptDatasetError, DatasetNotFoundError
from .autoattack import AutoAttackLogCapture, machine_info, rng_guard
from .pgd import eval_mode
from ..errors import BadInputError

__all__ = ["DATASETS", "THREAT_MODELS", "DEFAULT_EPS", "resolve_benchmark", "default_eps", "load_rb_data",
           "benchmark", "check_rb_data"]

DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2", "corruptions", "corruptions_3d")
# RobustBench's standard radii: CIFAR Linf 8/255 and L2 0.5; ImageNet Linf 4/255.
DEFAULT_EPS = {("cifar10", "Linf"): 8 / 255, ("cifar100", "Linf"): 8 / 255, ("cifar10", "L2"): 0.5,
               ("cifar100", "L2"): 0.5, ("imagenet", "Linf"): 4 / 255}

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CORRUPTION_HINT = {
    "cifar10": "CIFAR-10-C from https://zenodo.org/record/2535967 (extract CIFAR-10-C.tar into data_dir)",
    "cifar100": "CIFAR-100-C from https://zenodo.org/record/3555552 (extract CIFAR-100-C.tar into data_dir)",
    "imagenet": "ImageNet-C / ImageNet-3DCC folders (<corruption>/<severity>/<class>/<image>) under data_dir",
}


def resolve_benchmark(dataset, threat_model):
    """Validate names against RobustBench's enums; return ``(BenchmarkDataset, ThreatModel)``."""
    import_robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    try:
        ds = BenchmarkDataset(dataset.value if isinstance(dataset, BenchmarkDataset) else dataset)
    except ValueError:
        raise BadInputError(f"unknown RobustBench dataset {dataset!r}; choose one of "
                         f"{[d.value for d in BenchmarkDataset]}") from None
    try:
        tm = ThreatModel(threat_model.value if isinstance(threat_model, ThreatModel) else threat_model)
    except ValueError:
        raise BadInputError(f"unknown RobustBench threat model {threat_model!r}; choose one of "
                         f"{[t.value for t in ThreatModel]}") from None
    if tm is ThreatModel.corruptions_3d and ds is not BenchmarkDataset.imagenet:
        raise BadInputError(f"threat model 'corruptions_3d' exists only for imagenet, not {ds.value!r}")
    if tm is ThreatModel.L2 and ds is BenchmarkDataset.imagenet:
        raise BadInputError("RobustBench has no L2 benchmark for imagenet; use Linf or corruptions")
    return ds, tm


def default_eps(dataset, threat_model) -> Optional[float]:
    """RobustBench's radius for a (dataset, threat model) pair; ``None`` for corruptions."""
    ds, tm = resolve_benchmark(dataset, threat_model)
    return DEFAULT_EPS.get((ds.value, tm.value))


def _cifar_class(ds_value: str):
    import torchvision.datasets as tvd

    return tvd.CIFAR10 if ds_value == "cifar10" else tvd.CIFAR100


def check_rb_data(dataset, data_dir, threat_model="Linf", corruptions: Optional[Sequence[str]] = None,
                  severity: int = 5) -> Path:
    """Raise a clear error unless RobustBench will find ``dataset`` under ``data_dir`` offline.

    CIFAR: torchvision's folder with every file it checks, each matching the official MD5 (the
    same check torchvision runs, looked up at call time).  ImageNet: ``data_dir/val``.
    Corruptions: the ``-C`` folder with ``labels.npy`` and one ``.npy`` per corruption.
    Returns the folder that was checked.
    """
    ds, tm = resolve_benchmark(dataset, threat_model)
    root = Path(data_dir)
    if tm.value in ("Linf", "L2"):
        if ds.value == "imagenet":
            folder = root / "val"
            if not folder.is_dir():
                raise DatasetNotFoundError("ImageNet validation set", [folder],
                                           "RobustBench reads data_dir/val/<wnid>/<image> (the ILSVRC2012 "
                                           "validation images sorted into class folders); get them from "
                                           "https://image-net.org and pass that data_dir.")
            return folder
        import torchvision.datasets.cifar as tv_cifar

        cls = _cifar_class(ds.value)
        folder = root / cls.base_folder
        files = [(f, md5) for f, md5 in cls.train_list + cls.test_list] + [(cls.meta["filename"], cls.meta["md5"])]
        missing = [folder / f for f, _ in files if not (folder / f).is_file()]
        hint = (f"Download the python version ({cls.filename}) from {_CIFAR_URL} and extract it into "
                f"{root} (giving {folder}), or pass download=True on a machine with internet access.")
        if missing:
            raise DatasetNotFoundError(f"{ds.value} (RobustBench / torchvision layout)", missing, hint)
        for f, md5 in files:
            # Looked up on the module at call time: the very function torchvision will call.
            if not tv_cifar.check_integrity(str(folder / f), md5):
                raise CorruptDatasetError(folder / f, f"MD5 does not match the official {ds.value} file "
                                          f"({md5}); torchvision would refuse it and try to download "
                                          f"it again. {hint}")
        return folder
    # corruptions
    from robustbench.data import CORRUPTIONS_DICT, CORRUPTIONS_DIR_NAMES

    folder = root / CORRUPTIONS_DIR_NAMES[ds][tm]
    names = list(corruptions or CORRUPTIONS_DICT[ds][tm])
    if ds.value == "imagenet":
        needed = [folder / c / str(severity) for c in names]
        missing = [p for p in needed if not p.is_dir()]
    else:
        needed = [folder / "labels.npy"] + [folder / f"{c}.npy" for c in names]
        missing = [p for p in needed if not p.is_file()]
    if missing:
        raise DatasetNotFoundError(f"{ds.value} {tm.value}", missing[:5] + (["..."] if len(missing) > 5 else []),
                                   f"Get {_CORRUPTION_HINT[ds.value]}.")
    return folder


def load_rb_data(dataset: str = "cifar10", n_examples: Optional[int] = None, data_dir="./data",
                 threat_model: str = "Linf", *, download: bool = False, severity: int = 5,
                 corruptions: Optional[Sequence[str]] = None, preprocessing=None):
    """``(x, y)`` test tensors from RobustBench's own loaders (images in [0, 1]).

    ``robustbench.data.load_cifar10/100`` for Linf/L2 on CIFAR, ``load_imagenet`` for ImageNet
    (5,000 fixed validation images at most), ``load_cifar10c/100c/imagenetc/imagenet3dcc`` for
    corruptions (``severity`` 1..5).  Without ``download=True`` the data must already be in
    ``data_dir`` (checked first, with a clear error otherwise).
    """
    ds, tm = resolve_benchmark(dataset, threat_model)
    if n_examples is not None and n_examples < 1:
        raise BadInputError(f"n_examples must be >= 1, got {n_examples}")
    if not download or ds.value == "imagenet" or tm.value.startswith("corruptions"):
        check_rb_data(ds.value, data_dir, tm.value, corruptions, severity)
    import robustbench.data as rbd

    data_dir = str(data_dir)
    if tm.value in ("Linf", "L2"):
        if ds.value == "imagenet":
            prepr = rbd.get_preprocessing(ds, tm, None, preprocessing or "Res256Crop224")
            return rbd.load_imagenet(5000 if n_examples is None else n_examples, data_dir, prepr)
        loader = rbd.load_cifar10 if ds.value == "cifar10" else rbd.load_cifar100
        return loader(n_examples, data_dir)
    if not 1 <= severity <= 5:
        raise BadInputError(f"severity must be in 1..5, got {severity}")
    loader = rbd.CORRUPTION_DATASET_LOADERS[ds][tm]
    names = list(corruptions or rbd.CORRUPTIONS_DICT[ds][tm])
    n = 10000 if n_examples is None else n_examples
    if ds.value == "imagenet":
        prepr = rbd.get_preprocessing(ds, tm, None, preprocessing or "Res224")
        return loader(min(n, 5000), severity, data_dir, False, names[:1], prepr)
    return loader(n, severity, data_dir, False, names)


def _test_set_size(ds_value: str, data_dir) -> Optional[int]:
    try:
        return len(_cifar_class(ds_value)(root=str(data_dir), train=False, download=False))
    except Exception:  # only used to report n; the benchmark itself surfaces real errors
        return None


def benchmark(model: nn.Module, *, dataset: str = "cifar10", threat_model: str = "Linf",
              eps: Optional[float] = None, n_examples: int = 10000, data_dir="./data", device="cpu",
              batch_size: int = 32, to_disk: bool = False, model_name: Optional[str] = None,
              log_path=None, aa_state_path=None, download: bool = False,
              corruptions_data_dir=None, preprocessing=None) -> dict:
    """Run ``robustbench.eval.benchmark`` (AutoAttack standard for Linf/L2) and return a summary.

    ``eps`` defaults to RobustBench's radius for the pair (8/255 or 0.5 on CIFAR, 4/255 on
    ImageNet Linf).  The model is evaluated in eval mode (its mode is restored).  With
    ``to_disk=True`` RobustBench writes ``model_info/<dataset>/<threat>/<model_name>.json``
    relative to the current directory, as upstream does.

    Returns ``clean_acc`` and ``robust_acc`` in percent, ``n``, the protocol, AutoAttack's
    flags, the backend, the machine and the elapsed time.
    """
    ds, tm = resolve_benchmark(dataset, threat_model)
    if tm.value in ("Linf", "L2"):
        eps = DEFAULT_EPS.get((ds.value, tm.value)) if eps is None else eps
        if eps is None or not eps > 0:
            raise BadInputError(f"eps must be a positive radius for {tm.value}, got {eps}")
    elif eps is not None:
        raise BadInputError(f"eps is not used for the {tm.value} threat model; leave it None")
    if n_examples < 1:
        raise BadInputError(f"n_examples must be >= 1, got {n_examples}")
    corr_dir = corruptions_data_dir or data_dir
    if not download or ds.value == "imagenet" or tm.value.startswith("corruptions"):
        check_rb_data(ds.value, corr_dir if tm.value.startswith("corruptions") else data_dir, tm.value)
    if tm.value.startswith("corruptions"):
        # RobustBench scores corruptions as mCE relative to AlexNet, whose per-corruption
        # accuracies it reads from a CSV in the *current directory* (shipped in its GitHub repo).
        csv = Path("model_info") / ds.value / "corruptions" / (
            "unaggregated_results_3d.csv" if tm.value == "corruptions_3d" else "unaggregated_results.csv")
        if not csv.is_file():
            raise FileNotFoundError(
                f"robustbench.eval.benchmark needs {csv.resolve()} (AlexNet reference accuracies for the "
                "mCE); copy model_info/ from the RobustBench GitHub repository into the working directory")
    rb = import_robustbench()
    import robustbench.eval  # noqa: F401  (the submodule is not imported by the package)

    _, backend, backend_version = classic_autoattack()
    device = torch.device(device)
    capture = AutoAttackLogCapture()
    aa_logger = logging.getLogger("auto-attack")
    aa_logger.addHandler(capture)
    start = time.perf_counter()
    try:
        with eval_mode(model), rng_guard(device):
            clean, adv = rb.eval.benchmark(
                model, n_examples=n_examples, dataset=ds, threat_model=tm, to_disk=to_disk,
                model_name=model_name, data_dir=str(data_dir),
                corruptions_data_dir=str(corr_dir) if corruptions_data_dir else None, device=device,
                batch_size=batch_size, eps=eps, log_path=str(log_path) if log_path else None,
                preprocessing=preprocessing, aa_state_path=Path(aa_state_path) if aa_state_path else None)
    finally:
        aa_logger.removeHandler(capture)
    elapsed = time.perf_counter() - start
    n = n_examples
    if ds.value in ("cifar10", "cifar100") and tm.value in ("Linf", "L2"):
        size = _test_set_size(ds.value, data_dir)
        n = min(n_examples, size) if size is not None else n_examples
    return {
        "clean_acc": 100.0 * float(clean),
        "robust_acc": 100.0 * float(adv),
        "n": n,
        "dataset": ds.value,
        "threat_model": tm.value,
        "norm": tm.value if tm.value in ("Linf", "L2") else None,
        "eps": eps,
        "protocol": ("robustbench.eval.benchmark: AutoAttack standard" if tm.value in ("Linf", "L2")
                     else "robustbench.eval.benchmark: corruption accuracy"),
        "version": "standard" if tm.value in ("Linf", "L2") else None,
        "standard": tm.value in ("Linf", "L2"),
        "flags": list(dict.fromkeys(capture.flags)),
        "backend": backend,
        "backend_version": backend_version,
        "robustbench_version": getattr(rb, "__version__", None) or _dist_version("robustbench"),
        "elapsed_s": elapsed,
        "batch_size": batch_size,
        "machine": machine_info(device),
    }


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None

