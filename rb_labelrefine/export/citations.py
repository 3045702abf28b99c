"""What each method is and how to cite it, for model cards.

Author lists and venues are taken from the reference lists of the seed papers in this
project (ADR's and SGLR's bibliographies cite Madry et al., Zhang et al., Chen et al. 2021 and
Chen & Lee 2021 in full).  SGLR's own author list is abbreviated to the first two surnames,
the part we can vouch for; check the CVPR 2024 proceedings before publishing a card.
"""
from __future__ import annotations

__all__ = ["METHOD_INFO", "OBJECTIVE_INFO", "method_label", "method_citations"]

METHOD_INFO = {
    "adr": {
        "label": "ADR",
        "title": "Annealing Self-Distillation Rectification Improves Adversarial Training",
        "summary": ("Annealing Self-Distillation Rectification: the hard label is replaced by an "
                    "interpolation of the one-hot label with the temperature-scaled prediction of an "
                    "EMA teacher on the clean image, with the temperature annealed down and the "
                    "interpolation factor annealed up (Wu et al. 2024, Eq. 3-5). The rectified label "
                    "is used by both the attack and the training loss."),
        "bibtex": """@inproceedings{wu2024annealing,
  title     = {Annealing Self-Distillation Rectification Improves Adversarial Training},
  author    = {Wu, Yu-Yu and Wang, Hung-Jui and Chen, Shang-Tse},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024}
}""",
    },
    "kd": {
        "label": "KD-SWA",
        "title": "Robust Overfitting may be mitigated by properly learned smoothening",
        "summary": ("Learned logit smoothening by self-distillation from a robust and a standard "
                    "self-teacher of the same architecture (tempered KD terms next to the "
                    "cross-entropy), combined with stochastic weight averaging (Chen et al. 2021, "
                    "Eq. 1-2)."),
        "bibtex": """@inproceedings{chen2021robust,
  title     = {Robust Overfitting may be mitigated by properly learned smoothening},
  author    = {Chen, Tianlong and Zhang, Zhenyu and Liu, Sijia and Chang, Shiyu and Wang, Zhangyang},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2021}
}""",
    },
    "ltd": {
        "label": "LTD",
        "title": "LTD: Low Temperature Distillation for Robust Adversarial Training",
        "summary": ("Low Temperature Distillation: the natural term of TRADES is trained towards a "
                    "naturally trained teacher's softmax at a low temperature (> 1) on the clean "
                    "image; the attack uses the original label (RobustBench entries Chen2021LTD_*)."),
        "bibtex": """@article{chen2021ltd,
  title   = {{LTD}: Low Temperature Distillation for Robust Adversarial Training},
  author  = {Chen, Erh-Chung and Lee, Che-Rung},
  journal = {CoRR},
  volume  = {abs/2111.02331},
  year    = {2021}
}""",
    },
    "sglr": {
        "label": "SGLR",
        "title": "Soften to Defend: Towards Adversarial Robustness via Self-Guided Label Refinement",
        "summary": ("Self-Guided Label Refinement: the one-hot label is softened with the model's own "
                    "predictive distribution (interpolating clean and adversarial predictions) and "
                    "kept as a per-sample exponential moving average over training."),
        "bibtex": """@inproceedings{li2024soften,
  title     = {Soften to Defend: Towards Adversarial Robustness via Self-Guided Label Refinement},
  author    = {Li and Yu and others},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2024}
}""",
    },
    "label_smoothing": {
        "label": "LS",
        "title": "Label smoothing",
        "summary": "Uniform label smoothing of the one-hot target (a data-blind baseline for label refinement).",
        "bibtex": None,
    },
    "onehot": {
        "label": None,   # the plain objective: the label is the objective's name
        "title": None,
        "summary": "One-hot labels (the plain adversarial-training baseline).",
        "bibtex": None,
    },
}

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
    m = METHOD_INFO.get(method, {}).get("label", method.upper()) if method in METHOD_INFO else method.upper()
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
