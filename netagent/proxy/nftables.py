"""nftables backend: one table (`ip netagent` / `ip6 netagent`), verdict maps for O(1) lookup.

  services           daddr . proto . port  vmap @service-ips        -> svc-x (cluster IP) / ext-x
                     local daddr: proto . port vmap @service-nodeports -> ext-x
  svc-x / ext-x      the port's policy (netagent.proxy.policy), as in iptables; one `dnat to numgen
                     random mod N offset B map @endpoints` picks an endpoint: every service's endpoints
                     are ELEMENTS of one data map (slot -> address . port), each service port owning a
                     block of slots from B on. An endpoint change that keeps the count is then an
                     element-only transaction: adding or changing ANY rule makes the kernel re-validate
                     everything reachable from the base chains (through @service-ips: every service
                     chain), ~100 ms at 10,000 services, while element changes to a data map cost ~20
                     ms. No per-service sets or maps: see balance.
  sep-x              only for ClientIP affinity: one per endpoint, remembers the client in a dynamic
                     timeout set (named by endpoint and timeout) and DNATs
  nat-postrouting    hairpin (source == endpoint, looked up in @hairpin) and marked packets masquerade
  reject-check       (filter hooks, new connections) destinations in @reject-ips / @reject-nodeports
                     are rejected: nothing DNATed them, so nothing serves them.
Every sync is one `nft -f` transaction: new objects and chains, element changes, rewritten chains
(flush + rules inside the transaction), then removals.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Sequence

from netagent.proxy.backend import SyncError
from netagent.proxy.chain_names import ChainNames
from netagent.proxy.inspection import ChainFacts, KernelView
from netagent.proxy.policy import Destination
from netagent.proxy.render_engine import Fragment
from netagent.proxy.rule_backend import MASQUERADE_MARK, RuleBackend
from netagent.proxy.ruleset import RuleSet, RuleSetDiff
from netagent.proxy.service import Endpoint, ServicePort, short_hash

TABLE = "netagent"
SERVICE_IPS, SERVICE_NODEPORTS = "service-ips", "service-nodeports"
REJECT_IPS, REJECT_NODEPORTS = "reject-ips", "reject-nodeports"
HAIRPIN = "hairpin"  # "endpoint ip . endpoint ip": a connection from an endpoint to itself
ENDPOINT_BUCKETS = 64  # per protocol; see _balance
ENDPOINT_MAPS = {  # name -> protocol; slot -> "endpoint ip . port"
    f"endpoints-{proto}-{i}": proto for proto in ("tcp", "udp", "sctp") for i in range(ENDPOINT_BUCKETS)
}
ELEMENT_CONTAINERS = (SERVICE_IPS, SERVICE_NODEPORTS, REJECT_IPS, REJECT_NODEPORTS, HAIRPIN, *ENDPOINT_MAPS)
MIN_SLOTS = 16  # a service port's first block of endpoint slots; it doubles when outgrown
NAMES = ChainNames("svc-", "ext-", "sep-", "mark-for-masquerade", "masq-off-cluster")
MARK_MASQ, MASQ_OFF_CLUSTER = NAMES.mark_masquerade, NAMES.masquerade_off_cluster
BASE_CHAINS = {  # name -> base chain spec
    "nat-prerouting": "type nat hook prerouting priority -100;",
    "nat-output": "type nat hook output priority -100;",
    "nat-postrouting": "type nat hook postrouting priority 100;",
    "filter-input": "type filter hook input priority 0;",
    "filter-forward": "type filter hook forward priority 0;",
    "filter-output": "type filter hook output priority 0;",
}


def endpoint_map(p: ServicePort) -> str:
    return f"endpoints-{p.protocol.lower()}-{zlib.crc32(p.uid.encode()) % ENDPOINT_BUCKETS}"


def affinity_set(p: ServicePort, e: Endpoint) -> str:
    return f"aff-{short_hash(f'{p.endpoint_uid(e)}/{p.policy.affinity_timeout}')}"


def _element_key(dest: Destination) -> str:
    """A destination as the service and reject maps key it."""
    proto = dest.protocol.lower()
    return f"{dest.ip} . {proto} . {dest.port}" if dest.ip else f"{proto} . {dest.port}"


class NftablesBackend(RuleBackend):
    kind = "nftables"
    names = NAMES

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._nf_family = "ip6" if self.family == 6 else "ip"
        self._addr_type = "ipv6_addr" if self.family == 6 else "ipv4_addr"
        self._table = f"{self._nf_family} {TABLE}"
        self._slots: dict[str, tuple[int, int]] = {}  # balancing chain -> (first slot, block size)
        self._next_slot = 0

    # -- rendering: the steps of RuleBackend.render_port --------------------------------------------
    def jump(self, chain: str) -> str:
        return f"jump {chain}"

    def cluster_path(self, p: ServicePort) -> list[str]:
        cluster, cidrs = self.names.cluster_chain(p), self.node.cidrs(self.family)
        from_pods = [f"{self._nf_family} saddr {{ {', '.join(cidrs)} }} goto {cluster}"] if cidrs else []
        return [*from_pods, f"fib saddr type local jump {MARK_MASQ}", f"fib saddr type local goto {cluster}"]

    def balance(
        self, fragment: Fragment, p: ServicePort, chain: str, endpoints: Sequence[Endpoint]
    ) -> list[str]:
        """The rules that pick one of `endpoints` uniformly. Without affinity: one rule, `numgen
        random mod N offset B` looked up in one of the shared @endpoints-k maps, whose slots B..B+N-1
        hold this port's endpoints (the fragment's elements), so only a change of N rewrites the rule.
        Neither an anonymous `numgen ... map {}` per service (the kernel allocates anonymous set names
        by scanning every set in the table: 10,000 of them take tens of seconds) nor a named map per
        service (10,000 maps add ~3 s of nft CPU to a cold sync and ~40 ms to every later one) nor a
        single map (the kernel checks each added element against every rule using the map: 100,000
        elements x 10,000 rules took 19 s); services are spread over 64 maps per protocol by a hash
        of their id. The maps are typed per protocol (`ip daddr . tcp dport`): with `th dport`, nft
        1.0.6 refuses any later transaction adding a `meta l4proto tcp` rule that uses one
        ("conflicting protocols specified: tcp vs. th").
        With affinity, rule i takes the connection with probability 1/(N-i) (like iptables'
        statistic chain) and goes to the endpoint's sep chain, which remembers the client."""
        if not endpoints:
            return []
        proto = p.protocol.lower()
        if not p.policy.affinity_timeout:
            first, name = self._slot_block(chain, len(endpoints)), endpoint_map(p)
            for i, e in enumerate(endpoints):
                fragment.elements[(name, str(first + i))] = f"{e.ip} . {e.port}"
            pick = f"numgen random mod {len(endpoints)} offset {first} map @{name}"
            return [f"meta l4proto {proto} dnat {self._nf_family} addr . port to {pick}"]
        seps = [self.names.endpoint_chain(p, e) for e in endpoints]
        rules = [
            f"{self._nf_family} saddr @{affinity_set(p, e)} goto {sep}"
            for e, sep in zip(endpoints, seps, strict=True)
        ]
        for i, sep in enumerate(seps):
            pick = f"numgen random mod {len(seps) - i} 0 " if i < len(seps) - 1 else ""
            rules.append(pick + f"goto {sep}")
        return rules

    def _slot_block(self, key: str, count: int) -> int:
        """The first slot of `key`'s block in @endpoints, big enough for `count` endpoints. A block is
        kept while it fits (so endpoint changes reuse the same slots) and replaced by a fresh one twice
        as big when outgrown; blocks are never shared, so no two service ports' slots overlap."""
        first, size = self._slots.get(key, (0, 0))
        if count > size:
            size = max(MIN_SLOTS, size * 2, 1 << (count - 1).bit_length())
            first, self._next_slot = self._next_slot, self._next_slot + size
            self._slots[key] = (first, size)
        return first

    def dispatch(self, fragment: Fragment, p: ServicePort, dest: Destination, chain: str) -> None:
        container = SERVICE_IPS if dest.ip else SERVICE_NODEPORTS
        fragment.elements[(container, _element_key(dest))] = f"goto {chain}"

    def reject(self, fragment: Fragment, p: ServicePort, dest: Destination) -> None:
        """Into the reject sets, whose reject-check rules refuse as p.policy.reject_with says: the
        sets hold every port, so the rules tell TCP (reset) from the rest (ICMP) by the protocol."""
        fragment.elements[(REJECT_IPS if dest.ip else REJECT_NODEPORTS, _element_key(dest))] = ""

    def endpoint_parts(self, fragment: Fragment, p: ServicePort) -> None:
        """Each endpoint's hairpin element; with ClientIP affinity also a chain that remembers which
        endpoint this client got, in a timeout set."""
        timeout = p.policy.affinity_timeout
        for e in p.policy.endpoints:
            fragment.elements[(HAIRPIN, f"{e.ip} . {e.ip}")] = ""
            if timeout:
                name = affinity_set(p, e)
                fragment.chains[self.names.endpoint_chain(p, e)] = (
                    f"update @{name} {{ {self._nf_family} saddr }}",
                    f"meta l4proto {p.protocol.lower()} dnat to {e.address}",
                )
                flags = f"flags dynamic,timeout; timeout {timeout}s;"
                fragment.objects[name] = f"set {name} {{ type {self._addr_type}; {flags} }}"

    def fixed_objects(self) -> dict[str, str]:
        key, ip = f"{self._addr_type} . inet_proto . inet_service", self._nf_family
        return {
            SERVICE_IPS: f"map {SERVICE_IPS} {{ type {key} : verdict; }}",
            SERVICE_NODEPORTS: f"map {SERVICE_NODEPORTS} {{ type inet_proto . inet_service : verdict; }}",
            REJECT_IPS: f"set {REJECT_IPS} {{ type {key}; }}",
            REJECT_NODEPORTS: f"set {REJECT_NODEPORTS} {{ type inet_proto . inet_service; }}",
            HAIRPIN: f"set {HAIRPIN} {{ type {self._addr_type} . {self._addr_type}; }}",
            **{
                name: f"map {name} {{ typeof numgen random mod 1 : {ip} daddr . {proto} dport; }}"
                for name, proto in ENDPOINT_MAPS.items()
            },
        }

    def fixed_chains(self, shared: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
        ip, mark = self._nf_family, f"{MASQUERADE_MARK:#x}"
        cidrs = self.node.cidrs(self.family)
        check_new = ("ct state new jump reject-check",)
        return {
            "nat-prerouting": ("jump services",),
            "nat-output": ("jump services",),
            "nat-postrouting": (
                f"{ip} saddr . {ip} daddr @{HAIRPIN} masquerade fully-random",
                f"meta mark & {mark} == 0 return",
                f"meta mark set meta mark ^ {mark}",
                "masquerade fully-random",
            ),
            "filter-input": check_new,
            "filter-forward": check_new,
            "filter-output": check_new,
            "services": (
                f"{ip} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}",
                f"fib daddr type local meta l4proto . th dport vmap @{SERVICE_NODEPORTS}",
            ),
            "reject-check": (  # TCP gets a reset: ICMP errors are rate limited per host
                f"{ip} daddr . meta l4proto . th dport @{REJECT_IPS} meta l4proto tcp reject with tcp reset",
                f"{ip} daddr . meta l4proto . th dport @{REJECT_IPS} reject",
                f"fib daddr type local meta l4proto . th dport @{REJECT_NODEPORTS} meta l4proto tcp "
                "reject with tcp reset",
                f"fib daddr type local meta l4proto . th dport @{REJECT_NODEPORTS} reject",
            ),
            MARK_MASQ: (f"meta mark set meta mark | {mark}",),
            MASQ_OFF_CLUSTER: (f"{ip} saddr != {{ {', '.join(cidrs)} }} jump {MARK_MASQ}",) if cidrs else (),
        }

    # -- kernel side ----------------------------------------------------------------------------
    def _listing(self) -> list[dict]:
        """The table as nft JSON objects; [] when the table does not exist yet."""
        argv = ["nft", "-j", "list", "table", self._nf_family, TABLE]
        try:
            return json.loads(self.run(argv))["nftables"]
        except SyncError as err:
            if "No such file or directory" in str(err):
                return []
            raise

    def read_kernel(self) -> RuleSet:
        chains: dict[str, None] = {}
        objects: dict[str, str] = {}
        elements: dict[tuple[str, str], str] = {}
        for item in self._listing():
            if "chain" in item:
                chains[item["chain"]["name"]] = None
            for kind in ("set", "map"):
                if kind in item:
                    obj = item[kind]
                    objects[obj["name"]] = kind
                    if obj["name"] in ELEMENT_CONTAINERS:
                        for elem in obj.get("elem", []):
                            key, value = elem if kind == "map" else (elem, "")
                            elements[(obj["name"], _key_text(key))] = _verdict_text(value)
        return RuleSet(chains=chains, objects=objects, elements=elements)

    def transaction(self, current: RuleSet, desired: RuleSet, changes: RuleSetDiff) -> str:
        t = self._table
        lines = [f"add table {t}"]
        for name in changes.objects.added:
            kind, declaration = desired.objects[name].split(" ", 1)
            lines.append(f"add {kind} {t} {declaration}")
        for name in changes.chains.added:
            spec = f" {{ {BASE_CHAINS[name]} }}" if name in BASE_CHAINS else ""
            lines.append(f"add chain {t} {name}{spec}")
        # Elements before chain flushes: with a `th dport` endpoint map, nft 1.0.6 failed to delete
        # elements after a flush in the same transaction; the order is kept as the safe one.
        for container, keys in _grouped((*changes.elements.removed, *changes.elements.changed)):
            lines.append(f"delete element {t} {container} {{ {', '.join(keys)} }}")
        for container, keys in _grouped((*changes.elements.added, *changes.elements.changed)):
            values = [
                f"{k} : {desired.elements[(container, k)]}" if desired.elements[(container, k)] else k
                for k in keys
            ]
            lines.append(f"add element {t} {container} {{ {', '.join(values)} }}")
        for name in changes.chains.changed:
            if name in BASE_CHAINS:
                lines.append(f"add chain {t} {name} {{ {BASE_CHAINS[name]} }}")
            lines.append(f"flush chain {t} {name}")
        rewritten = [
            name for name in (*changes.chains.added, *changes.chains.changed) if desired.chains[name]
        ]
        if rewritten:  # the block form parses much faster than one `add rule` line per rule
            lines.append(f"table {t} {{")
            for name in rewritten:
                lines += [f"chain {name} {{", *(desired.chains[name] or ()), "}"]
            lines.append("}")
        lines += [f"flush chain {t} {name}" for name in changes.chains.removed]
        lines += [f"delete chain {t} {name}" for name in changes.chains.removed]
        lines += [f"delete {current.objects[name].split()[0]} {t} {name}" for name in changes.objects.removed]
        return "\n".join(lines) + "\n"

    def commit(self, transaction: str) -> None:
        self.run(["nft", "-f", "-"], stdin=transaction)

    def kernel_view(self) -> KernelView:
        entries: dict[str, str] = {}
        chains: dict[str, ChainFacts] = {}
        rules: dict[str, list[dict]] = {}
        slots: dict[tuple[str, int], str] = {}  # (endpoint map, slot) -> address
        for item in self._listing():
            if "map" in item and item["map"]["name"] in ENDPOINT_MAPS:
                for key, value in item["map"].get("elem", []):
                    slots[(item["map"]["name"], key)] = _address(
                        {"addr": value["concat"][0], "port": value["concat"][1]}
                    )
            elif "map" in item and item["map"]["name"] in (SERVICE_IPS, SERVICE_NODEPORTS):
                for key, value in item["map"].get("elem", []):
                    parts = key["concat"]
                    dest = (
                        Destination(parts[1].upper(), int(parts[2]), parts[0])
                        if len(parts) == 3
                        else Destination(parts[0].upper(), int(parts[1]))
                    )
                    entries[str(dest)] = next(iter(value.values()))["target"]
            elif "chain" in item:
                rules.setdefault(item["chain"]["name"], [])
            elif "rule" in item:
                rules.setdefault(item["rule"]["chain"], []).append(item["rule"])
        for name, chain_rules in rules.items():
            found = list(_walk(chain_rules))
            chains[name] = ChainFacts(
                jumps=tuple(v["target"] for k, v in found if k in ("jump", "goto")),
                dnat_to=tuple(
                    address for k, v in found if k == "dnat" for address in _dnat_addresses(v, slots)
                ),
            )
        return KernelView(entries=entries, chains=chains)

    def cleanup(self) -> None:
        if self._listing():
            self.run(["nft", "delete", "table", self._nf_family, TABLE])
        self._applied = None


def _grouped(keys: Sequence[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    by_container: dict[str, list[str]] = {}
    for container, key in keys:
        by_container.setdefault(container, []).append(key)
    yield from sorted(by_container.items())


def _key_text(key: object) -> str:
    """nft JSON element key -> the text form render() uses ("10.0.0.1 . tcp . 80")."""
    if isinstance(key, dict) and "concat" in key:
        return " . ".join(str(part) for part in key["concat"])
    return str(key)


def _verdict_text(value: object) -> str:
    """A map element's value as render() writes it: a verdict, an "address . port" concat, or ""."""
    if isinstance(value, dict) and "concat" in value:
        return " . ".join(str(part) for part in value["concat"])
    if isinstance(value, dict):
        verdict, arg = next(iter(value.items()))
        return f"{verdict} {arg['target']}" if isinstance(arg, dict) else verdict
    return ""


def _walk(node: object) -> Iterator[tuple[str, dict]]:
    """Every jump/goto/dnat statement anywhere in nft JSON (including inside verdict maps)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("jump", "goto", "dnat") and isinstance(value, dict):
                yield key, value
            else:
                yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _dnat_addresses(dnat: dict, slots: dict[tuple[str, int], str]) -> list[str]:
    """Where a dnat statement can send a connection: its address, or the slots of its endpoint map
    that its `numgen random mod N offset B` can pick."""
    addr = dnat.get("addr")
    if isinstance(addr, dict) and "map" in addr:
        name = str(addr["map"].get("data", "")).removeprefix("@")
        numgen = addr["map"].get("key", {}).get("numgen", {})
        first = numgen.get("offset", 0)
        picks = range(first, first + numgen.get("mod", 0))
        return [slots[(name, k)] for k in picks if (name, k) in slots]
    return [_address(dnat)]


def _address(dnat: dict) -> str:
    addr = str(dnat.get("addr", ""))
    host = f"[{addr}]" if ":" in addr else addr
    return f"{host}:{dnat['port']}" if "port" in dnat else host
