"""Where the Kubernetes API server is and how to log in: a kubeconfig file (JSON, or YAML
with PyYAML imported only then) or the in-cluster service account."""

from __future__ import annotations

import base64
import binascii
import json
import os

from .files import FileProblem, read_regular
from .kubeapi import KubeError

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


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
            token = _read_text(self.token_file, self.source)
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
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
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
    """A credentials file: a regular file (never a FIFO that would block), UTF-8."""
    where = "" if file == named_in else f" (named in {named_in})"
    try:
        return read_regular(file, "the file").decode("utf-8")
    except FileProblem as e:
        raise KubeError(f"{e}{where}") from None
    except UnicodeDecodeError:
        raise KubeError(f"{file} is not UTF-8 text") from None

