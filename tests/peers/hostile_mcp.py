"""A misbehaving MCP server over stdio, in raw JSON-RPC.

Usage: hostile_mcp.py MODE [ARG]. Every mode answers `initialize` (except
`never-init`) and offers the tools `echo` and the mode's own.

Modes:
  never-init         reads requests and never answers any
  silent-list        never answers tools/list
  endless-pages      every tools/list page has one tool and a new nextCursor
  exponential-refs   a small tools/list whose $refs expand exponentially
  bad-tools          tools without a usable inputSchema; a result with an unknown block type
  many-tools N       offers N tools
  env FILE           writes its environment (JSON) to FILE and dumps it on stderr
  bad-stderr         floods stderr with invalid UTF-8 before answering each call
  huge-result MB     the tool `big` answers with MB megabytes of text
  flood              sends 5,000 tools/list_changed notifications after initialize
  counted FILE       a well-behaved server that appends "start PID" and "end PID" to FILE
  hang FILE          the tool `hang` never answers; appends "called ID" for each call and
                     "cancelled ID" for each notifications/cancelled to FILE
  modern FILE        speaks only the stateless revision 2026-07-28: answers server/discover
                     (with instructions), refuses initialize, appends "METHOD VERSION" per
                     request to FILE; its tool `ask` first answers input_required with only a
                     request state, and `confirm` asks a form question (input_required)
  deaf-discover FILE a server of the handshake era that never answers server/discover (as
                     servers that drop unknown methods do); appends "METHOD -" per request
  asking             a server of the handshake era whose tools ask the person during the call
                     with elicitation/create requests and answer with what came back:
                     `book` (a form), `signin` (a URL to open), `secret` (a form asking for a
                     token, which must be refused)
"""

import json
import os
import sys

MODE = sys.argv[1]
ARG = sys.argv[2] if len(sys.argv) > 2 else None
out = sys.stdout.buffer


def send(message):
    out.write(json.dumps(message).encode() + b"\n")
    out.flush()


def answer(request, result):
    send({"jsonrpc": "2.0", "id": request["id"], "result": result})


def tool(name, schema=None):
    entry = {"name": name, "description": f"the {name} tool"}
    if schema is not None:
        entry["inputSchema"] = schema
    return entry


OBJECT = {"type": "object", "properties": {"text": {"type": "string"}}}


def exponential(levels):
    defs = {"D0": {"type": "string"}}
    for i in range(1, levels):
        ref = {"$ref": f"#/$defs/D{i - 1}"}
        defs[f"D{i}"] = {"type": "object", "properties": {k: ref for k in "abcd"}}
    return {
        "type": "object",
        "properties": {"x": {"$ref": f"#/$defs/D{levels - 1}"}},
        "$defs": defs,
    }


def tools_page(request):
    if MODE == "silent-list":
        return None
    if MODE == "endless-pages":
        cursor = int(((request.get("params") or {}).get("cursor")) or 0)
        return {"tools": [tool(f"t{cursor}", OBJECT)], "nextCursor": str(cursor + 1)}
    tools = [tool("echo", OBJECT)]
    if MODE == "exponential-refs":
        tools.append(tool("deep", exponential(12)))
    if MODE == "bad-tools":
        tools += [tool("no_schema"), tool("string_schema", "object"), {"description": "nameless"}]
        tools.append(tool("mixed", {"type": "object"}))
    if MODE == "many-tools":
        tools += [tool(f"tool_{i}", OBJECT) for i in range(int(ARG))]
    if MODE == "huge-result":
        tools.append(tool("big", {"type": "object"}))
    if MODE == "env":
        tools.append(tool("env", {"type": "object"}))
    if MODE == "hang":
        tools.append(tool("hang", {"type": "object"}))
    if MODE == "asking":
        tools += [tool(name, {"type": "object"}) for name in ("book", "signin", "secret")]
    if MODE == "modern":
        tools += [tool("ask", {"type": "object"}), tool("confirm", {"type": "object"})]
        return {"resultType": "complete", "tools": tools, "ttlMs": 0, "cacheScope": "private"}
    return {"tools": tools}


def call(request):
    params = request.get("params") or {}
    name = params.get("name")
    arguments = params.get("arguments") or {}
    if MODE == "bad-stderr":
        # Far more than a pipe holds, with bytes that are not UTF-8.
        for _ in range(2000):
            sys.stderr.buffer.write(b"\xff\xfe broken \xc3\x28 line\n")
        sys.stderr.buffer.flush()
    if name == "big":
        size = int(float(ARG) * 1024 * 1024)
        return {"content": [{"type": "text", "text": "x" * size}]}
    if name == "mixed":
        return {
            "content": [
                {"type": "text", "text": "before"},
                {"type": "hologram", "data": "???"},
                {"type": "text", "text": "after"},
            ]
        }
    if name == "env":
        return {"content": [{"type": "text", "text": json.dumps(dict(os.environ))}]}
    if name == "ask" and params.get("requestState") != "half-done":
        return {"resultType": "input_required", "requestState": "half-done"}
    if name == "ask":
        return {"resultType": "complete", "content": [{"type": "text", "text": "asked twice"}]}
    if name == "confirm" and not params.get("inputResponses"):
        form = {"method": "elicitation/create", "params": {
            "mode": "form", "message": "Really?",
            "requestedSchema": {"type": "object", "properties": {"ok": {"type": "boolean"}}}}}
        return {"resultType": "input_required", "inputRequests": {"sure": form},
                "requestState": "confirming"}
    if name == "confirm":
        response = params["inputResponses"]["sure"]
        said = json.dumps(response.get("content"), sort_keys=True)
        return {"resultType": "complete",
                "content": [{"type": "text", "text": f"answer: {response['action']} {said}"}]}
    if name in ASKED:
        response = elicit(ASKED[name])
        said = json.dumps(response.get("content"), sort_keys=True)
        return {"content": [{"type": "text", "text": f"{name}: {response.get('action')} {said}"}]}
    return {"content": [{"type": "text", "text": f"echo: {arguments.get('text', '')}"}]}


BOOKING = {"mode": "form", "message": "Where and when?", "requestedSchema": {
    "type": "object",
    "properties": {
        "name": {"type": "string", "title": "Your name", "minLength": 1},
        "guests": {"type": "integer", "minimum": 1, "maximum": 12},
        "outside": {"type": "boolean", "title": "Outside", "default": False},
        "time": {"type": "string", "oneOf": [{"const": "19", "title": "7 pm"},
                                              {"const": "21", "title": "9 pm"}]},
    },
    "required": ["name", "time"]}}
ASKED = {
    "book": BOOKING,
    "signin": {"mode": "url", "message": "Sign in to go on",
               "url": "https://auth.example.com/connect?state=xyz", "elicitationId": "e-1"},
    "secret": {"mode": "form", "message": "Your key", "requestedSchema": {
        "type": "object", "properties": {"api_token": {"type": "string"}}}},
}


def elicit(params):
    """Asks the client mid-call and waits for its answer."""
    send({"jsonrpc": "2.0", "id": "asked-1", "method": "elicitation/create", "params": params})
    for line in sys.stdin.buffer:
        message = json.loads(line)
        if message.get("id") == "asked-1" and "method" not in message:
            return message.get("result") or {"action": "error", "content": message.get("error")}
    return {"action": "input ended"}


def note(event, what=None):
    with open(ARG, "a") as f:
        f.write(f"{event} {os.getpid() if what is None else what}\n")


def main():
    if MODE == "counted":
        note("start")
    if MODE == "env":
        with open(ARG, "w") as f:
            json.dump(dict(os.environ), f)
        for key, value in os.environ.items():
            sys.stderr.write(f"{key}={value}\n")
        sys.stderr.flush()
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        method = request.get("method")
        if MODE == "hang" and method == "notifications/cancelled":
            note("cancelled", (request.get("params") or {}).get("requestId"))
        if "id" not in request or MODE == "never-init":
            continue
        if MODE == "deaf-discover":
            note(method, "-")
            if method == "server/discover":
                continue
        if MODE == "modern":
            meta = (request.get("params") or {}).get("_meta") or {}
            note(method, meta.get("io.modelcontextprotocol/protocolVersion"))
        if MODE == "modern" and method == "server/discover":
            answer(request, {
                "resultType": "complete", "supportedVersions": ["2026-07-28"],
                "capabilities": {"tools": {}}, "ttlMs": 0, "cacheScope": "private",
                "serverInfo": {"name": "modern", "version": "1"},
                "instructions": "Call ask before confirm.",
            })
        elif MODE == "modern" and method == "initialize":
            send({"jsonrpc": "2.0", "id": request["id"],
                  "error": {"code": -32600, "message": "this server speaks only 2026-07-28"}})
        elif method == "initialize":
            version = (request.get("params") or {}).get("protocolVersion", "2025-06-18")
            answer(request, {
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": {"name": "hostile", "version": "1"},
            })
            if MODE == "flood":
                for _ in range(5000):
                    send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        elif method == "tools/list":
            page = tools_page(request)
            if page is not None:
                answer(request, page)
        elif method == "tools/call" and MODE == "hang" and request["params"]["name"] == "hang":
            note("called", request["id"])
        elif method == "tools/call":
            answer(request, call(request))
        elif method == "ping":
            answer(request, {})
        else:
            send({"jsonrpc": "2.0", "id": request["id"],
                  "error": {"code": -32601, "message": "method not found"}})
    if MODE == "counted":
        note("end")


main()
