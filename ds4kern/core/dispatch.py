"""Choosing a variant per call, and saying why.

Order of precedence for each call:

1. ``variant=`` given to the op: used if it exists, matches the arrays' backend and supports the
   problem; otherwise a ``ValueError`` says why.
2. An override: :func:`use_variant` (innermost context first), then the environment variable
   ``DS4KERN_VARIANT`` (``"router_topk=naive,compress_decode=grouped"``).  An override that
   cannot run this problem is skipped, and :func:`ds4kern.explain` says so.
3. Autotune, when enabled (:mod:`ds4kern.core.autotune`): the cached winner of the bucket, or, on
   the first call of a bucket, the fastest supported variant timed on the call's own arguments.
4. The op's static rule (``define_op(rule=...)``): one short function over the built-in
   variants that support the problem, with its thresholds and the measurements behind them.
   A third-party variant wins over the rule's pick only with a cost hint below
   :data:`RULE_COST` (1.0); among third-party variants (and for ops without a rule) the lowest
   cost hint wins, ties by registration order.

A variant may have tunable settings (``Variant.configs``, e.g. the compressor's ``pool_group``):
the rule and the overrides bind its default (first) setting, an op may pass an explicit one, and
autotune times every (variant, setting) pair.

Decisions are memoised per (problem, overrides, registry generation); a problem's fields are
exactly what the variants' ``supports`` and the rule may look at, with sizes already rounded to
their bucket and layout facts (alignment) included.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Union

from . import autotune
from .op import OPS
from .registry import BUILTIN_PLUGINS, Variant, registry

__all__ = ["use_variant", "select", "decide", "Decision", "Candidate", "ENV_VARIANT", "RULE_COST"]

RULE_COST = 1.0  # the cost a third-party variant must beat to displace the op's rule

ENV_VARIANT = "DS4KERN_VARIANT"

_override: contextvars.ContextVar[tuple] = contextvars.ContextVar("ds4kern_override", default=())


@contextlib.contextmanager
def use_variant(op_or_map: Union[str, dict], name: Optional[str] = None):
    """Force variants inside a ``with`` block (this thread / task only).

    ``with ds4kern.use_variant("router_topk", "naive"): ...`` or
    ``with ds4kern.use_variant({"router_topk": "reference"}): ...``.  An op or variant name that
    is not registered raises ``ValueError`` on entering the block.
    """
    if isinstance(op_or_map, dict):
        if name is not None:
            raise TypeError("use_variant: give either a mapping or (op, name), not both")
        pairs = tuple(op_or_map.items())
    else:
        if not isinstance(name, str):
            raise TypeError(f"use_variant: name must be a variant name string, got {name!r}")
        pairs = ((op_or_map, name),)
    for op, n in pairs:
        if not isinstance(op, str) or not isinstance(n, str):
            raise TypeError(f"use_variant: op and name must be strings, got {op!r}: {n!r}")
        _check_registered(op, n)
    token = _override.set(pairs + _override.get())
    try:
        yield
    finally:
        _override.reset(token)


def _check_registered(op: str, name: str) -> None:
    names = [v.name for v in registry.variants(op)]
    if not names:
        raise ValueError(f"use_variant: unknown op {op!r}; ops: {registry.ops()}")
    if name not in names:
        raise ValueError(f"use_variant: {name!r} is not a registered variant of {op}; registered: {names}")


@functools.lru_cache(maxsize=16)
def _parse_env(raw: str) -> tuple:
    pairs = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"{ENV_VARIANT}={raw!r}: each entry must read op=variant, got {part!r}")
        op, name = (s.strip() for s in part.split("=", 1))
        pairs.append((op, name))
    return tuple(pairs)


def _override_for(op: str) -> tuple[Optional[str], str]:
    for o, n in _override.get():
        if o == op:
            return n, "use_variant() context"
    raw = os.environ.get(ENV_VARIANT)
    if raw:
        for o, n in _parse_env(raw):
            if o == op:
                return n, f"environment {ENV_VARIANT}"
    return None, ""


@dataclass
class Candidate:
    variant: Variant
    rejected: Optional[str]  # reason, or None if it can run the problem
    cost: Optional[float]    # None for built-in variants of an op with a rule


@dataclass
class Decision:
    op: str
    problem: object
    chosen: Optional[Variant]
    how: str  # "explicit", "override", "autotune", "rule", "heuristic", or "none"
    why: str
    candidates: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.op}: {self.problem}"]
        bucket = getattr(self.problem, "bucket", None)
        if bucket is not None:
            lines.append(f"  bucket: {bucket}")
        lines.append("  candidates:")
        for c in self.candidates:
            v = c.variant
            tag = f"[{v.backend}, plugin {v.plugin}]"
            if c.rejected is not None:
                lines.append(f"    - {v.name:16s} {tag}: rejected: {c.rejected}")
            else:
                mark = "  <- chosen" if self.chosen is not None and self.chosen.name == v.name else ""
                cfgs = v.configs_for(self.problem)
                settings = (", settings " + " | ".join(",".join(f"{k}={x}" for k, x in cf.items()) for cf in cfgs)
                            if cfgs else "")
                cost = "" if c.cost is None else f", cost {c.cost:g}"
                only = " (autotune only: the rule never picks it)" if v.autotune_only else ""
                lines.append(f"    - {v.name:16s} {tag}: supported{cost}{settings}{only}{mark}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.chosen is not None:
            lines.append(f"  chosen: {self.chosen.label} ({self.how}): {self.why}")
        else:
            lines.append(f"  chosen: none: {self.why}")
        return "\n".join(lines)

    __repr__ = __str__


def _builtin(v: Variant) -> bool:
    return v.plugin in BUILTIN_PLUGINS


def _evaluate(op: str, problem) -> list[Candidate]:
    backend = problem.backend
    ruled = op in OPS and OPS[op].rule is not None
    out = []
    for v in registry.variants(op):
        if v.backend != backend:
            out.append(Candidate(v, f"backend {v.backend!r}, the arrays are {backend!r}", None))
            continue
        try:
            reason = v.supports(problem)
        except Exception as e:  # a plugin's predicate must not break dispatch
            reason = f"supports() raised {type(e).__name__}: {e}"
        if reason is not None:
            out.append(Candidate(v, str(reason), None))
            continue
        if ruled and _builtin(v):
            out.append(Candidate(v, None, None))
            continue
        try:
            cost = v.cost_of(problem)
        except Exception as e:
            out.append(Candidate(v, f"cost() raised {type(e).__name__}: {e}", None))
            continue
        out.append(Candidate(v, None, cost))
    return out


def bind(v: Variant, config: Optional[dict]) -> Variant:
    """``v`` with ``config`` bound as keyword arguments of its ``fn`` (``v`` itself if none)."""
    if not config:
        return v
    return replace(v, fn=functools.partial(v.fn, **config), config=tuple(sorted(config.items())))


def _default(v: Variant, problem) -> Variant:
    cfgs = v.configs_for(problem)
    return bind(v, cfgs[0]) if cfgs else v


def decide(op: str, problem, variant: Optional[str] = None, run: Optional[Callable] = None,
           config: Optional[dict] = None) -> Decision:
    """Full decision with every candidate (what :func:`ds4kern.explain` prints).

    ``run(variant)`` runs the op's current call with a given variant; with it, autotune can time
    the candidates.  :func:`ds4kern.explain` passes none, so it never runs anything.
    ``config``: an explicit setting for ``variant`` (one of its ``configs``).
    """
    cands = _evaluate(op, problem)
    if not cands:
        raise ValueError(f"no variants registered for op {op!r}")
    by_name = {c.variant.name: c for c in cands}
    if variant is not None:
        if not isinstance(variant, str):
            raise TypeError(f"variant must be a variant name string, got {variant!r}")
        c = by_name.get(variant)
        if c is None:
            raise ValueError(f"variant={variant!r} is not a registered variant of {op}; registered: {list(by_name)}")
        if c.rejected is not None:
            raise ValueError(f"variant={variant!r} cannot run this {op} problem: {c.rejected}")
        if config:
            allowed = c.variant.configs_for(problem)
            if dict(config) not in allowed:
                raise ValueError(f"{op}: variant {variant!r} has no setting {dict(config)} for this problem; "
                                 f"settings: {allowed or 'none'}")
            return Decision(op, problem, bind(c.variant, dict(config)), "explicit", "variant= and setting given", cands)
        return Decision(op, problem, _default(c.variant, problem), "explicit", "variant= argument", cands)
    if config:
        raise ValueError(f"{op}: a setting {dict(config)} needs an explicit variant")
    notes = []
    name, source = _override_for(op)
    if name is not None:
        c = by_name.get(name)
        if c is None:
            notes.append(f"override {name!r} from {source} is not a registered variant; ignored")
        elif c.rejected is not None:
            notes.append(f"override {name!r} from {source} cannot run this problem ({c.rejected}); ignored")
        else:
            return Decision(op, problem, _default(c.variant, problem), "override", f"forced by {source}", cands, notes)
    ok = [c for c in cands if c.rejected is None]
    if ok and autotune.enabled():
        tunable = []  # every (variant, setting) pair
        for c in ok:
            cfgs = c.variant.configs_for(problem)
            tunable += [bind(c.variant, cf) for cf in cfgs] if cfgs else [c.variant]
        entry = autotune.lookup(op, problem, {v.label: v for v in tunable})
        how = "cached winner"
        if entry is None and run is not None and len(tunable) > 1:
            entry = autotune.tune(op, problem, tunable, run)
            how = "timed now"
        if entry is not None:
            chosen = next(v for v in tunable if v.label == autotune.entry_label(entry))
            times = ", ".join(f"{k} {v:g} us" for k, v in sorted(entry["times_us"].items(), key=lambda kv: kv[1]))
            return Decision(op, problem, chosen, "autotune",
                            f"{how} ({times}; {entry.get('when', '?')}) in {autotune.cache_path()}", cands, notes)
        if len(tunable) > 1:
            notes.append("autotune is on but this bucket is not tuned yet; the next call of the op times "
                         "the candidates")
    if not ok:
        reasons = "; ".join(f"{c.variant.name}: {c.rejected}" for c in cands)
        return Decision(op, problem, None, "none", f"no variant can run this problem ({reasons})", cands, notes)
    rule = OPS[op].rule if op in OPS else None
    inside = [c for c in ok if c.cost is None]  # built-ins under the rule
    outside = [c for c in ok if c.cost is not None]
    best_out = min(outside, key=lambda c: c.cost) if outside else None  # min keeps the first of equals
    if inside and not (best_out is not None and best_out.cost < RULE_COST):
        name, why = rule(problem, frozenset(c.variant.name for c in inside))
        pick = next((c for c in inside if c.variant.name == name), None)
        if pick is None:  # a rule that names a variant it was not offered is a bug in ds4kern
            raise AssertionError(f"{op}: the rule picked {name!r}, not among {[c.variant.name for c in inside]}")
        if best_out is not None:
            why += f" (plugin variant {best_out.variant.name} has cost hint {best_out.cost:g} >= {RULE_COST:g})"
        how = "rule"
    else:
        pick = best_out
        others = ", ".join(f"{c.variant.name} {c.cost:g}" for c in outside if c is not pick)
        why = f"lowest cost hint {pick.cost:g}" + (f" (others: {others})" if others else " (only candidate)")
        if inside:
            why += f"; below the rule's {RULE_COST:g}"
        how = "heuristic"
    chosen = _default(pick.variant, problem)
    if chosen.config:
        why += f"; its default setting for this problem: {chosen.label}"
    return Decision(op, problem, chosen, how, why, cands, notes)


_cache: dict = {}
_CACHE_MAX = 4096


def clear_cache() -> None:
    """Forget memoised decisions (e.g. after :func:`ds4kern.autotune.clear`)."""
    _cache.clear()


def select(op: str, problem, variant: Optional[str] = None, run: Optional[Callable] = None,
           config: Optional[dict] = None) -> Variant:
    """The variant to run (memoised; its setting bound); raises ``ValueError`` if none can run
    the problem."""
    key = (op, problem, variant, tuple(sorted(config.items())) if config else None, _override.get(),
           os.environ.get(ENV_VARIANT), registry.generation, autotune.enabled(), autotune.generation())
    v = _cache.get(key)
    if v is None:
        d = decide(op, problem, variant, run, config)
        if d.chosen is None:
            raise ValueError(f"{op}: {d.why}")
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()
        v = _cache[key] = d.chosen
    return v
