"""The variant registry: a pluggy plugin manager plus the variants its plugins register.

Loading order: built-in plugins, then entry points of group ``ds4kern``.  Environment:

- ``DS4KERN_PLUGINS``: unset or ``all`` loads every external plugin; ``none`` loads none;
  ``a,b`` loads only the entry points named ``a`` and ``b``.
- ``DS4KERN_DISABLE_PLUGINS``: ``a,b`` never loads those entry points.

A name in either variable that no installed entry point has warns (``EnvWarning``, naming the
variable and the installed plugins) and is ignored; when ``DS4KERN_PLUGINS`` names no known
plugin at all, its default (every plugin) stands.

A plugin that fails to import, to validate, or raises while registering is skipped with a
warning naming it; it never breaks ``import ds4kern`` or the other plugins.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Union

import pluggy

from . import hookspecs
from .env import EnvWarning

__all__ = ["Variant", "PluginWarning", "registry", "BUILTIN_PLUGINS", "add_builtin"]

BACKENDS = ("cuda", "numpy")

# Names of the modules whose hookimpls provide the built-in variants, in the order the ops added
# themselves (add_builtin); they are registered before any external plugin.
BUILTIN_PLUGINS: list = []
_BUILTIN_MODULES: dict = {}


def add_builtin(module) -> None:
    """Called by each op package at import: its module's hookimpls are built-in variants.  A
    broken built-in is a bug in ds4kern itself, so its errors are raised, not warned about."""
    name = module.__name__
    if name in _BUILTIN_MODULES:
        return
    _BUILTIN_MODULES[name] = module
    BUILTIN_PLUGINS.append(name)
    if registry._pm is not None:  # the registry was built before this op was imported
        registry._pm.register(module, name=name)
        registry.plugins[name] = PluginInfo(name, "builtin")
        registry._invalidate()


class PluginWarning(UserWarning):
    """A ds4kern plugin could not be loaded or registered and was skipped."""


def _always(problem) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Variant:
    """One implementation of one op.

    op, name:  e.g. ``"router_topk"``, ``"naive"``.
    backend:   ``"cuda"`` (runs on CuPy arrays) or ``"numpy"`` (runs on host arrays).
    fn:        ``fn(args)``; fills the outputs preallocated in ``args``.
    supports:  ``supports(problem) -> None | str``: ``None`` if it can run the problem, else a
               human-readable reason shown by :func:`ds4kern.explain`.
    cost:      a number or ``cost(problem) -> float``; the static heuristic picks the lowest.
    configs:   optional ``configs(problem) -> [dict, ...]``: tunable settings of this variant for
               a problem (e.g. ``[{"pool_group": 2}, {"pool_group": 4}]``), the static default
               first.  The dispatcher binds one as keyword arguments of ``fn``; autotune times each.
    autotune_only: a built-in the op's static rule never picks (it lost everywhere measured, or
               wins only where the rule cannot tell); autotune and explicit requests may use it.
    plugin:    filled in by the registry: the plugin that registered the variant.
    config:    filled in by the dispatcher: the bound setting, as sorted ``(key, value)`` pairs.
    """

    op: str
    name: str
    backend: str
    fn: Callable[[Any], Any]
    supports: Callable[[Any], Optional[str]] = _always
    cost: Union[float, Callable[[Any], float]] = 1.0
    description: str = ""
    configs: Optional[Callable[[Any], Any]] = None
    autotune_only: bool = False
    plugin: str = ""
    config: tuple = ()

    @property
    def label(self) -> str:
        """``name`` or ``name[key=value,...]`` when a setting is bound."""
        if not self.config:
            return self.name
        return f"{self.name}[{','.join(f'{k}={v}' for k, v in self.config)}]"

    def configs_for(self, problem) -> list:
        return [dict(c) for c in self.configs(problem)] if self.configs is not None else []

    def cost_of(self, problem) -> float:
        return float(self.cost(problem) if callable(self.cost) else self.cost)

    def check(self) -> None:
        for attr in ("op", "name"):
            v = getattr(self, attr)
            if not isinstance(v, str) or not v.isidentifier():
                raise ValueError(f"Variant.{attr} must be an identifier string, got {v!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"Variant.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not callable(self.fn):
            raise TypeError(f"Variant.fn must be callable, got {type(self.fn).__name__}")
        if not callable(self.supports):
            raise TypeError("Variant.supports must be callable")
        if self.configs is not None and not callable(self.configs):
            raise TypeError("Variant.configs must be None or callable")


def _env_list(name: str) -> Optional[set]:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def _known_names(var: str, names: Optional[set], known: set, keywords: frozenset = frozenset()) -> Optional[set]:
    """``names`` without those no installed plugin has (with a warning naming ``var``); None when
    nothing known is left (the variable's default stands)."""
    unknown = set() if names is None else names - known - keywords
    if not unknown:
        return names
    kept = names - unknown
    then = "ignored" if kept else "ignored; using the default"
    warnings.warn(f"ds4kern: {var} names unknown plugin(s) {sorted(unknown)} ({then}); installed plugins: "
                  f"{sorted(known) or 'none'}", EnvWarning, stacklevel=4)
    return kept or None


@dataclass
class PluginInfo:
    name: str
    origin: str  # "builtin", "entry point", "runtime"
    dist: str = ""
    status: str = "loaded"  # "loaded", "failed: ...", "blocked"
    variants: list = field(default_factory=list)


class Registry:
    """Lazily built: nothing is imported or loaded until a variant is first asked for."""

    def __init__(self):
        self._lock = threading.RLock()
        self._pm: Optional[pluggy.PluginManager] = None
        self._variants: Optional[dict[tuple[str, str], Variant]] = None
        self.plugins: dict[str, PluginInfo] = {}
        self.generation = 0  # bumped whenever the set of variants may change

    # -- plugin manager -------------------------------------------------------------------
    @property
    def pm(self) -> pluggy.PluginManager:
        with self._lock:
            if self._pm is None:
                self._build()
            return self._pm

    def _build(self) -> None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        self._pm = pm
        for modname in list(BUILTIN_PLUGINS):
            pm.register(_BUILTIN_MODULES[modname], name=modname)
            self.plugins[modname] = PluginInfo(modname, "builtin")
        self._load_entry_points()

    def _load_entry_points(self) -> None:
        try:
            eps = importlib.metadata.entry_points(group=hookspecs.PROJECT)
        except Exception as e:  # a broken metadata folder on sys.path
            warnings.warn(f"ds4kern: could not read entry points: {e}", PluginWarning, stacklevel=3)
            return
        known = {ep.name for ep in eps}
        select = _known_names("DS4KERN_PLUGINS", _env_list("DS4KERN_PLUGINS"), known, frozenset({"all", "none"}))
        if select is not None and select & {"all"}:
            select = None
        block = _known_names("DS4KERN_DISABLE_PLUGINS", _env_list("DS4KERN_DISABLE_PLUGINS"), known) or set()
        seen = set()
        for ep in eps:
            if ep.name in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ep.name)
            dist = ""
            try:
                if ep.dist is not None:
                    dist = f"{ep.dist.metadata['Name']} {ep.dist.version}"
            except Exception:
                pass
            if ep.name in block or (select is not None and ep.name not in select):
                self.plugins[ep.name] = PluginInfo(ep.name, "entry point", dist, "blocked")
                continue
            try:
                obj = ep.load()
                self._pm.register(obj, name=ep.name)
                try:
                    self._pm.check_pending()
                except Exception:
                    self._pm.unregister(name=ep.name)
                    raise
            except Exception as e:
                warnings.warn(
                    f"ds4kern: plugin {ep.name!r} ({ep.value}) failed to load and was skipped: "
                    f"{type(e).__name__}: {e}",
                    PluginWarning,
                    stacklevel=3,
                )
                self.plugins[ep.name] = PluginInfo(ep.name, "entry point", dist, f"failed: {e}")
                continue
            self.plugins[ep.name] = PluginInfo(ep.name, "entry point", dist)

    # -- runtime registration -------------------------------------------------------------
    def register_plugin(self, plugin: object, name: Optional[str] = None) -> str:
        """Register a plugin object (module, class or instance with hookimpls) at run time."""
        with self._lock:
            pm = self.pm
            got = pm.register(plugin, name=name)
            if got is None:
                raise ValueError(f"ds4kern: plugin {name or plugin!r} is blocked or already registered")
            try:
                pm.check_pending()
            except Exception:
                pm.unregister(name=got)
                raise
            self.plugins[got] = PluginInfo(got, "runtime")
            self._invalidate()
            return got

    def unregister_plugin(self, name_or_plugin) -> None:
        with self._lock:
            pm = self.pm
            if isinstance(name_or_plugin, str):
                pm.unregister(name=name_or_plugin)
                self.plugins.pop(name_or_plugin, None)
            else:
                name = pm.get_name(name_or_plugin)
                pm.unregister(plugin=name_or_plugin)
                self.plugins.pop(name, None)
            self._invalidate()

    def _invalidate(self) -> None:
        self._variants = None
        self.generation += 1

    # -- variants -------------------------------------------------------------------------
    def _collect(self) -> dict[tuple[str, str], Variant]:
        pm = self.pm
        out: dict[tuple[str, str], Variant] = {}
        for info in self.plugins.values():
            info.variants = []
        for impl in pm.hook.ds4kern_register_variants.get_hookimpls():
            pname = impl.plugin_name
            got: list[Variant] = []

            def register(variant: Variant, _got=got, _p=pname) -> None:
                if not isinstance(variant, Variant):
                    raise TypeError(f"register() takes a ds4kern.Variant, got {type(variant).__name__}")
                variant.check()
                _got.append(replace(variant, plugin=_p))

            try:
                impl.function(**({"register": register} if "register" in impl.argnames else {}))
            except Exception as e:
                if pname in BUILTIN_PLUGINS:
                    raise
                warnings.warn(
                    f"ds4kern: plugin {pname!r} raised while registering variants and was skipped: "
                    f"{type(e).__name__}: {e}",
                    PluginWarning,
                    stacklevel=4,
                )
                if pname in self.plugins:
                    self.plugins[pname].status = f"failed: {e}"
                continue
            for v in got:
                key = (v.op, v.name)
                if key in out:
                    warnings.warn(
                        f"ds4kern: plugin {pname!r} registers {v.op}/{v.name}, already provided by "
                        f"{out[key].plugin!r}; the later one is skipped",
                        PluginWarning,
                        stacklevel=4,
                    )
                    continue
                out[key] = v
                if pname in self.plugins:
                    self.plugins[pname].variants.append(f"{v.op}/{v.name}")
        return out

    def _all(self) -> dict[tuple[str, str], Variant]:
        with self._lock:
            if self._variants is None:
                self._variants = self._collect()
            return self._variants

    def variants(self, op: Optional[str] = None) -> list[Variant]:
        """Registered variants, of one op or of all, in registration order."""
        return [v for (o, _), v in self._all().items() if op is None or o == op]

    def get(self, op: str, name: str) -> Variant:
        try:
            return self._all()[(op, name)]
        except KeyError:
            names = [v.name for v in self.variants(op)]
            if not names:
                raise ValueError(f"unknown op {op!r}; registered ops: {self.ops()}") from None
            raise ValueError(f"variant={name!r} is not a registered variant of {op}; registered: {names}") from None

    def ops(self) -> list[str]:
        return sorted({o for (o, _) in self._all()})


registry = Registry()
