"""A Starlette shop behind TieredCacheMiddleware, for the Varnish test, the HTTP
benchmark and trying it by hand.

``GET /products/{id}`` is cached (tag ``product:{id}``, keyed ``?lang``);
``GET /cart/{id}`` is not (a path no route names: the middleware makes no cache
call for it); ``PUT /products/{id}`` changes the product and, being an unsafe
method on the URL, drops its cached page. Products come from ``load_product``
(an async function: a dict by default, PostgreSQL in ``benchmarks/bench_http.py``).

Run it (uvicorn adds its own Date header, so the middleware's is turned off)::

    python -m examples.http_app            # http://127.0.0.1:8000/products/1
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tieredcache import MemoryLayer, TieredCache
from tieredcache.middleware import CacheRoutes, CdnConfig, TieredCacheMiddleware

ProductLoader = Callable[[int], Awaitable[dict[str, Any] | None]]

PRODUCTS: dict[int, dict[str, Any]] = {
    i: {"id": i, "name": f"Product {i}", "price": 10 * i} for i in range(1, 101)
}


async def dict_products(product_id: int) -> dict[str, Any] | None:
    return PRODUCTS.get(product_id)


def build_app(load_product: ProductLoader = dict_products) -> tuple[Starlette, CacheRoutes]:
    """The bare Starlette app and its cache routes (not yet wrapped)."""
    routes = CacheRoutes()

    @routes.cache("/products/{id:int}", ttl=300, tags=["product:{id}"], query=["lang"],
                  stale_while_revalidate=30)  # fmt: skip
    async def product(request: Request) -> Response:
        found = await load_product(request.path_params["id"])
        if found is None:
            return Response(b'{"error":"not found"}', 404, media_type="application/json")
        return Response(json.dumps(found).encode(), media_type="application/json")

    async def update(request: Request) -> Response:
        product_id = request.path_params["id"]
        PRODUCTS[product_id] = {**PRODUCTS.get(product_id, {"id": product_id}),
                                **json.loads(await request.body())}  # fmt: skip
        return Response(json.dumps(PRODUCTS[product_id]).encode(), media_type="application/json")

    async def cart(request: Request) -> Response:
        found = await load_product(request.path_params["id"])
        return Response(json.dumps({"items": [found]}).encode(), media_type="application/json")

    app = Starlette(
        routes=[
            Route("/products/{id:int}", product, methods=["GET"]),
            Route("/products/{id:int}", update, methods=["PUT"]),
            Route("/cart/{id:int}", cart),
        ]
    )
    return app, routes


def create_app(
    cache: TieredCache,
    *,
    load_product: ProductLoader = dict_products,
    cdn: CdnConfig | None = None,
    date: bool = False,
) -> TieredCacheMiddleware:
    """The shop wrapped in the middleware (``date=False``: the server adds Date)."""
    app, routes = build_app(load_product)
    return TieredCacheMiddleware(app, cache=cache, routes=routes, cdn=cdn, date=date)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(create_app(TieredCache("shop", [MemoryLayer()])), port=8000, date_header=False)
