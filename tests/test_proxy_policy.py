"""The traffic policy of a service port (netagent.proxy.policy), as a specification: what happens to
each kind of connection, whatever backend translates it. Pure functions, no kernel needed."""

from __future__ import annotations

from netagent.proxy.policy import Destination, HealthCheck, Masquerade, RejectWith
from netagent.proxy.service import ServicePort
from netagent.proxy.snapshot_builder import build_snapshot

NODE = "node-a"
VIP, EXTERNAL_IP, LB_IP = "10.96.0.10", "192.168.60.5", "192.168.70.5"
LOCAL, REMOTE, LEAVING = "10.244.0.10", "10.244.1.10", "10.244.0.11"


def port_of(protocol: str = "TCP", endpoints: tuple[dict, ...] = (), **spec: object) -> ServicePort:
    """The one ServicePort of Service default/web with these spec fields and endpoints."""
    ports = [{"name": "http", "port": 80, "protocol": protocol, "nodePort": 30080}]
    service = {"metadata": {"namespace": "default", "name": "web"},
               "spec": {"clusterIP": VIP, "ports": ports, **spec}}
    if spec.get("type") == "LoadBalancer":
        service["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    endpoint_slice = {
        "metadata": {"namespace": "default", "name": "web-a",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": protocol}],
        "endpoints": list(endpoints),
    }
    (port,) = build_snapshot([service], [endpoint_slice], NODE).ports
    return port


def endpoint(ip: str, node: str = NODE, ready: bool = True, terminating: bool = False) -> dict:
    return {"addresses": [ip], "nodeName": node,
            "conditions": {"ready": ready, "serving": True, "terminating": terminating}}


def ips(endpoints) -> set[str]:
    return {e.ip for e in endpoints}


NODE_PORT_LOCAL = {"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}


# -- cluster traffic ------------------------------------------------------------------------------
def test_cluster_traffic_is_balanced_over_every_usable_endpoint_and_masqueraded_only_from_outside() -> None:
    plan = port_of(endpoints=(endpoint(LOCAL), endpoint(REMOTE, node="node-b"))).policy
    assert plan.cluster.destinations == (Destination("TCP", 80, VIP),)
    assert ips(plan.cluster.endpoints) == {LOCAL, REMOTE}
    assert plan.cluster.masquerade is Masquerade.OFF_CLUSTER
    assert plan.cluster.dnat and not plan.cluster.rejected


def test_a_port_without_endpoints_is_rejected_tcp_with_a_reset_the_rest_with_icmp() -> None:
    tcp, udp = port_of().policy, port_of("UDP").policy
    assert tcp.cluster.rejected and not tcp.cluster.dnat
    assert (tcp.reject_with, udp.reject_with) == (RejectWith.TCP_RESET, RejectWith.ICMP_PORT_UNREACHABLE)


def test_internal_traffic_policy_local_balances_cluster_traffic_over_local_endpoints_only() -> None:
    plan = port_of(
        endpoints=(endpoint(LOCAL), endpoint(REMOTE, node="node-b")), type="NodePort",
        internalTrafficPolicy="Local",
    ).policy
    assert ips(plan.cluster.endpoints) == {LOCAL}
    assert plan.external and ips(plan.external.endpoints) == {LOCAL, REMOTE}  # eTP Cluster: everyone


def test_ready_endpoints_win_and_terminating_ones_serve_only_when_none_is_ready() -> None:
    both = port_of(endpoints=(endpoint(LOCAL), endpoint(LEAVING, ready=False, terminating=True))).policy
    assert ips(both.cluster.endpoints) == {LOCAL}
    leaving_only = port_of(endpoints=(endpoint(LEAVING, ready=False, terminating=True),)).policy
    assert ips(leaving_only.cluster.endpoints) == {LEAVING}


# -- external traffic -----------------------------------------------------------------------------
def test_a_cluster_ip_service_has_no_external_traffic() -> None:
    plan = port_of(endpoints=(endpoint(LOCAL),)).policy
    assert plan.external is None and plan.traffic == (plan.cluster,)


def test_external_destinations_are_the_external_ips_load_balancer_ips_and_node_port() -> None:
    plan = port_of(endpoints=(endpoint(LOCAL),), type="LoadBalancer", externalIPs=[EXTERNAL_IP]).policy
    assert plan.external and plan.external.destinations == (
        Destination("TCP", 80, EXTERNAL_IP),
        Destination("TCP", 80, LB_IP),
        Destination("TCP", 30080),
    )
    assert [str(d) for d in plan.external.destinations] == [
        f"TCP {EXTERNAL_IP}:80", f"TCP {LB_IP}:80", "TCP nodeport 30080",
    ]


def test_external_traffic_policy_cluster_balances_over_every_endpoint_and_always_masquerades() -> None:
    plan = port_of(endpoints=(endpoint(LOCAL), endpoint(REMOTE, node="node-b")), type="NodePort").policy
    assert plan.external and ips(plan.external.endpoints) == {LOCAL, REMOTE}
    assert plan.external.masquerade is Masquerade.ALWAYS
    assert not plan.external.inside_takes_cluster_path
    assert plan.health_check is None


def test_external_traffic_policy_local_keeps_the_client_ip_and_only_local_endpoints() -> None:
    plan = port_of(endpoints=(endpoint(LOCAL), endpoint(REMOTE, node="node-b")), **NODE_PORT_LOCAL).policy
    assert plan.external and ips(plan.external.endpoints) == {LOCAL}
    assert plan.external.masquerade is Masquerade.NEVER


def test_under_external_traffic_policy_local_pods_and_the_node_take_the_cluster_path() -> None:
    plan = port_of(endpoints=(endpoint(LOCAL), endpoint(REMOTE, node="node-b")), **NODE_PORT_LOCAL).policy
    assert plan.external and plan.external.inside_takes_cluster_path
    assert ips(plan.reachable(plan.external)) == {LOCAL, REMOTE}  # from some source, every endpoint


def test_without_local_endpoints_outside_clients_are_rejected_but_pods_still_get_through() -> None:
    plan = port_of(endpoints=(endpoint(REMOTE, node="node-b"),), **NODE_PORT_LOCAL).policy
    assert plan.external and plan.external.rejected  # outside clients: refused
    assert plan.external.dnat and plan.external.inside_takes_cluster_path  # pods, node: the cluster path
    assert ips(plan.reachable(plan.external)) == {REMOTE}


def test_without_any_endpoint_external_traffic_is_rejected_for_everyone() -> None:
    plan = port_of(**NODE_PORT_LOCAL).policy
    assert plan.external and plan.external.rejected
    assert not plan.external.dnat and not plan.external.inside_takes_cluster_path


# -- per endpoint, affinity, health ----------------------------------------------------------------
def test_every_reachable_endpoint_is_hairpin_masqueraded_once() -> None:
    plan = port_of(
        endpoints=(endpoint(LOCAL), endpoint(REMOTE, node="node-b")), internalTrafficPolicy="Local",
        type="NodePort",
    ).policy
    assert [e.ip for e in plan.endpoints] == [LOCAL, REMOTE]  # cluster's and external's, each once


def test_client_ip_affinity_keeps_its_timeout() -> None:
    affinity = {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}
    assert port_of(**affinity).policy.affinity_timeout == 60
    assert port_of(sessionAffinity="ClientIP").policy.affinity_timeout == 10800  # the Kubernetes default
    assert port_of().policy.affinity_timeout == 0


def test_the_health_check_counts_ready_local_endpoints() -> None:
    local_two = (endpoint(LOCAL), endpoint("10.244.0.12"), endpoint(REMOTE, node="node-b"))
    plan = port_of(endpoints=local_two, **NODE_PORT_LOCAL).policy
    assert plan.health_check == HealthCheck(node_port=32000, local_ready=2)


def test_local_endpoints_that_are_all_terminating_serve_but_the_health_check_says_none_is_ready() -> None:
    plan = port_of(
        endpoints=(endpoint(LEAVING, ready=False, terminating=True), endpoint(REMOTE, node="node-b")),
        **NODE_PORT_LOCAL,
    ).policy
    assert plan.external and ips(plan.external.endpoints) == {LEAVING}  # the fallback drains them
    assert plan.health_check == HealthCheck(node_port=32000, local_ready=0)  # 503: send no more


def test_the_policy_is_computed_once_per_service_port() -> None:
    port = port_of(endpoints=(endpoint(LOCAL),))
    assert port.policy is port.policy
