"""Corrects the mistakes in SAP's Destination Service OpenAPI document that no server can satisfy.

SAP's `api_spec.yaml` (shipped in the PyPI package `sap-cloud-sdk`, under
`sap_cloud_sdk/destination/spec/`) is the contract schemathesis checks Ferry against. A few of its
statements contradict themselves; each correction below says which, and changes only that. Every
other part of the document is used as SAP wrote it. docs/destination-api.md lists these errata.

usage: python errata.py [--ferry] <sap api_spec.yaml> <corrected output .yaml>

With --ferry the output is Ferry's own document, served at
`/destination-configuration/openapi.yaml`: the corrected document plus the label endpoints
Ferry also serves, and a note saying where it comes from.
"""

import sys

import yaml


def operations(spec):
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if isinstance(op, dict) and "responses" in op:
                yield path, method, op


def walk(node, fn):
    if isinstance(node, dict):
        fn(node)
        for v in node.values():
            walk(v, fn)
    elif isinstance(node, list):
        for v in node:
            walk(v, fn)


def error_response(description):
    return {"description": description, "content": {"*/*": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def add_ferry_parts(spec):
    """Ferry's additions: where the document comes from, and the label endpoints (SPEC §1.9)."""
    spec["info"]["title"] = "Ferry Destination Service"
    spec["info"]["description"] = (
        "SAP's Destination Service API as Ferry serves it. Derived from SAP's OpenAPI document "
        "(PyPI package sap-cloud-sdk, sap_cloud_sdk/destination/spec/api_spec.yaml, Apache-2.0, "
        "Copyright SAP SE or an SAP affiliate company) with the errata listed in Ferry's "
        "docs/destination-api.md, plus the label endpoints.\n\n" + spec["info"].get("description", "")
    )
    spec["servers"] = [{"url": "/destination-configuration", "description": "this Ferry"}]
    schemas = spec["components"]["schemas"]
    schemas["Label"] = {
        "type": "object",
        "required": ["key"],
        "properties": {
            "key": {"type": "string", "maxLength": 256},
            "values": {"type": "array", "maxItems": 10, "items": {"type": "string", "maxLength": 256}},
        },
    }
    schemas["Labels"] = {"type": "array", "maxItems": 10, "items": {"$ref": "#/components/schemas/Label"}}
    schemas["LabelPatch"] = {
        "type": "object",
        "required": ["action", "labels"],
        "properties": {
            "action": {"type": "string", "enum": ["ADD", "DELETE"]},
            "labels": {"$ref": "#/components/schemas/Labels"},
        },
    }
    labels = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Labels"}}}}
    errors = {
        "400": error_response("The labels break a rule (count, length, action); the text says which"),
        "401": error_response("Unauthorized"),
        "404": error_response("No object with that name"),
    }
    for level in ("subaccount", "instance"):
        for noun, param in (
            ("Destinations", "destination name"),
            ("DestinationFragments", "fragment name"),
            ("Certificates", "certificate name"),
        ):
            name = {"name": param, "in": "path", "required": True, "schema": {"type": "string"}}
            tag = [f"Labels of {noun[0].lower() + noun[1:]}"]
            spec["paths"][f"/v1/{level}{noun}/{{{param}}}/labels"] = {
                "get": {
                    "tags": tag,
                    "summary": "Read the labels of the object",
                    "parameters": [name],
                    "responses": {"200": {"description": "The labels", **labels}, **errors},
                },
                "put": {
                    "tags": tag,
                    "summary": "Replace the labels of the object",
                    "parameters": [name],
                    "requestBody": {"required": True, **labels},
                    "responses": {"200": {"description": "The labels now", **labels}, **errors},
                },
                "patch": {
                    "tags": tag,
                    "summary": "Add or remove labels (values) of the object",
                    "parameters": [name],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/LabelPatch"}}},
                    },
                    "responses": {"200": {"description": "The labels now", **labels}, **errors},
                },
            }


def main(src, dst, ferry=False):
    with open(src, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    fixed = []

    # 1. `BulkDelete` is declared `type: string` but has object properties (`Count`, `Summary`) and
    #    an object example; the bulk DELETE answer is that object.
    bulk = spec["components"]["schemas"]["BulkDelete"]
    if bulk.get("type") == "string":
        bulk["type"] = "object"
        fixed.append("BulkDelete: type string -> object")

    # 2. Lists are `oneOf: [Destination, NameOnly]` (and the same for fragments, certificates and the
    #    bulk answers). Any full object also matches the name-only schema, so by `oneOf` rules no
    #    valid answer can exist; `anyOf` is what is meant.
    def one_of_to_any_of(node):
        if "oneOf" in node and len(node["oneOf"]) > 1:
            node["anyOf"] = node.pop("oneOf")
            fixed.append("oneOf -> anyOf")

    for _, _, op in operations(spec):
        walk(op["responses"], one_of_to_any_of)

    # 3. Find and consume declare a header parameter literally named `X-chain-var-<variable-name>`:
    #    a template for a family of headers, and not a valid header name (`<`, `>`), so requests
    #    built from it are refused by any HTTP/1.1 parser before they reach the service.
    for path, method, op in operations(spec):
        params = op.get("parameters", [])
        kept = [p for p in params if not (p.get("in") == "header" and "<" in p.get("name", ""))]
        if len(kept) != len(params):
            op["parameters"] = kept
            fixed.append(f"{method.upper()} {path}: template header parameter removed")

    # 4. `Owner.InstanceId` is a plain string, yet a subaccount-level destination has no instance:
    #    the service answers `"InstanceId": null`, and the SAP Cloud SDK for JavaScript depends on
    #    the key being present (CLIENT-CONTRACT §3.2).
    owner = spec["components"]["schemas"]["Owner"]["properties"]["InstanceId"]
    if not owner.get("nullable"):
        owner["nullable"] = True
        fixed.append("Owner.InstanceId: nullable")

    if ferry:
        add_ferry_parts(spec)
    with open(dst, "w", encoding="utf-8") as f:
        yaml.safe_dump(spec, f, sort_keys=False, allow_unicode=True, width=120)
    for line in fixed:
        print(f"errata: {line}", file=sys.stderr)


if __name__ == "__main__":
    args = sys.argv[1:]
    ferry = args[:1] == ["--ferry"]
    if ferry:
        args = args[1:]
    if len(args) != 2:
        sys.exit(__doc__)
    main(args[0], args[1], ferry)
