"""Serve stage: an OpenAI-compatible HTTP server on plain PyTorch/transformers (docs/serving.md).

``python -m npu_recipes stage=serve [model=...] [adapters=RUN/checkpoint-N | {name: path, ...}]``
loads the base (or merged) model and its adapters with :func:`npu_recipes.inference.load`, then
serves them with uvicorn until SIGTERM/SIGINT, after which in-flight requests finish first
(uvicorn's graceful shutdown). It writes no run directory.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Optional

from npu_recipes import devices, inference, rundir
from npu_recipes.errors import UserError
from npu_recipes.rundir import RunDir
from npu_recipes.schema import RecipeConfig
from npu_recipes.serving.launcher import READY_MESSAGE

log = logging.getLogger(__name__)

IN_LAUNCHER_ONLY = True
"""One server process on one device, whatever ``parallelism`` a recipe sets for training."""

def prepare(config: RecipeConfig, fresh_output_dir: bool) -> Optional[RunDir]:
    """Nothing to prepare: serving creates no run directory."""
    return None


def _import_server_packages():
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as error:
        raise UserError(
            f"stage=serve needs fastapi and uvicorn ({error})",
            fix="pip install 'npu_recipes[serve]' (fastapi, uvicorn, pydantic)",
        ) from None
    return uvicorn


def served_model_name(config: RecipeConfig, base_name_or_path: str) -> str:
    """The base model's id: ``serve.served_model_name``, else the last component of its path or hub id."""
    return config.serve.served_model_name or Path(base_name_or_path.rstrip("/")).name


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


def run(config: RecipeConfig, run_dir: Optional[RunDir]) -> None:
    """Load the model and adapters, then serve until a shutdown signal.

    Raises:
        UserError: fastapi/uvicorn missing, the port unavailable, an adapter named like the base
            model, or anything :func:`npu_recipes.inference.load` refuses.
    """
    uvicorn = _import_server_packages()
    from npu_recipes.serving.app import Backend, create_app
    from npu_recipes.serving.batcher import Batcher
    from npu_recipes.serving.generation import Generator

    serve = config.serve
    sock = bind(serve.host, serve.port)
    device = devices.resolve(config.device)
    loaded = inference.load(config, device)
    base_id = served_model_name(config, loaded.base.name_or_path)
    adapter_ids = [adapter.name for adapter in loaded.adapters]
    if base_id in adapter_ids:
        raise UserError(
            f"adapter name {base_id!r} is also the base model's id",
            fix="rename the adapter in adapters={name: path} or set serve.served_model_name",
        )
    max_model_len = serve.max_model_len or loaded.model.config.max_position_embeddings
    generator = Generator(loaded, device)
    backend = Backend(
        tokenizer=loaded.tokenizer,
        batcher=Batcher(generator, serve.max_batch_size, serve.batch_wait_ms / 1000),
        base_id=base_id,
        adapter_ids=adapter_ids,
        max_model_len=max_model_len,
        serve=serve,
        info={
            "device": device.name(),
            "dtype": str(loaded.model.dtype).replace("torch.", ""),
            "max_model_len": max_model_len,
            "versions": rundir.package_versions(),
        },
    )
    uvicorn_config = uvicorn.Config(
        create_app(backend), host=serve.host, port=serve.port, log_level=serve.log_level,
        timeout_graceful_shutdown=serve.timeout_graceful_shutdown,
    )
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    print(f"{READY_MESSAGE} http://{host}:{port} (models: {', '.join([base_id, *adapter_ids])})", flush=True)
    try:
        uvicorn.Server(uvicorn_config).run(sockets=[sock])
    except KeyboardInterrupt:
        log.info("stopped")
