"""The README's ten-line example, runnable as it stands (in-process layer only).

python -m examples.quickstart
"""

from tieredcache import MemoryLayer, TieredCache, tenant_scope

cache = TieredCache(namespace="shop", layers=[MemoryLayer(maxsize=10_000)])


@cache.cached(ttl=60, tags=lambda product_id: [f"product:{product_id}"])
def get_product(product_id: int) -> dict[str, object]:
    print(f"  (loading product {product_id} from the database)")
    return {"id": product_id, "name": f"Product {product_id}"}


if __name__ == "__main__":
    with tenant_scope("acme"):
        print(get_product(42))  # miss: loads
        print(get_product(42))  # hit: in-process
        cache.invalidate(tags=["product:42"])
        print(get_product(42))  # loads again
    print(f"hit rate: {cache.stats().layers['memory'].hit_rate:.0%}")
