"""The chunk REST API: the fields of `kvchunks info --json`, over the API of one context.

Chunk routes read and change chunks (in the `default` context unless `?context=` names
another, which decides `is_active`); context routes change one context's active set.
Every call runs on a worker thread: the API is synchronous.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from kvchunks import provenance_tree
from kvchunks.common import InvalidInput
from kvchunks.server.schemas import (
    Body,
    ChunkSelection,
    Compose,
    Move,
    NewChunk,
    Order,
    Settings,
    Split,
    Tags,
)
from kvchunks.vocabulary import check_tag


def _known_query(request: Request) -> None:
    """A query parameter the route does not take is refused, as an unknown body field is:
    ignored, `?tags=x` would list every chunk, and a script might then delete them all."""
    route = request.scope["route"]
    known = sorted(p.alias for p in route.dependant.query_params)
    unknown = sorted(set(request.query_params) - set(known))
    if unknown:
        takes = ", ".join(known) or "none"
        raise InvalidInput(f"unknown query parameter '{unknown[0]}'; this route takes: {takes}")


router = APIRouter(dependencies=[Depends(_known_query)])


def _api(request: Request, context: str = "default"):
    return request.app.state.backend.manager(context)


@router.post("/v1/chunks", status_code=201)
def add_chunk(body: NewChunk, request: Request, context: str = "default") -> dict:
    metadata = {"source": body.source} if body.source else None
    return _api(request, context).add_chunk(body.text, body.role, body.tags, metadata).to_json()


@router.get("/v1/chunks")
def list_chunks(
    request: Request, pattern: str | None = None, tag: str | None = None, context: str = "default"
) -> dict:
    """The chunks, each with its `type` (document, prompt, answer, composed, split) and the
    chunk it `follows` in the provenance tree among those listed (as `kvchunks tree` draws
    it), so that the web page draws the same tree."""
    chunks = _api(request, context).list_chunks(pattern, tag)
    follows = {n.chunk.hash: n.follows for n in provenance_tree(chunks).nodes()}
    data = [{**c.to_json(), "follows": follows.get(c.hash)} for c in chunks]
    return {"object": "list", "data": data}


@router.post("/v1/chunks/compose", status_code=201)
def compose(body: Compose, request: Request, context: str = "default") -> dict:
    return _api(request, context).compose_chunks(body.chunks, body.tags).to_json()


@router.get("/v1/chunks/{ref}")
def get_chunk(ref: str, request: Request, context: str = "default") -> dict:
    return _api(request, context).get_chunk(ref).to_json(tokens=True)


@router.delete("/v1/chunks/{ref}")
def delete_chunk(ref: str, request: Request, cascade: bool = False) -> dict:
    return {"deleted": _api(request).delete_chunk(ref, cascade)}


@router.post("/v1/chunks/{ref}/tags")
def tag_chunk(ref: str, body: Tags, request: Request, context: str = "default") -> dict:
    api = _api(request, context)
    for tag in [*body.add, *body.remove]:  # all checked before anything changes
        check_tag(tag)
    chunk = api.get_chunk(ref)
    for tag in body.add:
        chunk = api.tag_chunk(chunk.hash, tag)
    for tag in body.remove:
        chunk = api.untag_chunk(chunk.hash, tag)
    return chunk.to_json()


@router.post("/v1/chunks/{ref}/move")
def move_chunk(ref: str, body: Move, request: Request, context: str = "default") -> dict:
    return _api(request, context).move_chunks([ref], body.tier)[0].to_json()


@router.get("/v1/chunks/{ref}/provenance")
def provenance(ref: str, request: Request, context: str = "default") -> dict:
    """The chunk, what it was computed after (in order), the chunks computed after it, and
    those with its text computed after other chunks."""
    api = _api(request, context)
    chunk = api.get_chunk(ref)
    parents, children = api.provenance(chunk.hash)
    return {
        "chunk": chunk.to_json(),
        "parents": [p.to_json() for p in parents],
        "children": [c.to_json() for c in children],
        "same_text": [c.to_json() for c in api.same_text(chunk.hash)],
    }


@router.post("/v1/chunks/{ref}/split", status_code=201)
def split(ref: str, body: Split, request: Request, context: str = "default") -> dict:
    head, tail = _api(request, context).split_chunk(ref, body.at)
    return {"object": "list", "data": [head.to_json(), tail.to_json()]}


@router.get("/v1/contexts")
def list_contexts(request: Request) -> dict:
    return {"object": "list", "data": request.app.state.backend.contexts()}


@router.get("/v1/usage")
def usage(request: Request) -> dict:
    """The KV pool's blocks, host memory and disk in use (and their budgets), the counters."""
    return request.app.state.backend.usage()


@router.get("/v1/contexts/{name}")
def get_context(name: str, request: Request) -> dict:
    return _api(request, name).context().to_json()


@router.post("/v1/contexts/{name}/settings")
def configure(name: str, body: Settings, request: Request) -> dict:
    api = _api(request, name)
    api.configure(**body.model_dump(exclude_unset=True))
    return api.context().to_json()


@router.post("/v1/contexts/{name}/activate")
def activate(name: str, body: ChunkSelection, request: Request) -> dict:
    api = _api(request, name)
    if body.chunks is None:
        return api.activate_chunk(body.chunk).to_json()
    return _listed(api.activate_chunks(body.chunks))


@router.post("/v1/contexts/{name}/deactivate")
def deactivate(name: str, body: ChunkSelection, request: Request) -> dict:
    api = _api(request, name)
    if body.chunks is None:
        return api.deactivate_chunk(body.chunk).to_json()
    return _listed(api.deactivate_chunks(body.chunks))


def _listed(chunks: list) -> dict:
    return {"object": "list", "data": [c.to_json() for c in chunks]}


@router.post("/v1/contexts/{name}/order")
def reorder(name: str, body: Order, request: Request) -> dict:
    return _api(request, name).reorder_chunks(body.chunks).to_json()


@router.delete("/v1/contexts/{name}", status_code=204)
def delete_context(name: str, request: Request) -> Response:
    _api(request, name).delete_context()
    request.app.state.backend.let_go(name)
    return Response(status_code=204)


@router.post("/v1/contexts/{name}/clear")
def clear(name: str, request: Request, body: Body | None = None) -> Response:
    _api(request, name).clear()
    return Response(status_code=204)
