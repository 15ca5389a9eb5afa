"""Hook specifications of ds4kern's plugin system (pluggy project and entry-point group ``ds4kern``).

A plugin is any object (usually a module) with functions marked ``@ds4kern.hookimpl``.
Built-in variants register through exactly the same hook as third-party ones.

Third-party packages expose their plugin through an entry point::

    [project.entry-points.ds4kern]
    my_router = "my_package.ds4kern_plugin"
"""

import pluggy

PROJECT = "ds4kern"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def ds4kern_register_variants(register):
    """Provide op variants.

    Call ``register(variant)`` once per :class:`ds4kern.Variant` the plugin offers.  A variant's
    ``fn`` receives the op's validated argument object (for ``router_topk``:
    :class:`ds4kern.ops.router.RouterArgs`) and fills its preallocated outputs.

    Problems gain fields as ops grow (``RouterProblem.num_groups`` came after the first
    release): a variant's ``supports`` should return a reason for every feature it does not
    implement, so the dispatcher never hands it a problem it would answer wrongly.
    """
