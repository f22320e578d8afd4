"""`graphopt serve MODEL_DIR`: an OpenAI-compatible HTTP server with continuous batching.

One process serves one model with :class:`graphopt.runtime.batching.BatchEngine` behind FastAPI
on uvicorn (the ``serve`` extra); ``--ray --replicas N`` runs N copies as a Ray Serve deployment
behind Ray's HTTP proxy instead (the ``ray`` extra).
"""

from __future__ import annotations

import click

from graphopt.errors import GraphoptError
from graphopt.runtime.session import EXECUTION_PROVIDERS


@click.command("serve")
@click.argument("model_dir", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences decoded together (KV-cache slots).")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests allowed to wait for a slot; past it the server answers 503 with Retry-After.")
@click.option("--context", type=click.IntRange(min=2), default=None,
              help="Positions per slot, prompt plus completion (default: 2048, at most the model's).")
@click.option("--ep", type=click.Choice(list(EXECUTION_PROVIDERS)), default="cpu", show_default=True,
              help="ONNX Runtime execution provider (falls back to CPU when unavailable).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--prefill-chunk", type=click.IntRange(min=0), default=64, show_default=True,
              help="Prompt tokens prefilled per step while other requests decode (0: whole prompts).")
@click.option("--prefix-cache", type=click.IntRange(min=0), default=256, show_default=True,
              help="Positions of the last prompt kept to be reused by prompts that start alike (0: off; CPU).")
@click.option("--model-name", default=None, help="The model id clients use (default: MODEL_DIR's folder name).")
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM / SIGINT, seconds open requests get to finish before they are cancelled.")
@click.option("--ray", "use_ray", is_flag=True, help="Serve with Ray Serve (needs graphopt[ray]).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: engine replicas behind Ray's HTTP proxy.")
@click.option("--ray-address", default=None,
              help="With --ray: the Ray cluster to join (default: a new local one; 'auto' joins a running one).")
def command(model_dir, host, port, max_batch, max_queue, context, ep, threads, prefill_chunk, prefix_cache, model_name,
            shutdown_timeout, use_ray, replicas, ray_address):
    """Serve MODEL_DIR over HTTP with the OpenAI API (chat and text completions, streaming or not)."""
    from graphopt.runtime.batching import require_batchable

    require_batchable(model_dir)  # a missing, broken or unfused directory: one line, before anything starts
    if not use_ray and (replicas != 1 or ray_address is not None):
        raise click.UsageError("--replicas and --ray-address need --ray")
    _check_port(host, port)

    def ready(url: str, name: str, engine) -> None:
        click.echo(f"graphopt: serving {name} at {url} ({engine.max_batch} slots of {engine.context} positions, "
                   f"{engine.provider})", err=True)

    if use_ray:
        load_ray_serve().run_ray(model_dir, host=host, port=port, replicas=replicas, address=ray_address, max_batch=max_batch,
                max_queue=max_queue, context=context, ep=ep, threads=threads, prefill_chunk=prefill_chunk,
                prefix_cache=prefix_cache, model_name=model_name,
                ready=lambda url, name: click.echo(f"graphopt: serving {name} at {url} on Ray Serve, "
                                                   f"{replicas} replicas", err=True))
        return
    load_server().serve(model_dir, host=host, port=port, max_batch=max_batch, max_queue=max_queue, ep=ep, context=context,
          threads=threads, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache, model_name=model_name,
          shutdown_timeout=shutdown_timeout, ready=ready)


def _check_port(host: str, port: int) -> None:
    """A port someone else holds is a one-line error now, not a traceback after the model has loaded."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as error:
        raise GraphoptError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def load_server():
    """``graphopt.server``, or GraphoptError naming the extra that brings what it lacks."""
    try:
        import prometheus_client  # noqa: F401  (imported by the server at its first metrics)
        import uvicorn  # noqa: F401

        from graphopt import server
    except ImportError as error:
        raise GraphoptError(f"graphopt serve needs {error.name}: pip install 'graphopt[serve]'") from None
    return server


def load_ray_serve():
    """``graphopt.ray_serve``, or GraphoptError naming the extra that brings what it lacks."""
    server = load_server()
    try:
        from graphopt import ray_serve
    except ImportError as error:
        raise GraphoptError(f"graphopt serve --ray needs {error.name}: pip install 'graphopt[ray]'") from None
    del server
    return ray_serve
