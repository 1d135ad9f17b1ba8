"""Shared fixtures: every test works in network namespaces it creates, named with a unique
prefix, and removes them even when it fails. The host's root namespace is never touched."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator

import pytest

from nodekit import netns

TEST_PREFIX = "nt"  # every test netns starts with this; a leftover one fails the session
# prefixes handed out in THIS session: other sessions may run concurrently on the same machine,
# and their namespaces must not be taken for our leftovers
_SESSION_PREFIXES: set[str] = set()


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("netagent tests create network namespaces: run them as root")


@pytest.fixture
def prefix() -> str:
    """A short unique name prefix for this test (interface names are limited to 15 chars)."""
    name = f"{TEST_PREFIX}{secrets.token_hex(3)}"
    _SESSION_PREFIXES.add(name)
    return name


@pytest.fixture
def make_netns(prefix: str) -> Iterator[Callable[[str], str]]:
    """make_netns('node') creates netns '<prefix>-node' and returns its name; all removed after."""
    created: list[str] = []

    def make(suffix: str) -> str:
        name = f"{prefix}-{suffix}"
        netns.create(name)
        created.append(name)
        return name

    yield make
    for name in reversed(created):
        netns.delete(name)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is not None:  # only the controlling process, after every worker finished
        return
    leftovers = [name for name in netns.names(TEST_PREFIX) if name.startswith(tuple(_SESSION_PREFIXES))]
    if leftovers:
        for name in leftovers:
            netns.delete(name)
        print(f"\nLEFTOVER NETNS (a test did not clean up): {leftovers}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def api_server(tmp_path) -> Iterator:
    """The lab's API server stand-in in this process, with a short watch history (5 events) so that
    410 Gone is easy to provoke."""
    from netns_lab.apiserver.server import LabApiServer

    server = LabApiServer(str(tmp_path / "api.json"), history_size=5).start()
    yield server
    server.stop()


@pytest.fixture
def core(api_server, tmp_path):
    """The official client's CoreV1Api for api_server, through a kubeconfig as an agent has it."""
    from kubernetes import client
    from netns_lab.apiserver.server import write_kubeconfig

    from netagent.kube import load_api_client

    kubeconfig = str(tmp_path / "kubeconfig")
    write_kubeconfig(kubeconfig, api_server.url, api_server.credentials)
    return client.CoreV1Api(load_api_client(kubeconfig))
