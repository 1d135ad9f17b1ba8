"""The discovery and OpenAPI documents kubectl and the `kubernetes` client fetch before anything else.

They are fixed for the life of the server (the resources never change), so they are built once, as a
map from URL path to the JSON document served there."""

from __future__ import annotations

from netns_lab.apiserver.resources import GROUP_VERSIONS, RESOURCES

SERVER_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-netagent-lab",
    "platform": "linux/amd64",
}
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def resource_list(group_version: str) -> dict:
    """The APIResourceList of a group version: how kubectl learns names, kinds, short names and verbs."""
    resources = []
    for r in RESOURCES:
        if r.group_version != group_version:
            continue
        base = {"namespaced": r.namespaced, "kind": r.kind}
        resources.append(
            {
                "name": r.name,
                "singularName": r.kind.lower(),
                **base,
                "verbs": VERBS,
                "shortNames": list(r.short_names),
                "categories": ["all"] if r.in_all else [],
            }
        )
        if r.has_status:
            resources.append(
                {"name": f"{r.name}/status", "singularName": "", **base, "verbs": ["get", "patch", "update"]}
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }


def api_group(group_version: str) -> dict:
    """An APIGroup's versions: only one each here, so it is also the preferred one."""
    group, version = group_version.split("/")
    preferred = {"groupVersion": group_version, "version": version}
    return {"name": group, "versions": [preferred], "preferredVersion": preferred}


DISCOVERY: dict[str, dict] = {
    "/version": SERVER_VERSION,
    "/api": {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    },
    "/api/v1": resource_list("v1"),
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [api_group(gv) for gv in GROUP_VERSIONS]},
    **{f"/apis/{gv}": resource_list(gv) for gv in GROUP_VERSIONS},
    **{
        f"/apis/{gv.split('/')[0]}": {"kind": "APIGroup", "apiVersion": "v1", **api_group(gv)}
        for gv in GROUP_VERSIONS
    },
}


def openapi_paths(group_version: str) -> dict:
    """A minimal OpenAPI v3 document: no schemas, only that PATCH takes `fieldValidation`.

    That is what kubectl looks for before validating; finding it, it leaves validation to the server
    (which here accepts any fields) instead of demanding schemas we do not have."""
    group, _, version = group_version.rpartition("/")
    prefix = f"/apis/{group_version}" if group else "/api/v1"
    paths = {}
    for r in RESOURCES:
        if r.group_version == group_version:
            scope = "/namespaces/{namespace}" if r.namespaced else ""
            patch = {
                "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": r.kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}},
            }
            paths[f"{prefix}{scope}/{r.name}/{{name}}"] = {"patch": patch}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
        "paths": paths,
        "components": {"schemas": {}},
    }


OPENAPI_ROOTS = {("apis/" + gv if gv != "v1" else "api/v1"): gv for gv in ["v1", *GROUP_VERSIONS]}
DISCOVERY["/openapi/v3"] = {
    "paths": {root: {"serverRelativeURL": f"/openapi/v3/{root}"} for root in OPENAPI_ROOTS}
}
DISCOVERY.update({f"/openapi/v3/{root}": openapi_paths(gv) for root, gv in OPENAPI_ROOTS.items()})
