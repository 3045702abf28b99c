"""Model cards: Hugging Face front-matter plus a readable report of how a model was trained and
how robust it measured.

The card is rendered from the package template ``templates/model_card.md.j2`` (Jinja2; the
same file is kept at ``model_cards/TEMPLATE.md`` in the repository for people writing cards by
hand).  Rule: every number comes from an input -- an AutoAttack / benchmark result, the run's
``summary.json``, the sanity report.  Whatever is missing renders as "not measured"; the
front-matter's ``model-index`` lists only metrics that were measured.
"""
from __future__ import annotations

import datetime as _dt
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from .citations import method_citations, method_label

__all__ = ["render_model_card", "card_context", "TEMPLATE_NAME", "DATASET_TITLES", "ARCH_TITLES", "HUB_DATASETS",
           "arch_title", "load_template"]

TEMPLATE_NAME = "model_card.md.j2"
NOT_MEASURED = "not measured"
DATASET_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet",
                  "digits": "digits (scikit-learn 8x8)", "fashion_mnist": "Fashion-MNIST",
                  "tiny_imagenet": "Tiny ImageNet-200", "synthetic": "synthetic patterns"}
FULL_TEST_SIZE = {"cifar10": 10000, "cifar100": 10000, "imagenet": 5000}
# Hugging Face Hub dataset ids (the card's `datasets:` and model-index `dataset.type`); data sets
# with no Hub copy (scikit-learn's digits, synthetic patterns) are left out of `datasets:`.
HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100", "imagenet": "ILSVRC/imagenet-1k",
                "fashion_mnist": "zalando-datasets/fashion_mnist", "tiny_imagenet": "zh-plus/tiny-imagenet"}
ARCH_TITLES = {"preact_resnet18": "PreActResNet-18", "resnet18": "ResNet-18", "wrn_28_10": "WideResNet-28-10",
               "wrn_34_10": "WideResNet-34-10", "wrn_70_16": "WideResNet-70-16", "small_cnn": "small CNN",
               "tiny_cnn": "tiny CNN", "mlp": "MLP"}


def arch_title(arch: str, kwargs: Optional[dict] = None) -> str:
    if arch.startswith("timm:"):
        return f"timm {arch[5:]}"
    if arch == "wrn" and kwargs:
        return f"WideResNet-{kwargs.get('depth', 28)}-{kwargs.get('width', 10)}"
    return ARCH_TITLES.get(arch, arch)


def load_template(template=None) -> str:
    if template is not None:
        return Path(template).read_text()
    return (resources.files("rb_labelrefine.export") / "templates" / TEMPLATE_NAME).read_text()


def _acc(v) -> str:
    return NOT_MEASURED if v is None else f"{float(v):.2f}%"


def _pts(v) -> str:
    return NOT_MEASURED if v is None else f"{float(v):+.2f} points"


def _fmt_eps(eps) -> str:
    from ..evaluation.pgd import format_eps

    return NOT_MEASURED if eps is None else format_eps(float(eps))


def _describe(result: dict) -> str:
    if result.get("protocol"):
        return str(result["protocol"])
    from ..evaluation.autoattack import describe_autoattack

    return describe_autoattack(result)


def _result_row(which: str, result: Optional[dict]) -> dict:
    if not result:
        return {"which": which, "clean": None, "robust": None, "n": None, "protocol": NOT_MEASURED,
                "backend": NOT_MEASURED}
    backend = " ".join(str(result[k]) for k in ("backend", "backend_version") if result.get(k)) or "unknown"
    return {"which": which, "clean": result.get("clean_acc"), "robust": result.get("robust_acc"),
            "n": result.get("n"), "protocol": _describe(result), "backend": backend}


def _comparable(a: Optional[dict], b: Optional[dict]) -> bool:
    if not a or not b:
        return False
    keys = ("n", "norm", "eps", "version", "attacks")
    return all(a.get(k) == b.get(k) for k in keys) and a.get("robust_acc") is not None \
        and b.get("robust_acc") is not None


def _gap(best: Optional[dict], final: Optional[dict]) -> dict:
    if not _comparable(best, final):
        return {"clean": None, "robust": None}
    clean = None
    if best.get("clean_acc") is not None and final.get("clean_acc") is not None:
        clean = best["clean_acc"] - final["clean_acc"]
    return {"clean": clean, "robust": best["robust_acc"] - final["robust_acc"]}


def _config_highlights(cfg: dict) -> list[tuple[str, str]]:
    d, model, method, o, a, op, tr = (cfg.get(k) or {} for k in
                                      ("data", "model", "method", "objective", "attack", "optim", "train"))
    return [
        ("data", f"{d.get('name')}" + (f", {d['train_subset']} training images" if d.get("train_subset") else "")
         + (f", validation fraction {d.get('val_fraction')}" if d.get("val_fraction") is not None else "")
         + ((", random-resized-crop+flip augmentation" if d.get("name") == "imagenet" else ", crop+flip augmentation")
            if d.get("augment") else "")),
        ("architecture", f"{model.get('arch')}" + (f" {model['kwargs']}" if model.get("kwargs") else "")),
        ("labels (method)", _method_params(method.get("name"), method)),
        ("objective", f"{o.get('name')}" + (f" (beta = {o.get('beta')})" if o.get("name") == "trades" else "")),
        ("training attack", f"{a.get('name')} {a.get('norm')} eps={_fmt_eps(a.get('eps'))} "
                            f"alpha={_fmt_eps(a.get('alpha'))} steps={a.get('steps')}, "
                            f"BatchNorm in {a.get('bn_mode')} mode during the attack"),
        ("optimiser", f"SGD lr={op.get('lr')} momentum={op.get('momentum')} weight decay={op.get('weight_decay')}, "
                      f"{op.get('schedule')} schedule, milestones {op.get('milestones')}"),
        ("epochs / batch size", f"{tr.get('epochs')} / {d.get('batch_size')}"),
        ("weight averaging", ", ".join(n for n, sec in (("WA/EMA", "wa"), ("SWA", "swa"), ("AWP", "awp"))
                                       if (cfg.get(sec) or {}).get("enabled")) or "none"),
        ("evaluated weights", str((cfg.get("eval") or {}).get("model"))),
        ("seed", str(tr.get("seed"))),
    ]


def _method_params(name: Optional[str], m: dict) -> str:
    """The method's card parameters (its settings' ``card_params``); the raw section for a method
    this installation does not know.  Parsed, not validated: a teacher path need not exist here."""
    from ..config import ConfigError, parse_method

    fields = {k: v for k, v in m.items() if k != "name"}
    try:
        params = parse_method(m).card_params()
    except (ConfigError, ValueError):
        params = fields
    text = ", ".join(f"{k}={v}" for k, v in params.items())
    return f"{name}" + (f" ({text})" if text else "")


def _machine_lines(autoattack: dict, summary: Optional[dict]) -> list[str]:
    """What ran the evaluations and the training, from what was recorded -- never placeholders."""
    lines = []
    for which in ("best", "final"):
        r = autoattack.get(which)
        if not r:
            continue
        mach = r.get("machine") or {}
        parts = []
        device, name = mach.get("device"), mach.get("device_name")
        if name or device:
            parts.append(f"{name} ({device})" if name and device and name != device else str(name or device))
        if mach.get("torch"):
            parts.append(f"torch {mach['torch']}")
        if mach.get("threads") is not None:
            parts.append(f"{mach['threads']} CPU threads")
        if r.get("elapsed_s") is not None:
            parts.append(f"{r['elapsed_s']:.0f} s")
        lines.append(f"{which} evaluation: " + (", ".join(parts) if parts else "machine not recorded"))
    if summary:
        parts = [f"device {summary['device']}" if summary.get("device") else None,
                 f"torch {summary['torch']}" if summary.get("torch") else None,
                 f"{summary['threads']} CPU threads" if summary.get("threads") is not None else None,
                 f"{summary['train_seconds']:.0f} s" if summary.get("train_seconds") is not None else None]
        parts = [p for p in parts if p]
        lines.append("training: " + (", ".join(parts) if parts else "machine not recorded"))
    return lines or ["not recorded"]


# APGD-CE accuracy minus the full AutoAttack accuracy from which a card warns that cross-entropy
# attacks (PGD, APGD-CE) overstate the model's robustness (a sign of a flat / masked CE loss;
# ~1 point is usual for PGD-AT models, soft-label training can leave 4-6, see
# benchmarks/results/robust_overfitting_fmnist.md).
CE_GAP_WARN_POINTS = 2.0


def _limitations(*, dataset, training_data_name, cfg, which, autoattack, sanity, eps, std_eps,
                 robustbench_loadable, zoo_note=None) -> list[str]:
    out = []
    r = autoattack.get(which)
    full = FULL_TEST_SIZE.get(dataset)
    if not r:
        out.append(f"No AutoAttack evaluation of the {which} checkpoint was given to the exporter: its robust "
                   "accuracy is not measured.")
    else:
        if full and r.get("n") is not None and r["n"] < full:
            out.append(f"AutoAttack was run on {r['n']} test points, not the full {full:,}-image test set "
                       "RobustBench uses; the numbers carry sampling error.")
        elif not full and r.get("n") is not None:
            out.append(f"Evaluated on {r['n']} test points of {training_data_name}.")
        if not r.get("standard"):
            out.append("The evaluation was not AutoAttack *standard* with default settings "
                       f"({_describe(r)}); it is weaker than the RobustBench protocol, so the robust accuracy is an "
                       "upper bound.")
        if r.get("flags"):
            out.append("AutoAttack flagged the evaluation (see Results); investigate before trusting the number.")
        ce = (r.get("per_attack") or {}).get("apgd-ce")
        if ce is not None and r.get("robust_acc") is not None and ce - r["robust_acc"] >= CE_GAP_WARN_POINTS:
            out.append(f"Cross-entropy attacks overstate this model's robustness: {ce:.2f}% after APGD-CE vs "
                       f"{r['robust_acc']:.2f}% after all of AutoAttack ({ce - r['robust_acc']:.2f} points found only "
                       "by the targeted DLR attack and the rest). PGD-CE numbers (training logs, validation-based "
                       "checkpoint selection) are optimistic for it; compare models by AutoAttack.")
    if training_data_name != dataset:
        out.append(f"Trained on {training_data_name}, not on {dataset}: the {dataset} slot of this export is a "
                   "layout/compatibility target, not a claim about performance on that data set.")
    subset = (cfg.get("data") or {}).get("train_subset")
    if subset:
        out.append(f"Trained on a subset of {subset} training images (small-data regime).")
    if not robustbench_loadable:
        out.append(f"RobustBench has no {dataset} benchmark; robustbench.utils.load_model cannot load this export.")
    if zoo_note:
        out.append(zoo_note)
    if not sanity:
        out.append("Gradient-masking sanity checks were not run for this card.")
    elif not sanity.get("passed"):
        out.append(f"Gradient-masking sanity checks FAILED ({', '.join(sanity.get('failed', []))}): the robust "
                   "accuracy may be overestimated.")
    if std_eps is not None and eps is not None and abs(float(eps) - std_eps) > 1e-9:
        out.append(f"eps = {_fmt_eps(eps)} differs from RobustBench's standard {_fmt_eps(std_eps)} for {dataset}: "
                   "the numbers are not comparable with its leaderboard.")
    out.append("Robustness is claimed only for the threat model above (norm and radius); nothing is measured "
               "for other radii, norms, corruptions or adaptive attacks.")
    return out


def _front_matter(*, name, dataset, threat_model, eps, method_tag, objective, result, license) -> str:
    """Hugging Face model-card metadata.  A metric's name carries what makes it comparable (the
    threat model, and the number of test points when fewer than the full split); the
    ``model-index`` is written only when something was measured (the Hub rejects empty results)."""
    title = DATASET_TITLES.get(dataset, dataset)
    n = (result or {}).get("n")
    full = FULL_TEST_SIZE.get(dataset)
    points = f"{n:,} test points" if n is not None and (full is None or n < full) else (
        "full test set" if n is not None else None)
    metrics = []
    if result and result.get("clean_acc") is not None:
        metrics.append({"type": "accuracy", "value": round(float(result["clean_acc"]), 2),
                        "name": f"Clean accuracy ({title} test" + (f", {points})" if points else ")")})
    if result and result.get("robust_acc") is not None:
        kind = "AutoAttack standard" if result.get("standard") else "AutoAttack (non-standard)"
        metrics.append({"type": "accuracy", "value": round(float(result["robust_acc"]), 2),
                        "name": f"{kind} robust accuracy ({threat_model}, eps={_fmt_eps(eps)}"
                                + (f", {points})" if points else ")")})
    tags = ["adversarial-robustness", "robustbench", method_tag, objective.replace("_", "-"),
            "image-classification", "pytorch"]
    fm = {
        "license": license,
        "library_name": "pytorch",
        "pipeline_tag": "image-classification",
        "tags": list(dict.fromkeys(t for t in tags if t)),
    }
    if dataset in HUB_DATASETS:
        fm["datasets"] = [HUB_DATASETS[dataset]]
    fm["metrics"] = ["accuracy"]
    if metrics:
        fm["model-index"] = [{"name": name, "results": [{
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"name": title, "type": HUB_DATASETS.get(dataset, dataset), "split": "test"},
            "metrics": metrics}]}]
    return yaml.safe_dump(fm, sort_keys=False, allow_unicode=True)


def _selected_on(best: Optional[dict]) -> str:
    """The split the best checkpoint was selected on (summary ``best.selected_on``); a summary written
    before it was recorded selected on the test split exactly when it has no validation numbers."""
    best = best or {}
    if best.get("selected_on") in ("val", "test"):
        return best["selected_on"]
    return "test" if best and best.get("val_pgd") is None and best.get("val_clean") is None else "val"


def card_context(*, name: str, cfg: dict, dataset: str, threat_model: str, eps, which: str = "best",
                 autoattack: Optional[dict] = None, sanity: Optional[dict] = None, summary: Optional[dict] = None,
                 curves: Optional[str] = None, training_data: Optional[str] = None,
                 robustbench_loadable: bool = True, license: str = "mit", std_eps=None,
                 zoo_note: Optional[str] = None) -> dict:
    """Everything the template needs, computed from the inputs only.

    ``zoo_note`` (from the exporter) says when the model-zoo entry cannot go to RobustBench as it is.

    ``cfg`` is the run's config as a dict; ``autoattack`` maps ``best``/``final`` to results of
    :func:`~rb_labelrefine.evaluation.run_autoattack` or
    :func:`~rb_labelrefine.evaluation.benchmark`; ``summary`` is the run's ``summary.json``.
    """
    from .. import __version__
    from ..evaluation.sanity import format_sanity_markdown

    autoattack = autoattack or {}
    method = (cfg.get("method") or {}).get("name", "onehot")
    objective = (cfg.get("objective") or {}).get("name", "pgd_at")
    label = method_label(method, objective)
    training_data = training_data or (cfg.get("data") or {}).get("name") or dataset
    arch = (cfg.get("model") or {}).get("arch", "unknown")
    kwargs = (cfg.get("model") or {}).get("kwargs") or {}
    ev = cfg.get("eval") or {}
    rows = []
    if summary:
        for w in ("best", "final"):
            rec = summary.get(w) or {}
            rows.append({"which": w, "epoch": summary.get("best_epoch") if w == "best" else rec.get("epoch"),
                         **{k: rec.get(k) for k in ("val_clean", "val_pgd", "test_clean", "test_pgd")}})
    flags = []
    for w in ("best", "final"):
        for f in (autoattack.get(w) or {}).get("flags") or []:
            flags.append(f"{w}: {f}")
    return {
        "front_matter": _front_matter(name=name, dataset=dataset, threat_model=threat_model, eps=eps,
                                      method_tag=method.replace("_", "-") if method != "onehot" else None,
                                      objective=objective, result=autoattack.get(which), license=license),
        "name": name, "version": __version__, "which": which,
        "method_label": label, "dataset": dataset, "dataset_title": DATASET_TITLES.get(dataset, dataset),
        "training_data": DATASET_TITLES.get(training_data, training_data),
        "threat_model": threat_model, "eps_str": _fmt_eps(eps),
        "arch_title": arch_title(arch, kwargs),
        "robustbench_loadable": robustbench_loadable,
        "results": [_result_row(w, autoattack.get(w)) for w in ("best", "final")],
        "gap": _gap(autoattack.get("best"), autoattack.get("final")),
        "flags": flags,
        "training": {"rows": rows, "best_epoch": (summary or {}).get("best_epoch"),
                     "selected_on": _selected_on((summary or {}).get("best")),
                     "val_steps": ev.get("val_attack_steps", "k"), "test_steps": ev.get("test_attack_steps", "k")},
        "curves": curves,
        "citations": method_citations(method, objective),
        "config_highlights": _config_highlights(cfg),
        "config_yaml": yaml.safe_dump(cfg, sort_keys=False),
        "sanity_md": format_sanity_markdown(sanity),
        "limitations": _limitations(dataset=dataset, training_data_name=training_data, cfg=cfg, which=which,
                                    autoattack=autoattack, sanity=sanity, eps=eps, std_eps=std_eps,
                                    robustbench_loadable=robustbench_loadable, zoo_note=zoo_note),
        "machine": _machine_lines(autoattack, summary),
        "generated": _dt.date.today().isoformat(),
    }


def render_model_card(context: Optional[dict] = None, *, template=None, **kwargs) -> str:
    """Render a card from :func:`card_context` (or its keyword arguments) with the template."""
    import jinja2

    ctx = context if context is not None else card_context(**kwargs)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False, trim_blocks=False)
    env.filters["acc"] = _acc
    env.filters["pts"] = _pts
    return env.from_string(load_template(template)).render(**ctx)
