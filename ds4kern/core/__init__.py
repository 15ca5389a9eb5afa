"""The core: arrays, kernel loading, the registry and its hook specs, op objects, dispatch,
autotune and timing.  It imports no op: ops register themselves with it (``define_op``,
``registry.add_builtin``, ``kernels.register_family``)."""
