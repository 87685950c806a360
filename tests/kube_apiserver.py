"""A small Kubernetes API server for tests: real HTTPS on 127.0.0.1, bearer tokens, real REST paths.

It serves GET on the namespaced object paths the plugin reads (pods, replicasets, deployments,
daemonsets, batch and volcano jobs, the VNI service's vnis and vniclaims) with the JSON shapes
of the real API, including `Status` objects for errors. Certificates come from the `openssl`
command line: a CA, a server certificate for 127.0.0.1/localhost and a client certificate.
Tests can add objects, slow it down, make it fail with 5xx, forbid resources and stop it.
"""

from __future__ import annotations

import hmac
import http.server
import json
import re
import socket
import ssl
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

CLIENT_CERT_USER = "cxi-cni-client"

# (group/version as in the URL, plural) -> kind, for every resource this server knows.
RESOURCES = {
    ("v1", "pods"): "Pod",
    ("v1", "namespaces"): "Namespace",
    ("apps/v1", "replicasets"): "ReplicaSet",
    ("apps/v1", "deployments"): "Deployment",
    ("apps/v1", "daemonsets"): "DaemonSet",
    ("batch/v1", "jobs"): "Job",
    ("batch.volcano.sh/v1alpha1", "jobs"): "Job",
    ("horizon-opencube.eu/v1", "vnis"): "Vni",
    ("horizon-opencube.eu/v1", "vniclaims"): "VniClaim",
}
PLURALS = {(gv, kind): plural for (gv, plural), kind in RESOURCES.items()}
OBJECT_PATH = re.compile(r"^/(?:api/(v1)|apis/([^/]+/[^/]+))/namespaces/([^/]+)/([^/]+)/([^/]+)$")
SSAR_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
NAMESPACE_PATH = re.compile(r"^/api/(v1)/(namespaces)/([^/]+)$")  # the one cluster-scoped kind


TOKEN = "sa-token-0123456789abcdef"  # the bearer token the test servers accept


@dataclass
class Pki:
    """PEM files made by `openssl`: a CA, a server certificate it signed, a client certificate it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @property
    def ca_pem(self) -> str:
        return self.ca_cert.read_text()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed P-256 CA certificate and key in `directory`, valid for a day."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _issue(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, csr, ext = (directory / f"{name}.{s}" for s in ("crt", "key", "csr", "ext"))
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
    )  # fmt: skip
    ext.write_text(extensions + "\nauthorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
        "-days", "1", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory, "kube-ca")
    server = _issue(
        directory,
        "kube-apiserver",
        ca,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost",
    )
    client = _issue(
        directory,
        CLIENT_CERT_USER,
        ca,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth",
    )
    return Pki(ca[0], server[0], server[1], client[0], client[1])


def new_object(api_version: str, kind: str, namespace: str, name: str, owner: dict | None = None, **fields) -> dict:
    """An object as the API returns it; `owner` (another such object) becomes its controller reference."""
    metadata = {
        "name": name,
        "namespace": namespace,
        "uid": str(uuid.uuid4()),
        "resourceVersion": "1",
        "creationTimestamp": "2026-01-01T00:00:00Z",
    }
    if owner is not None:
        metadata["ownerReferences"] = [
            {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": metadata,
        **_typical_body(api_version, kind, name),
        **fields,
    }


def _typical_body(api_version: str, kind: str, name: str) -> dict:
    """The spec (and status) the real API returns for such an object, so typed clients can decode it."""
    pod_spec = {"containers": [{"name": "main", "image": "busybox:1.36"}], "restartPolicy": "Always"}
    template = {"metadata": {"labels": {"app": name}}, "spec": pod_spec}
    selector = {"matchLabels": {"app": name}}
    if kind == "Pod":
        return {"spec": {**pod_spec, "nodeName": "node-1"}, "status": {"phase": "Pending"}}
    if kind in ("ReplicaSet", "Deployment"):
        status = {"observedGeneration": 1, "replicas": 1, "readyReplicas": 1, "availableReplicas": 1}
        return {"spec": {"replicas": 1, "selector": selector, "template": template}, "status": status}
    if kind == "DaemonSet":
        status = {"currentNumberScheduled": 1, "desiredNumberScheduled": 1, "numberMisscheduled": 0, "numberReady": 1}
        return {"spec": {"selector": selector, "template": template}, "status": status}
    job_template = {**template, "spec": {**pod_spec, "restartPolicy": "Never"}}
    if (api_version, kind) == ("batch/v1", "Job"):
        return {"spec": {"template": job_template}, "status": {}}
    if kind == "Job":  # volcano
        return {"spec": {"tasks": [{"name": "worker", "replicas": 1, "template": job_template}]}, "status": {}}
    return {}


def vni_object(owner: dict, vni) -> dict:
    """The Vni the VNI service makes for `owner`: `vni-<owner uid>` in the owner's namespace,
    owned by it (metacontroller sets the controller reference of its attachments)."""
    meta = owner["metadata"]
    return new_object("horizon-opencube.eu/v1", "Vni", meta["namespace"], f"vni-{meta['uid']}", owner=owner,
                      spec={"vni": vni})


def pod_args(pod: dict, uid: str | None = None) -> str:
    """CNI_ARGS as containerd passes them for `pod` (K8S_POD_UID: the pod's, or `uid`)."""
    meta = pod["metadata"]
    out = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={meta['namespace']};K8S_POD_NAME={meta['name']}"
    return out + f";K8S_POD_UID={uid or meta['uid']}" if uid is not None else out


def status_object(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    """A `Status` like the API server's error bodies."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message}
    body.update({"reason": reason, "code": code})
    if details is not None:
        body["details"] = details
    return body


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TlsServer

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._reply(None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._reply(json.loads(self.rfile.read(length) or b"null"))

    def _reply(self, posted) -> None:
        api = self.server.api
        api.requests.append(self.path if posted is None else f"POST {self.path}")
        if api.delay and api.stopping.wait(api.delay):
            return
        authorization, cert = self.headers.get("Authorization", ""), self.connection.getpeercert()
        if posted is None:
            code, body = api.answer(self.path, authorization, cert)
        else:
            code, body = api.review(self.path, posted, authorization, cert)
        payload = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if api.close_connections:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(payload)


class _TlsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    api: KubeApiServer

    def finish_request(self, request, client_address) -> None:
        # The handshake runs here, in the connection's own thread, so one bad client blocks no one.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Go's net/http does
        request.settimeout(30)  # a client that stalls mid-request frees its thread eventually
        try:
            tls = self.api.tls_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        self.api.connections.add(tls)
        self.api.connections_accepted += 1
        try:
            super().finish_request(tls, client_address)
        except (ssl.SSLError, OSError):
            pass
        finally:
            self.api.connections.discard(tls)
            tls.close()


class KubeApiServer:
    """The server and its controls. Use as a context manager or call start() and stop()."""

    def __init__(self, pki: Pki, token: str):
        self.token = token
        self.objects: dict[str, dict] = {}
        self.requests: list[str] = []
        self.delay = 0.0  # seconds to wait before answering each request
        self.fail_status: int | None = None  # answer every request with this 5xx
        self.forbidden: set[str] = set()  # plurals the caller's ClusterRole lacks
        self.close_connections = False  # answer with Connection: close
        self.stopping = threading.Event()
        self.connections: set[ssl.SSLSocket] = set()
        self.connections_accepted = 0  # TLS handshakes that succeeded
        self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls_context.load_cert_chain(pki.server_cert, pki.server_key)
        self.tls_context.load_verify_locations(cafile=pki.ca_cert)
        self.tls_context.verify_mode = ssl.CERT_OPTIONAL  # client certificates are one way to log in
        self._httpd: _TlsServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> KubeApiServer:
        self._httpd = _TlsServer(("127.0.0.1", 0), _Handler)
        self._httpd.api = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="kube-apiserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection: afterwards the port refuses connections."""
        self.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None
        for conn in list(self.connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def add(self, *objects: dict) -> None:
        for obj in objects:
            self.objects[path_of(obj)] = obj

    def remove(self, obj: dict) -> None:
        self.objects.pop(path_of(obj), None)

    def answer(self, path: str, authorization: str, peer_cert: dict | None) -> tuple[int, dict]:
        if not self._authenticated(authorization, peer_cert):
            return 401, status_object(401, "Unauthorized", "Unauthorized")
        if self.fail_status is not None:
            return self.fail_status, status_object(self.fail_status, "InternalError", "etcdserver: request timed out")
        if path == "/version":
            return 200, {"major": "1", "minor": "30", "gitVersion": "v1.30.2-test"}
        match = OBJECT_PATH.match(path)
        if match is not None and (match[1] or match[2], match[4]) in RESOURCES:
            group_version, namespace, plural, name = match[1] or match[2], match[3], match[4], match[5]
        elif (match := NAMESPACE_PATH.match(path)) is not None:
            group_version, namespace, plural, name = match[1], "", match[2], match[3]
        else:
            return 404, status_object(404, "NotFound", "the server could not find the requested resource", {})
        group = group_version.rpartition("/")[0]
        details = {"name": name, "kind": plural} | ({"group": group} if group else {})
        if plural in self.forbidden:
            message = (
                f'{plural}{"." + group if group else ""} "{name}" is forbidden: User '
                f'"system:serviceaccount:kube-system:cxi-cni" cannot get resource "{plural}" '
                f'in API group "{group}" in the namespace "{namespace}"'
            )
            return 403, status_object(403, "Forbidden", message, details)
        obj = self.objects.get(path)
        if obj is None:
            resource = f"{plural}.{group}" if group else plural
            return 404, status_object(404, "NotFound", f'{resource} "{name}" not found', details)
        return 200, obj

    def review(self, path: str, review, authorization: str, peer_cert: dict | None) -> tuple[int, dict]:
        """POST of a SelfSubjectAccessReview: allowed unless the resource is forbidden."""
        if not self._authenticated(authorization, peer_cert):
            return 401, status_object(401, "Unauthorized", "Unauthorized")
        if path != SSAR_PATH or not isinstance(review, dict):
            return 404, status_object(404, "NotFound", "the server could not find the requested resource", {})
        attributes = (review.get("spec") or {}).get("resourceAttributes") or {}
        allowed = attributes.get("verb") == "get" and attributes.get("resource") not in self.forbidden
        reason = "" if allowed else f'RBAC: no rule grants get on {attributes.get("resource")}'
        return 201, {**review, "status": {"allowed": allowed, **({"reason": reason} if reason else {})}}

    def _authenticated(self, authorization: str, peer_cert: dict | None) -> bool:
        scheme, _, token = authorization.partition(" ")
        if scheme == "Bearer" and hmac.compare_digest(token.encode(), self.token.encode()):
            return True
        subject = dict(item[0] for item in (peer_cert or {}).get("subject", ()))
        return subject.get("commonName") == CLIENT_CERT_USER


def path_of(obj: dict) -> str:
    """Where the API serves `obj`: namespaced objects under their namespace, Namespaces at the top."""
    meta = obj["metadata"]
    if obj["kind"] == "Namespace":
        return f"/api/v1/namespaces/{meta['name']}"
    return object_path(obj["apiVersion"], meta["namespace"], PLURALS[(obj["apiVersion"], obj["kind"])], meta["name"])


def namespace_object(name: str, annotations: dict | None = None) -> dict:
    """A Namespace as the API returns it, with the cluster admin's annotations."""
    obj = new_object("v1", "Namespace", "", name, spec={"finalizers": ["kubernetes"]})
    del obj["metadata"]["namespace"]
    obj["metadata"]["annotations"] = dict(annotations or {})
    return obj


def object_path(group_version: str, namespace: str, plural: str, name: str) -> str:
    prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}/{name}"


def write_kubeconfig(
    path: Path,
    server: str,
    ca_pem: str | None = None,
    token: str | None = None,
    token_file: str | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    as_json: bool = False,
) -> Path:
    """A kubeconfig with one cluster, user and context (YAML, or JSON when `as_json`)."""
    import base64

    import yaml

    def b64(data: str | bytes) -> str:
        return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()

    cluster = {"server": server}
    if ca_pem is not None:
        cluster["certificate-authority-data"] = b64(ca_pem)
    user: dict = {}
    if token is not None:
        user["token"] = token
    if token_file is not None:
        user["tokenFile"] = token_file
    if client_cert is not None:
        user["client-certificate-data"] = b64(client_cert.read_bytes())
        user["client-key-data"] = b64(client_key.read_bytes())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": "cxi-cni", "user": user}],
        "contexts": [{"name": "cxi-cni@test", "context": {"cluster": "test", "user": "cxi-cni"}}],
        "current-context": "cxi-cni@test",
    }
    path.write_text(json.dumps(config, indent=2) if as_json else yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
