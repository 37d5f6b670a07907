"""A minimal in-memory HTTP client for ASGI apps: one request, one response, cookies kept
(the consoles' fast tests; no socket, no httpx)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from urllib.parse import urlencode

from starlette.types import ASGIApp, Message


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str

    @property
    def csrf(self) -> str:
        m = re.search(r'name="csrf" value="([^"]+)"', self.body)
        assert m, self.body
        return m.group(1)


@dataclass
class Client:
    app: ASGIApp
    host: str = "127.0.0.1:8080"
    #: the client's address as the server sees it
    address: str = "127.0.0.1"
    cookies: dict[str, str] = field(default_factory=dict)

    async def request(
        self, method: str, path: str, form: dict[str, str] | None = None, host: str | None = None
    ) -> Reply:
        body = urlencode(form or {}).encode()
        path, _, query = path.partition("?")
        headers = [(b"host", (host or self.host).encode())]
        if self.cookies:
            cookie = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            headers.append((b"cookie", cookie.encode()))
        if form is not None:
            headers.append((b"content-type", b"application/x-www-form-urlencoded"))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": headers,
            "client": (self.address, 50000),
            "server": ("127.0.0.1", 8080),
        }
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        status = 0
        out_headers: dict[str, str] = {}
        chunks: list[bytes] = []

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                for k, v in message["headers"]:
                    name, value = k.decode().lower(), v.decode()
                    if name == "set-cookie":
                        jar: SimpleCookie = SimpleCookie()
                        jar.load(value)
                        for key, morsel in jar.items():
                            self.cookies[key] = morsel.value
                    out_headers[name] = value
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        return Reply(status, out_headers, b"".join(chunks).decode())

    async def get(self, path: str, host: str | None = None) -> Reply:
        return await self.request("GET", path, host=host)

    async def post(self, path: str, form: dict[str, str]) -> Reply:
        return await self.request("POST", path, form)

    async def sign_in(self, password: str) -> Reply:
        page = await self.get("/login")
        return await self.post("/login", {"csrf": page.csrf, "password": password})
