"""Run real QEMU guests against vfiouser-srv: provisioning, configurations and a launcher.

Public surface (see each module's docstring for the why):

* :func:`provision`, :func:`find_qemu`, :func:`find_guest`, :func:`is_provisioned`,
  :class:`QemuCommand`, :class:`CacheLayout` (:mod:`.provision`);
* :func:`load_configs`, :class:`QemuConfig` (:mod:`.configs`, data in ``qemu-configs/``);
* :func:`run_guest`, :func:`run_config`, :func:`serve_device`, :class:`RunResult`
  (:mod:`.launcher`, trio);
* :func:`setup_main`, :func:`run_main` (:mod:`.cli`) for ``vfiouser-srv qemu setup|run``.
"""

from .cli import run_main, setup_main
from .configs import ConfigError, ConfigFile, QemuConfig, load_configs
from .launcher import (
    ConfigRun,
    LaunchError,
    RunResult,
    ServerHandle,
    run_config,
    run_guest,
    serve_device,
)
from .provision import (
    CacheLayout,
    ProvisionError,
    ProvisionResult,
    QemuCommand,
    find_guest,
    find_qemu,
    is_provisioned,
    provision,
)

__all__ = [
    "CacheLayout",
    "ConfigError",
    "ConfigFile",
    "ConfigRun",
    "LaunchError",
    "ProvisionError",
    "ProvisionResult",
    "QemuCommand",
    "QemuConfig",
    "RunResult",
    "ServerHandle",
    "find_guest",
    "find_qemu",
    "is_provisioned",
    "load_configs",
    "provision",
    "run_config",
    "run_guest",
    "run_main",
    "serve_device",
    "setup_main",
]
