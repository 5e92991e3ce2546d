"""Switchyard: a distributed mixture-of-experts runtime (C++), from Python.

    import switchyard
    world = switchyard.init()            # mpi under mpirun, ucx under `switchyard launch` or torchrun, else one rank
    layer = switchyard.torch.MoE(world.communicator, model_dim=256, hidden_dim=512, experts=8, k=2)

Tensors cross the boundary zero-copy through DLPack; `switchyard.torch` holds
the torch.nn.Module.
"""
import atexit

from ._switchyard import (  # noqa: F401
    Checkpoint,
    Communicator,
    ConfigError,
    Error,
    InvalidArgument,
    IoError,
    MoELayer,
    NotSupported,
    TimeoutError,
    World,
    finalize,
    gemm_threads,
    init,
    save_checkpoint,
    set_gemm_threads,
)

_world = None
atexit.register(finalize)


def world():
    """The process's world, made by the first call (init() with defaults)."""
    global _world
    if _world is None:
        _world = init()
    return _world
