"""Export a training run in the layout RobustBench reads, with a model card.

``export_run(run_dir, out_dir)`` writes::

    out_dir/models/<dataset>/<threat_model>/<Name>.pt        weights, as robustbench.utils.load_model reads them
    out_dir/model_info/<dataset>/<threat_model>/<Name>.json  exactly the fields of robustbench.utils.ModelInfo
    out_dir/model_zoo_entry.py                              the (Name, {'model': ..., 'gdrive_id': ...}) tuple
    out_dir/<Name>.safetensors                              the same weights, self-describing (load_exported)
    out_dir/export.json                                     what was exported from where, with which numbers
    out_dir/README.md                                       the model card (+ curves.png when the run has one)

How RobustBench 1.1.1 reads the ``.pt`` (``robustbench/utils.py: load_model``), and what that
means for the file:

* ``torch.load(path, map_location='cpu')`` without ``weights_only`` -- on torch >= 2.6 that
  means ``weights_only=True``, so the file must be a plain dict of tensors (it is);
* ``checkpoint['state_dict']`` if present, else the dict itself, then
  ``rm_substr_from_state_dict(sd, 'module.')`` and ``rm_substr_from_state_dict(sd, 'model.')``,
  which cut the first 7 / 6 characters of *every key that contains the substring anywhere*.
  Our models are :class:`~rb_labelrefine.models.NormalizedModel` with keys ``mean``, ``std``,
  ``model.*``; stored as is, ``model.`` would be cut and the keys would no longer match.  So
  the ``.pt`` stores every key with one extra ``model.`` prefix, which RobustBench removes again.
  The exporter runs RobustBench's own functions on the keys and refuses to write a file whose
  keys would not come back unchanged (e.g. a timm model with a submodule named ``module``);
* an entry whose ``gdrive_id`` is ``None`` is refused ("has no gdrive_id specified"), so the
  generated entry carries an empty string: with the ``.pt`` in ``model_dir`` nothing is
  downloaded; put the real Google Drive id there after uploading.

Nothing here unpickles: weights are read with safetensors or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import re
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..runs import RUN_FILES, info_from_metadata, info_to_metadata, load_run_config, read_weights
from .citations import METHOD_INFO, method_label
from .model_card import arch_title, card_context, render_model_card

__all__ = ["export_run", "load_exported", "default_name", "read_pt_state_dict", "MANIFEST", "NAME_RE",
           "PT_PREFIX"]

MANIFEST = "export.json"
PT_PREFIX = "model."
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
_FORMAT = "rb_labelrefine.export/1"
_ZOO_PLACEHOLDER_ID = ""


# ----------------------------------------------------------------------------- names

def default_name(cfg, year: Optional[int] = None) -> str:
    """``RBLabelRefine<year>_<method>_<arch>``, e.g. ``RBLabelRefine2026_TRADES-ADR_preact_resnet18``."""
    year = year or _dt.date.today().year
    arch = re.sub(r"[^A-Za-z0-9\-]+", "_", cfg.model.arch.replace("timm:", "timm-")).strip("_")
    return f"RBLabelRefine{year}_{method_label(cfg.method.name, cfg.objective.name)}_{arch}"


def _check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise ValueError(f"model name {name!r} must start with a letter and use only letters, digits, '_' and '-' "
                         "(it becomes a file name and a model-zoo key), e.g. 'Author2026_Method_Arch'")
    return name


# ----------------------------------------------------------------------------- inputs

def _resolve_target(dataset: Optional[str], run_dataset: str, threat_model: str):
    """``(dataset, threat_model, robustbench_loadable)`` validated against RobustBench's enums."""
    from ..evaluation.robustbench_eval import THREAT_MODELS, resolve_benchmark

    if threat_model not in ("Linf", "L2"):
        if threat_model in THREAT_MODELS:
            raise ValueError(f"export supports the Linf and L2 threat models (an eps-ball); got {threat_model!r}")
        raise ValueError(f"unknown RobustBench threat model {threat_model!r}; choose one of {list(THREAT_MODELS)}")
    if dataset is not None:
        ds, tm = resolve_benchmark(dataset, threat_model)   # explicit: must be a RobustBench dataset
        return ds.value, tm.value, True
    try:
        ds, tm = resolve_benchmark(run_dataset, threat_model)
        return ds.value, tm.value, True
    except ValueError:
        # A run on an offline data set (digits, Fashion-MNIST, ...): same layout, but RobustBench
        # cannot load it -- said so in export.json and in the card.
        return run_dataset, threat_model, False


def _normalise_results(autoattack, which: str) -> dict:
    if autoattack is None:
        return {}
    if not isinstance(autoattack, dict):
        raise TypeError("autoattack must be a result dict or {'best': result, 'final': result}")
    if "robust_acc" in autoattack or "clean_acc" in autoattack:
        return {which: autoattack}
    unknown = set(autoattack) - {"best", "final"}
    if unknown:
        raise ValueError(f"autoattack keys must be 'best'/'final' (or pass one result dict); got {sorted(unknown)}")
    return {k: v for k, v in autoattack.items() if v}


def _check_result_threat(results: dict, threat_model: str, eps: Optional[float]) -> Optional[float]:
    """All results must be for the exported threat model; returns the eps they share."""
    seen = None
    for which, r in results.items():
        norm = r.get("norm") or r.get("threat_model")
        if norm is not None and norm != threat_model:
            raise ValueError(f"the {which} evaluation was measured for {norm}, but the export is for {threat_model}")
        r_eps = r.get("eps")
        if r_eps is None:
            continue
        if eps is not None and abs(float(r_eps) - float(eps)) > 1e-9:
            raise ValueError(f"the {which} evaluation was measured at eps={r_eps:.6g}, but the export is for "
                             f"eps={eps:.6g}; pass eps={r_eps:.6g} or re-evaluate")
        if seen is not None and abs(float(r_eps) - seen) > 1e-9:
            raise ValueError("the best and final evaluations use different eps values")
        seen = float(r_eps)
    return seen


# ----------------------------------------------------------------------------- weights

def _pt_state(state: dict) -> dict:
    return {PT_PREFIX + k: v.detach().contiguous().cpu() for k, v in state.items()}


def _check_robustbench_keys(pt_state: dict, original: dict) -> None:
    """Run RobustBench's own key rewriting and require the original keys back."""
    from ..compat.robustbench import import_robustbench

    import_robustbench()
    from robustbench.utils import rm_substr_from_state_dict

    back = rm_substr_from_state_dict(rm_substr_from_state_dict(pt_state, "module."), "model.")
    if list(back) != list(original):
        bad = [k for k, b in zip(original, back) if k != b][:3]
        raise ValueError("robustbench.utils.load_model would rename some weights of this model (it cuts 'module.'/"
                         f"'model.' wherever they occur in a key), e.g. {bad}; the export would not load. Rename the "
                         "offending submodules.")


def read_pt_state_dict(path) -> dict:
    """A ``.pt`` state dict via ``torch.load(weights_only=True)``; anything else is refused."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends: never fall back to full pickle
        raise ValueError(f"refusing to load {path}: it is not a plain tensor state dict "
                         f"(torch.load(weights_only=True) said: {str(exc).splitlines()[0]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return obj


def _write_safetensors(state: dict, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path),
              metadata={k: str(v) for k, v in meta.items()})


# ----------------------------------------------------------------------------- zoo entry

def _zoo_source(name: str, dataset: str, threat_model: str, arch: str, kwargs: dict, info, loadable: bool) -> str:
    call_args = (f"{arch!r}, num_classes={info.num_classes}, in_channels={info.channels}, "
                 f"image_size={info.image_size},\n                                 mean={tuple(info.mean)!r}, "
                 f"std={tuple(info.std)!r}")
    if kwargs:
        call_args += "".join(f", {k}={v!r}" for k, v in kwargs.items())
    extra = "    'preprocessing': 'Res256Crop224',\n" if dataset == "imagenet" else ""
    note = "" if loadable else (f"# NOTE: RobustBench has no '{dataset}' benchmark; this entry documents the model "
                                "but robustbench.utils.load_model cannot use it.\n")
    return f'''"""RobustBench model-zoo entry for {name} (generated by rb_labelrefine).

Paste ENTRY into the {threat_model} list of robustbench/model_zoo/{dataset}.py, or register it at run time::

    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    model_dicts[BenchmarkDataset({dataset!r})][ThreatModel({threat_model!r})][ENTRY[0]] = ENTRY[1]

    from robustbench.utils import load_model
    model = load_model({name!r}, model_dir="models", dataset={dataset!r}, threat_model={threat_model!r})

load_model refuses an entry whose gdrive_id is None. While models/{dataset}/{threat_model}/{name}.pt
exists under model_dir it reads that file and downloads nothing; after uploading the .pt, put its
Google Drive id here.
"""
{note}from rb_labelrefine.models import build_model

ENTRY = ({name!r}, {{
    'model': lambda: build_model({call_args}),
    'gdrive_id': {_ZOO_PLACEHOLDER_ID!r},
{extra}}})
'''


def _verify_with_robustbench(entry, name: str, model_dir: Path, dataset: str, threat_model: str,
                             reference: nn.Module, input_shape: tuple) -> None:
    """Load the export with robustbench.utils.load_model itself; outputs must equal the original's."""
    from ..compat.robustbench import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import load_model

    zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    previous = zoo.get(name)
    zoo[name] = entry
    try:
        loaded = load_model(name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    finally:
        if previous is None:
            zoo.pop(name, None)
        else:
            zoo[name] = previous
    _check_same_outputs(reference, loaded, "robustbench.utils.load_model", input_shape)


def _check_same_outputs(reference: nn.Module, loaded: nn.Module, how: str, input_shape: tuple) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, *input_shape, generator=g)
    reference.eval()
    loaded.eval()
    with torch.no_grad():
        a, b = reference(x), loaded.cpu()(x)
    if a.shape != b.shape or not torch.allclose(a, b, rtol=0, atol=1e-6):
        raise RuntimeError(f"the export loaded through {how} does not reproduce the original model's outputs")


# ----------------------------------------------------------------------------- export

def export_run(run_dir, out_dir, *, name: Optional[str] = None, which: str = "best", threat_model: str = "Linf",
               eps: Optional[float] = None, autoattack: Optional[dict] = None, sanity: Optional[dict] = None,
               dataset: Optional[str] = None, authors: Optional[str] = None, link: Optional[str] = None,
               venue: Optional[str] = None, additional_data: bool = False, license: str = "mit",
               verify: bool = True) -> dict:
    """Export ``run_dir``'s ``best`` or ``final`` weights to ``out_dir`` (see the module docstring).

    Args:
        name: RobustBench-style model name (default :func:`default_name`).
        threat_model, eps: what the numbers are for. ``eps`` defaults to the eps of the given
            evaluations, else the training eps (if the training norm matches), else RobustBench's
            standard radius for the dataset.
        autoattack: the evaluation(s) to report -- one result of
            :func:`~rb_labelrefine.evaluation.run_autoattack` / ``benchmark`` for the exported
            checkpoint, or ``{"best": ..., "final": ...}`` (both appear in the card, with the gap).
            Default: the ``autoattack`` entry of the run's ``summary.json`` (written by the trainer
            with ``eval.autoattack=true``) if there is one; otherwise accuracies are written as
            null / "not measured".
        sanity: a :func:`~rb_labelrefine.evaluation.sanity_report` result for the card.
        dataset: the RobustBench dataset slot (``cifar10``/``cifar100``/``imagenet``). Default: the
            run's data set; runs on other data sets are exported in the same layout, marked as not
            loadable by RobustBench.
        authors, link, venue, additional_data: ModelInfo fields (never guessed).
        verify: load the written files back (through ``robustbench.utils.load_model`` for
            RobustBench datasets, else through :func:`load_exported`) and require identical outputs.

    Returns a dict of the written paths.
    """
    from ..evaluation.robustbench_eval import DEFAULT_EPS

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if which not in ("best", "final"):
        raise ValueError(f"which must be 'best' or 'final', got {which!r}")
    weights_path = run_dir / RUN_FILES[which]
    cfg = load_run_config(run_dir)
    state, meta = read_weights(weights_path)
    info = info_from_metadata(meta)
    ds, tm, loadable = _resolve_target(dataset, info.name, threat_model)
    if loadable:
        from ..evaluation.robustbench_eval import DATASETS

        expected = {"cifar10": (10, 3, 32), "cifar100": (100, 3, 32)}.get(ds)
        got = (info.num_classes, info.channels, info.image_size)
        if expected and got != expected:
            raise ValueError(f"the model takes {got[1]}x{got[2]}x{got[2]} images with {got[0]} classes, but "
                             f"RobustBench's {ds} needs {expected[1]}x{expected[2]}x{expected[2]} and {expected[0]} "
                             f"classes (RobustBench datasets: {list(DATASETS)})")
    summary = _read_json(run_dir / RUN_FILES["summary"])
    if autoattack is None and summary and summary.get("autoattack"):
        # The trainer's own end-of-run AutoAttack (eval.autoattack=true), measured on this run.
        autoattack = summary["autoattack"]
    results = _normalise_results(autoattack, which)
    measured_eps = _check_result_threat(results, tm, eps)
    if eps is None:
        eps = measured_eps
    if eps is None:
        if cfg.attack.norm == tm:
            eps = cfg.attack.eps
        else:
            eps = DEFAULT_EPS.get((ds, tm))
    if eps is None or not eps > 0:
        raise ValueError(f"pass eps: no evaluation, training attack or RobustBench default gives one for {ds}/{tm}")
    name = _check_name(name or default_name(cfg))

    from ..models import build_model

    arch, kwargs = cfg.model.arch, dict(cfg.model.kwargs or {})

    def build():
        return build_model(arch, num_classes=info.num_classes, in_channels=info.channels,
                           image_size=info.image_size, mean=info.mean, std=info.std, **kwargs)

    model = build()
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{weights_path} does not match {arch}: {str(exc).splitlines()[0]}") from None
    model.eval()
    input_shape = (info.channels, info.image_size, info.image_size)

    pt_state = _pt_state(state)
    if loadable:
        _check_robustbench_keys(pt_state, state)

    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict = {}
    pt_path = out_dir / "models" / ds / tm / f"{name}.pt"
    pt_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pt_state, pt_path)
    written["weights_pt"] = pt_path

    st_path = out_dir / f"{name}.safetensors"
    epoch = meta.get("epoch")
    st_meta = {"format": _FORMAT, "name": name, "arch": arch, "model_kwargs": json.dumps(kwargs),
               "data_info": info_to_metadata(info), "dataset": ds, "threat_model": tm, "eps": repr(float(eps)),
               "which": which, "method": cfg.method.name, "objective": cfg.objective.name}
    if epoch is not None:
        st_meta["epoch"] = epoch
    _write_safetensors(state, st_path, st_meta)
    written["safetensors"] = st_path

    result = results.get(which)
    model_info = _model_info(ds, eps, result, cfg, info, arch, kwargs, authors, link, venue, additional_data,
                             loadable)
    mi_path = out_dir / "model_info" / ds / tm / f"{name}.json"
    mi_path.parent.mkdir(parents=True, exist_ok=True)
    mi_path.write_text(json.dumps(model_info, indent=2) + "\n")
    written["model_info"] = mi_path

    zoo_path = out_dir / "model_zoo_entry.py"
    zoo_path.write_text(_zoo_source(name, ds, tm, arch, kwargs, info, loadable))
    written["zoo_entry"] = zoo_path

    curves = None
    if (run_dir / RUN_FILES["curves"]).is_file():
        shutil.copyfile(run_dir / RUN_FILES["curves"], out_dir / "curves.png")
        curves = "curves.png"
        written["curves"] = out_dir / "curves.png"

    from ..config import config_to_dict

    std_eps = DEFAULT_EPS.get((ds, tm)) if loadable else None
    context = card_context(name=name, cfg=config_to_dict(cfg), dataset=ds, threat_model=tm, eps=eps, which=which,
                           autoattack=results, sanity=sanity, summary=summary, curves=curves,
                           training_data=info.name, robustbench_loadable=loadable, license=license,
                           std_eps=std_eps)
    card_path = out_dir / "README.md"
    card_path.write_text(render_model_card(context))
    written["model_card"] = card_path

    manifest = {
        "format": _FORMAT, "name": name, "dataset": ds, "threat_model": tm, "eps": float(eps),
        "robustbench_loadable": loadable, "which": which, "epoch": epoch,
        "source": {"run_dir": str(run_dir.resolve()), "weights": str(weights_path.resolve())},
        "arch": arch, "model_kwargs": kwargs, "data_info": json.loads(info_to_metadata(info)),
        "method": cfg.method.name, "objective": cfg.objective.name,
        "evaluations": results, "sanity": sanity,
        "files": {k: str(v.relative_to(out_dir)) for k, v in written.items()},
        "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    man_path = out_dir / MANIFEST
    man_path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    written["manifest"] = man_path

    if verify:
        _check_same_outputs(model, load_exported(st_path), "load_exported(.safetensors)", input_shape)
        _check_same_outputs(model, load_exported(pt_path), "load_exported(.pt)", input_shape)
        if loadable:
            import runpy

            entry = runpy.run_path(str(zoo_path))["ENTRY"]
            _verify_with_robustbench(entry[1], name, out_dir / "models", ds, tm, model, input_shape)
    return written


def _model_info(ds, eps, result, cfg, info, arch, kwargs, authors, link, venue, additional_data, loadable) -> dict:
    """``dataclasses.asdict(robustbench.utils.ModelInfo(...))`` when RobustBench is importable.

    Values follow ``robustbench.utils.update_json``: accuracies as strings rounded to two
    decimals (percent), ``eps`` as a float.  Unmeasured values stay ``None``.
    """
    method_title = (METHOD_INFO.get(cfg.method.name) or {}).get("title")
    label = method_label(cfg.method.name, cfg.objective.name)
    notes = [f"Trained with rb_labelrefine ({label})"]
    if info.name != ds:
        notes.append(f"trained on {info.name}, not {ds}")
    if result:
        n = result.get("n")
        kind = "AutoAttack standard" if result.get("standard") else "non-standard AutoAttack"
        notes.append(f"{kind} on {n} test points" if n is not None else kind)
    else:
        notes.append("not evaluated with AutoAttack")
    fields = dict(
        link=link,
        name=(f"{method_title} (rb_labelrefine)" if method_title else f"{label} (rb_labelrefine)"),
        authors=authors,
        additional_data=bool(additional_data),
        number_forward_passes=1,
        dataset=ds,
        venue=venue,
        architecture=arch_title(arch, kwargs),
        eps=float(eps),
        clean_acc=_acc_str(result, "clean_acc"),
        reported=None,
        autoattack_acc=_acc_str(result, "robust_acc"),
        footnote="; ".join(notes) + ".",
    )
    if loadable:
        from ..compat.robustbench import import_robustbench

        import_robustbench()
        from robustbench.utils import ModelInfo

        return dataclasses.asdict(ModelInfo(**fields))
    # Off-benchmark data set: same fields, without importing RobustBench for nothing.
    keys = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
            "architecture", "eps", "clean_acc", "reported", "corruptions_acc", "corruptions_acc_3d",
            "corruptions_mce", "corruptions_mce_3d", "autoattack_acc", "footnote")
    return {k: fields.get(k) for k in keys}


def _acc_str(result: Optional[dict], key: str) -> Optional[str]:
    if not result or result.get(key) is None:
        return None
    return str(round(float(result[key]), 2))


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- loading

def _manifest_for(path: Path) -> dict:
    # out/models/<dataset>/<threat>/<Name>.pt -> out/export.json
    candidates = [path / MANIFEST] if path.is_dir() else [p / MANIFEST for p in list(path.parents)[:4]]
    for c in candidates:
        if c.is_file():
            return json.loads(c.read_text())
    raise FileNotFoundError(f"no {MANIFEST} found for {path}: pass the export directory or its .safetensors file")


def load_exported(path: Union[str, Path], device="cpu") -> nn.Module:
    """Rebuild an exported model (eval mode, inputs in [0, 1]) without unpickling anything.

    ``path`` is the export directory, its ``<Name>.safetensors`` (self-describing), or the
    RobustBench ``.pt`` inside the export (read with ``torch.load(weights_only=True)``; the
    architecture comes from ``export.json``).
    """
    from ..models import build_model
    from ..runs import read_weights as _read

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"export not found: {path}")
    if path.is_dir():
        manifest = _manifest_for(path)
        path = path / manifest["files"]["safetensors"]
    if path.suffix == ".safetensors":
        state, meta = _read(path)
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} was not written by rb_labelrefine's exporter (metadata format "
                             f"{meta.get('format')!r}); for a run's weights use rb_labelrefine.runs.load_run_model")
        arch, kwargs = meta["arch"], json.loads(meta.get("model_kwargs") or "{}")
        info = info_from_metadata(meta)
    elif path.suffix == ".pt":
        raw = read_pt_state_dict(path)
        manifest = _manifest_for(path)
        if any(not k.startswith(PT_PREFIX) for k in raw):
            raise ValueError(f"{path}: expected every key to start with {PT_PREFIX!r} (the export's convention)")
        state = {k[len(PT_PREFIX):]: v for k, v in raw.items()}
        arch, kwargs = manifest["arch"], manifest.get("model_kwargs") or {}
        info = info_from_metadata({"data_info": json.dumps(manifest["data_info"])})
    else:
        raise ValueError(f"{path}: expected an export directory, a .safetensors or a .pt file")
    model = build_model(arch, num_classes=info.num_classes, in_channels=info.channels, image_size=info.image_size,
                        mean=info.mean, std=info.std, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not match {arch}: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval()
