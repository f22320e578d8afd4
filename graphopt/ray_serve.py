"""The batching engine as a Ray Serve deployment: N replicas behind Ray's HTTP proxy, one endpoint.

Each replica owns one :class:`graphopt.runtime.batching.BatchEngine` and serves the same FastAPI
app as ``graphopt serve`` (:func:`graphopt.server.create_app`); Ray's proxy spreads requests over
the replicas (and, with ``autoscaling_config``, adds or removes them with the load).

Two ways in:

* ``graphopt serve MODEL_DIR --ray --replicas N [--ray-address auto]``: starts (or joins) a Ray
  cluster, deploys, and serves until SIGINT / SIGTERM.
* ``serve run graphopt.ray_serve:build_app model_dir=MODEL_DIR replicas=N``: Ray's own CLI, with
  the application builder below; a Serve config file for ``serve deploy`` names the same
  ``import_path`` and ``args`` (and may set ``autoscaling_config`` instead of ``replicas``).

Every node that may run a replica must see ``MODEL_DIR`` at the same path (a shared or copied
folder). Needs the ``ray`` extra.
"""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import threading
from typing import Any, Callable

from ray import serve

from graphopt.errors import GraphoptError
from graphopt.runtime.batching import BatchEngine
from graphopt.server import create_app

logger = logging.getLogger(__name__)

APPLICATION = "graphopt"


@serve.deployment
@serve.ingress()
class GraphoptDeployment:
    """One replica: a BatchEngine on its own thread, and the OpenAI-compatible app over it."""

    def __init__(self, model_dir: str, model_name: str, engine_options: dict[str, Any]):
        # Not spinning, as in graphopt.server.serve: the replica's event loop shares the cores.
        self.engine = BatchEngine(model_dir, **{"spinning": False, **engine_options}).start()
        # Not ``self.app``: Serve's ingress wrapper defines that name itself.
        self._asgi_app = create_app(self.engine, model_name, manage_engine=False)

    def __serve_build_asgi_app__(self):
        return self._asgi_app

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(cancel=True, timeout=10)


def deployment(model_dir: str | os.PathLike, replicas: int = 1, model_name: str | None = None,
               autoscaling_config: dict | None = None, num_cpus: float | None = None, **engine_options):
    """The bound Serve application: ``replicas`` copies (or ``autoscaling_config``) of the engine."""
    from graphopt.modeldir import ModelDir

    model_dir = str(ModelDir.open(model_dir).path.resolve())
    name = model_name or pathlib.Path(model_dir).name
    options: dict[str, Any] = {"name": "GraphoptDeployment"}
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = replicas
    if num_cpus is not None:
        options["ray_actor_options"] = {"num_cpus": num_cpus}
    return GraphoptDeployment.options(**options).bind(model_dir, name, engine_options)


def build_app(args: dict[str, str]):
    """Application builder for ``serve run graphopt.ray_serve:build_app model_dir=DIR [key=value ...]``.

    Keys: ``model_dir`` (required), ``replicas``, ``model_name``, ``num_cpus``, and the engine's
    ``max_batch``, ``max_queue``, ``context``, ``threads``, ``prefill_chunk``, ``prefix_cache``, ``ep``.
    """
    args = dict(args)
    integers = {key: int(args.pop(key)) for key in ("replicas", "max_batch", "max_queue", "context", "threads",
                                                              "prefill_chunk", "prefix_cache")
                if key in args}
    num_cpus = float(args.pop("num_cpus")) if "num_cpus" in args else None
    return deployment(args.pop("model_dir"), num_cpus=num_cpus, **integers, **args)


def run_ray(model_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1,
            address: str | None = None, ready: Callable[[str, str], None] | None = None, model_name: str | None = None,
            **engine_options) -> None:
    """Deploy ``replicas`` engines on Ray Serve with its proxy on ``host:port``; block until SIGINT / SIGTERM."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
             configure_logging=True, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        name = model_name or pathlib.Path(model_dir).resolve().name
        # A replica reserves one CPU by default; a local cluster on a small machine would then
        # refuse a second replica, and the engines size their own threads anyway.
        try:
            serve.run(deployment(model_dir, replicas=replicas, model_name=name, num_cpus=0, **engine_options),
                      name=APPLICATION, route_prefix="/", blocking=False)
        except RuntimeError as error:  # a replica failed to start; Ray has logged its traceback
            raise GraphoptError(f"Ray Serve could not start the replicas ({str(error).splitlines()[0]}); "
                                "see the replica logs under the Ray session's logs/serve folder") from None
        if ready is not None:
            ready(f"http://{host}:{port}/v1", name)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        stop.wait()
        serve.delete(APPLICATION)  # replicas drain their open requests, then their engines stop
        serve.shutdown()
    finally:
        ray.shutdown()
