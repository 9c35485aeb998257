"""Fixtures for train/: an S3 endpoint (moto in server mode on 127.0.0.1), and a sweep trained in
one process that the multi-process runs must equal."""

import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback; the environment points boto/s3fs at it."""
    moto_server = pytest.importorskip("moto.server")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request):
    """A fresh bucket; returns its s3:// URL."""
    import s3fs

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
    }.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    name = f"bucket-{request.node.name.lower().replace('_', '-')[:40]}".strip("-")
    s3fs.S3FileSystem(endpoint_url=s3_server).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def one_process(tmp_path_factory):
    """tests/train/runs.py's sweep: its settings and its run in one process."""
    from tests.train.runs import SWEEP, common, launch

    tmp_path = tmp_path_factory.mktemp("one_process")
    args = common(tmp_path, SWEEP)
    launch(tmp_path / "one", 1, *args)
    return args, tmp_path / "one"
