import pytest


@pytest.mark.timeout(180)
def test_ray_two_nodes_on_loopback(ray_cluster):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)

    @ray.remote(num_cpus=0.5)
    def where():
        return ray.get_runtime_context().get_node_id()

    a = ray.get(where.options(resources={"node_a": 0.1}).remote())
    b = ray.get(where.options(resources={"node_b": 0.1}).remote())
    assert a != b


def test_s3_roundtrip(s3_bucket):
    from pipeline import storage

    url = storage.join(s3_bucket, "x", "a.json")
    storage.write_json(url, {"a": 1})
    assert storage.read_json(url) == {"a": 1}
    assert storage.listdir(storage.join(s3_bucket, "x")) == [url]
