"""common/lazyimport.py: what the agent and the shim import on the way to serving but never
run stays unrun, and still works when something does use it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from common import lazyimport

ROOT = Path(__file__).resolve().parents[2]

#: Prints, per deferred module: absent, deferred (registered, not run), run, or before (run
#: before the probe's first line: the venv's site hooks import some; a frozen program has none).
REPORT = """
from common import lazyimport
for name in sorted(lazyimport.DEFERRED):
    mod = sys.modules.get(name)
    state = ("before" if name in BEFORE else "absent" if mod is None
             else "deferred" if lazyimport.is_deferred(mod) else "run")
    print(name, state)
"""

#: The agent's entry point (its main replaced), the modules it serves with, one message.
AGENT = """
import runpy
import agent.main as m
m.main = lambda: 0
try:
    runpy.run_module("agent", run_name="__main__")
except SystemExit:
    pass
import asyncio, agent.init, agent.channel, agent.service, agent.container
from protocols import agent_pb2
req = agent_pb2.CreateContainerRequest(container_id="c1", exec_id="c1")
assert agent_pb2.CreateContainerRequest.FromString(req.SerializeToString()) == req
assert 'container_id: "c1"' in str(req)
""" + REPORT

#: A shim process: run as containerd-shim-kata-v2, it imports its package (which installs
#: the finder) and the daemon, then publishes an event's text.
SHIM = """
import sys
sys.argv = ["/usr/local/bin/containerd-shim-kata-v2", "-v"]
import shim.main, shim.daemon
from shim import events
from protocols import events_pb2
ev = events_pb2.TaskExit(container_id="c1", id="c1", pid=7)
ev.exited_at.seconds = 5
print("brief", events._brief(ev))
""" + REPORT


def _run(code: str) -> list[str]:
    probe = "import sys\nBEFORE = set(sys.modules)\n" + code
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_agents_start_up_leaves_protobufs_python_implementation_unrun() -> None:
    lines = _run(AGENT)
    assert "google.protobuf.internal.python_message deferred" in lines, lines
    assert not [line for line in lines if line.endswith(" run")], lines


def test_a_shim_process_leaves_them_unrun_and_still_writes_an_events_text() -> None:
    lines = _run(SHIM)
    assert "google.protobuf.internal.python_message deferred" in lines, lines
    assert not [line for line in lines if line.endswith(" run")], lines
    # What text_format's one-line form writes, from the message's own str().
    assert 'brief container_id: "c1" id: "c1" pid: 7 exited_at { seconds: 5 }' in lines, lines


def test_another_program_importing_the_shim_defers_nothing() -> None:
    lines = _run("import shim.main, shim.daemon\n" + REPORT)
    assert "google.protobuf.internal.python_message run" in lines, lines


def test_a_deferred_module_runs_on_first_use() -> None:
    lines = _run("from common import lazyimport\nlazyimport.install()\nimport textwrap\n"
                 "print(lazyimport.is_deferred(textwrap))\n"
                 "print(textwrap.dedent('  a\\n  b'))\n"
                 "print(lazyimport.is_deferred(textwrap))\n")
    assert lines == ["True", "a", "b", "False"], lines


def test_the_finder_answers_only_for_its_names() -> None:
    assert lazyimport.DeferredFinder.find_spec("json") is None
    assert lazyimport.DeferredFinder.find_spec("textwrap", ["/nonexistent"]) is None
    spec = lazyimport.DeferredFinder.find_spec("textwrap")
    assert spec is not None and type(spec.loader).__name__ == "LazyLoader"


def test_python_implementation_of_protobuf_still_works_deferred() -> None:
    """With protobuf's pure-Python implementation the deferred module is used: it runs."""
    code = ("import os\nos.environ['PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION'] = 'python'\n"
            "from common import lazyimport\nlazyimport.install()\n"
            "from protocols import agent_pb2\n"
            "req = agent_pb2.CreateContainerRequest(container_id='c1')\n"
            "print(agent_pb2.CreateContainerRequest.FromString(req.SerializeToString())"
            ".container_id)\n" + REPORT)
    lines = _run(code)
    assert "c1" in lines and "google.protobuf.internal.python_message run" in lines, lines
