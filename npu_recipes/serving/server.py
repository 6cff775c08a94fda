"""Running the server: the port bound before the model loads, the model ids, the FastAPI app on uvicorn."""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path
from typing import List, Optional

from npu_recipes.config.schema import ModelConfig, ServeConfig
from npu_recipes.errors import UserError
from npu_recipes.infer.adapters import Adapter, base_model_config
from npu_recipes.infer.loading import LoadedModel
from npu_recipes.model import pretrained
from npu_recipes.run import manifest
from npu_recipes.runtime.devices import Device
from npu_recipes.serving.launcher import READY_MESSAGE

log = logging.getLogger(__name__)


def check_packages() -> None:
    """Refuse to start without the ``serve`` extra: fastapi, uvicorn, prometheus-client and xgrammar.

    xgrammar is only looked up, not imported: its import takes about 2 s and waits for the first
    constrained request.

    Raises:
        UserError: names the package to install.
    """
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn", "prometheus_client", "xgrammar")
               if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"stage=serve needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed",
            fix="pip install 'npu_recipes[serve]' (fastapi, uvicorn, pydantic, prometheus-client, xgrammar)",
        )


def served_model_name(configured: Optional[str], base_name_or_path: str) -> str:
    """The base model's id: ``serve.served_model_name`` (``configured``), else the last component of its path or hub id."""
    return configured or Path(base_name_or_path.rstrip("/")).name


def _names_of(name_or_path: str) -> set:
    path = Path(str(name_or_path)).expanduser()
    return {str(name_or_path), str(path.resolve())} if path.exists() else {str(name_or_path)}


def check_base_model(base: ModelConfig, adapters: List[Adapter], allow_base_mismatch: bool) -> None:
    """Refuse to serve adapters on a base model other than the one they were trained on.

    An adapter's base is known two ways: ``base_model_name_or_path`` in its adapter_config.json
    (the path PEFT saw) and ``model.name_or_path`` in its training run's resolved.yaml (as the
    user named it); ``base`` (the model about to load) matches when either names it, local paths
    compared after resolving. A LoRA of another size never fits (``check_adapters_fit``); this
    catches a base of the same shape but other weights, which would serve silently different text.

    Raises:
        UserError: a mismatch while ``serve.allow_base_mismatch`` is false; names both models.
    """
    if allow_base_mismatch or not adapters:
        return
    loading = _names_of(base.name_or_path)
    for adapter in adapters:
        trained = _names_of(adapter.base_model_name_or_path)
        if adapter.run_dir is not None:
            trained |= _names_of(base_model_config(base, [adapter]).name_or_path)
        if not loading & trained:
            raise UserError(
                f"adapter {adapter.path} was trained on {adapter.base_model_name_or_path}, "
                f"but model.name_or_path={base.name_or_path} would be served under it",
                fix="leave model.name_or_path out to serve the adapter on its own base, or pass "
                    "serve.allow_base_mismatch=true to serve it on this model on purpose",
            )


def bind(host: str, port: int) -> socket.socket:
    """A socket bound (not yet listening) to ``host:port``; port 0 picks a free port.

    Bound before the model loads, so a busy port fails in a second rather than after minutes of
    loading; connections are refused, not left hanging, until uvicorn starts listening. (uvicorn's
    own ``Config.bind_socket`` would announce "Uvicorn running" at this point already.)

    Raises:
        UserError: the host is not an address of this machine (the fix is about ``serve.host``),
            or the port is in use or privileged (the fix is about ``serve.port``).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
            # The host is at fault: not an address or name at all, or not one of this machine's.
            fix = (f"pass a serve.host this machine has: 127.0.0.1 (this machine only), 0.0.0.0 (every network "
                   f"interface), or one of its own addresses or names; {host!r} is not")
        elif error.errno == errno.EACCES:
            fix = "pass a serve.port of 1024 or above (lower ports need administrator rights), or 0 for a free one"
        else:
            fix = "pass another serve.port (0 picks a free one) or stop the process using it"
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror})", fix=fix) from None
    return sock


def serve(loaded: LoadedModel, settings: ServeConfig, device: Device, sock: socket.socket) -> None:
    """Serve ``loaded`` (its base model and every adapter as its own model id) on ``sock`` (from
    :func:`bind`) until SIGTERM/SIGINT; in-flight requests finish first (uvicorn's graceful shutdown).

    Raises:
        UserError: an adapter is named like the base model.
    """
    import uvicorn

    from npu_recipes.serving.app import create_app

    backend = build_backend(loaded, settings, device)
    uvicorn_config = uvicorn.Config(
        create_app(backend), host=settings.host, port=settings.port, log_level=settings.log_level,
        timeout_graceful_shutdown=settings.timeout_graceful_shutdown,
    )
    host, port = sock.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    models = ", ".join([backend.base_id, *backend.adapter_ids])
    print(f"{READY_MESSAGE} http://{host}:{port} (models: {models}; engine: {backend.engine.name})", flush=True)
    try:
        uvicorn.Server(uvicorn_config).run(sockets=[sock])
    except KeyboardInterrupt:
        log.info("stopped")



def check_max_model_len(max_model_len: Optional[int], loaded: LoadedModel) -> None:
    """Refuse a ``serve.max_model_len`` longer than the model's context, as training refuses such a
    ``train.max_length``: positions beyond it were never trained, and requests would be admitted
    only to produce garbage. The context is :func:`npu_recipes.model.pretrained.context_length` of
    the model's directory (rope scaling counted), else its ``max_position_embeddings``.

    Raises:
        UserError: names both lengths and the fix.
    """
    if max_model_len is None:
        return
    config = loaded.model.config
    directory = Path(str(getattr(config, "_name_or_path", "")))
    if (directory / "config.json").is_file():
        context, source = pretrained.context_length(str(directory))
    else:
        context = config.max_position_embeddings
        source = f"max_position_embeddings={context} in its config"
    if max_model_len > context:
        raise UserError(
            f"serve.max_model_len={max_model_len} exceeds the context of {loaded.base.name_or_path}: {context} tokens ({source})",
            fix=f"pass serve.max_model_len={context} or less, or leave it unset to serve the model's whole context",
        )


def build_backend(loaded: LoadedModel, settings: ServeConfig, device: Device):
    """The routes' :class:`~npu_recipes.serving.backend.Backend`: model ids, engine, grammars, metrics.

    Raises:
        UserError: an adapter is named like the base model, or ``serve.max_model_len`` exceeds the
            model's context (:func:`check_max_model_len`).
    """
    from npu_recipes.serving import engines, tools
    from npu_recipes.serving.backend import Backend
    from npu_recipes.serving.grammar import Grammars
    from npu_recipes.serving.metrics import Metrics

    base_id = served_model_name(settings.served_model_name, loaded.base.name_or_path)
    adapter_ids = [adapter.name for adapter in loaded.adapters]
    if base_id in adapter_ids:
        raise UserError(
            f"adapter name {base_id!r} is also the base model's id",
            fix="rename the adapter in adapters={name: path} or set serve.served_model_name",
        )
    max_model_len = settings.max_model_len or loaded.model.config.max_position_embeddings
    check_max_model_len(settings.max_model_len, loaded)
    metrics = Metrics(settings.max_batch_size)
    engine = engines.create(loaded, settings, device, metrics)
    return Backend(
        tokenizer=loaded.tokenizer,
        engine=engine,
        base_id=base_id,
        adapter_ids=adapter_ids,
        max_model_len=max_model_len,
        serve=settings,
        vocab_size=loaded.model.config.vocab_size,
        model_defaults=loaded.model.generation_config,
        grammars=Grammars(loaded.tokenizer, loaded.model.config.vocab_size, engine.eos),
        metrics=metrics,
        template_has_tools=tools.template_uses_tools(loaded.tokenizer),
        info={
            "device": device.name(),
            "dtype": str(loaded.model.dtype).replace("torch.", ""),
            "max_model_len": max_model_len,
            "versions": manifest.package_versions(),
        },
    )
