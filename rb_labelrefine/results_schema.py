"""Schemas of the JSON files users pass back in: ``eval --json`` results (``export --results``,
``leaderboard --results``) and exported ``model_info`` files (``leaderboard --model-info``).

Such a file may come from anywhere, so every field the package reads is checked for type and range
before it is used -- a missing ``eps`` or a malformed ``sanity`` section is an error naming the
field (exit 2), never a ``TypeError`` inside the model card.  Fields the package does not read are
left alone (the file's size and depth are bounded when it is read, :mod:`rb_labelrefine.safe_files`).
Stdlib only: the leaderboard must not import torch.
"""
from __future__ import annotations

import math
from typing import Any, Optional

from .errors import BadInputError

__all__ = ["SchemaError", "check_eval_json", "check_autoattack", "check_sanity", "check_model_info",
           "number", "count", "MAX_TEXT"]

MAX_TEXT = 2000           # characters of a free-text field that ends up in a card or a table
MAX_POINTS = 10 ** 9
NORMS = ("Linf", "L2")
SANITY_CHECKS = ("eps_sweep", "steps_sweep", "black_box", "autoattack_flags", "zero_gradient")


class SchemaError(BadInputError):
    """A field of a JSON input has the wrong type or range; the message names the file and field."""


def _fail(where: str, field: str, what: str, value: Any) -> SchemaError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return SchemaError(f"{where}: {field} must be {what}, got {shown}")


def _get(d: dict, key: str, where: str, field: str, required: bool):
    if key not in d or d[key] is None:
        if required:
            raise SchemaError(f"{where}: {field} is missing")
        return None
    return d[key]


def number(d: dict, key: str, where: str, prefix: str = "", *, lo: float = -math.inf, hi: float = math.inf,
           required: bool = False, lo_open: bool = False) -> Optional[float]:
    """``d[key]`` as a finite number in [lo, hi] (``(lo, hi]`` when ``lo_open``), or None if absent
    and not ``required``."""
    field = prefix + key
    v = _get(d, key, where, field, required)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v > hi or v < lo or (lo_open and v == lo):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise _fail(where, field, f"a finite number in {rng}", v)
    return float(v)


def count(d: dict, key: str, where: str, prefix: str = "", *, lo: int = 1, hi: int = MAX_POINTS,
          required: bool = False) -> Optional[int]:
    """``d[key]`` as an integer in [lo, hi] (a float with an integer value is accepted)."""
    field = prefix + key
    v = _get(d, key, where, field, required)
    if v is None:
        return None
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _fail(where, field, f"an integer in [{lo}, {hi:,}]", v)
    return v


def _text(d: dict, key: str, where: str, prefix: str = "", required: bool = False,
          choices: Optional[tuple] = None) -> Optional[str]:
    field = prefix + key
    v = _get(d, key, where, field, required)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > MAX_TEXT:
        raise _fail(where, field, f"a string of at most {MAX_TEXT} characters", v)
    if choices is not None and v not in choices:
        raise _fail(where, field, f"one of {list(choices)}", v)
    return v


def _flag(d: dict, key: str, where: str, prefix: str = "", allow_none: bool = True) -> Optional[bool]:
    field = prefix + key
    if key not in d or (d[key] is None and allow_none):
        return None
    v = d[key]
    if not isinstance(v, bool):
        raise _fail(where, field, "true or false" + (" (or null)" if allow_none else ""), v)
    return v


def _mapping(v, where: str, field: str) -> dict:
    if not isinstance(v, dict):
        raise _fail(where, field, "a JSON object", v)
    return v


def _texts(d: dict, key: str, where: str, prefix: str = "") -> list:
    v = d.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) and len(x) <= MAX_TEXT for x in v):
        raise _fail(where, prefix + key, "a list of strings", v)
    return v


def check_autoattack(r, where: str, prefix: str = "autoattack.", *, require_eps: bool = True,
                     require_robust: bool = True) -> dict:
    """An AutoAttack result (:func:`~rb_labelrefine.evaluation.run_autoattack`): the fields the card,
    model_info and the leaderboard read, typed and ranged."""
    r = _mapping(r, where, prefix.rstrip(".") or "the result")
    number(r, "robust_acc", where, prefix, lo=0, hi=100, required=require_robust)
    number(r, "clean_acc", where, prefix, lo=0, hi=100)
    number(r, "eps", where, prefix, lo=0, hi=1e6, lo_open=True, required=require_eps)
    _text(r, "norm", where, prefix, choices=NORMS)
    count(r, "n", where, prefix)
    _flag(r, "standard", where, prefix)
    for key in ("version", "protocol", "backend", "backend_version"):
        _text(r, key, where, prefix)
    _texts(r, "flags", where, prefix)
    _texts(r, "attacks", where, prefix)
    number(r, "elapsed_s", where, prefix, lo=0)
    per = r.get("per_attack")
    if per is not None:
        per = _mapping(per, where, prefix + "per_attack")
        for k in per:
            number(per, k, where, f"{prefix}per_attack.", lo=0, hi=100)
    return r


def _check(c: dict, where: str, prefix: str) -> None:
    if "passed" not in c:
        raise SchemaError(f"{where}: {prefix}passed is missing")
    _flag(c, "passed", where, prefix)
    _text(c, "reason", where, prefix, required=True)


def _numbers(d: dict, key: str, where: str, prefix: str, lo: float, hi: float, integer: bool = False) -> list:
    v = d.get(key)
    ok = isinstance(v, list) and len(v) <= 10_000 and all(
        not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and lo <= x <= hi
        and (not integer or float(x).is_integer()) for x in v)
    if not ok:
        kind = "integers" if integer else "finite numbers"
        raise _fail(where, prefix + key, f"a list of {kind} in [{lo:g}, {hi:g}]", v)
    return v


def check_sanity(s, where: str, prefix: str = "sanity.") -> Optional[dict]:
    """A :func:`~rb_labelrefine.evaluation.sanity_report` result, as the model card renders it."""
    if s is None:
        return None
    s = _mapping(s, where, prefix.rstrip("."))
    _text(s, "norm", where, prefix, required=True, choices=NORMS)
    number(s, "eps", where, prefix, lo=0, hi=1e6, lo_open=True, required=True)
    count(s, "n", where, prefix, required=True)
    number(s, "clean_acc", where, prefix, lo=0, hi=100, required=True)
    if not isinstance(s.get("passed"), bool):
        raise _fail(where, prefix + "passed", "true or false", s.get("passed"))
    failed = _texts(s, "failed", where, prefix)
    if any(f not in SANITY_CHECKS for f in failed):
        raise _fail(where, prefix + "failed", f"a list of check names {list(SANITY_CHECKS)}", failed)
    checks = _mapping(s.get("checks"), where, prefix + "checks")
    for name in SANITY_CHECKS:
        if name not in checks:
            raise SchemaError(f"{where}: {prefix}checks.{name} is missing")
        c = _mapping(checks[name], where, f"{prefix}checks.{name}")
        p = f"{prefix}checks.{name}."
        _check(c, where, p)
        if name == "eps_sweep":
            count(c, "steps", where, p, required=True)
            eps = _numbers(c, "eps", where, p, 0, 1e6)
            acc = _numbers(c, "acc", where, p, 0, 100)
            if len(eps) != len(acc):
                raise SchemaError(f"{where}: {p}eps and {p}acc must have the same length ({len(eps)} != {len(acc)})")
        elif name == "steps_sweep":
            steps = _numbers(c, "steps", where, p, 1, 10 ** 6, integer=True)
            acc = _numbers(c, "acc", where, p, 0, 100)
            number(c, "eps", where, p, lo=0, hi=1e6, lo_open=True, required=True)
            if len(steps) != len(acc):
                raise SchemaError(f"{where}: {p}steps and {p}acc must have the same length ({len(steps)} != {len(acc)})")
        elif name == "black_box":
            count(c, "n_queries", where, p, required=True, lo=0)
            number(c, "square_acc", where, p, lo=0, hi=100)
            white = _mapping(c.get("white_box"), where, p + "white_box")
            for k in white:
                number(white, k, where, p + "white_box.", lo=0, hi=100)
            best = _text(c, "best_white_box", where, p, required=True)
            if best not in white:
                raise _fail(where, p + "best_white_box", f"a key of {p}white_box", best)
        elif name == "autoattack_flags":
            if not isinstance(c.get("flags"), list):
                raise _fail(where, p + "flags", "a list of strings", c.get("flags"))
            _texts(c, "flags", where, p)
        elif name == "zero_gradient":
            count(c, "n_zero", where, p, required=True, lo=0)
            count(c, "n_correct", where, p, required=True, lo=0)
    return s


def check_eval_json(data, where: str) -> dict:
    """The content of an ``eval --json`` file: ``autoattack`` (required), ``sanity`` (optional),
    and the outer ``norm``/``eps``/``which``/``checkpoint``/``dataset``; the outer ``norm`` and
    ``eps`` fill the result's when it lacks them (as ``eval --json`` keeps them beside it)."""
    data = _mapping(data, where, "the file")
    if not isinstance(data.get("autoattack"), dict):
        raise SchemaError(f"{where} has no 'autoattack' result; write it with "
                          "`rb-labelrefine eval --checkpoint RUN --json FILE`")
    _text(data, "norm", where, choices=NORMS)
    number(data, "eps", where, lo=0, hi=1e6, lo_open=True)
    _text(data, "which", where, choices=("best", "final"))
    _text(data, "checkpoint", where)
    _text(data, "dataset", where)
    aa = dict(data["autoattack"])
    for key in ("norm", "eps"):
        if aa.get(key) is None and data.get(key) is not None:
            aa[key] = data[key]
    check_autoattack(aa, where)
    check_sanity(data.get("sanity"), where)
    return {**data, "autoattack": aa}


def check_model_info(d, where: str) -> dict:
    """An exported ``model_info`` JSON (RobustBench's ModelInfo fields) as the leaderboard reads it."""
    d = _mapping(d, where, "the file")
    for key in ("name", "model_name", "dataset", "footnote", "architecture", "threat_model", "norm"):
        _text(d, key, where)
    _flag(d, "additional_data", where)
    _flag(d, "extra_data", where)
    return d
