"""Running the server: the port bound before the model loads, the model ids, the FastAPI app on uvicorn."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Optional

from npu_recipes.config.schema import ServeConfig
from npu_recipes.errors import UserError
from npu_recipes.infer.loading import LoadedModel
from npu_recipes.run import manifest
from npu_recipes.runtime.devices import Device
from npu_recipes.serving.launcher import READY_MESSAGE

log = logging.getLogger(__name__)


def check_packages() -> None:
    """Refuse to start without fastapi and uvicorn (the ``serve`` extra).

    Raises:
        UserError: names the package to install.
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise UserError(
            f"stage=serve needs fastapi and uvicorn ({error})",
            fix="pip install 'npu_recipes[serve]' (fastapi, uvicorn, pydantic)",
        ) from None


def served_model_name(configured: Optional[str], base_name_or_path: str) -> str:
    """The base model's id: ``serve.served_model_name`` (``configured``), else the last component of its path or hub id."""
    return configured or Path(base_name_or_path.rstrip("/")).name


def bind(host: str, port: int) -> socket.socket:
    """A socket bound (not yet listening) to ``host:port``; port 0 picks a free port.

    Bound before the model loads, so a busy port fails in a second rather than after minutes of
    loading; connections are refused, not left hanging, until uvicorn starts listening. (uvicorn's
    own ``Config.bind_socket`` would announce "Uvicorn running" at this point already.)

    Raises:
        UserError: the address is in use or not available on this machine.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({error.strerror})",
            fix="pass another serve.port (0 picks a free one) or stop the process using it",
        ) from None
    return sock


def serve(loaded: LoadedModel, settings: ServeConfig, device: Device, sock: socket.socket) -> None:
    """Serve ``loaded`` (its base model and every adapter as its own model id) on ``sock`` (from
    :func:`bind`) until SIGTERM/SIGINT; in-flight requests finish first (uvicorn's graceful shutdown).

    Raises:
        UserError: an adapter is named like the base model.
    """
    import uvicorn

    from npu_recipes.serving.app import Backend, create_app
    from npu_recipes.serving.batcher import Batcher
    from npu_recipes.serving.generation import Generator

    base_id = served_model_name(settings.served_model_name, loaded.base.name_or_path)
    adapter_ids = [adapter.name for adapter in loaded.adapters]
    if base_id in adapter_ids:
        raise UserError(
            f"adapter name {base_id!r} is also the base model's id",
            fix="rename the adapter in adapters={name: path} or set serve.served_model_name",
        )
    max_model_len = settings.max_model_len or loaded.model.config.max_position_embeddings
    generator = Generator(loaded, device)
    backend = Backend(
        tokenizer=loaded.tokenizer,
        batcher=Batcher(generator, settings.max_batch_size, settings.batch_wait_ms / 1000),
        base_id=base_id,
        adapter_ids=adapter_ids,
        max_model_len=max_model_len,
        serve=settings,
        info={
            "device": device.name(),
            "dtype": str(loaded.model.dtype).replace("torch.", ""),
            "max_model_len": max_model_len,
            "versions": manifest.package_versions(),
        },
    )
    uvicorn_config = uvicorn.Config(
        create_app(backend), host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=settings.timeout_graceful_shutdown,
    )
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"{READY_MESSAGE} http://{host}:{port} (models: {', '.join([base_id, *adapter_ids])})", flush=True)
    try:
        uvicorn.Server(uvicorn_config).run(sockets=[sock])
    except KeyboardInterrupt:
        log.info("stopped")

