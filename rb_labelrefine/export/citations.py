"""What each method and objective is and how to cite it, for model cards.

A method's label, title, summary and BibTeX live in its own module under
``rb_labelrefine/rectifiers/`` (its registration); the objectives' are here.  Author lists and
venues are taken from the reference lists of the seed papers in this project (ADR's and SGLR's
bibliographies cite Madry et al., Zhang et al., Chen et al. 2021 and Chen & Lee 2021 in full).
SGLR's own author list is abbreviated to the first two surnames, the part we can vouch for;
check the CVPR 2024 proceedings before publishing a card.
"""
from __future__ import annotations

from collections.abc import Mapping

__all__ = ["METHOD_INFO", "OBJECTIVE_INFO", "method_label", "method_citations"]

class _MethodInfo(Mapping):
    """``METHOD_INFO[name]`` -> ``{'label', 'title', 'summary', 'bibtex'}``, read from the method's
    own module (its :func:`~rb_labelrefine.rectifiers.register_method` call): one source."""

    def _specs(self):
        from ..rectifiers.registry import METHODS

        return METHODS

    def __getitem__(self, name):
        spec = self._specs()[name]
        return {"label": spec.label, "title": spec.title, "summary": spec.summary, "bibtex": spec.bibtex}

    def __iter__(self):
        return iter(self._specs())

    def __len__(self):
        return len(self._specs())


METHOD_INFO = _MethodInfo()

OBJECTIVE_INFO = {
    "pgd_at": {
        "label": "AT",
        "title": "Towards Deep Learning Models Resistant to Adversarial Attacks",
        "summary": "PGD adversarial training: minimise the loss at the PGD-maximised point of the eps-ball (Madry et al. 2018).",
        "bibtex": """@inproceedings{madry2018towards,
  title     = {Towards Deep Learning Models Resistant to Adversarial Attacks},
  author    = {Madry, Aleksander and Makelov, Aleksandar and Schmidt, Ludwig and Tsipras, Dimitris and Vladu, Adrian},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2018}
}""",
    },
    "trades": {
        "label": "TRADES",
        "title": "Theoretically Principled Trade-off between Robustness and Accuracy",
        "summary": "TRADES: natural loss plus beta times the KL divergence between clean and adversarial predictions (Zhang et al. 2019).",
        "bibtex": """@inproceedings{zhang2019theoretically,
  title     = {Theoretically Principled Trade-off between Robustness and Accuracy},
  author    = {Zhang, Hongyang and Yu, Yaodong and Jiao, Jiantao and Xing, Eric P. and El Ghaoui, Laurent and Jordan, Michael I.},
  booktitle = {International Conference on Machine Learning (ICML)},
  pages     = {7472--7482},
  year      = {2019}
}""",
    },
}


def method_label(method: str, objective: str) -> str:
    """Short label used in model names and cards: ``ADR``, ``TRADES-ADR``, ``AT``, ``TRADES``..."""
    m = METHOD_INFO[method]["label"] if method in METHOD_INFO else method.upper()
    o = OBJECTIVE_INFO.get(objective, {}).get("label", objective.upper())
    if m is None:
        return o
    return m if objective == "pgd_at" else f"{o}-{m}"


def method_citations(method: str, objective: str) -> list[dict]:
    """``[{'role', 'title', 'summary', 'bibtex'}]`` for the label method and the base objective."""
    out = []
    info = METHOD_INFO.get(method)
    if info is not None and info.get("title"):
        out.append({"role": "label refinement", **{k: info[k] for k in ("title", "summary", "bibtex")}})
    elif info is not None:
        out.append({"role": "labels", "title": None, "summary": info["summary"], "bibtex": None})
    obj = OBJECTIVE_INFO.get(objective)
    if obj is not None:
        out.append({"role": "objective", **{k: obj[k] for k in ("title", "summary", "bibtex")}})
    return out
