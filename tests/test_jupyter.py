"""JupyterLab's server with the project's kernel: start, execute a notebook over the REST/kernel API, shut down."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nbformat
import websocket

from mm_research.core import project_root

ROOT = project_root(Path(__file__).parent)
TOKEN = uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base, path, method="GET", body=None):
    req = urllib.request.Request(f"{base}{path}", method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        data = r.read()
        return json.loads(data) if data else None


def execute(ws, code: str, timeout: float = 120) -> dict:
    "Send one execute_request on the kernel channels; return the reply content and the outputs seen."
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({"header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test",
                                   "session": uuid.uuid4().hex, "version": "5.3"},
                        "parent_header": {}, "metadata": {}, "channel": "shell",
                        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                                    "allow_stdin": False, "stop_on_error": True}}))
    outputs, reply, idle, deadline = [], None, False, time.time() + timeout
    while time.time() < deadline and not (reply and idle):  # shell and iopub are not ordered: wait for both
        m = json.loads(ws.recv())
        if m.get("parent_header", {}).get("msg_id") != msg_id: continue
        if m["msg_type"] in ("stream", "execute_result", "error"): outputs.append(m["content"])
        if m["channel"] == "shell" and m["msg_type"] == "execute_reply": reply = m["content"]
        if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle": idle = True
    if not (reply and idle): raise TimeoutError(code[:80])
    return {"reply": reply, "outputs": outputs}


def test_jupyter_server_runs_a_notebook_with_the_project_kernel(tmp_path):
    port = free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"), "MMR_RUNS": str(tmp_path / "runs")}
    server = subprocess.Popen([sys.executable, "-m", "jupyter", "server", "--no-browser", f"--port={port}",
                               "--ip=127.0.0.1", "--allow-root", f"--IdentityProvider.token={TOKEN}",
                               f"--ServerApp.root_dir={ROOT / 'nbs'}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                api(base, "/api/status")
                break
            except OSError: time.sleep(0.5)
        specs = api(base, "/api/kernelspecs")
        assert "python3" in specs["kernelspecs"]
        session = api(base, "/api/sessions", "POST", {"path": "00_core.ipynb", "type": "notebook",
                                                     "name": "00_core.ipynb", "kernel": {"name": "python3"}})
        kid = session["kernel"]["id"]
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/api/kernels/{kid}/channels?token={TOKEN}", timeout=120)
        exe = execute(ws, "import sys; print(sys.executable)")
        assert exe["reply"]["status"] == "ok"
        assert Path(exe["outputs"][0]["text"].strip()).resolve().is_relative_to(Path(sys.prefix).resolve()) or \
            exe["outputs"][0]["text"].strip() == sys.executable  # the .venv's python runs the notebooks
        nb = nbformat.read(ROOT / "nbs" / "00_core.ipynb", as_version=4)
        ran = 0
        for cell in nb.cells:
            if cell.cell_type != "code" or "nbdev_export()" in cell.source: continue
            res = execute(ws, cell.source)
            assert res["reply"]["status"] == "ok", (cell.source[:200], res["outputs"])
            ran += 1
        assert ran >= 10
        ws.close()
        api(base, f"/api/sessions/{session['id']}", "DELETE")
        assert api(base, "/api/kernels") == []
        api(base, "/api/shutdown", "POST")
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
