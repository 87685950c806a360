"""Find a pod's VNI in the Kubernetes API: walk its owners and read the VNI service's Vni objects.

The VNI service gives each owner (Job, ReplicaSet, Deployment, DaemonSet, volcano Job) a
namespaced object `vni-<owner uid>` (horizon-opencube.eu/v1, plural vnis) whose `spec.vni`
is the owner's VNI. `pod_vnis` reads the pod, then tries its owners nearest first.

Only the standard library is used (http.client and ssl, imported when a lookup runs), so
importing this module costs next to nothing in the per-attachment binary. A kubeconfig
written as JSON (what the installer in deploy/ writes) is read without any YAML parser; a
YAML one needs PyYAML, imported only then. The bearer token never appears in an exception.
"""

from __future__ import annotations

import os
import time

VNI_GROUP_PATH = "/apis/horizon-opencube.eu/v1"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_OWNER_DEPTH = 8

# Owners whose object we may read to continue the walk: (apiVersion, kind) -> plural.
WALKABLE_OWNERS = {
    ("apps/v1", "ReplicaSet"): "replicasets",
    ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "DaemonSet"): "daemonsets",
    ("batch/v1", "Job"): "jobs",
    ("batch.volcano.sh/v1alpha1", "Job"): "jobs",
}


class KubeError(Exception):
    """The API server or the kubeconfig says no; retrying will not help until someone fixes it."""


class KubeUnavailable(Exception):
    """The API server could not be reached or answered 5xx/429 in time; the runtime should retry."""


def pod_vnis(kubeconfig: str | None, namespace: str, pod: str, timeout: float = 5.0) -> list[int] | None:
    """VNIs of the nearest owner of `namespace/pod` that has a Vni object, or None if none has.

    `kubeconfig` is a kubeconfig file path; None means in-cluster credentials. `timeout` bounds
    the whole lookup (every connect and read of every request), in seconds.
    """
    api = ApiClient(load_access(kubeconfig), deadline=time.monotonic() + timeout)
    try:
        found = api.get(f"/api/v1/namespaces/{namespace}/pods/{pod}")
        if found is None:
            raise KubeError(f"pod {namespace}/{pod} was not found in the API server at {api.access.server}")
        return _nearest_owner_vnis(api, namespace, found)
    finally:
        api.close()


def _nearest_owner_vnis(api: ApiClient, namespace: str, obj: dict) -> list[int] | None:
    seen: set[str] = set()
    for _ in range(MAX_OWNER_DEPTH):
        owner = _controller_ref(obj)
        if owner is None or owner.get("uid") in seen:
            return None
        uid = str(owner.get("uid", ""))
        seen.add(uid)
        vni_object = api.get(f"{VNI_GROUP_PATH}/namespaces/{namespace}/vnis/vni-{uid}")
        if vni_object is not None:
            return _vnis_of(vni_object, f"{namespace}/vni-{uid}")
        plural = WALKABLE_OWNERS.get((owner.get("apiVersion"), owner.get("kind")))
        if plural is None:
            return None
        obj = api.get(f"{_api_prefix(owner['apiVersion'])}/namespaces/{namespace}/{plural}/{owner.get('name')}")
        if obj is None:  # the owner is gone (being deleted): nothing further up to ask
            return None
    return None


def _controller_ref(obj: dict) -> dict | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    for ref in refs:
        if ref.get("controller"):
            return ref
    return refs[0] if refs else None


def _api_prefix(api_version: str) -> str:
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


def _vnis_of(vni_object: dict, name: str) -> list[int]:
    value = (vni_object.get("spec") or {}).get("vni")
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise KubeError(f"Vni {name} has spec.vni = {value!r}; expected an integer or a list of integers")
    return list(values)


class Access:
    """Where the API server is and how to authenticate: parsed from a kubeconfig or in-cluster files."""

    def __init__(self, server: str, source: str):
        self.server = server.rstrip("/")
        self.source = source  # the file to name in error messages
        self.ca_pem: str | None = None
        self.tls_server_name: str | None = None
        self.token: str | None = None
        self.token_file: str | None = None
        self.client_cert_pem: bytes | None = None
        self.client_key_pem: bytes | None = None

    def bearer_token(self) -> str | None:
        token = self.token
        if self.token_file:
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    token = f.read()
            except OSError as e:
                raise KubeError(
                    f"cannot read the token file {self.token_file} named in {self.source}: {e.strerror}"
                ) from None
        if token is None:
            return None
        token = token.strip()
        if not token or any(c in token for c in "\r\n\0"):
            raise KubeError(f"the token in {self.source} is empty or spans several lines")
        return token


def load_access(kubeconfig: str | None) -> Access:
    """Access from the kubeconfig file, or from the pod's service account when `kubeconfig` is None."""
    return _from_kubeconfig(kubeconfig) if kubeconfig else _in_cluster()


def _in_cluster() -> Access:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeError(
            "no kubeconfig configured and not running in a pod (KUBERNETES_SERVICE_HOST/PORT unset): "
            "set `kubeconfig` in the network config"
        )
    if ":" in host:
        host = f"[{host}]"
    access = Access(f"https://{host}:{port}", SERVICE_ACCOUNT_DIR)
    access.token_file = os.path.join(SERVICE_ACCOUNT_DIR, "token")
    access.ca_pem = _read_text(os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt"), SERVICE_ACCOUNT_DIR)
    return access


def _from_kubeconfig(path: str) -> Access:
    doc = _parse_kubeconfig(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    context_name = doc.get("current-context")
    context = _named(doc, "contexts", context_name, path) if context_name else _only(doc, "contexts", path)
    cluster = _named(doc, "clusters", context.get("cluster"), path)
    user_name = context.get("user")
    user = _named(doc, "users", user_name, path) if user_name else {}
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith("https://"):
        raise KubeError(f"kubeconfig {path}: clusters[].cluster.server must be an https:// URL")
    if cluster.get("insecure-skip-tls-verify"):
        raise KubeError(f"kubeconfig {path}: insecure-skip-tls-verify is refused; give certificate-authority-data")
    access = Access(server, path)
    access.tls_server_name = cluster.get("tls-server-name")
    access.ca_pem = _pem_from(cluster, "certificate-authority", base_dir, path)
    access.client_cert_pem = _pem_from(user, "client-certificate", base_dir, path, as_bytes=True)
    access.client_key_pem = _pem_from(user, "client-key", base_dir, path, as_bytes=True)
    if (access.client_cert_pem is None) != (access.client_key_pem is None):
        raise KubeError(f"kubeconfig {path}: users[].user needs both client-certificate and client-key, or neither")
    for unsupported in ("exec", "auth-provider", "username", "password"):
        if unsupported in user:
            raise KubeError(f"kubeconfig {path}: users[].user.{unsupported} is not supported; use token or tokenFile")
    if user.get("token") is not None:
        access.token = str(user["token"])
    elif user.get("tokenFile"):
        access.token_file = os.path.join(base_dir, str(user["tokenFile"]))
    if access.token is None and access.token_file is None and access.client_cert_pem is None:
        raise KubeError(f"kubeconfig {path}: users[].user has no token, tokenFile or client certificate")
    return access


def _parse_kubeconfig(path: str) -> dict:
    text = _read_text(path, path)
    import json

    try:
        doc = json.loads(text)
    except ValueError:
        doc = _parse_yaml(text, path)
    if not isinstance(doc, dict):
        raise KubeError(f"kubeconfig {path} is not a mapping (apiVersion, clusters, contexts, users)")
    return doc


def _parse_yaml(text: str, path: str):
    try:
        import yaml
    except ImportError:
        raise KubeError(f"kubeconfig {path} is not JSON and PyYAML is not available to read YAML") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        # The parser's message quotes the offending line, which may hold the token: give the position only.
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise KubeError(f"kubeconfig {path} is neither valid JSON nor valid YAML{where}") from None


def _named(doc: dict, section: str, name, path: str) -> dict:
    singular = section[:-1]
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(singular)
            if not isinstance(body, dict):
                raise KubeError(f"kubeconfig {path}: {section}[name={name}].{singular} is missing")
            return body
    raise KubeError(f"kubeconfig {path}: {section} has no entry named {name!r}")


def _only(doc: dict, section: str, path: str) -> dict:
    entries = doc.get(section) or []
    if len(entries) != 1:
        raise KubeError(f"kubeconfig {path}: current-context is not set and {section} has {len(entries)} entries")
    return _named(doc, section, entries[0].get("name"), path)


def _pem_from(section: dict, key: str, base_dir: str, path: str, as_bytes: bool = False):
    import base64
    import binascii

    data = section.get(f"{key}-data")
    if data:
        try:
            raw = base64.b64decode(str(data), validate=True)
        except (binascii.Error, ValueError):
            raise KubeError(f"kubeconfig {path}: {key}-data is not valid base64") from None
        return raw if as_bytes else raw.decode("ascii", "replace")
    if section.get(key):
        file = os.path.join(base_dir, str(section[key]))
        text = _read_text(file, path)
        return text.encode() if as_bytes else text
    return None


def _read_text(file: str, named_in: str) -> str:
    try:
        with open(file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        where = "" if file == named_in else f" (named in {named_in})"
        raise KubeError(f"cannot read {file}{where}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise KubeError(f"{file} is not UTF-8 text") from None


class ApiClient:
    """GETs JSON from the API server over one kept-alive TLS connection, all within one deadline."""

    def __init__(self, access: Access, deadline: float):
        from urllib.parse import urlsplit

        self.access, self.deadline = access, deadline
        url = urlsplit(access.server)
        try:
            self.host, self.port = url.hostname or "", url.port or 443
        except ValueError:
            raise KubeError(f"{access.source}: the server URL has an invalid port") from None
        self.base_path = url.path.rstrip("/")
        self.context = self._tls_context()
        self.headers = {"Accept": "application/json", "User-Agent": "cxi-cni"}
        token = access.bearer_token()
        if token is not None:
            self.headers["Authorization"] = f"Bearer {token}"
        self.conn = None

    def _tls_context(self):
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
        if self.access.ca_pem is None:
            ctx.load_default_certs()
        else:
            try:
                ctx.load_verify_locations(cadata=self.access.ca_pem)
            except (ssl.SSLError, ValueError):
                raise KubeError(
                    f"{self.access.source}: the certificate authority is not a valid PEM certificate"
                ) from None
        if self.access.client_cert_pem is not None:
            self._load_client_cert(ctx)
        return ctx

    def _load_client_cert(self, ctx) -> None:
        import ssl

        # load_cert_chain wants file names: memory-only files keep the key off every disk.
        fds = [os.memfd_create("kube-client-cert"), os.memfd_create("kube-client-key")]
        try:
            for fd, pem in zip(fds, (self.access.client_cert_pem, self.access.client_key_pem), strict=True):
                os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        except (ssl.SSLError, OSError):
            raise KubeError(
                f"kubeconfig {self.access.source}: client-certificate/client-key do not load as a PEM pair"
            ) from None
        finally:
            for fd in fds:
                os.close(fd)

    def _remaining(self, what: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise KubeUnavailable(f"the API server at {self.access.server} did not answer in time ({what})")
        return left

    def get(self, path: str) -> dict | None:
        """The object at `path`, or None on 404. Raises KubeError or KubeUnavailable."""
        import http.client
        import ssl

        try:
            status, body = self._request(path)
        except ssl.SSLCertVerificationError as e:
            raise KubeError(
                f"TLS verification of {self.access.server} failed ({e.verify_message}): "
                f"check the certificate authority in {self.access.source}"
            ) from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            self.close()
            raise KubeUnavailable(f"the API server at {self.access.server} closed the TLS connection") from None
        except ssl.SSLError as e:
            raise KubeError(
                f"TLS with {self.access.server} failed ({e.reason}): is it the API server's HTTPS port?"
            ) from None
        except (OSError, http.client.HTTPException) as e:  # refused, reset, unreachable, timed out, garbled
            self.close()
            reason = "timed out" if isinstance(e, TimeoutError) else (getattr(e, "strerror", None) or type(e).__name__)
            raise KubeUnavailable(f"cannot reach the API server at {self.access.server}: {reason}") from None
        if status == 200:
            return self._decode(body, path)
        if status == 404:
            return None
        message = self._status_message(body)
        if status == 401:
            raise KubeError(
                f"the API server refused the kubeconfig's credentials (401: {message}): "
                f"check the token or client certificate in {self.access.source}"
            )
        if status == 403:
            raise KubeError(
                f"the API server forbids GET {path} (403: {message}): grant it in the ClusterRole of deploy/rbac.yaml"
            )
        if status == 429 or status >= 500:
            raise KubeUnavailable(f"the API server at {self.access.server} answered {status} for GET {path}: {message}")
        raise KubeError(f"the API server answered {status} for GET {path}: {message}")

    def _request(self, path: str) -> tuple[int, bytes]:
        from urllib.parse import quote

        target = self.base_path + quote(path)
        while True:
            reused = self.conn is not None
            if not reused:
                self.conn = self._open()
            try:
                sock = self.conn.sock  # kept: http.client drops it from conn when the server says close
                sock.settimeout(self._remaining(f"GET {path}"))
                self.conn.request("GET", target, headers=self.headers)
                response = self.conn.getresponse()
                body = self._read_body(response, sock, path)
                if response.will_close:
                    self.close()
                return response.status, body
            except (ConnectionResetError, BrokenPipeError):
                self.close()
                if not reused:  # a kept-alive connection the server dropped gets one fresh retry
                    raise

    def _open(self):
        import http.client
        import socket

        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context)
        sock = socket.create_connection((self.host, self.port), timeout=self._remaining("connect"))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small requests: do not wait for ACKs
            sock.settimeout(self._remaining("TLS handshake"))
            conn.sock = self.context.wrap_socket(sock, server_hostname=self.access.tls_server_name or self.host)
        except BaseException:
            sock.close()
            raise
        return conn

    def _read_body(self, response, sock, path: str) -> bytes:
        chunks = []
        while True:
            sock.settimeout(self._remaining(f"GET {path}"))
            chunk = response.read1(65536)
            if not chunk:
                response.close()  # the whole body is read: the connection is free for the next request
                return b"".join(chunks)
            chunks.append(chunk)

    @staticmethod
    def _decode(body: bytes, path: str) -> dict:
        import json

        try:
            obj = json.loads(body)
        except ValueError:
            raise KubeError(f"GET {path} returned something other than JSON") from None
        if not isinstance(obj, dict):
            raise KubeError(f"GET {path} returned JSON that is not an object")
        return obj

    @staticmethod
    def _status_message(body: bytes) -> str:
        import json

        try:
            return str(json.loads(body).get("message") or "no message")[:300]
        except (ValueError, AttributeError):
            return body[:200].decode("utf-8", "replace").strip() or "no message"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
