"""Export a training run in the layout RobustBench reads, with a model card.

``export_run(run_dir, out_dir)`` writes::

    out_dir/models/<dataset>/<threat_model>/<Name>.pt        weights, as robustbench.utils.load_model reads them
    out_dir/model_info/<dataset>/<threat_model>/<Name>.json  exactly the fields of robustbench.utils.ModelInfo
    out_dir/model_zoo_entry.py                              the (Name, {'model': ..., 'gdrive_id': ...}) tuple,
                                                            registered in RobustBench's zoo when imported
                                                            (RobustBench datasets only)
    out_dir/ROBUSTBENCH_NEW_MODEL.md                        RobustBench's "[New Model]" issue text, filled
                                                            (RobustBench datasets only)
    out_dir/<Name>.safetensors                              the same weights, self-describing (load_exported)
    out_dir/export.json                                     what was exported from where (names, never local
                                                            paths), with which numbers
    out_dir/README.md                                       the model card (+ curves.png when the run has one)

How RobustBench 1.1.1 reads the ``.pt`` (``robustbench/utils.py: load_model``), and what that
means for the file:

* ``torch.load(path, map_location='cpu')`` without ``weights_only`` -- on torch >= 2.6 that
  means ``weights_only=True``, so the file must be a plain dict of tensors (it is);
* ``checkpoint['state_dict']`` if present, else the dict itself, then
  ``rm_substr_from_state_dict(sd, 'module.')`` and ``rm_substr_from_state_dict(sd, 'model.')``,
  which cut the first 7 / 6 characters of *every key that contains the substring anywhere*.
  The network is stored as RobustBench's own ``normalize_model(net, mean, std)`` holds it
  (``normalize.mean``, ``normalize.std``, ``model.*``: the input normalisation is a layer of the
  model), every key with one extra ``model.`` prefix, which RobustBench removes again. The
  exporter runs RobustBench's own functions on the keys and refuses to write a file whose keys
  would not come back unchanged (e.g. a timm model with a submodule named ``module``);
* an entry whose ``gdrive_id`` is ``None`` is refused ("has no gdrive_id specified"), so the
  generated entry carries an empty string: with the ``.pt`` in ``model_dir`` nothing is
  downloaded; put the real Google Drive id there after uploading.

A run directory is untrusted input, like a checkpoint. Nothing here unpickles (weights are read
with safetensors or ``torch.load(weights_only=True)``), and nothing generated is executed: the
zoo entry holds only validated names and Python literals of plain data, is checked by parsing
it back (``ast``), and the model it describes is checked by building that description in-process
and loading the ``.pt`` through ``robustbench.utils.load_model``. Every file is written into a
temporary sibling of ``out_dir`` and moved into place at the end, so an export never mixes two
exports' files, never writes into the run it exports, and never writes outside ``out_dir``.
"""
from __future__ import annotations

import ast
import ctypes
import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import keyword
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..runs import (NAME_MAX, NAME_RE, RUN_FILES, check_name, check_run_weights, info_from_metadata,
                    info_to_metadata, load_run_config, load_state_checked, read_weights)
from .citations import METHOD_INFO, method_label
from .publish import (ISSUE_FILE, REGISTER_IMPORTS, eps_text, local_paths, local_paths_in, new_model_issue, portable,
                      register_line)
from .model_card import arch_title, card_context, render_model_card

__all__ = ["export_run", "load_exported", "load_export_for_eval", "default_name", "read_pt_state_dict", "ExportError",
           "MANIFEST", "NAME_RE", "PT_PREFIX"]

MANIFEST = "export.json"
PT_PREFIX = "model."
# RobustBench's evaluation preprocessing of ImageNet entries (robustbench/data.py PREPROCESSINGS):
# resize 256, centre crop 224 -- what data.name=imagenet evaluates with (rb_labelrefine/data/imagenet.py)
IMAGENET_PREPROCESSING = "Res256Crop224"
_FORMAT = "rb_labelrefine.export/2"
# /1 stored the .pt in NormalizedModel's layout (mean, std, model.*); /2 in normalize_model's.
_READABLE_FORMATS = ("rb_labelrefine.export/1", _FORMAT)
_ZOO_PLACEHOLDER_ID = ""
_NORMALIZE_MODULE = "robustbench.model_zoo.architectures.utils_architectures"
# registry names and timm:<name>; they appear in generated code and file names
_ARCH_RE = re.compile(r"^(timm:)?[A-Za-z0-9][A-Za-z0-9_.\-]*$")


from ..errors import ExportError  # noqa: E402,F401 (bad input to the exporter: the leaf errors.py, exit 2)


# ----------------------------------------------------------------------------- names

def default_name(cfg, year: Optional[int] = None) -> str:
    """``RBLabelRefine<year>_<method>_<arch>``, e.g. ``RBLabelRefine2026_TRADES-ADR_preact_resnet18``."""
    year = year or _dt.date.today().year
    arch = re.sub(r"[^A-Za-z0-9\-]+", "_", cfg.model.arch.replace("timm:", "timm-")).strip("_")
    return f"RBLabelRefine{year}_{method_label(cfg.method.name, cfg.objective.name)}_{arch}"


def _check_arch(arch, field: str) -> str:
    if not isinstance(arch, str) or not _ARCH_RE.match(arch) or len(arch) > NAME_MAX:
        raise ExportError(f"{field}: {str(arch)[:60]!r} is not an architecture name (a registered model or "
                          f"'timm:<name>': letters, digits, '_', '-', '.', at most {NAME_MAX} characters)")
    return arch


def _check_plain(value, field: str, depth: int = 0) -> None:
    """Plain data only: what ``repr`` writes as a literal that ``ast.literal_eval`` reads back."""
    t = type(value)   # exact types: a subclass could override __repr__
    if depth > 8:
        raise ExportError(f"{field}: nested too deeply")
    if value is None or t in (bool, int, str):
        return
    if t is float:
        if not math.isfinite(value):
            raise ExportError(f"{field}: must be a finite number, got {value!r}")
        return
    if t in (list, tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{field}[{i}]", depth + 1)
        return
    if t is dict:
        for k, v in value.items():
            if type(k) is not str:
                raise ExportError(f"{field}: keys must be strings, got {k!r}")
            _check_plain(v, f"{field}.{k}", depth + 1)
        return
    raise ExportError(f"{field}: a {t.__name__} value cannot be written into the model-zoo entry "
                      "(plain str/int/float/bool/None and lists/dicts of them only)")


def _literal(value, field: str) -> str:
    """``value`` as Python source that can only evaluate to that same value."""
    _check_plain(value, field)
    text = repr(value)
    if ast.literal_eval(text) != value:   # e.g. -0.0 vs 0.0 compare equal; anything else is a bug
        raise ExportError(f"{field}: {text[:60]} does not read back as the same value")
    return text


def _check_kwargs(kwargs, field: str) -> dict:
    if type(kwargs) is not dict:
        raise ExportError(f"{field}: must be a mapping, got {type(kwargs).__name__}")
    for k in kwargs:
        if type(k) is not str or not k.isidentifier() or keyword.iskeyword(k) or k.startswith("__"):
            raise ExportError(f"{field}: key {str(k)[:60]!r} is not a valid Python keyword-argument name")
    _check_plain(kwargs, field)
    return dict(kwargs)


# ----------------------------------------------------------------------------- inputs

def _resolve_target(dataset: Optional[str], run_dataset: str, threat_model: str):
    """``(dataset, threat_model, robustbench_loadable)`` validated against RobustBench's enums."""
    from ..evaluation.robustbench_eval import THREAT_MODELS, resolve_benchmark

    if threat_model not in ("Linf", "L2"):
        if threat_model in THREAT_MODELS:
            raise ExportError(f"export supports the Linf and L2 threat models (an eps-ball); got {threat_model!r}")
        raise ExportError(f"unknown RobustBench threat model {threat_model!r}; choose one of {list(THREAT_MODELS)}")
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


def _normalise_results(autoattack, which: str, where: str = "autoattack") -> dict:
    if autoattack is None:
        return {}
    if not isinstance(autoattack, dict):
        raise ExportError(f"{where} must be a result dict or {{'best': result, 'final': result}}")
    if "robust_acc" in autoattack or "clean_acc" in autoattack:
        results = {which: autoattack}
    else:
        unknown = set(autoattack) - {"best", "final"}
        if unknown:
            raise ExportError(f"{where} keys must be 'best'/'final' (or pass one result dict); got "
                              f"{sorted(map(str, unknown))}")
        results = {k: v for k, v in autoattack.items() if v}
    for k, r in results.items():
        _check_result(r, f"{where}.{k}" if r is not autoattack else where)
    return results


def _check_result(r, where: str) -> None:
    """The numbers an evaluation contributes to the card and model_info: type- and range-checked."""
    if not isinstance(r, dict):
        raise ExportError(f"{where} must be a result dict, got {type(r).__name__}")

    def number(key, lo, hi):
        v = r.get(key)
        if v is None:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise ExportError(f"{where}.{key} must be a number in [{lo}, {hi}], got {v!r}")

    number("clean_acc", 0, 100)
    number("robust_acc", 0, 100)
    number("eps", 0, math.inf)
    n = r.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ExportError(f"{where}.n must be a positive integer, got {n!r}")
    from ..results_schema import check_autoattack

    # every other field the card reads (eps unless a protocol text replaces its description, norm,
    # flags, per-attack numbers, ...), typed: a malformed result is exit 2 naming the field
    check_autoattack(r, "the evaluation", f"{where}.", require_eps=not r.get("protocol"), require_robust=False)


def _check_result_threat(results: dict, threat_model: str, eps: Optional[float]) -> Optional[float]:
    """All results must be for the exported threat model; returns the eps they share."""
    seen = None
    for which, r in results.items():
        norm = r.get("norm") or r.get("threat_model")
        if norm is not None and norm != threat_model:
            raise ExportError(f"the {which} evaluation was measured for {norm}, but the export is for {threat_model}")
        r_eps = r.get("eps")
        if r_eps is None:
            continue
        if eps is not None and abs(float(r_eps) - float(eps)) > 1e-9:
            raise ExportError(f"the {which} evaluation was measured at eps={r_eps:.6g}, but the export is for "
                             f"eps={eps:.6g}; pass eps={r_eps:.6g} or re-evaluate")
        if seen is not None and abs(float(r_eps) - seen) > 1e-9:
            raise ExportError("the best and final evaluations use different eps values")
        seen = float(r_eps)
    return seen


# ----------------------------------------------------------------------------- weights

def _rb_layout(state: dict) -> dict:
    """NormalizedModel's keys (``mean``, ``std``, ``model.*``) -> ``normalize_model``'s
    (``normalize.mean``, ``normalize.std``, ``model.*``)."""
    return {(f"normalize.{k}" if k in ("mean", "std") else k): v for k, v in state.items()}


def _from_rb_layout(state: dict) -> dict:
    return {(k[len("normalize."):] if k in ("normalize.mean", "normalize.std") else k): v for k, v in state.items()}


def _pt_state(state: dict, dataset: Optional[str] = None) -> dict:
    if dataset == "imagenet":
        # RobustBench's ImageNet checkpoints hold the bare network: load_model prefixes every key with
        # 'model.' (normalize_model's network) and takes the normalisation from the entry (it tolerates
        # the missing normalize.mean / normalize.std for ImageNet)
        return {k[len("model."):]: v.detach().contiguous().cpu() for k, v in state.items() if k.startswith("model.")}
    return {PT_PREFIX + k: v.detach().contiguous().cpu() for k, v in _rb_layout(state).items()}


def _check_robustbench_keys(pt_state: dict) -> None:
    """Run RobustBench's own key rewriting and require normalize_model's keys back."""
    from ..compat.robustbench import import_robustbench

    import_robustbench()
    from robustbench.utils import rm_substr_from_state_dict

    want = [k[len(PT_PREFIX):] if k.startswith(PT_PREFIX) else k for k in pt_state]
    back = list(rm_substr_from_state_dict(rm_substr_from_state_dict(pt_state, "module."), "model."))
    if back != want:
        bad = [k for k, b in zip(want, back) if k != b][:3]
        raise ExportError("robustbench.utils.load_model would rename some weights of this model (it cuts 'module.'/"
                          f"'model.' wherever they occur in a key), e.g. {bad}; the export would not load. Rename the "
                          "offending submodules.")


def read_pt_state_dict(path) -> dict:
    """A ``.pt`` state dict via ``torch.load(weights_only=True)``; anything else is refused."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends: never fall back to full pickle
        raise ExportError(f"refusing to load {path}: it is not a plain tensor state dict "
                         f"(torch.load(weights_only=True) said: {(str(exc).splitlines() or [''])[0]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise ExportError(f"{path} does not hold a state dict of tensors")
    return obj


def _write_safetensors(state: dict, path: Path, meta: dict) -> None:
    from safetensors.torch import save

    # save() + an ordinary write: save_file() creates the file 0600, unlike the export's other files
    path.write_bytes(save({k: v.detach().contiguous().cpu() for k, v in state.items()},
                          metadata={k: str(v) for k, v in meta.items()}))


# ----------------------------------------------------------------------------- zoo entry

@dataclasses.dataclass(frozen=True)
class _ZooSpec:
    """What ``model_zoo_entry.py`` builds, as data:
    ``normalize_model(<callee>(*args, **kwargs), mean, std)`` with ``callee`` and the
    :class:`ArchRef` arguments imported from ``module``."""
    module: str
    callee: str
    args: tuple
    kwargs: dict
    mean: tuple
    std: tuple
    native: bool      # RobustBench's own architecture code: the entry imports only robustbench

    def build(self) -> nn.Module:
        """The model the entry describes, built in-process from this data (not from the file)."""
        import importlib

        from ..compat.robustbench import import_robustbench
        from ..models.robustbench_archs import ArchRef

        import_robustbench()
        from robustbench.model_zoo.architectures.utils_architectures import normalize_model

        m = importlib.import_module(self.module)
        args = [getattr(m, a.name) if isinstance(a, ArchRef) else a for a in self.args]
        return normalize_model(getattr(m, self.callee)(*args, **self.kwargs), self.mean, self.std)

    def as_read(self, name: str, dataset: str, threat_model: str) -> dict:
        """What :func:`_read_zoo_entry` must find in the file written from this spec."""
        from ..models.robustbench_archs import ArchRef

        names = [self.callee] + [a.name for a in self.args if isinstance(a, ArchRef)]
        registration = {n: m for m, ns in REGISTER_IMPORTS.items() for n in ns}
        return {"name": name, "imports": {"normalize_model": _NORMALIZE_MODULE, **registration,
                                          **{n: self.module for n in names}},
                "callee": self.callee, "args": list(self.args), "kwargs": dict(self.kwargs),
                "mean": tuple(self.mean), "std": tuple(self.std), "gdrive_id": _ZOO_PLACEHOLDER_ID,
                "register": (dataset, threat_model),
                "preprocessing": IMAGENET_PREPROCESSING if dataset == "imagenet" else None}


def _zoo_spec(arch: str, kwargs: dict, info) -> _ZooSpec:
    from ..models.robustbench_archs import robustbench_call

    if len(info.mean) != 3 or len(info.std) != 3:
        # RobustBench's ImageNormalizer holds exactly one mean/std per RGB channel
        raise ExportError(f"the weights' data_info has {len(info.mean)} mean and {len(info.std)} std values; a "
                          "RobustBench model-zoo entry needs one per RGB channel (3)")
    mean, std = tuple(info.mean), tuple(info.std)
    call = robustbench_call(arch, num_classes=info.num_classes, in_channels=info.channels,
                            image_size=info.image_size, **kwargs)
    if call is not None:
        return _ZooSpec(f"robustbench.model_zoo.architectures.{call.module}", call.cls, tuple(call.args),
                        dict(call.kwargs), mean, std, native=True)
    if arch.startswith("timm:"):
        # RobustBench's own zoo builds timm models with timm.create_model (its CIFAR-10 XCiT entries);
        # the same call as models/registry.py's, never downloading weights (they are the .pt)
        return _ZooSpec("timm", "create_model", (arch[len("timm:"):],),
                        {"num_classes": info.num_classes, "in_chans": info.channels,
                         **{k: v for k, v in kwargs.items() if k != "pretrained"}, "pretrained": False},
                        mean, std, native=True)
    return _ZooSpec("rb_labelrefine.models", "create_model", (arch,),
                    {"num_classes": info.num_classes, "in_channels": info.channels, "image_size": info.image_size,
                     **kwargs}, mean, std, native=False)


def _zoo_source(name: str, dataset: str, threat_model: str, arch: str, spec: _ZooSpec) -> str:
    """The entry's source. Interpolated as text: only names matching NAME_RE / _ARCH_RE and the
    fixed module names; every value is a checked literal (:func:`_literal`)."""
    from .. import __version__
    from ..models.robustbench_archs import ArchRef

    args = [a.name if isinstance(a, ArchRef) else _literal(a, "model_zoo_entry argument") for a in spec.args]
    args += [f"{k}={_literal(v, f'model.kwargs.{k}')}" for k, v in spec.kwargs.items()]
    refs = [a.name for a in spec.args if isinstance(a, ArchRef)]
    imports = sorted([(_NORMALIZE_MODULE, ["normalize_model"]), (spec.module, [spec.callee] + refs),
                      *REGISTER_IMPORTS.items()])
    if spec.native and spec.module == "timm":
        about = (f"Architecture: timm's {arch[len('timm:'):]} (timm.create_model, as RobustBench's own zoo builds its timm\n"
                 "entries), with the input normalisation the model was trained with as RobustBench's\n"
                 "normalize_model layer. The file imports only robustbench and timm, so ENTRY can go into a\n"
                 "RobustBench \"[New Model]\" pull request as it is: add it (and the imports) to the\n"
                 f"{threat_model} list of robustbench/model_zoo/{dataset}.py.")
    elif spec.native:
        about = (f"Architecture: RobustBench's own {spec.callee} ({spec.module}), with the input normalisation\n"
                 "the model was trained with as RobustBench's normalize_model layer. The file imports only\n"
                 "robustbench, so ENTRY can go into a RobustBench \"[New Model]\" pull request as it is: add it\n"
                 f"(and the imports) to the {threat_model} list of robustbench/model_zoo/{dataset}.py.")
    else:
        about = (f"Architecture: RobustBench has no {arch} architecture (robustbench.model_zoo.architectures\n"
                 "holds WideResNet, PreActResNet, ResNet and others, not this one), so this entry builds the\n"
                 "network with rb_labelrefine (pip install rb-labelrefine) and cannot go into a RobustBench\n"
                 "pull request as it is: a \"[New Model]\" submission needs the architecture's code added to\n"
                 "robustbench/model_zoo/architectures first.")
    doc = f'''RobustBench model-zoo entry for {name} (generated by rb_labelrefine {__version__}).

{about}

Importing this file registers ENTRY in RobustBench's model zoo (its last line), so a reviewer
loads the export from the export directory with

    import model_zoo_entry   # with the export directory on sys.path
    from robustbench.utils import load_model
    model = load_model(model_name='{name}', model_dir='models', dataset='{dataset}', threat_model='{threat_model}')

load_model refuses an entry whose gdrive_id is None. While models/{dataset}/{threat_model}/{name}.pt
exists under model_dir it reads that file and downloads nothing; after uploading the .pt, put its
Google Drive id here.
'''
    body = "\n".join(f"from {m} import {', '.join(names)}" for m, names in imports)
    model = (f"normalize_model(\n        {spec.callee}({', '.join(args)}),\n"
             f"        {_literal(spec.mean, 'data_info.mean')}, {_literal(spec.std, 'data_info.std')})")
    return (f'"""{doc}"""\n{body}\n\nENTRY = ({name!r}, {{\n    \'model\': lambda: {model},\n'
            f"    'gdrive_id': {_ZOO_PLACEHOLDER_ID!r},\n"
            + (f"    'preprocessing': {IMAGENET_PREPROCESSING!r},\n" if dataset == "imagenet" else "")
            + f"}})\n\n{register_line(dataset, threat_model)}\n")


def _read_zoo_entry(source: str) -> dict:
    """The data a ``model_zoo_entry.py`` holds, read with ``ast`` (never executed).

    The file must be a docstring, ``from <module> import <names>`` lines and exactly
    ``ENTRY = (<str>, {'model': lambda: normalize_model(<name>(<names or literals>, <k>=<literal>...),
    <literal>, <literal>), 'gdrive_id': <str>})``; anything else raises ``ValueError``.
    """
    from ..models.robustbench_archs import ArchRef

    def bad(what):
        return ValueError(f"model_zoo_entry.py is not a plain model-zoo entry: {what}")

    tree = ast.parse(source)
    body = list(tree.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body.pop(0)
    imports: dict = {}
    while body and isinstance(body[0], ast.ImportFrom):
        node = body.pop(0)
        if node.level or not node.module:
            raise bad("relative import")
        for alias in node.names:
            if alias.asname or alias.name == "*" or alias.name in imports:
                raise bad(f"import of {alias.name!r}")
            imports[alias.name] = node.module
    register = None
    if len(body) == 2:
        # the registration line: exactly register_line(<str>, <str>), nothing else
        consts = [n.value for n in sorted((n for n in ast.walk(body[1]) if isinstance(n, ast.Constant)
                                           and isinstance(n.value, str)), key=lambda n: (n.lineno, n.col_offset))]
        if (len(consts) != 2 or not isinstance(body[1], ast.Assign)
                or ast.dump(body[1]) != ast.dump(ast.parse(register_line(*consts)).body[0])):
            raise bad("after ENTRY only the registration line "
                      f"{register_line('<dataset>', '<threat_model>')!r} may follow")
        register = tuple(consts)
        body.pop()
        for mod, names in REGISTER_IMPORTS.items():
            if any(imports.get(n) != mod for n in names):
                raise bad(f"the registration line needs 'from {mod} import {', '.join(names)}'")
    if (len(body) != 1 or not isinstance(body[0], ast.Assign) or len(body[0].targets) != 1
            or not isinstance(body[0].targets[0], ast.Name) or body[0].targets[0].id != "ENTRY"):
        raise bad("expected one assignment 'ENTRY = ...' after the imports")
    value = body[0].value
    if not isinstance(value, ast.Tuple) or len(value.elts) != 2 or not isinstance(value.elts[1], ast.Dict):
        raise bad("ENTRY must be (name, {...})")
    name = ast.literal_eval(value.elts[0])
    d = value.elts[1]
    keys = [ast.literal_eval(k) if k is not None else None for k in d.keys]
    if keys not in (["model", "gdrive_id"], ["model", "gdrive_id", "preprocessing"]):
        raise bad("the dict must have exactly the keys 'model' and 'gdrive_id' (and 'preprocessing' for ImageNet)")
    lam, gdrive = d.values[:2]
    preprocessing = ast.literal_eval(d.values[2]) if len(keys) == 3 else None
    a = lam.args if isinstance(lam, ast.Lambda) else None
    if a is None or a.posonlyargs or a.args or a.kwonlyargs or a.vararg or a.kwarg or a.defaults:
        raise bad("'model' must be a lambda without arguments")
    call = lam.body

    def is_call_of(node, names):
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names

    if (not is_call_of(call, {"normalize_model"}) or imports.get("normalize_model") != _NORMALIZE_MODULE
            or len(call.args) != 3 or call.keywords):
        raise bad("'model' must return normalize_model(net, mean, std)")
    net = call.args[0]
    if not is_call_of(net, set(imports) - {"normalize_model"} - {n for ns in REGISTER_IMPORTS.values() for n in ns}):
        raise bad("the network must be built by a call of an imported name")
    args = [ArchRef(n.id) if isinstance(n, ast.Name) and n.id in imports else ast.literal_eval(n) for n in net.args]
    if any(k.arg is None for k in net.keywords):
        raise bad("**kwargs in the network call")
    return {"name": name, "imports": imports, "callee": net.func.id, "args": args,
            "kwargs": {k.arg: ast.literal_eval(k.value) for k in net.keywords},
            "mean": ast.literal_eval(call.args[1]), "std": ast.literal_eval(call.args[2]),
            "gdrive_id": ast.literal_eval(gdrive), "register": register, "preprocessing": preprocessing}


def _verify_with_robustbench(build, name: str, model_dir: Path, dataset: str, threat_model: str,
                             reference: nn.Module, input_shape: tuple) -> None:
    """Load the ``.pt`` with robustbench.utils.load_model itself, through an entry whose model is
    ``build``; outputs must equal the original's."""
    from ..compat.robustbench import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import load_model

    zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    previous = zoo.get(name)
    zoo[name] = {"model": build, "gdrive_id": _ZOO_PLACEHOLDER_ID}
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


# ----------------------------------------------------------------------------- the output directory

def _resolved(path: Path, field: str) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:   # RuntimeError: a symlink loop (Python < 3.13)
        raise ExportError(f"{field}: {path} cannot be resolved ({exc})") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _existing_export(out: Path) -> Optional[dict]:
    from ..safe_files import read_json

    try:   # never through a link, never a FIFO, bounded: the folder may be anyone's
        manifest = read_json(out / MANIFEST, max_bytes=16 << 20, max_depth=32, follow_links=False)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") in _READABLE_FORMATS else None


def _foreign_files(out: Path, manifest: dict) -> list:
    """Paths under ``out`` (relative, sorted) that the manifest does not describe: anything but
    ``export.json``, the files it lists (regular files, not links) and the folders holding them.
    ``--overwrite`` replaces ``out`` only when this is empty."""
    files = manifest.get("files")
    listed = {str(v) for v in files.values() if isinstance(v, str)} if isinstance(files, dict) else set()
    listed.add(MANIFEST)
    folders = {str(parent) for rel in listed for parent in Path(rel).parents if str(parent) != "."}
    foreign = []
    for dirpath, dirnames, filenames in os.walk(out):   # os.walk does not follow links to folders
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(out))
            if p.is_symlink():
                foreign.append(rel)
            elif name in dirnames:
                if name == "__pycache__" and _only_bytecode_of(p, listed, out):
                    dirnames.remove(name)   # Python's cache of model_zoo_entry.py (the card says to import it)
                elif rel not in folders:
                    foreign.append(rel + "/")
                    dirnames.remove(name)   # listed once, not file by file
            elif rel not in listed or not p.is_file():
                foreign.append(rel)
    return sorted(foreign)


def _only_bytecode_of(cache: Path, listed: set, out: Path) -> bool:
    """``cache`` (a ``__pycache__``) holds only ``<stem>.*.pyc`` files of listed ``.py`` files."""
    parent = cache.parent.relative_to(out)
    stems = {Path(r).stem for r in listed if r.endswith(".py") and Path(r).parent == parent}
    try:
        entries = list(os.scandir(cache))
    except OSError:
        return False
    return all(e.is_file(follow_symlinks=False) and e.name.endswith(".pyc") and e.name.split(".")[0] in stems
               for e in entries)


def _edited_files(out: Path, manifest: dict) -> list:
    edited = []
    for rel, digest in (manifest.get("sha256") or {}).items():
        p = out / str(rel)
        if _inside(out, p) and (not p.is_file() or _sha256(p) != digest):
            edited.append(str(rel))
    return edited


def _inside(root: Path, path: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (RuntimeError, OSError):
        return False


def _check_out(run_dir: Path, out: Path, overwrite: bool) -> Path:
    """The resolved ``out``, after refusing every target that is, holds or lies in the run, that is
    not a directory, or that is a non-empty directory (without ``overwrite``, or not an export)."""
    run_r, out_r = _resolved(run_dir, "--checkpoint"), _resolved(out, "--out")
    never = "an export never writes into a run directory; choose a new --out"
    if out_r == run_r:
        raise ExportError(f"--out: {out} is the run directory {run_dir}; {never}")
    if out_r.is_relative_to(run_r):
        raise ExportError(f"--out: {out} is inside the run directory {run_dir}; {never}")
    if run_r.is_relative_to(out_r):
        raise ExportError(f"--out: {out} contains the run directory {run_dir}; {never}")
    if out.is_symlink() and not out_r.exists():
        raise ExportError(f"--out: {out} is a symlink to {out_r}, which does not exist")
    if out_r.exists():
        if not out_r.is_dir():
            raise ExportError(f"--out: {out} exists and is not a directory")
        if any(out_r.iterdir()):
            manifest = _existing_export(out_r)
            if manifest is None:
                raise ExportError(f"--out: {out} is not empty and holds no rb_labelrefine export ({MANIFEST} missing "
                                  "or unreadable); choose a new or empty directory (--overwrite replaces only an "
                                  "earlier export)")
            foreign = _foreign_files(out_r, manifest) if overwrite else []
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise ExportError(f"--out: {out} holds files that are not part of the export {manifest.get('name')!r} "
                                  f"({shown}); --overwrite replaces only a directory its {MANIFEST} describes "
                                  "completely: move them away or choose a new --out (nothing was changed)")
            if not overwrite:
                edited = _edited_files(out_r, manifest)
                raise ExportError(f"--out: {out} already holds the export {manifest.get('name')!r}"
                                  + (f" (edited since it was written: {', '.join(edited)})" if edited else "")
                                  + "; pass --overwrite to replace the whole export, or choose a new --out")
    # the export is staged next to --out: its parent (or the first ancestor that exists) must be
    # writable, found out now rather than after the model is built
    ancestor = out_r.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"--out: cannot create files in {ancestor} (not writable)", str(ancestor))
    return out_r


_STAGING_RE = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.partial$")
_HELD_STAGING: dict = {}     # staging dir -> descriptor holding its flock while this process fills it


def _lock_dir(path: Path) -> Optional[int]:
    """An ``flock``-ed descriptor of the directory ``path`` (not a link), or None if another live
    process holds it (the kernel drops the lock when its holder dies, kill -9 included)."""
    import fcntl

    fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def remove_stale_staging(out: Path) -> list:
    """Remove the ``.NAME.<hex>.partial`` staging directories that an export to ``out`` killed
    before it finished (kill -9, power loss) left next to it.  A staging directory is locked by
    the process filling it, so one in use by a concurrent export is never touched."""
    removed = []
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return removed
    for entry in entries:
        m = _STAGING_RE.match(entry.name)
        if not m or m.group("name") != out.name or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = _lock_dir(Path(entry.path))
        except OSError:
            continue
        if fd is None:
            continue
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
        finally:
            os.close(fd)
    return removed


def _release_staging(tmp: Path) -> None:
    fd = _HELD_STAGING.pop(str(tmp), None)
    if fd is not None:
        os.close(fd)


def _staging_dir(out: Path) -> Path:
    """A new, empty sibling of ``out`` (same file system, so the final rename is atomic), locked
    while this process fills it; stale staging directories of killed exports are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    for _ in range(100):
        tmp = out.parent / f".{out.name}.{os.urandom(4).hex()}.partial"
        try:
            os.mkdir(tmp)          # default mode (umask applies), unlike mkdtemp's 0700
        except FileExistsError:
            continue
        fd = _lock_dir(tmp)
        if fd is not None:
            _HELD_STAGING[str(tmp)] = fd
        return tmp
    raise FileExistsError(f"could not create a staging directory next to {out}")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system has no such call."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Make the complete staged export ``out``. An existing ``out`` (empty, or an export being
    overwritten) is exchanged with it in one step where the system allows, else renamed aside
    first; either way ``out`` never holds a mix of two exports.  SIGTERM/SIGINT wait until the
    renames are done (a handler raising between two of them would strand the old export)."""
    import signal

    try:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    except (AttributeError, ValueError, OSError):
        blocked = None
    try:
        _move_into_place_now(tmp, out, overwrite)
    finally:
        if blocked is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _move_into_place_now(tmp: Path, out: Path, overwrite: bool) -> None:
    if not os.path.lexists(out):
        os.rename(tmp, out)
        _release_staging(tmp)
        return
    if not overwrite and any(out.iterdir()):
        # filled since _check_out looked (e.g. a concurrent export): never replace it unasked
        raise ExportError(f"--out: {out} was filled by another process during the export; pass --overwrite to "
                          "replace it, or choose a new --out")
    if _exchange(tmp, out):
        _release_staging(tmp)
        shutil.rmtree(tmp)        # now the previous export
        return
    old = tmp.with_name(tmp.name[:-len(".partial")] + ".old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    _release_staging(tmp)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- export

def export_run(run_dir, out_dir, *, name: Optional[str] = None, which: str = "best", threat_model: str = "Linf",
               eps: Optional[float] = None, autoattack: Optional[dict] = None, sanity: Optional[dict] = None,
               dataset: Optional[str] = None, authors: Optional[str] = None, link: Optional[str] = None,
               venue: Optional[str] = None, additional_data: bool = False, license: str = "mit",
               verify: bool = True, overwrite: bool = False, log=None, model_name: Optional[str] = None,
               checkpoint_url: Optional[str] = None) -> dict:
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
            loadable by RobustBench (and without a model-zoo entry).
        authors, link, venue, additional_data: ModelInfo fields (never guessed).
        model_name: ModelInfo's ``name`` -- RobustBench shows it on the leaderboard (for its own
            entries the paper's title); default "<method title> (rb_labelrefine)".
        checkpoint_url: where the weights are published (the "[New Model]" text cites it).
        verify: load the written files back (through :func:`load_exported`, and for RobustBench
            datasets through ``robustbench.utils.load_model``) and require identical outputs.
        overwrite: replace an earlier export in ``out_dir`` (as a whole, in one step). Without it
            a non-empty ``out_dir`` is refused; with it, one that holds no export still is.
        log: a callable taking one line, told when the weights predate config fields that were
            accepted at their defaults (:func:`~rb_labelrefine.runs.check_fingerprint`); the
            manifest lists them as ``source.fields_added_later`` either way.

    ``out_dir`` must not be, contain or lie inside ``run_dir``. Returns a dict of the written paths.
    Bad input raises :class:`ExportError` (a ``ValueError``) naming the argument, file or field,
    before anything is written.
    """
    from ..evaluation.robustbench_eval import DEFAULT_EPS

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if which not in ("best", "final"):
        raise ExportError(f"which must be 'best' or 'final', got {which!r}")
    if not run_dir.exists():
        raise ExportError(f"--checkpoint: {run_dir} does not exist")
    if not run_dir.is_dir():
        raise ExportError(f"--checkpoint: {run_dir} is not a run directory")
    if name is not None:
        check_name(name, "--name")
    for field, value in (("--model-name", model_name), ("--authors", authors), ("--link", link), ("--venue", venue),
                         ("checkpoint_url", checkpoint_url)):
        if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > 500
                                  or any(ord(c) < 32 for c in value)):
            raise ExportError(f"{field}: must be one line of text (1-500 characters), got {str(value)[:60]!r}")
    out = _check_out(run_dir, out_dir, overwrite)

    cfg = load_run_config(run_dir)
    cfg_file = run_dir / RUN_FILES["config"]
    arch = _check_arch(cfg.model.arch, f"{cfg_file}: model.arch")
    kwargs = _check_kwargs(cfg.model.kwargs or {}, f"{cfg_file}: model.kwargs")
    weights_path = run_dir / RUN_FILES[which]
    state, meta = read_weights(weights_path)
    added_later = check_run_weights(run_dir, cfg, meta, which, log=log)  # written by this run
    info = info_from_metadata(meta, str(weights_path))
    epoch = meta.get("epoch")
    if epoch is not None and not re.fullmatch(r"\d{1,9}", epoch):
        raise ExportError(f"{weights_path}: metadata epoch must be a non-negative integer, got {epoch[:60]!r}")
    ds, tm, loadable = _resolve_target(dataset, info.name, threat_model)
    if loadable:
        from ..evaluation.robustbench_eval import DATASETS

        expected = {"cifar10": (10, 3, 32), "cifar100": (100, 3, 32)}.get(ds)
        got = (info.num_classes, info.channels, info.image_size)
        if expected and got != expected:
            raise ExportError(f"the model takes {got[1]}x{got[2]}x{got[2]} images with {got[0]} classes, but "
                              f"RobustBench's {ds} needs {expected[1]}x{expected[2]}x{expected[2]} and {expected[0]} "
                              f"classes (RobustBench datasets: {list(DATASETS)})")
        if info.channels != 3:
            raise ExportError(f"the model takes {info.channels}-channel images; RobustBench's {ds} is RGB")
    summary = _read_summary(run_dir / RUN_FILES["summary"])
    if autoattack is None and summary and summary.get("autoattack"):
        # The trainer's own end-of-run AutoAttack (eval.autoattack=true), measured on this run.
        results = _normalise_results(summary["autoattack"], which, f"{run_dir / RUN_FILES['summary']}: autoattack")
    else:
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
        raise ExportError(f"pass eps: no evaluation, training attack or RobustBench default gives one for {ds}/{tm}")
    name = check_name(name or default_name(cfg), "--name" if name else "the default model name (pass --name)")

    from ..models import build_model

    try:
        model = build_model(arch, num_classes=info.num_classes, in_channels=info.channels,
                            image_size=info.image_size, mean=info.mean, std=info.std, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{cfg_file}: model.arch {arch!r} with model.kwargs {kwargs} cannot be built "
                          f"for the weights' data_info: {exc}") from None
    load_state_checked(model, state, str(weights_path), arch)
    model.eval()
    input_shape = (info.channels, info.image_size, info.image_size)

    pt_state = _pt_state(state, ds if loadable else None)
    spec = zoo_source = None
    if loadable:
        _check_robustbench_keys(pt_state)
        spec = _zoo_spec(arch, kwargs, info)
        zoo_source = _zoo_source(name, ds, tm, arch, spec)
        if _read_zoo_entry(zoo_source) != spec.as_read(name, ds, tm):
            raise RuntimeError("the generated model_zoo_entry.py does not read back as the model it describes")

    from ..config import config_to_dict

    curves_src = run_dir / RUN_FILES["curves"]
    has_curves = _is_png(curves_src)
    std_eps = DEFAULT_EPS.get((ds, tm)) if loadable else None
    zoo_note = None
    if spec is not None and not spec.native:
        zoo_note = (f"RobustBench has no {arch} architecture: model_zoo_entry.py builds the network with "
                    "rb_labelrefine, so the entry cannot go into a RobustBench pull request as it is (the "
                    "architecture's code would have to be added to robustbench/model_zoo/architectures).")
    context = card_context(name=name, cfg=portable(config_to_dict(cfg)), dataset=ds, threat_model=tm, eps=eps, which=which,
                           autoattack=results, sanity=sanity, summary=summary,
                           curves="curves.png" if has_curves else None, training_data=info.name,
                           robustbench_loadable=loadable, license=license, std_eps=std_eps, zoo_note=zoo_note)
    card = render_model_card(context)
    model_info = _model_info(ds, eps, results.get(which), cfg, info, arch, kwargs, authors, link, venue,
                             additional_data, loadable, tm, model_name)
    data_info_meta = json.dumps(portable(json.loads(info_to_metadata(info))))   # no local path in any file

    rel = {"weights_pt": Path("models", ds, tm, f"{name}.pt"), "safetensors": Path(f"{name}.safetensors"),
           "model_info": Path("model_info", ds, tm, f"{name}.json")}
    if zoo_source is not None:
        rel["zoo_entry"] = Path("model_zoo_entry.py")
        rel["new_model_issue"] = Path(ISSUE_FILE)
    if has_curves:
        rel["curves"] = Path("curves.png")
    rel["model_card"] = Path("README.md")

    tmp = _staging_dir(out)
    try:
        paths = {k: tmp / r for k, r in rel.items()}
        for p in paths.values():
            if not _inside(tmp, p):   # names are validated; this guards the invariant itself
                raise RuntimeError(f"refusing to write {p} outside the export directory")
            p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(pt_state, paths["weights_pt"])
        st_meta = {"format": _FORMAT, "name": name, "arch": arch, "model_kwargs": json.dumps(kwargs),
                   "data_info": data_info_meta, "dataset": ds, "threat_model": tm, "eps": repr(float(eps)),
                   "which": which, "method": cfg.method.name, "objective": cfg.objective.name}
        if epoch is not None:
            st_meta["epoch"] = epoch
        _write_safetensors(state, paths["safetensors"], st_meta)
        paths["model_info"].write_text(json.dumps(model_info, indent=2) + "\n")
        if zoo_source is not None:
            paths["zoo_entry"].write_text(zoo_source)
            r = results.get(which) or {}
            evaluation = None
            if r.get("robust_acc") is not None:
                backend = " ".join(str(r[k]) for k in ("backend", "backend_version") if r.get(k))
                evaluation = (f"AutoAttack {'standard' if r.get('standard') else 'non-standard (' + str(r.get('version')) + ')'}"
                              + (f", {backend}" if backend else "") + (f", on {r['n']} test points" if r.get("n") else ""))
            paths["new_model_issue"].write_text(new_model_issue(
                model_name=name, model_info=model_info, threat_model=tm, evaluation=evaluation,
                in_zoo_terms=spec.native, checkpoint=checkpoint_url, license=license))
        if has_curves:
            shutil.copyfile(curves_src, paths["curves"])
        paths["model_card"].write_text(card)
        manifest = {
            "format": _FORMAT, "name": name, "dataset": ds, "threat_model": tm, "eps": float(eps),
            "robustbench_loadable": loadable,
            "robustbench_architecture": None if spec is None else spec.native,
            "which": which, "epoch": None if epoch is None else int(epoch),
            # names, not local paths: the export is published as it is
            "source": {"run_dir": run_dir.resolve().name, "weights": weights_path.name,
                       "config_fingerprint": meta.get("config_fingerprint"),
                       "fields_added_later": added_later},
            "arch": arch, "model_kwargs": kwargs, "data_info": json.loads(data_info_meta),
            "method": cfg.method.name, "objective": cfg.objective.name,
            "evaluations": results, "sanity": sanity,
            "files": {k: str(r) for k, r in rel.items()},
            "sha256": {str(r): _sha256(paths[k]) for k, r in rel.items()},
            "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        leaked = local_paths_in(tmp, {str(run_dir.resolve()), str(run_dir.absolute())}
                                | local_paths(config_to_dict(cfg)) | local_paths(getattr(info, "source", "")))
        if leaked:   # the export is published as it is: never with a path of this machine
            raise RuntimeError(f"the export would contain local paths: {leaked[:3]}")
        if verify:
            _check_same_outputs(model, load_exported(paths["safetensors"]), "load_exported(.safetensors)", input_shape)
            _check_same_outputs(model, load_exported(paths["weights_pt"]), "load_exported(.pt)", input_shape)
            if spec is not None:
                _verify_with_robustbench(spec.build, name, tmp / "models", ds, tm, model, input_shape)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        _release_staging(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**{k: out_dir / r for k, r in rel.items()}, "manifest": out_dir / MANIFEST}


def _model_info(ds, eps, result, cfg, info, arch, kwargs, authors, link, venue, additional_data, loadable,
                threat_model="Linf", model_name=None) -> dict:
    """``dataclasses.asdict(robustbench.utils.ModelInfo(...))`` when RobustBench is importable.

    Values as RobustBench's own ``model_info/*.json`` write them: accuracies as strings rounded to
    two decimals (percent), ``eps`` as a string (``"8/255"``, ``"0.5"``: :func:`.publish.eps_text`).
    Unmeasured values stay ``None``.
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
        name=model_name or (f"{method_title} (rb_labelrefine)" if method_title else f"{label} (rb_labelrefine)"),
        authors=authors,
        additional_data=bool(additional_data),
        number_forward_passes=1,
        dataset=ds,
        venue=venue,
        architecture=arch_title(arch, kwargs),
        eps=eps_text(eps, threat_model),
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


def _is_png(path: Path) -> bool:
    """A regular file (not a symlink, which could copy any file into the export) holding a PNG."""
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def _read_summary(path: Path) -> Optional[dict]:
    """The run's summary.json (optional); present but unreadable or not an object is refused."""
    from ..safe_files import read_json

    if not os.path.lexists(path):
        return None
    data = read_json(path, max_bytes=16 << 20, max_depth=32, follow_links=False)   # exit 2 naming it
    if not isinstance(data, dict):
        raise ExportError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- loading

def _manifest_for(path: Path) -> dict:
    # out/models/<dataset>/<threat>/<Name>.pt -> out/export.json
    candidates = [path / MANIFEST] if path.is_dir() else [p / MANIFEST for p in list(path.parents)[:4]]
    for c in candidates:
        if c.is_file():
            from ..safe_files import read_json

            manifest = read_json(c, max_bytes=16 << 20, max_depth=32, follow_links=False)   # exit 2 naming it
            if not isinstance(manifest, dict) or manifest.get("format") not in _READABLE_FORMATS:
                raise ExportError(f"{c} is not an rb_labelrefine export manifest (format "
                                  f"{str(manifest.get('format') if isinstance(manifest, dict) else None)[:40]!r})")
            return manifest
    raise FileNotFoundError(f"no {MANIFEST} found for {path}: pass the export directory or its .safetensors file")


def load_exported(path: Union[str, Path], device="cpu") -> nn.Module:
    """Rebuild an exported model (eval mode, inputs in [0, 1]) without unpickling or executing anything.

    ``path`` is the export directory, its ``<Name>.safetensors`` (self-describing), or the
    RobustBench ``.pt`` inside the export (read with ``torch.load(weights_only=True)``; the
    architecture comes from ``export.json``). Like a run directory, an export from elsewhere is
    untrusted: its metadata is validated before anything is built.
    """
    from ..models import build_model
    from ..runs import read_weights as _read

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"export not found: {path}")
    if path.is_dir():
        manifest = _manifest_for(path)
        st_name = (manifest.get("files") or {}).get("safetensors")
        if not isinstance(st_name, str) or not st_name.endswith(".safetensors"):
            raise ExportError(f"{path / MANIFEST}: files.safetensors must name the export's .safetensors file")
        check_name(st_name[:-len(".safetensors")], f"{path / MANIFEST}: files.safetensors")
        path = path / st_name
    if path.suffix == ".safetensors":
        state, meta = _read(path)
        if meta.get("format") not in _READABLE_FORMATS:
            raise ExportError(f"{path} was not written by rb_labelrefine's exporter (metadata format "
                              f"{str(meta.get('format'))[:40]!r}); for a run's weights use "
                              "rb_labelrefine.runs.load_run_model")
        arch = _check_arch(meta.get("arch"), f"{path}: metadata arch")
        try:
            kwargs = json.loads(meta.get("model_kwargs") or "{}")
        except ValueError as exc:
            raise ExportError(f"{path}: metadata model_kwargs is not valid JSON ({exc})") from None
        info = info_from_metadata(meta, str(path))
    elif path.suffix == ".pt":
        raw = read_pt_state_dict(path)
        manifest = _manifest_for(path)
        if manifest.get("dataset") == "imagenet":   # the bare network (see _pt_state): the wrapper's keys back
            mi = manifest.get("data_info") or {}
            raw = {PT_PREFIX + "normalize.mean": torch.tensor(mi.get("mean", ())).reshape(1, -1, 1, 1),
                   PT_PREFIX + "normalize.std": torch.tensor(mi.get("std", ())).reshape(1, -1, 1, 1),
                   **{PT_PREFIX + "model." + k: v for k, v in raw.items()}}
        if any(not k.startswith(PT_PREFIX) for k in raw):
            raise ExportError(f"{path}: expected every key to start with {PT_PREFIX!r} (the export's convention)")
        state = {k[len(PT_PREFIX):]: v for k, v in raw.items()}
        if manifest["format"] != "rb_labelrefine.export/1":
            state = _from_rb_layout(state)
        arch = _check_arch(manifest.get("arch"), f"{path}: {MANIFEST} arch")
        kwargs = manifest.get("model_kwargs") or {}
        info = info_from_metadata({"data_info": json.dumps(manifest.get("data_info"))}, f"{path}: {MANIFEST}")
    else:
        raise ExportError(f"{path}: expected an export directory, a .safetensors or a .pt file")
    kwargs = _check_kwargs(kwargs, f"{path}: model_kwargs")
    try:
        model = build_model(arch, num_classes=info.num_classes, in_channels=info.channels,
                            image_size=info.image_size, mean=info.mean, std=info.std, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{path}: {arch!r} with model_kwargs {kwargs} cannot be built: {exc}") from None
    return load_state_checked(model, state, str(path), arch).to(device).eval()


def load_export_for_eval(path):
    """``(model, info, threat_model, eps, which)`` of an export directory or its ``<Name>.safetensors``
    (a downloaded one included: the file describes itself), for ``rb-labelrefine eval``.

    Nothing is unpickled: the model comes from :func:`load_exported`, the description from the
    safetensors header, each field validated.
    """
    from safetensors import safe_open

    path = Path(path)
    st = path
    if path.is_dir():
        name = (_manifest_for(path).get("files") or {}).get("safetensors")
        if not isinstance(name, str):
            raise ExportError(f"{path / MANIFEST}: files.safetensors must name the export's .safetensors file")
        st = path / name
    model = load_exported(path)            # validates the manifest, the names and the weights
    try:
        with safe_open(str(st), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:   # noqa: BLE001 - any unreadable header is bad input
        raise ExportError(f"{st}: not a readable .safetensors file ({exc})") from None
    if meta.get("format") not in _READABLE_FORMATS:
        raise ExportError(f"{st} was not written by rb_labelrefine's exporter")
    info = info_from_metadata(meta, str(st))
    tm = meta.get("threat_model")
    if tm not in ("Linf", "L2"):
        raise ExportError(f"{st}: metadata threat_model must be Linf or L2, got {str(tm)[:40]!r}")
    try:
        eps = float(json.loads(meta.get("eps", "null")))
    except (TypeError, ValueError):
        eps = float("nan")
    if not math.isfinite(eps) or eps <= 0:
        raise ExportError(f"{st}: metadata eps must be a positive number, got {str(meta.get('eps'))[:40]!r}")
    which = meta.get("which") if meta.get("which") in ("best", "final") else "best"
    return model, info, tm, eps, which
