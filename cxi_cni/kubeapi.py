"""A small HTTPS client of the Kubernetes API: GETs of JSON objects (and the POSTs of the
doctor's access reviews) over one kept-alive TLS connection, every connect and read of every
request within one deadline.

Only the standard library is used, and http.client and ssl are imported when a request
runs, so importing this module costs next to nothing in the per-attachment binary. The
bearer token never appears in an exception."""

from __future__ import annotations

import json
import os
import socket
import time
from urllib.parse import quote, urlsplit


class KubeError(Exception):
    """The API server or the kubeconfig says no; retrying will not help until someone fixes it."""


class KubeUnavailable(Exception):
    """The API server could not be reached or answered 5xx/429 in time; the runtime should retry."""


class ApiClient:
    """Requests to the API server, JSON both ways, over one kept-alive TLS connection, all
    within one deadline."""

    def __init__(self, access, deadline: float):
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
        return self.call("GET", path)

    def post(self, path: str, obj: dict) -> dict | None:
        """POST `obj` as JSON (a review the server answers in its status)."""
        return self.call("POST", path, json.dumps(obj).encode())

    def call(self, method: str, path: str, payload: bytes | None = None) -> dict | None:
        """The JSON object answered to `method` on `path`, or None on 404. Raises KubeError
        or KubeUnavailable."""
        import http.client
        import ssl

        try:
            status, body = self._request(method, path, payload)
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
        if status in (200, 201):
            return self._decode(body, f"{method} {path}")
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
                f"the API server forbids {method} {path} (403: {message}): "
                "grant it in the ClusterRole of deploy/rbac.yaml"
            )
        if status == 429 or status >= 500:
            raise KubeUnavailable(f"the API server at {self.access.server} answered {status} for "
                                  f"{method} {path}: {message}")
        raise KubeError(f"the API server answered {status} for {method} {path}: {message}")

    def _request(self, method: str, path: str, payload: bytes | None = None) -> tuple[int, bytes]:
        target = self.base_path + quote(path)
        headers = {**self.headers, "Content-Type": "application/json"} if payload is not None else self.headers
        while True:
            reused = self.conn is not None
            if not reused:
                self.conn = self._open()
            try:
                sock = self.conn.sock  # kept: http.client drops it from conn when the server says close
                sock.settimeout(self._remaining(f"{method} {path}"))
                self.conn.request(method, target, body=payload, headers=headers)
                response = self.conn.getresponse()
                body = self._read_body(response, sock, f"{method} {path}")
                if response.will_close:
                    self.close()
                return response.status, body
            except (ConnectionResetError, BrokenPipeError):
                self.close()
                if not reused:  # a kept-alive connection the server dropped gets one fresh retry
                    raise

    def _open(self):
        import http.client

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

    def _read_body(self, response, sock, request: str) -> bytes:
        chunks = []
        while True:
            sock.settimeout(self._remaining(request))
            chunk = response.read1(65536)
            if not chunk:
                response.close()  # the whole body is read: the connection is free for the next request
                return b"".join(chunks)
            chunks.append(chunk)

    @staticmethod
    def _decode(body: bytes, request: str) -> dict:
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            raise KubeError(f"{request} returned something other than JSON") from None
        if not isinstance(obj, dict):
            raise KubeError(f"{request} returned JSON that is not an object")
        return obj

    @staticmethod
    def _status_message(body: bytes) -> str:
        try:
            return str(json.loads(body).get("message") or "no message")[:300]
        except (ValueError, AttributeError, RecursionError):
            return body[:200].decode("utf-8", "replace").strip() or "no message"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
