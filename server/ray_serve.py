"""The same HTTP app deployed on a Ray cluster with Ray Serve, in front of the kvchunks
actors: a plain class whose ASGI app is built on its replica, wrapped by Serve."""

from __future__ import annotations

APP_NAME = "kvchunks-http"


class HTTPServer:
    """One Serve replica: the HTTP app over a Client of the service on this cluster."""

    def __init__(self, api_key: str | None):
        self.api_key = api_key

    def __serve_build_asgi_app__(self):
        from kvchunks.actors.client import connect
        from kvchunks.server.app import create_app
        from kvchunks.server.backend import ClusterBackend

        return create_app(ClusterBackend(connect()), self.api_key)


def deploy(port: int, host: str = "127.0.0.1", api_key: str | None = None) -> str:
    """Serve the HTTP app on every node's Serve proxy at host:port; returns its URL."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    deployment = serve.deployment(
        serve.ingress()(HTTPServer), name="http", ray_actor_options={"num_cpus": 0}
    )
    serve.run(deployment.bind(api_key), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def undeploy() -> bool:
    """Stop the HTTP app, if it runs, and Serve too if nothing else runs on it (another
    application on the cluster is not ours to stop); True if the app ran."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        running = serve.status().applications
    except RayServeException:  # Serve was never started on this cluster: nothing to stop
        return False
    if APP_NAME not in running:
        return False
    serve.delete(APP_NAME)
    if not set(running) - {APP_NAME}:
        serve.shutdown()
    return True
