"""`kvchunks http`: the OpenAI-compatible API and the chunk REST API over HTTP."""

from __future__ import annotations

import ipaddress

import click

from kvchunks.cli.shared import dtype_option, step_tokens_option
from kvchunks.cli.state import State, pass_state
from kvchunks.common import InvalidInput

API_KEY_ENV = "KVCHUNKS_API_KEY"
host_option = click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on."
)
api_key_option = click.option(
    "--api-key",
    envvar=API_KEY_ENV,
    help=f"Clients must send `Authorization: Bearer KEY` [${API_KEY_ENV}]; needed to listen "
    "on anything but loopback.",
)


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if not loopback and not api_key:
        raise InvalidInput(
            f"refusing to listen on {host} without an API key: pass --api-key (or set "
            f"{API_KEY_ENV}), or listen on 127.0.0.1"
        )


@click.command("http")
@host_option
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port."
)
@api_key_option
@dtype_option
@step_tokens_option
@pass_state
def http(
    state: State,
    host: str,
    port: int,
    api_key: str | None,
    dtype: str | None,
    step_tokens: int | None,
) -> None:
    """Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models), the chunk
    REST API (/v1/chunks, /v1/contexts), /health and /metrics.

    In this process over the data directory, or with --address in front of a kvchunks
    service on a Ray cluster. OpenAPI schema at /openapi.json.
    """
    check_exposure(host, api_key)
    state.dtype = dtype or state.dtype  # of the model loaded here (not a cluster's)
    state.step_tokens = step_tokens
    import uvicorn

    from kvchunks.server.app import create_app
    from kvchunks.server.backend import ClusterBackend, LocalBackend

    manager = state.manager
    backend = ClusterBackend(manager) if state.address else LocalBackend(manager)
    url = f"http://{host}:{port}"
    click.echo(f"kvchunks HTTP API on {url} (web page: {url}/ui, schema: /openapi.json)", err=True)
    uvicorn.run(create_app(backend, api_key), host=host, port=port, log_level="warning")
