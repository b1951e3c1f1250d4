"""A real MCP client (the official Python SDK) driving `repo mcp` for the e2e tests.

Usage: mcp_client.py SCRIPT.json -- REPO_BINARY ARGS...        (stdio)
       mcp_client.py SCRIPT.json --http URL TOKEN              (streamable HTTP)

SCRIPT is a list of steps, run in order in one session:
  {"list": true}                              tools/list: names, descriptions, schemas
  {"call": TOOL, "args": {...}}               one tool call
  {"call": TOOL, "args": {...}, "until": {"key": "run.status", "in": [...]}}
                                              repeated (0.5 s apart, 10 minutes at most)
                                              until the result's key is one of the values
Argument values "$name" are replaced by what an earlier step saved:
  "save": {"name": "key.path"}                saves a key of the step's result
  {"run": [PROGRAM, ARG...]}                  a program run meanwhile (with "$name"
                                              arguments): its exit code and output

Prints one JSON object: {"transcript": [{"step", "is_error", "result"}...], "tools": [...]}.
The environment (REPO_REPOSITORY, REPO_PASSWORD, ...) is passed on to the server.
"""

import asyncio
import json
import os
import subprocess
import sys
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamablehttp_client


def dig(value, path):
    for part in path.split("."):
        if isinstance(value, list):
            value = value[int(part)]
        elif isinstance(value, dict):
            value = value.get(part)
        else:
            return None
    return value


def fill(args, saved):
    if isinstance(args, str) and args.startswith("$"):
        return saved[args[1:]]
    if isinstance(args, dict):
        return {k: fill(v, saved) for k, v in args.items()}
    if isinstance(args, list):
        return [fill(v, saved) for v in args]
    return args


async def call(session, tool, args):
    r = await session.call_tool(tool, args)
    text = "".join(c.text for c in r.content if getattr(c, "type", "") == "text")
    try:
        result = json.loads(text)
    except ValueError:
        result = text
    return bool(r.isError), result


def transport():
    if sys.argv[2] == "--http":
        url, token = sys.argv[3], sys.argv[4]
        return streamablehttp_client(url, headers={"Authorization": f"Bearer {token}"})
    server = sys.argv[sys.argv.index("--") + 1:]
    params = StdioServerParameters(command=server[0], args=server[1:], env=dict(os.environ))
    return stdio_client(params)


async def main():
    script = json.load(open(sys.argv[1]))
    transcript, tools, saved = [], [], {}
    async with transport() as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            await session.initialize()
            for step in script:
                if step.get("list"):
                    listed = await session.list_tools()
                    tools = [
                        {
                            "name": t.name,
                            "description": t.description,
                            "inputSchema": t.inputSchema,
                            "annotations": t.annotations.model_dump(exclude_none=True)
                            if t.annotations
                            else None,
                        }
                        for t in listed.tools
                    ]
                    transcript.append({"step": "tools/list", "result": [t["name"] for t in tools]})
                    continue
                if "run" in step:
                    argv = fill(step["run"], saved)
                    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
                    transcript.append({"step": "run", "argv": argv[0], "code": p.returncode,
                                       "stdout": p.stdout, "stderr": p.stderr})
                    continue
                args = fill(step.get("args", {}), saved)
                until = step.get("until")
                deadline = time.time() + 600
                while True:
                    is_error, result = await call(session, step["call"], args)
                    if not until or is_error or dig(result, until["key"]) in until["in"]:
                        break
                    if time.time() > deadline:
                        raise SystemExit(f"{step['call']}: {until} never held: {result}")
                    await asyncio.sleep(0.5)
                for name, path in step.get("save", {}).items():
                    saved[name] = dig(result, path)
                transcript.append(
                    {"step": step["call"], "args": args, "is_error": is_error, "result": result}
                )
    print(json.dumps({"transcript": transcript, "tools": tools}, indent=1))


asyncio.run(main())
