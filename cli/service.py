"""`kvchunks serve`, `status` and `stop`: the kvchunks actors on a Ray cluster.

    ray start --head                 # or `ray up cluster.yaml`
    kvchunks serve --workers 2       # detached actors; returns once every worker is ready
    kvchunks status                  # workers, pools, tiers, chunk counts (--json)
    kvchunks --address auto chat     # any command, served by the actors
    kvchunks stop

Ray and torch are imported only when one of these commands runs.
"""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from kvchunks.cli.http import api_key_option, check_exposure, host_option
from kvchunks.cli.shared import dtype_option, step_tokens_option
from kvchunks.cli.state import State, pass_state

address_option = click.option(
    "--address",
    help="Ray cluster address: auto (the local cluster), HOST:PORT or ray://HOST:10001. "
    "Default: the kvchunks --address option, else auto.",
)


def _attach(state: State, address: str | None):
    from kvchunks.actors import service

    service.init_ray(address or state.address or "auto")
    return service


@click.command()
@click.option(
    "--workers", type=click.IntRange(min=1), help="InferenceWorkers [one per GPU, else 1]."
)
@address_option
@click.option(
    "--redis-url",
    envvar="KVCHUNKS_REDIS_URL",
    help="Redis for the registry (needed with several nodes) [embedded, on this node].",
)
@click.option(
    "--kv-cache-mb", type=click.IntRange(min=1), help="KV pool of each worker, MiB [1024]."
)
@click.option(
    "--cpus-per-worker",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="CPUs each CPU-only worker reserves (GPU workers reserve one GPU).",
)
@click.option("--timeout", type=float, default=600, show_default=True, help="Seconds to wait.")
@click.option(
    "--http",
    "http_port",
    type=click.IntRange(1, 65535),
    help="Also serve the HTTP API (see `kvchunks http`) on this port, with Ray Serve.",
)
@host_option
@api_key_option
@dtype_option
@step_tokens_option
@pass_state
def serve(
    state: State,
    workers: int | None,
    address: str | None,
    redis_url: str | None,
    kv_cache_mb: int | None,
    cpus_per_worker: float,
    timeout: float,
    http_port: int | None,
    host: str,
    api_key: str | None,
    dtype: str | None,
    step_tokens: int | None,
) -> None:
    """Start the kvchunks actors (detached, namespace "kvchunks") and wait until ready."""
    if http_port is not None:
        check_exposure(host, api_key)
    from kvchunks import EngineConfig

    state.dtype, state.step_tokens = dtype or state.dtype, step_tokens
    engine = state.engine_options()
    if kv_cache_mb:
        engine["kv_cache_bytes"] = kv_cache_mb << 20
    EngineConfig(**engine)  # refused here, in one line, rather than by every worker
    service = _attach(state, address)
    started = service.start(
        workers,
        model=state.model,
        home=state.home,
        redis_url=redis_url,
        engine_options=engine or None,
        cpus_per_worker=cpus_per_worker,
        timeout=timeout,
    )
    Console().print(_workers_table(service.status(started)))
    click.echo(
        f"kvchunks is serving with {len(started.workers)} worker(s); `kvchunks stop` ends it"
    )
    if http_port is not None:
        from kvchunks.server import ray_serve

        url = ray_serve.deploy(http_port, host, api_key)
        click.echo(f"HTTP API on {url} (Ray Serve)")


@click.command()
@address_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead.")
@pass_state
def status(state: State, address: str | None, as_json: bool) -> None:
    """Show the workers, their KV pools, the tiers and the chunk counts."""
    service = _attach(state, address)
    report = service.status(service.attach())
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    registry = report["registry"]
    console = Console()
    console.print(_workers_table(report))
    console.print(_tiers_table(report))
    console.print(
        f"registry: {registry['chunks']} chunk(s), {registry['contexts']} context(s), "
        f"Redis at {registry['redis']}",
        markup=False,
        highlight=False,
    )


@click.command()
@address_option
@pass_state
def stop(state: State, address: str | None) -> None:
    """Stop the kvchunks actors (chunk records and KV files stay on disk)."""
    service = _attach(state, address)
    from kvchunks.server import ray_serve

    http = ["HTTP API (Ray Serve)"] if ray_serve.undeploy() else []
    stopped = [*http, *service.stop()]
    click.echo(f"stopped {len(stopped)}: {', '.join(stopped)}")


SERVICE_COMMANDS = [serve, status, stop]


def _workers_table(report: dict) -> Table:
    table = Table(title="workers", title_justify="left")
    for column in ("worker", "device", "blocks free/total", "chunks", "KV", "shipped", "state"):
        table.add_column(column)
    for w in report["workers"]:
        if "blocks_total" not in w:
            table.add_row(w["name"], "", "", "", "", "", w["state"])
            continue
        stats = w["stats"]
        table.add_row(
            w["name"],
            w["device"],
            f"{w['blocks_free']}/{w['blocks_total']}",
            str(w["chunks"]),
            _size(w["kv_bytes"]),
            str(stats.get("shipped", 0)),
            "busy" if w["busy"] else "idle",
        )
    return table


def _tiers_table(report: dict) -> Table:
    table = Table(title="tiers", title_justify="left")
    for column in ("tier", "chunks", "bytes"):
        table.add_column(column)
    for tier, usage in report["tiers"].items():
        table.add_row(tier, str(usage["chunks"]), _size(usage["bytes"]))
    return table


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
