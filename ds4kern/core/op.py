"""Op objects: one per public op, from which the call, ``explain`` and the dispatch rule come.

An op is written once, as a *prepare* function with the op's public signature and docstring.
It validates the arguments and returns a :class:`Call`: the problem (what variants' ``supports``
and the rule look at), the argument object handed to the chosen variant, and what to give back.
:func:`define_op` turns it into the public function::

    @define_op("router_topk", rule=rule, kernels=(NAIVE, ROWS, ...))
    def router_topk(logits, topk, *, score_function="softmax", ..., plan_only=False):
        '''docstring users read'''
        ...validate...
        if plan_only:
            return Call(problem)
        return Call(problem, args, frame, results=(w, i))

The public function takes the same arguments plus ``variant=``; ``ds4kern.explain("router_topk",
...)`` calls the prepare function with ``plan_only=True`` and asks the dispatcher, so the
signature exists once.  Ops register here; the core never imports an op.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from .scope import scope

__all__ = ["Call", "Op", "define_op", "OPS", "get_op", "sources_hash", "reference_or", "private_errors_run"]


@dataclass
class Call:
    """One validated call of an op.

    problem:  hashable problem object (bucketed sizes, dtypes, layout facts) given to every
              variant's ``supports`` and to the op's rule.
    args:     what the chosen variant's ``fn`` receives (None when planning only).
    frame:    the :class:`ds4kern.core.arrays.Frame` the call runs in.
    results:  returned to the caller: one array or a tuple of arrays (given back in the caller's
              kind: torch in, torch out), or any other object as it is.
    skip:     nothing to compute (empty inputs): the variant is still chosen (``variant=`` is
              validated) but not run.
    variant, config: a variant and setting an argument of the op forces (e.g. ``pool_group``);
              ``forced_by`` names that argument for the error a contradicting ``variant=`` gets.
    tune_run: ``run(variant)`` used by autotune to time candidates; default: the variant's fn on
              ``args`` inside the frame.  Ops whose variants update buffers in place give one
              that works on copies.
    """

    problem: Any
    args: Any = None
    frame: Any = None
    results: Any = None
    skip: bool = False
    variant: Optional[str] = None
    config: Optional[dict] = None
    forced_by: str = ""
    tune_run: Optional[Callable] = None
    give_back: bool = True


@dataclass
class Op:
    name: str
    prepare: Callable[..., Call]
    rule: Optional[Callable] = None
    kernels: tuple = ()
    _hash: Optional[str] = field(default=None, repr=False)

    def plan(self, *args, **kwargs) -> Call:
        return self.prepare(*args, plan_only=True, **kwargs)

    def explain(self, *args, variant: Optional[str] = None, **kwargs):
        from . import dispatch

        c = self.plan(*args, **kwargs)
        return dispatch.decide(self.name, c.problem, c.variant or variant, config=c.config)

    def __call__(self, *args, variant: Optional[str] = None, **kwargs):
        with scope(self.name):  # outputs and scratch of the call (free when statistics are off)
            return self._call(args, variant, kwargs)

    def _call(self, args, variant, kwargs):
        from . import autotune, dispatch

        c = self.prepare(*args, **kwargs)
        if c.variant is not None:
            if variant is not None and variant != c.variant:
                raise ValueError(f"{self.name}: variant={variant!r} contradicts {c.forced_by or 'the arguments'}, "
                                 f"which selects the {c.variant!r} variant")
            variant = c.variant
        if c.skip:
            dispatch.select(self.name, c.problem, variant, config=c.config)  # validates variant=
        else:
            if autotune.enabled():  # autotune times on the call's device and stream
                run = c.tune_run or (lambda v: v.fn(c.args))
                with c.frame.running():
                    v = dispatch.select(self.name, c.problem, variant, run=run, config=c.config)
            else:
                v = dispatch.select(self.name, c.problem, variant, config=c.config)
            c.frame.run(v.fn, c.args)
        if not c.give_back:
            return c.results
        if isinstance(c.results, tuple):
            return tuple(c.frame.give_back(r) for r in c.results)
        return c.frame.give_back(c.results)

    def sources_hash(self) -> str:
        """Hash of the folded kernel sources and options of this op's kernel families."""
        if self._hash is None:
            self._hash = sources_hash(self.kernels)
        return self._hash


OPS: dict[str, Op] = {}


def get_op(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; ops: {sorted(OPS)}") from None


def sources_hash(families) -> str:
    from .kernels import load_source

    h = hashlib.sha256()
    for fam in sorted(families, key=lambda f: f.source):
        h.update(fam.source.encode())
        h.update("\0".join(fam.options).encode())
        h.update(load_source(fam.source).encode())
    return h.hexdigest()[:16]


def define_op(name: str, *, rule: Optional[Callable] = None, kernels: tuple = ()):
    """Decorator: the prepare function (public signature, ``plan_only=False`` last) becomes the
    public op.  ``rule(problem, supported) -> (variant name, reason)`` is the op's static
    dispatch rule over its built-in variants (``supported``: names that can run the problem);
    ``kernels``: the op's kernel families (their source hash keys autotune's cache)."""

    def wrap(prepare: Callable[..., Call]):
        sig = inspect.signature(prepare)
        if "plan_only" not in sig.parameters:
            raise TypeError(f"{name}: the prepare function must take plan_only")
        op = Op(name, prepare, rule, tuple(kernels))
        if name in OPS:
            raise ValueError(f"op {name!r} is defined twice")
        OPS[name] = op

        @functools.wraps(prepare)
        def public(*args, **kwargs):
            return op(*args, **kwargs)

        params = [p for p in sig.parameters.values() if p.name != "plan_only"]
        if "variant" not in sig.parameters:
            params.append(inspect.Parameter("variant", inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation="Optional[str]"))
        public.__signature__ = sig.replace(parameters=params, return_annotation=inspect.Signature.empty)
        public.op = op
        public.explain = op.explain
        del public.__wrapped__  # help() shows the public signature, not prepare's
        return public

    return wrap


def reference_or(name: str) -> Callable:
    """The rule of an op with one CUDA variant: the reference on host arrays, ``name`` on the GPU."""

    def rule(problem, ok: frozenset) -> tuple[str, str]:
        if "reference" in ok:
            return "reference", "host arrays run the reference backend"
        if name in ok:
            return name, "the op's CUDA variant"
        return sorted(ok)[0], f"{name} cannot run it; the first variant by name that can"

    rule.__name__ = f"reference_or_{name}"
    return rule


def private_errors_run(args) -> Callable:
    """``Call.tune_run`` for ops whose args carry a device ``errors`` counter (and a ``frame``):
    autotune times the candidates on a copy of the args with a private counter, so timing never
    adds to the caller's."""
    holder = {}

    def run(var):
        if "args" not in holder:
            e = args.errors
            holder["args"] = replace(args, errors=None if e is None else args.frame.xp.zeros_like(e))
        var.fn(holder["args"])

    return run
